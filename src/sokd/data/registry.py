"""User data sets: `@sokd.data.register("name")` puts a reader beside the built-in ones.

A reader is called as `fn(root=data.root, **data.options)` and returns both splits, in any of
these forms (see `sokd.data.plugin`): a mapping or tuple with `train` and `test`, each a pair
(uint8 images (N,H,W[,C]) or (N,C,H,W), integer labels) or a torch `Dataset` of (image, label)
with PIL images, uint8 tensors (C,H,W) or uint8 arrays (H,W[,C]); optionally `classes` (names).
The result goes through the same checks as the built-in readers, then the in-memory fast path.
List the module that registers it under `imports:` in a config.
"""
from __future__ import annotations

from typing import Any, Callable

from ..errors import SokdError

Reader = Callable[..., Any]
_READERS: dict[str, Reader] = {}


def register(name: str, *, overwrite: bool = False) -> Callable[[Reader], Reader]:
    """Decorator adding a data set reader under `name` (usable as `data.name=<name>`)."""
    from .config import DATASETS

    if not isinstance(name, str) or not name.strip():
        raise SokdError(f"data set name must be a non-empty string, got {name!r}")
    if name in DATASETS:
        raise SokdError(f"data set '{name}' is built in; register yours under another name")

    def decorator(fn: Reader) -> Reader:
        if not callable(fn):
            raise SokdError(f"sokd.data.register('{name}') must decorate a callable, got {type(fn).__name__}")
        if name in _READERS and not overwrite and _READERS[name] is not fn:
            raise SokdError(f"data set '{name}' is already registered; pick another name or pass overwrite=True")
        _READERS[name] = fn
        return fn

    return decorator


def registered() -> list[str]:
    return sorted(_READERS)


def reader(name: str) -> Reader:
    if name not in _READERS:
        raise SokdError(f"data set '{name}' is not registered; list the module that registers it under imports:")
    return _READERS[name]
