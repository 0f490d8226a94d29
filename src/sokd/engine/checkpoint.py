"""Tensor health before a checkpoint is written or scored: NaN or infinite weights are refused.

Writing, loading and strict state loading are the ground floor's (`sokd.files`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import artifacts
from ..errors import SokdError


def non_finite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of `state` holding NaN or infinity (one host sync)."""
    named = [(k, v) for k, v in state.items()
             if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())]
    if not named:
        return []
    ok = torch.stack([torch.isfinite(v).all() for _, v in named]).cpu().tolist()
    return [k for (k, _), good in zip(named, ok) if not good]


def check_finite(state: dict, path: str | os.PathLike) -> None:
    """SokdError when weights or buffers of `state` are NaN or infinite: they score and export
    as if they were a model, so they are refused before either."""
    bad = non_finite_tensors(state)
    if bad:
        earlier = "an older backup" if Path(path).name == artifacts.BEST else "best.pt"
        raise SokdError(f"checkpoint '{path}' holds non-finite weights ({len(bad)} tensor"
                        f"{'s' if len(bad) != 1 else ''}, e.g. {bad[0]}); use an earlier checkpoint "
                        f"such as {earlier}")
