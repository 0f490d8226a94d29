"""Registers the CIFAR zoo (CRD-benchmark architectures) under their usual names."""
from __future__ import annotations

from .mobilenetv2 import MobileNetV2
from .registry import WRN_EXAMPLES, WRN_PATTERN, register
from .resnet import cifar_resnet, resnet50
from .shufflenet import ShuffleNetV1, ShuffleNetV2
from .vgg import CONFIGS, vgg
from .wrn import wide_resnet


def _wrn(depth: int, width: int):
    def build(num_classes: int, in_channels: int = 3, dropout: float = 0.0):
        return wide_resnet(depth, width, num_classes, in_channels, dropout)
    build.__doc__ = f"WRN-{depth}-{width} (CIFAR)."
    return build


def _resnet(depth: int, x4: bool):
    def build(num_classes: int, in_channels: int = 3):
        return cifar_resnet(depth, num_classes, in_channels, x4=x4)
    build.__doc__ = f"CIFAR ResNet-{depth}{'x4' if x4 else ''} (basic blocks)."
    return build


def _vgg(name: str):
    def build(num_classes: int, in_channels: int = 3):
        return vgg(name, num_classes, in_channels)
    build.__doc__ = f"{name} with BatchNorm (CIFAR, CRD layout)."
    return build


for _name in WRN_EXAMPLES:
    _m = WRN_PATTERN.fullmatch(_name)
    register(_name)(_wrn(int(_m.group(1)), int(_m.group(2))))
for _depth in (8, 14, 20, 32, 44, 56, 110):
    register(f"resnet{_depth}")(_resnet(_depth, False))
register("resnet8x4")(_resnet(8, True))
register("resnet32x4")(_resnet(32, True))
for _name in CONFIGS:
    register(_name)(_vgg(_name))


@register("resnet50")
def _resnet50(num_classes: int, in_channels: int = 3):
    """Bottleneck ResNet-50, CIFAR variant (3x3 stride-1 stem, no max-pool)."""
    return resnet50(num_classes, in_channels)


@register("mobilenetv2")
def _mobilenetv2(num_classes: int, in_channels: int = 3, width_mult: float = 0.5, expansion: int = 6):
    """CRD's CIFAR MobileNetV2 (width 0.5, expansion 6 by default)."""
    return MobileNetV2(num_classes, in_channels, width_mult, expansion)


@register("shufflenetv1")
def _shufflenetv1(num_classes: int, in_channels: int = 3):
    """CRD's CIFAR ShuffleNetV1, groups 3, 240/480/960 channels."""
    return ShuffleNetV1(num_classes, in_channels)


@register("shufflenetv2")
def _shufflenetv2(num_classes: int, in_channels: int = 3, net_size: float = 1.0):
    """CRD's CIFAR ShuffleNetV2, net size 1 (116/232/464, final conv 1024) by default."""
    return ShuffleNetV2(num_classes, in_channels, net_size)


CIFAR_MODELS = tuple(sorted(
    list(WRN_EXAMPLES) + [f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)] + ["resnet8x4", "resnet32x4"]
    + list(CONFIGS) + ["resnet50", "mobilenetv2", "shufflenetv1", "shufflenetv2"]))
