"""Methods by name, and what each declares about itself, for the layers above.

Each method class is registered with `@register("name")`, which also sets its `name`. The runner,
the demo and the tooling ask these functions what a method needs (which networks a config must
give, whether its teacher must come trained) instead of keeping lists of method names.
"""
from __future__ import annotations

from typing import Callable

from ..registry import Registry

#: name -> Method subclass
_REGISTRY = Registry("method")


def register(name: str, *, overwrite: bool = False) -> Callable[[type], type]:
    """Decorator adding a Method subclass under `name` (and naming the class `name`); a name
    registered twice is refused unless `overwrite=True`."""
    def deco(cls):
        _REGISTRY.add(name, cls, overwrite)
        cls.name = name
        return cls
    return deco


def get(name: str) -> type:
    """The Method class registered as `name`; SokdError listing the valid names otherwise."""
    return _REGISTRY.find(name)


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def options_model(name: str):
    return get(name).Options


def needs_trained_teacher(name: str) -> bool:
    """Whether method `name` distils from a teacher that must come trained."""
    return get(name).needs_trained_teacher


def config_roles(name: str) -> tuple[str, ...]:
    """The network sections a config gives method `name` (its roles with `config=True`)."""
    return get(name).config_roles


def with_features() -> list[str]:
    """Names of the methods that take feature terms (method.features)."""
    return [n for n in list_methods() if _REGISTRY[n].accepts_features]
