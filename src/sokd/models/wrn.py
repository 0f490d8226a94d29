"""Wide residual networks (Zagoruyko & Komodakis, 2016), CIFAR layout as in the CRD benchmark.

wrn_D_W: depth D with (D - 4) % 6 == 0, widths 16 -> 16W -> 32W -> 64W, pre-activation basic
blocks, three stages with strides 1, 2, 2. Stage outputs are the blocks' raw (pre-activation) sums;
the final BN + ReLU lives in the head.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SokdError
from .common import ZooNet, classifier_head, conv1x1, conv3x3


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus identity or 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # the projection shortcut sees the activated input; the identity sees the raw input
        self.shortcut = conv1x1(cin, cout, stride) if (cin != cout or stride != 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(act)
        out = torch.relu(self.bn2(self.conv1(act)))
        out = self.conv2(self.dropout(out))
        return out + skip


class WideResNet(ZooNet):
    conv_init = "kaiming"
    linear_init = "zero_bias"

    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int = 3,
                 dropout: float = 0.0):
        check_wrn(depth, width)
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        stem = conv3x3(in_channels, widths[0])
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            cin, cout = widths[i], widths[i + 1]
            stages.append(nn.Sequential(*[PreActBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1,
                                                      dropout) for j in range(n)]))
        head = classifier_head(widths[3], num_classes, nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True))
        super().__init__(stem, stages, head)
        self.depth, self.width = depth, width
        self.reset_parameters()


def check_wrn(depth: int, width: int) -> None:
    if depth < 10 or (depth - 4) % 6 != 0:
        valid = ", ".join(str(d) for d in range(10, 53, 6))
        raise SokdError(f"wrn depth {depth} is invalid: a WideResNet has depth = 6n + 4 (3 stages of n "
                        f"two-conv blocks plus 4 more layers), so (depth - 4) % 6 must be 0, e.g. {valid}, ...")
    if width < 1:
        raise SokdError(f"wrn width {width} is invalid: the widening factor must be >= 1")


def wide_resnet(depth: int, width: int, num_classes: int, in_channels: int = 3,
                dropout: float = 0.0) -> WideResNet:
    """WRN-depth-width; `dropout` is the within-block dropout rate (CRD and SOKD use 0)."""
    return WideResNet(depth, width, num_classes, in_channels, dropout)
