"""Distillation methods by name. `create(name, teacher=..., student=..., **options)` -> Method."""
from __future__ import annotations

from typing import Callable

from ..errors import SokdError, unknown
from ..validation import validate
from . import losses
from .base import Method, MethodOptions
from .dml import DML
from .kbm import KnowledgeBridge, build_kbm, teacher_branch
from .kd import KD
from .kd_dml import KDDML
from .sokd import SOKD, SOKDOptions
from .vanilla import Vanilla

_REGISTRY: dict[str, type[Method]] = {
    "vanilla": Vanilla, "kd": KD, "dml": DML, "kd_dml": KDDML, "sokd": SOKD,
}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Decorator adding a Method subclass under `name`."""
    def deco(cls):
        _REGISTRY[name] = cls
        return cls
    return deco


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def options_model(name: str):
    if name not in _REGISTRY:
        raise unknown("method", name, _REGISTRY)
    return _REGISTRY[name].Options


def create(name: str, *, input_shape=(3, 32, 32), **kwargs) -> Method:
    """Build method `name` from networks (teacher=, student=, model=, peers=) and options.

    Options (T, weights, features, kbm_stages, ...) are validated; unknown ones raise SokdError.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise unknown("method", name, _REGISTRY)
    net_keys = {"teacher", "student", "model", "peers", "peer"}
    nets = {k: v for k, v in kwargs.items() if k in net_keys}
    for role, net in nets.items():
        if net is not None and role not in cls.accepts:
            raise SokdError(f"method '{name}' does not use a {role} network; remove `{role}` from the "
                            f"config or pick a method that uses it")
    opts = validate(cls.Options, {k: v for k, v in kwargs.items() if k not in net_keys}, prefix="method.")
    return cls(options=opts, input_shape=tuple(input_shape), **nets)


__all__ = ["create", "register", "list_methods", "options_model", "Method", "MethodOptions", "losses",
           "build_kbm", "teacher_branch", "KnowledgeBridge", "SOKD", "SOKDOptions", "KD", "DML",
           "KDDML", "Vanilla"]
