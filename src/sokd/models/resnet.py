"""CIFAR ResNets as in the CRD benchmark.

resnet{8,14,20,32,44,56,110}: 3x3 stem with 16 channels, three stages of basic blocks with
16/32/64 channels, (depth - 2) / 6 blocks per stage. resnet8x4 / resnet32x4: stem 32, stages
64/128/256. resnet50: bottleneck ResNet-50 with a 3x3 stride-1 stem and no max-pool, four stages
64/128/256/512 (x4 expansion). All use kaiming (fan_out) init.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SokdError
from .common import ZooNet, classifier_head, conv1x1, conv3x3


def _projection(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(out + skip)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(out + skip)


def _stage(block, cin: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = []
    for i in range(blocks):
        layers.append(block(cin, planes, stride if i == 0 else 1))
        cin = planes * block.expansion
    return nn.Sequential(*layers)


class CifarResNet(ZooNet):
    """Basic-block ResNet for 32x32 inputs: stem conv-BN-ReLU, 3 stages (strides 1, 2, 2)."""

    conv_init = "kaiming"
    linear_init = "default"

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int,
                 in_channels: int = 3):
        if depth < 8 or (depth - 2) % 6 != 0:
            raise SokdError(f"CIFAR ResNet depth {depth} is invalid: (depth - 2) must be divisible by 6")
        n = (depth - 2) // 6
        stem = nn.Sequential(conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages = [_stage(BasicBlock, widths[i], widths[i + 1], n, 1 if i == 0 else 2) for i in range(3)]
        super().__init__(stem, stages, classifier_head(widths[3], num_classes))
        self.reset_parameters()


class BottleneckResNet(ZooNet):
    """ImageNet-style bottleneck ResNet adapted to CIFAR: 3x3 stride-1 stem, no max-pool."""

    conv_init = "kaiming"
    linear_init = "default"

    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int = 3):
        stem = nn.Sequential(conv3x3(in_channels, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        stages, cin = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stages.append(_stage(Bottleneck, cin, planes, n, 1 if i == 0 else 2))
            cin = planes * Bottleneck.expansion
        super().__init__(stem, stages, classifier_head(cin, num_classes))
        self.reset_parameters()


def cifar_resnet(depth: int, num_classes: int, in_channels: int = 3, x4: bool = False) -> CifarResNet:
    widths = (32, 64, 128, 256) if x4 else (16, 16, 32, 64)
    return CifarResNet(depth, widths, num_classes, in_channels)


def resnet50(num_classes: int, in_channels: int = 3) -> BottleneckResNet:
    return BottleneckResNet((3, 4, 6, 3), num_classes, in_channels)
