"""ShuffleNet V1 (groups 3) and V2 (net size 1) for CIFAR, as in the CRD benchmark.

Both: 1x1 conv stem to 24 channels (+BN+ReLU) at full resolution, three stages that each start by
halving the resolution. V1 head: pool + linear; V2 head: 1x1 conv to 1024 + BN + ReLU, pool, linear.
PyTorch default init (CRD does not re-initialise these networks).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SokdError
from .common import ZooNet, classifier_head, conv1x1, conv3x3


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1; stride 2 concatenates an avg-pooled input."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        mid = cout // 4
        self.g1 = first_groups
        self.stride = stride
        self.conv1 = conv1x1(cin, mid, groups=first_groups)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = conv3x3(mid, mid, stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = conv1x1(mid, cout, groups=groups)
        self.bn3 = nn.BatchNorm2d(cout)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.g1)
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = torch.cat([out, self.pool(x)], 1) if self.pool is not None else out + x
        return torch.relu(out)


class ShuffleNetV1(ZooNet):
    conv_init = "default"
    linear_init = "default"

    def __init__(self, num_classes: int, in_channels: int = 3, out_planes=(240, 480, 960),
                 blocks=(4, 8, 4), groups: int = 3):
        stem = nn.Sequential(conv1x1(in_channels, 24), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        stages, cin = [], 24
        for planes, n in zip(out_planes, blocks):
            units = []
            for i in range(n):
                # the stride-2 unit concatenates its (pooled) input, so it only produces the rest
                units.append(ShuffleUnitV1(cin, planes - cin if i == 0 else planes, 2 if i == 0 else 1,
                                           groups, 1 if cin == 24 else groups))
                cin = planes
            stages.append(nn.Sequential(*units))
        super().__init__(stem, stages, classifier_head(cin, num_classes))
        self.reset_parameters()


class ShuffleUnitV2(nn.Module):
    """Channel split: half passes through, half goes 1x1 - dw3x3 - 1x1; concat + shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.split = c
        self.branch = nn.Sequential(
            conv1x1(channels - c, channels - c), nn.BatchNorm2d(channels - c), nn.ReLU(inplace=True),
            conv3x3(channels - c, channels - c, groups=channels - c), nn.BatchNorm2d(channels - c),
            conv1x1(channels - c, channels - c), nn.BatchNorm2d(channels - c), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, work = x[:, :self.split], x[:, self.split:]
        return channel_shuffle(torch.cat([keep, self.branch(work)], 1), 2)


class DownUnitV2(nn.Module):
    """Both branches downsample (dw 3x3 stride 2); outputs are concatenated and shuffled."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(
            conv3x3(cin, cin, 2, groups=cin), nn.BatchNorm2d(cin),
            conv1x1(cin, mid), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.right = nn.Sequential(
            conv1x1(cin, mid), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            conv3x3(mid, mid, 2, groups=mid), nn.BatchNorm2d(mid),
            conv1x1(mid, mid), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


V2_SIZES = {0.5: (48, 96, 192, 1024), 1.0: (116, 232, 464, 1024), 1.5: (176, 352, 704, 1024),
            2.0: (224, 488, 976, 2048)}


class ShuffleNetV2(ZooNet):
    conv_init = "default"
    linear_init = "default"

    def __init__(self, num_classes: int, in_channels: int = 3, net_size: float = 1.0,
                 blocks=(3, 7, 3)):
        if float(net_size) not in V2_SIZES:
            raise SokdError(f"shufflenetv2 net_size {net_size} is invalid; valid: {sorted(V2_SIZES)}")
        widths = V2_SIZES[float(net_size)]
        stem = nn.Sequential(conv1x1(in_channels, 24), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        stages, cin = [], 24
        for cout, n in zip(widths[:3], blocks):
            stages.append(nn.Sequential(DownUnitV2(cin, cout), *[ShuffleUnitV2(cout) for _ in range(n)]))
            cin = cout
        last = widths[3]
        head = classifier_head(last, num_classes, conv1x1(cin, last), nn.BatchNorm2d(last), nn.ReLU(inplace=True))
        super().__init__(stem, stages, head)
        self.reset_parameters()
