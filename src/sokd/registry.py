"""One behaviour for every registry users can add to by name (models, methods, feature kinds, data
sets): a name registered twice is refused in one line unless the caller says `overwrite=True`,
so a plugin can never silently replace a built-in or another plugin's entry."""
from __future__ import annotations

from typing import Any

from .errors import SokdError, unknown


class Registry(dict):
    """name -> entry for one `kind` of thing ("model", "method", "feature kind", "data set")."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, name: str, entry: Any, overwrite: bool = False) -> Any:
        """Register `entry` as `name`; the same entry again is a no-op (a module imported twice)."""
        if not isinstance(name, str) or not name.strip():
            raise SokdError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self and self[name] is not entry and not overwrite:
            raise SokdError(f"{self.kind} '{name}' is already registered; pick another name or pass "
                            f"overwrite=True")
        self[name] = entry
        return entry

    def find(self, name: str) -> Any:
        """The entry registered as `name`; SokdError listing the valid names otherwise."""
        if name not in self:
            raise unknown(self.kind, name, self)
        return self[name]
