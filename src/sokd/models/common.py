"""Building blocks shared by the CIFAR zoo: a StagedNet with a per-family init scheme."""
from __future__ import annotations

from torch import nn

from .staged import StagedNet


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=bias)


def conv1x1(cin: int, cout: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, groups=groups, bias=bias)


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def classifier_head(channels: int, num_classes: int, *pre: nn.Module) -> nn.Sequential:
    """`pre` modules (e.g. final BN+ReLU), global average pooling, flatten, linear."""
    return nn.Sequential(*pre, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes))


class ZooNet(StagedNet):
    """StagedNet whose `init_module` applies one of the CIFAR-zoo init schemes.

    conv_init:   "kaiming" -> kaiming-normal (fan_out, ReLU gain), bias 0 (the CRD / WRN scheme,
                 identical to normal(0, sqrt(2 / (k*k*out_channels))));  "default" -> PyTorch's own.
    linear_init: "default" -> PyTorch's own; "zero_bias" -> PyTorch's weight, bias 0;
                 "normal" -> weight ~ N(0, 0.01), bias 0.
    BatchNorm always gets weight 1, bias 0 and fresh running statistics.
    """

    conv_init = "kaiming"
    linear_init = "default"

    def init_module(self, m: nn.Module) -> None:
        if isinstance(m, nn.modules.conv._ConvNd) and self.conv_init == "kaiming":
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and self.linear_init != "default":
            if self.linear_init == "normal":
                nn.init.normal_(m.weight, 0.0, 0.01)
            else:
                m.reset_parameters()
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        else:  # BatchNorm.reset_parameters: weight 1, bias 0, running stats reset
            super().init_module(m)
