"""OFA-KD's stage branches (Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous
Architectures in Knowledge Distillation", NeurIPS 2023) as the module feature kind "ofa".

Features of different architectures (a ViT teacher's tokens, a CNN student's maps) live in
different spaces, so OFA-KD compares them in the one space they share: the logits. Each chosen
student stage gets a trainable branch to the logits, and every branch learns from the target's
final logits with OFA's loss (`losses.ofa`: a soft-target cross-entropy whose label class is
enhanced by the exponent eps):

    loss = Σ over stages  ofa(branch_i(stage_i of the student), target logits, y; eps, T)

Branch of stage i of n (as the released code's CNN branches): n − 1 − i separable-conv blocks,
each halving the map (depthwise 3x3 stride 2, 1x1, BN, ReLU, depthwise 3x3, 1x1, BN, ReLU) and
doubling the channels, the last one to W = max(student width, target width) at the logits'
input; the last stage a 1x1 conv to W; then global average pooling and a linear classifier.
Convolutions: Kaiming normal (fan out); linear: truncated normal (std 0.02), bias 0.

Deviations: a transformer student's token stages go through the same convolutional branches, as
patch maps (`stage_map`); the released code gives them patch-merging and transformer blocks. The
released recipe also puts OFA's loss on the final logits (its `kd_loss`): here that is the method's
logit distance, `method.logit_loss: ofa`. Defaults: every stage, eps 1, T 1, weight 1
(the released code's `--ofa-stage 1 2 3 4`, `--ofa-eps 1`, `--ofa-temperature 1`; ImageNet CNN
students: eps 1.5).
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ...errors import SokdError
from ...models.staged import dry_forward, final_linear
from .. import losses
from .terms import TermContext, _Kind, register_kind


class OFAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    eps: float = Field(1.0, gt=0, description="exponent enhancing the label class (ImageNet CNN students: 1.5)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both sides (no T² factor)")


def _sep_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False), nn.Conv2d(cin, cin, 1, bias=False),
        nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
        nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def branch(channels: int, blocks: int, width: int, num_classes: int) -> nn.Sequential:
    """A stage's map -> logits: `blocks` separable convs (channels doubling, the last to `width`),
    or a 1x1 conv to `width` when `blocks` is 0; pooling; a linear classifier."""
    layers: list[nn.Module] = []
    if blocks == 0:
        layers.append(nn.Conv2d(channels, width, 1))
    c = channels
    for k in range(blocks):
        out = width if k == blocks - 1 else 2 * c
        layers.append(_sep_conv(c, out))
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width, num_classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return net


class OFATerm(nn.Module):
    def __init__(self, stages: list[int], branches: list[nn.Module], options: OFAOptions):
        super().__init__()
        self.stages = stages
        self.branches = nn.ModuleList(branches)
        self.eps, self.temperature = options.eps, options.temperature

    def forward(self, student_feats: list, target_feats: list, batch: dict) -> torch.Tensor:
        target = batch.get("target_logits")
        if target is None:
            raise SokdError("the ofa feature term needs the target's logits; the method must pass "
                            "target_logits= to its feature terms")
        total = 0.0
        for stage, head in zip(self.stages, self.branches):
            total = total + losses.ofa(target, head(student_feats[stage]), batch["labels"], self.eps,
                                       self.temperature)
        return total


def _width(net, stage_channels: list[int]) -> int:
    """The width of the logits' input: the classifier's in_features, else the last stage's channels."""
    classifier = final_linear(net)
    return classifier.in_features if classifier is not None else stage_channels[-1]


def _build(pairs, options: OFAOptions, ctx: TermContext) -> OFATerm:
    ns = ctx.student.num_stages
    stages = [i for i, _ in pairs]
    s_ch, t_ch = ctx.channels("student"), ctx.channels("target")
    width = max(_width(ctx.student, s_ch), _width(ctx.target, t_ch))
    num_classes = int(dry_forward(ctx.target, ctx.input_shape, lambda n, x: n(x)).shape[1])
    branches = [branch(s_ch[i], ns - 1 - i, width, num_classes) for i in stages]
    return OFATerm(stages, branches, options)


register_kind("ofa", _Kind(
    1.0, "OFA-KD's released code (ofa_loss_weight 1, eps 1, T 1, every stage)", build=_build, options=OFAOptions,
    default_stages=lambda n: list(range(n)), target_stages=False))
