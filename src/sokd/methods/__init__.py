"""Distillation methods by name. `create(name, teacher=..., student=..., **options)` -> Method.

`get(name)` is the registered class; `needs_trained_teacher(name)` and `config_roles(name)` answer
what a run of that method needs, from what the class declares.
"""
from __future__ import annotations

from torch import nn

from ..errors import SokdError
from ..validation import validate
from . import losses
from . import features  # noqa: F401  (registers every built-in feature kind)
from .base import UNDECLARED, Method, MethodOptions, Role
from .deit import DeiT, DeiTOptions
from .dml import DML
from .kbm import KnowledgeBridge, build_kbm, teacher_branch
from .kd import KD
from .kd_dml import KDDML
from .kdcl import KDCL, KDCLOptions
from .one import ONE, ONEOptions
from .registry import _REGISTRY, config_roles, get, list_methods, needs_trained_teacher, options_model, register, \
    with_features
from .shake import SHAKE, SHAKEOptions
from .sokd import SOKD, SOKDOptions
from .vanilla import Vanilla


def _is_network(value) -> bool:
    """A network, or a non-empty list of them (a role with `many`), as opposed to an option."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(isinstance(v, nn.Module) for v in value)
    return isinstance(value, nn.Module)


def role(method: str, name: str) -> Role:
    """The declaration of role `name` of method `method`; a method this process does not know (a
    plugin not imported) gives the undeclared default."""
    cls = _REGISTRY.get(method)
    return cls.role(name) if cls is not None else UNDECLARED


def create(name: str, *, input_shape=(3, 32, 32), num_samples: int | None = None, **kwargs) -> Method:
    """Build method `name` from networks (teacher=, student=, model=, peers=) and options.

    Options (T, weights, features, kbm_stages, ...) are validated; unknown ones raise SokdError.
    `num_samples` (the training-set size) reaches the constructor of every method that accepts
    feature terms, whose terms may keep per-sample state (CRD's memory banks).
    """
    cls = get(name)
    nets = {k: v for k, v in kwargs.items() if k in cls.accepts or _is_network(v)}
    for role, net in nets.items():
        if net is not None and role not in cls.accepts:
            raise SokdError(f"method '{name}' does not use a {role} network; remove `{role}` from the "
                            f"config or pick a method that uses it")
    opts = validate(cls.Options, {k: v for k, v in kwargs.items() if k not in nets}, prefix="method.")
    extra = {"num_samples": num_samples} if cls.accepts_features else {}
    return cls(options=opts, input_shape=tuple(input_shape), **nets, **extra)


__all__ = ["create", "register", "get", "list_methods", "options_model", "needs_trained_teacher",
           "config_roles", "role", "with_features", "Method", "MethodOptions", "Role", "losses", "build_kbm",
           "teacher_branch", "KnowledgeBridge", "SOKD", "SOKDOptions", "KD", "DML", "KDDML", "Vanilla",
           "ONE", "ONEOptions", "KDCL", "KDCLOptions", "SHAKE", "SHAKEOptions", "DeiT", "DeiTOptions"]
