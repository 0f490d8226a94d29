"""ReviewKD (Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021) as the
module feature kind "reviewkd".

Knowledge review: each target stage is learnt from the student's stage at the same level *and*
every deeper one. The levels are every stage and, deepest, the embedding each classifier reads as
a 1 x 1 map (the released code's four levels for a 3-stage network: its pooled feature, shape 1,
then the stages). A chain of attention-based fusion (ABF) blocks runs over the paired student
stages from the deepest to the shallowest; level k's output is compared with its target stage by
the hierarchical context loss (HCL). The ABF blocks exist only for training: the student keeps
its own architecture, and the blocks learn with it (FeatureTerms' param group).

ABF at level k (student map s_k with C_k channels, H_k x W_k; the target map t_k has D_k channels):
    x_k = BN(conv1x1(s_k))                                        mid channels M
    deepest level:  f_k = x_k
    otherwise:      r = nearest_upsample(f_{k+1}, H_k x W_k)
                    [a, b] = sigmoid(conv1x1([x_k, r]))           two 1-channel attention maps
                    f_k = a * x_k + b * r
    y_k = BN(conv3x3(nearest_resize(f_k, size of t_k)))           D_k channels, t_k's size
f_k (resized to t_k's size, as in the reference implementation) is what level k-1 fuses.

HCL at level k, with MSE the mean squared error over all elements and P_l adaptive average
pooling to l x l, for the pooling levels l_1, l_2, ... (default 4, 2, 1) that shrink the map
(a level with l >= H and l >= W adds nothing and is skipped, as in the official code):
    HCL_k = (MSE(y_k, t_k) + sum_i 2^-i MSE(P_{l_i} y_k, P_{l_i} t_k)) / (1 + sum_i 2^-i)
the i-th *used* level weighing 2^-i; the term is sum_k HCL_k. Targets are detached, so the term
never trains the teacher side (in SOKD, the KBM learns from its own terms only).

Defaults follow the official CIFAR-100 code (github.com/dvlab-research/ReviewKD, CIFAR-100/):
mid channels min(512, channels of the deepest paired student stage), pooling levels [4, 2, 1],
loss weight 5.0 (its scripts for WRN-40-2 -> WRN-16-2 / WRN-40-1 and resnet32x4 -> resnet8x4;
mdistiller's configs/cifar100/reviewkd.yaml sets the same 5.0 over its global default of 1.0),
CE weight 1 and a linear warm-up of the ReviewKD weight over the first 20 of 240 epochs. The
warm-up is `method.warmup_epochs` here, which ramps every non-CE term (the KD term too);
the official recipe has no KD term.

One difference remains: the released code reads the teacher's stage maps before their last ReLU
(`preact=True`). sokd's stage outputs are the blocks' outputs, which on a pre-activation network
(the WideResNets) are the same maps and on a post-activation one (the CIFAR ResNets) come after
that ReLU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ...errors import SokdError
from .terms import EMBEDDING, TermContext, _Kind, register_kind


class ReviewKDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    mid_channels: int | None = Field(
        None, ge=1, description="channels of the fused maps (default: min(512, deepest paired "
        "student stage's channels), as in the official code)")
    pool_levels: list[int] = Field(
        default_factory=lambda: [4, 2, 1],
        description="HCL's pooled sizes l (l x l average pooling), weights 1/2, 1/4, ... in this order")

    @field_validator("pool_levels")
    @classmethod
    def _positive(cls, levels: list[int]) -> list[int]:
        if any(lv < 1 for lv in levels):
            raise ValueError(f"every pooling level must be >= 1, got {levels}")
        return levels


def hcl_level(student: torch.Tensor, target: torch.Tensor, pool_levels=(4, 2, 1)) -> torch.Tensor:
    """Hierarchical context loss of one level: full-resolution MSE plus MSEs of l x l average-pooled
    maps, the i-th used pooling level weighted 2^-i, all divided by the sum of the weights.

    A pooling level that would not shrink the map (l >= H and l >= W) is skipped, so a map smaller
    than every level is compared at full resolution only.
    """
    h, w = student.shape[-2:]
    loss = F.mse_loss(student, target)
    weight, total = 1.0, 1.0
    for lv in pool_levels:
        if lv >= h and lv >= w:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, lv),
                                          F.adaptive_avg_pool2d(target, lv))
        total += weight
    return loss / total


class ABF(nn.Module):
    """Attention-based fusion of one student level with the fused map of the deeper levels.

    `fuse=False` for the deepest level, which has nothing deeper to fuse.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                    nn.BatchNorm2d(mid_channels))
        self.attention = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid())
                          if fuse else None)
        self.out = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(out_channels))
        # the official code's initialisation of both convolutions (uniform Kaiming, a=1)
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.out[0].weight, a=1)

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None, out_size) -> tuple[torch.Tensor, torch.Tensor]:
        """(output at `out_size` with the target's channels, fused map for the next level)."""
        x = self.reduce(x)
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            att = self.attention(torch.cat([x, deeper], dim=1))
            x = x * att[:, 0:1] + deeper * att[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.out(x), x


class ReviewKDTerm(nn.Module):
    """The ReviewKD term over (student stage, target stage) pairs: ABF chain + HCL.

    The chain runs over the pairs in order of student stage, deepest first, whatever order the
    config lists them in; each student stage may appear once.
    """

    def __init__(self, pairs: list[tuple[int, int]], student_channels: list[int],
                 target_channels: list[int], mid_channels: int | None = None, pool_levels=(4, 2, 1)):
        super().__init__()
        students = [i for i, _ in pairs]
        if len(set(students)) != len(students):
            raise SokdError(f"feature term 'reviewkd' lists a student stage twice ({students}); its "
                            f"fusion chain takes each stage once; fix method.features[reviewkd].stages")
        self.pairs = sorted(pairs, key=lambda p: p[0], reverse=True)  # deepest student stage first
        mid = mid_channels or min(512, student_channels[self.pairs[0][0]])
        self.mid_channels = mid
        self.pool_levels = tuple(pool_levels)
        self.abfs = nn.ModuleList(
            ABF(student_channels[i], mid, target_channels[j], fuse=k > 0)
            for k, (i, j) in enumerate(self.pairs))

    def fused(self, student_feats: list[torch.Tensor], target_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ABF outputs, one per pair, in the chain's (deepest-first) order."""
        outs, deeper = [], None
        for abf, (i, j) in zip(self.abfs, self.pairs):
            y, deeper = abf(as_map(student_feats[i]), deeper, as_map(target_feats[j]).shape[-2:])
            outs.append(y)
        return outs

    def forward(self, student_feats: list[torch.Tensor], target_feats: list[torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        total = 0.0
        for y, (_, j) in zip(self.fused(student_feats, target_feats), self.pairs):
            # fp32 loss under autocast: squared differences of bf16/fp16 maps lose precision
            total = total + hcl_level(y.float(), as_map(target_feats[j]).detach().float(), self.pool_levels)
        return total


def as_map(feat: torch.Tensor) -> torch.Tensor:
    """An embedding (B x C) as the 1 x 1 map the fusion chain takes; maps as they are."""
    return feat[:, :, None, None] if feat.dim() == 2 else feat


def _build(pairs, options: ReviewKDOptions, ctx: TermContext) -> ReviewKDTerm:
    return ReviewKDTerm(pairs, ctx.channels("student"), ctx.channels("target"),
                        options.mid_channels, options.pool_levels)


register_kind("reviewkd", _Kind(
    5.0, "ReviewKD official CIFAR-100 scripts (github.com/dvlab-research/ReviewKD: weight 5 for "
    "WRN-40-2 -> WRN-16-2/WRN-40-1, also mdistiller's cifar100 config; both warm it up over 20 "
    "epochs: method.warmup_epochs)",
    build=_build, options=ReviewKDOptions, embedding=True,
    default_stages=lambda n: list(range(n)) + [EMBEDDING]))
