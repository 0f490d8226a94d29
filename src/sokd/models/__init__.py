"""Model zoo: every network is a `StagedNet` (stem -> stages -> head).

    create(name, num_classes, in_channels=3, **options) -> StagedNet
    list_models() -> names of the CIFAR zoo (CRD-benchmark architectures) and registered models
    register(name)  -> decorator adding your own constructor
    model_info(name_or_net, input_shape=(3, 32, 32), num_classes=100) -> {"params", "macs"}
    from_torchvision(module) -> StagedNet cut automatically from a torchvision/timm classifier
    adapt(stem, stages, head) -> StagedNet from your own pieces
    spec_of(net) -> {"arch", "num_classes", "in_channels", "kwargs"} that `create` rebuilds it from

Names: resnet8/14/20/32/44/56/110, resnet8x4, resnet32x4, resnet50, vgg8/11/13/16/19 (with BN),
mobilenetv2, shufflenetv1, shufflenetv2, wrn_<depth>_<width> (`weights=PATH`: a state dict in sokd's
layout or a RepDistiller/mdistiller CIFAR teacher file, see `published`); `tv.<torchvision model>`
(e.g. tv.resnet18, tv.mobilenet_v2; weights=<local state-dict path>, never downloaded) and
`timm.<model>` (pip install sokd[timm]; stages from timm's feature_info; ResNet(-D),
EfficientNet, MobileNetV3, ConvNeXt and RegNet are tested as SOKD teachers and students; ViT,
DeiT and Swin are staged by `tokens`). `sokd models --tv/--timm [PATTERN]` lists them (`info.listing`).
"""
from __future__ import annotations

from . import zoo as _zoo  # noqa: F401  (registers the CIFAR zoo)
from .info import model_info
from .registry import adapt, create, list_models, register, set_spec, spec_of
from .staged import StagedNet
from .torchvision_adapter import from_torchvision

CIFAR_MODELS = _zoo.CIFAR_MODELS

__all__ = ["StagedNet", "adapt", "create", "from_torchvision", "list_models", "model_info", "register",
           "set_spec", "spec_of", "CIFAR_MODELS"]
