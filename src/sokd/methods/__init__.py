"""Distillation methods by name. `create(name, teacher=..., student=..., **options)` -> Method.

`get(name)` is the registered class; `needs_trained_teacher(name)` and `config_roles(name)` answer
what a run of that method needs, from what the class declares.
"""
from __future__ import annotations

from ..errors import SokdError
from ..validation import validate
from . import crd  # noqa: F401  (registers the "crd" feature kind)
from . import losses
from .base import Method, MethodOptions
from .dml import DML
from .kbm import KnowledgeBridge, build_kbm, teacher_branch
from .kd import KD
from .kd_dml import KDDML
from .kdcl import KDCL, KDCLOptions
from .one import ONE, ONEOptions
from . import reviewkd  # noqa: F401  (registers the "reviewkd" feature kind)
from .registry import config_roles, get, list_methods, needs_trained_teacher, options_model, register, with_features
from .sokd import SOKD, SOKDOptions
from .vanilla import Vanilla


def create(name: str, *, input_shape=(3, 32, 32), num_samples: int | None = None, **kwargs) -> Method:
    """Build method `name` from networks (teacher=, student=, model=, peers=) and options.

    Options (T, weights, features, kbm_stages, ...) are validated; unknown ones raise SokdError.
    `num_samples` (the training-set size) reaches the constructor of every method that accepts
    feature terms, whose terms may keep per-sample state (CRD's memory banks).
    """
    cls = get(name)
    net_keys = {"teacher", "student", "model", "peers", "peer"}
    nets = {k: v for k, v in kwargs.items() if k in net_keys}
    for role, net in nets.items():
        if net is not None and role not in cls.accepts:
            raise SokdError(f"method '{name}' does not use a {role} network; remove `{role}` from the "
                            f"config or pick a method that uses it")
    opts = validate(cls.Options, {k: v for k, v in kwargs.items() if k not in net_keys}, prefix="method.")
    extra = {"num_samples": num_samples} if cls.accepts_features else {}
    return cls(options=opts, input_shape=tuple(input_shape), **nets, **extra)


__all__ = ["create", "register", "get", "list_methods", "options_model", "needs_trained_teacher",
           "config_roles", "with_features", "Method", "MethodOptions", "losses", "build_kbm",
           "teacher_branch", "KnowledgeBridge", "SOKD", "SOKDOptions", "KD", "DML", "KDDML", "Vanilla",
           "ONE", "ONEOptions", "KDCL", "KDCLOptions"]
