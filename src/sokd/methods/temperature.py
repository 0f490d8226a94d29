"""Curriculum Temperature KD (Li et al., AAAI 2023): a temperature that learns against the student.

One learnable scalar θ (starting at 1) gives the temperature of every distillation term of a method:

    T = t_start + t_range · sigmoid(θ)          (t_start 1, t_range 20: T in (1, 21), T₀ ≈ 15.6)

θ is optimised with the student, by the same optimizer and schedule, but its gradient passes a
gradient-reversal layer scaled by λ: the student descends the distillation loss while the
temperature ascends it, so the task the student faces gets harder as it learns. λ follows a
cosine curriculum over the first `curriculum_epochs` epochs (epoch n = 1, 2, ...):

    λ_n = lambda_max · (1 − cos(π · min(n, L) / L)) / 2        (0 → lambda_max over L epochs)

Defaults are the released code's CIFAR-100 setting (t_start 1, t_end 20, cosine decay from 0 to
-1 over 10 loops; ImageNet uses 5); the released code applies weight decay to θ as well, and so
does this one (θ is in the optimizer like any parameter). The temperature is not detached: its
gradient comes through both softened distributions and the T² factor.
"""
from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class CTKDOptions(BaseModel):
    """The curriculum temperature's range and curriculum (defaults: the CTKD code's CIFAR-100 run)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    t_start: float = Field(1.0, gt=0, description="lowest temperature")
    t_range: float = Field(20.0, gt=0, description="the temperature spans (t_start, t_start + t_range)")
    lambda_max: float = Field(1.0, ge=0, description="strength of the reversed gradient once the curriculum ends")
    curriculum_epochs: int = Field(10, ge=1, description="epochs over which the reversal rises from 0 to lambda_max")


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by -strength backward."""

    @staticmethod
    def forward(ctx, x, strength):
        ctx.save_for_backward(strength)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (strength,) = ctx.saved_tensors
        return -strength * grad, None


class CurriculumTemperature(nn.Module):
    """The learnable temperature: call it for the current T (a 0-d tensor, in fp32)."""

    def __init__(self, options: CTKDOptions):
        super().__init__()
        self.options = options
        self.theta = nn.Parameter(torch.ones(()))
        # set from the epoch by `set_epoch`; a tensor, so a compiled step reads it as an input
        self.register_buffer("strength", torch.zeros(()), persistent=False)

    def set_epoch(self, epoch: float) -> None:
        """Epochs done so far (0 while the first trains): the curriculum's λ for the next one."""
        o = self.options
        n = min(float(epoch) + 1.0, o.curriculum_epochs)
        self.strength.fill_(o.lambda_max * (1.0 - math.cos(math.pi * n / o.curriculum_epochs)) / 2.0)

    def forward(self) -> torch.Tensor:
        o = self.options
        theta = _ReverseGradient.apply(self.theta.float(), self.strength)
        return o.t_start + o.t_range * torch.sigmoid(theta)
