"""Methods by name, and what each declares about itself, for the layers above.

Each method class is registered with `@register("name")`, which also sets its `name`. The runner,
the demo and the tooling ask these functions what a method needs (which networks a config must
give, whether its teacher must come trained) instead of keeping lists of method names.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..errors import unknown

if TYPE_CHECKING:
    from .base import Method

_REGISTRY: dict[str, type["Method"]] = {}


def register(name: str) -> Callable[[type["Method"]], type["Method"]]:
    """Decorator adding a Method subclass under `name` (and naming the class `name`)."""
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def get(name: str) -> type["Method"]:
    """The Method class registered as `name`; SokdError listing the valid names otherwise."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise unknown("method", name, _REGISTRY)
    return cls


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def options_model(name: str):
    return get(name).Options


def needs_trained_teacher(name: str) -> bool:
    """Whether method `name` distils from a teacher that must come trained."""
    return get(name).needs_trained_teacher


def config_roles(name: str) -> tuple[str, ...]:
    """The network sections ("model", "teacher", "student", "peers") a config gives method `name`."""
    return get(name).config_roles


def with_features() -> list[str]:
    """Names of the methods that take feature terms (method.features)."""
    return [n for n in list_methods() if _REGISTRY[n].accepts_features]
