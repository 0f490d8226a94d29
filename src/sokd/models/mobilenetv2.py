"""MobileNetV2 for CIFAR as in the CRD benchmark ("mobile_half": width 0.5, expansion T=6).

Stem: 3x3 stride-2 conv-BN-ReLU (CRD keeps the stride, so 32x32 inputs end at 2x2). The seven
inverted-residual groups are cut into stages at each resolution change:
    stage 0 = groups (16, 24) at 1/2, stage 1 = (32) at 1/4, stage 2 = (64, 96) at 1/8,
    stage 3 = (160, 320) at 1/16
(the same points where CRD taps features). Head: 1x1 conv to 1280 + BN + ReLU, pool, linear.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import ZooNet, classifier_head, conv_bn_relu

# expansion (None = T), channels, repeats, first stride
SETTINGS = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
            (None, 160, 3, 2), (None, 320, 1, 1)]


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(ZooNet):
    conv_init = "kaiming"
    linear_init = "normal"

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 0.5,
                 expansion: int = 6):
        cin = int(32 * width_mult)
        stem = conv_bn_relu(in_channels, cin, 3, stride=2)
        stages: list[list[nn.Module]] = []
        for t, c, n, s in SETTINGS:
            cout = int(c * width_mult)
            if s == 2 or not stages:
                stages.append([])
            for i in range(n):
                stages[-1].append(InvertedResidual(cin, cout, s if i == 0 else 1, expansion if t is None else t))
                cin = cout
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        head = classifier_head(last, num_classes, *conv_bn_relu(cin, last, 1))
        super().__init__(stem, [nn.Sequential(*blocks) for blocks in stages], head)
        self.reset_parameters()
