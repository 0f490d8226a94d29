"""VGG with BatchNorm for CIFAR, as in the CRD benchmark (fully-connected layers removed).

Five conv blocks, each a stage; the stem is the identity. Block k > 0 starts with the 2x2 max-pool
that CRD applies between blocks k-1 and k. Like CRD, the pool before the last block is only applied
when the map is still large (>= 8 px, i.e. 64x64 inputs), so the last block runs at 4x4 for both
32x32 and 64x64 inputs. Head: global average pool + linear (512 -> classes).
Conv layers keep their bias (as in CRD) so parameter counts match the benchmark.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import ZooNet, classifier_head

CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class MaxPoolIfLarge(nn.Module):
    """2x2 max-pool when the input is at least `min_size` px high, identity otherwise."""

    def __init__(self, min_size: int = 8):
        super().__init__()
        self.min_size = min_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2, 2) if x.shape[-2] >= self.min_size else x

    def extra_repr(self) -> str:
        return f"min_size={self.min_size}"


class VGG(ZooNet):
    conv_init = "kaiming"
    linear_init = "normal"

    def __init__(self, config: list[list[int]], num_classes: int, in_channels: int = 3):
        stages, cin = [], in_channels
        for k, widths in enumerate(config):
            layers: list[nn.Module] = []
            if k > 0:
                layers.append(MaxPoolIfLarge() if k == len(config) - 1 else nn.MaxPool2d(2, 2))
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            stages.append(nn.Sequential(*layers))
        super().__init__(nn.Identity(), stages, classifier_head(cin, num_classes))
        self.reset_parameters()


def vgg(name: str, num_classes: int, in_channels: int = 3) -> VGG:
    return VGG(CONFIGS[name], num_classes, in_channels)
