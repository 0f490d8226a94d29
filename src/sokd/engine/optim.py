"""Optimizer and learning-rate schedule from the config, over the method's param groups."""
from __future__ import annotations

import math

import torch

from ..config import OptimSpec, ScheduleSpec
from ..errors import SokdError
from .dot import DOT


def kernel_options(impl: str, device: torch.device) -> dict:
    """torch.optim keyword arguments for `optim.impl` on `device`.

    auto: fused on CUDA (one kernel for every parameter instead of a few per tensor); on a CPU,
    PyTorch's default per-tensor loop, so CPU runs keep the numerics of earlier results (the
    fused CPU kernel is ~7x faster on wrn_40_1's 115 tensors, 0.56 vs 3.8 ms a step, about 1% of
    a bf16 SOKD step there: docs/training-step.md).
    """
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "loop"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[impl]


def check_optimizer(spec: OptimSpec, precision: str, world_size: int = 1) -> None:
    """SokdError for an optimizer setting this run cannot use."""
    if spec.name != "dot":
        return
    if spec.momentum - spec.dot_delta < 0 or spec.momentum + spec.dot_delta >= 1:
        raise SokdError(f"optim.name=dot needs 0 <= optim.momentum - optim.dot_delta and optim.momentum + "
                        f"optim.dot_delta < 1 (got {spec.momentum:g} and {spec.dot_delta:g}); lower optim.dot_delta")
    if spec.nesterov:
        raise SokdError("optim.name=dot has no Nesterov variant; set optim.nesterov=false")
    if precision == "fp16":
        raise SokdError("optim.name=dot takes the task and distillation gradients apart, which fp16's loss "
                        "scaling does not; use train.precision=bf16 or fp32")
    if world_size > 1:
        raise SokdError("optim.name=dot runs two backward passes per step, which data-parallel training "
                        "does not synchronise; train it on one process (or use optim.name=sgd)")


def build_optimizer(method, spec: OptimSpec, device: torch.device | None = None) -> torch.optim.Optimizer:
    groups = method.param_groups(spec.lr, spec.lr_per_role)
    if device is None:
        device = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
    if spec.name == "dot":
        return DOT(groups, lr=spec.lr, momentum=spec.momentum, delta=spec.dot_delta, weight_decay=spec.weight_decay)
    kernels = kernel_options(spec.impl, device)
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                               weight_decay=spec.weight_decay, **kernels)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay, **kernels)


def lr_factor(spec: ScheduleSpec, epochs: int, epoch: float) -> float:
    """Multiplier of the base lr at (fractional) epoch `epoch` (0-based)."""
    if spec.warmup_epochs and epoch < spec.warmup_epochs:
        return (epoch + 1) / (spec.warmup_epochs + 1)
    if spec.name == "multistep":
        return spec.gamma ** sum(1 for m in spec.milestones if epoch >= m)
    if spec.name == "cosine":
        span = max(1, epochs - spec.warmup_epochs)
        t = min(1.0, (epoch - spec.warmup_epochs) / span)
        return spec.min_lr_factor + (1 - spec.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def build_scheduler(optimizer, spec: ScheduleSpec, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per epoch; its state (last_epoch, base lrs) goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(spec, epochs, e))


def rebase_lr(optimizer, scheduler, wanted: list[float]) -> str:
    """After loading a resumed run's optimizer and schedule, move each group's base lr to the
    configured one (`optim.lr` / `optim.lr_per_role` may change on resume); the schedule's
    position is kept. Returns a description of what changed ('' when nothing did)."""
    changes = []
    for i, (group, base) in enumerate(zip(optimizer.param_groups, wanted)):
        old = scheduler.base_lrs[i]
        if old == base:
            continue
        factor = scheduler.lr_lambdas[i](scheduler.last_epoch)
        scheduler.base_lrs[i] = base
        group["initial_lr"] = base
        group["lr"] = base * factor
        changes.append(f"{group.get('role', i)} {old:g} -> {base:g}")
    if changes:
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return ", ".join(changes)
