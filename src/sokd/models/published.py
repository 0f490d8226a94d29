"""Local weight files for CIFAR-zoo networks: sokd's own layout and the published CIFAR teachers.

The CRD benchmark's teachers are released as RepDistiller files (`{'model': state_dict}`, e.g.
`wrn_40_2_vanilla/ckpt_epoch_240.pth`) and in mdistiller's `cifar_teachers.tar` (the same model
code, so the same key layout). Their key names differ from ours (`block1.layer.0.convShortcut` vs
`stages.0.0.shortcut`), while the tensors are the same: every zoo class below has one rename rule
per parameter, from our key to theirs. A file is accepted when its keys are exactly the renamed
keys of the network being built (BatchNorm's `num_batches_tracked` may be absent, as in files
saved before PyTorch 0.4.1); anything else is refused in one line naming the first keys that do
not match, before any weight is copied.

The published forward passes pool with fixed windows (8x8, 4x4, 2x2), which equal our global
average pooling at the 32x32 inputs they were trained on; at other resolutions logits differ.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import SokdError
from ..files import does_not_fit, load_weights_only

LAYOUT = "RepDistiller/mdistiller"
DOC = "docs/published-teachers.md"

Rule = tuple[str, Callable[[re.Match], str]]


def _layer(prefix: str, base: int = 1, shortcut: str = "shortcut") -> Rule:
    """stages.I.J.rest -> {prefix}{I+base}.J.rest, renaming the shortcut module."""
    def rename(m: re.Match) -> str:
        rest = m[3]
        if rest.startswith("shortcut."):
            rest = shortcut + rest[len("shortcut"):]
        return f"{prefix}{int(m[1]) + base}.{m[2]}.{rest}"
    return r"stages\.(\d+)\.(\d+)\.(.+)", rename


def _fixed(ours: str, theirs: str) -> Rule:
    return re.escape(ours) + r"(.+)", lambda m: theirs + m[1]


def _wrn_rules() -> list[Rule]:
    def block(m: re.Match) -> str:
        rest = m[3].replace("shortcut.", "convShortcut.", 1) if m[3].startswith("shortcut.") else m[3]
        return f"block{int(m[1]) + 1}.layer.{m[2]}.{rest}"
    return [_fixed("stem.", "conv1."), (r"stages\.(\d+)\.(\d+)\.(.+)", block),
            _fixed("head.0.", "bn1."), _fixed("head.4.", "fc.")]


def _vgg_rules() -> list[Rule]:
    # our stage k > 0 starts with the max-pool that theirs keeps outside the block
    def block(m: re.Match) -> str:
        k, idx = int(m[1]), int(m[2])
        return f"block{k}.{idx - 1 if k > 0 else idx}.{m[3]}"
    return [(r"stages\.(\d+)\.(\d+)\.(.+)", block), _fixed("head.2.", "classifier.")]


def _mobilenetv2_rules() -> list[Rule]:
    from .mobilenetv2 import SETTINGS
    # (stage, block) -> (their group, index in group): groups are cut into stages where stride is 2
    where: dict[tuple[int, int], tuple[int, int]] = {}
    stage, block = -1, 0
    for g, (_, _, n, s) in enumerate(SETTINGS):
        if s == 2 or stage < 0:
            stage, block = stage + 1, 0
        for j in range(n):
            where[(stage, block)] = (g, j)
            block += 1

    def inverted(m: re.Match) -> str:
        g, j = where[(int(m[1]), int(m[2]))]
        return f"blocks.{g}.{j}.conv.{m[3]}"
    return [_fixed("stem.", "conv1."), (r"stages\.(\d+)\.(\d+)\.body\.(.+)", inverted),
            _fixed("head.0.", "conv2.0."), _fixed("head.1.", "conv2.1."), _fixed("head.5.", "classifier.0.")]


_V2_DOWN = {"left.0": "conv1", "left.1": "bn1", "left.2": "conv2", "left.3": "bn2", "right.0": "conv3",
            "right.1": "bn3", "right.3": "conv4", "right.4": "bn4", "right.5": "conv5", "right.6": "bn5"}
_V2_UNIT = {"branch.0": "conv1", "branch.1": "bn1", "branch.3": "conv2", "branch.4": "bn2",
            "branch.5": "conv3", "branch.6": "bn3"}


def _shufflenetv2_rules() -> list[Rule]:
    def unit(m: re.Match) -> str:
        names = _V2_DOWN if m[2] == "0" else _V2_UNIT
        return f"layer{int(m[1]) + 1}.{m[2]}.{names.get(m[3], m[3])}.{m[4]}"
    return [_fixed("stem.0.", "conv1."), _fixed("stem.1.", "bn1."),
            (r"stages\.(\d+)\.(\d+)\.(\w+\.\d+)\.(.+)", unit),
            _fixed("head.0.", "conv2."), _fixed("head.1.", "bn2."), _fixed("head.5.", "linear.")]


def _families() -> dict[type, tuple[str, list[Rule]]]:
    """Zoo class -> (published model name, rename rules). Every CIFAR-zoo class is covered."""
    from .mobilenetv2 import MobileNetV2
    from .resnet import BottleneckResNet, CifarResNet
    from .shufflenet import ShuffleNetV1, ShuffleNetV2
    from .vgg import VGG
    from .wrn import WideResNet
    stem = [_fixed("stem.0.", "conv1."), _fixed("stem.1.", "bn1.")]
    return {
        WideResNet: ("WideResNet (wrn_D_W)", _wrn_rules()),
        CifarResNet: ("CIFAR ResNet (resnet8..110, resnet8x4, resnet32x4)",
                      stem + [_layer("layer", shortcut="downsample"), _fixed("head.2.", "fc.")]),
        BottleneckResNet: ("ResNet50", stem + [_layer("layer"), _fixed("head.2.", "linear.")]),
        VGG: ("VGG (vgg8..vgg19, with BN)", _vgg_rules()),
        MobileNetV2: ("MobileNetV2 (mobile_half)", _mobilenetv2_rules()),
        ShuffleNetV1: ("ShuffleV1", stem + [_layer("layer"), _fixed("head.2.", "linear.")]),
        ShuffleNetV2: ("ShuffleV2", _shufflenetv2_rules()),
    }


#: top-level module names of each published layout: how a file of another architecture is named
PUBLISHED_ROOTS: dict[str, frozenset[str]] = {
    "WideResNet (wrn_D_W)": frozenset({"conv1", "block1", "block2", "block3", "bn1", "fc"}),
    "CIFAR ResNet (resnet8..110, resnet8x4, resnet32x4)": frozenset({"conv1", "bn1", "layer1", "layer2",
                                                                      "layer3", "fc"}),
    "ResNet50": frozenset({"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "linear"}),
    "VGG (vgg8..vgg19, with BN)": frozenset({"block0", "block1", "block2", "block3", "block4", "classifier"}),
    "MobileNetV2 (mobile_half)": frozenset({"conv1", "blocks", "conv2", "classifier"}),
    "ShuffleV1": frozenset({"conv1", "bn1", "layer1", "layer2", "layer3", "linear"}),
    "ShuffleV2": frozenset({"conv1", "bn1", "layer1", "layer2", "layer3", "conv2", "bn2", "linear"}),
}


def published_keys(net: nn.Module) -> dict[str, str] | None:
    """{our state-dict key: the published file's key} for a CIFAR-zoo network, None for others."""
    family = _families().get(type(net))
    if family is None:
        return None
    rules = [(re.compile(p), f) for p, f in family[1]]
    out = {}
    for key in net.state_dict():
        for pattern, rename in rules:
            if (m := pattern.fullmatch(key)) is not None:
                out[key] = rename(m)
                break
        else:  # a zoo class gained a parameter the rules do not know: a bug in sokd, not in the file
            raise AssertionError(f"no published name for {type(net).__name__} key '{key}'")
    return out


def family_name(net: nn.Module) -> str | None:
    family = _families().get(type(net))
    return family[0] if family else None


def read_state_file(path, label: str) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping of a local weights file (a plain state dict, or one under 'model',
    'state_dict' or 'model_state_dict'; a DataParallel 'module.' prefix is dropped). Read with
    weights_only=True: a file crafted to run code is refused."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise SokdError(f"{label}: weights file '{path}' does not exist (sokd never downloads weights)")
    obj = load_weights_only(p, f"{label} file")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SokdError(f"{label}: '{path}' is not a state dict (name -> tensor)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _first(keys, n: int = 4) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _roots(keys) -> frozenset[str]:
    return frozenset(k.split(".", 1)[0] for k in keys)


def _refusal(net: nn.Module, state: dict, path, label: str, expected: dict[str, str] | None) -> SokdError:
    """The one line for a file whose keys fit neither sokd's layout nor the published one."""
    roots = _roots(state)
    if {"student", "teacher"} <= roots:
        return SokdError(f"{label}: '{path}' is a distiller checkpoint holding a student and a teacher; "
                         "pass the network's own file (mdistiller: student_best / student_latest; a "
                         "teacher: its ckpt_epoch_240.pth)")
    if expected is not None:
        mine = family_name(net)
        other = next((name for name, r in PUBLISHED_ROOTS.items() if r == roots), None)
        if other == "ResNet50" and not any(".conv3." in k for k in state):
            return SokdError(f"{label}: '{path}' holds a basic-block CIFAR ResNet18/34 ({LAYOUT} "
                             "resnetv2), which the sokd zoo does not build; wrap your own with "
                             f"sokd.models.adapt (see {DOC})")
        if other is not None and other != mine:
            return SokdError(f"{label}: '{path}' holds a {LAYOUT} {other}, not a {mine}; set the "
                             "architecture to the file's (e.g. teacher.arch=...)")
        wanted = set(expected.values())
        file_keys = [k for k in state if k not in wanted]
        missing = [k for k in expected.values() if k not in state and not k.endswith("num_batches_tracked")]
        if other == mine:
            return SokdError(f"{label}: '{path}' is a {LAYOUT} {mine} of another depth or width: keys "
                             f"not in this model: {_first(file_keys) or 'none'}; missing: "
                             f"{_first(missing) or 'none'}; pick the architecture the file was trained as")
    own = net.state_dict()
    unmatched = [k for k in state if k not in own]
    what = (f"first unmatched keys {_first(unmatched)}" if unmatched else
            f"keys missing from the file: {_first(k for k in own if k not in state)}")
    return SokdError(f"{label}: unknown weights layout in '{path}': {what}; sokd reads its own "
                     f"layout and {LAYOUT} CIFAR-zoo files ({DOC})")


def _check_shapes(net: nn.Module, state: dict, path, label: str) -> None:
    error = does_not_fit(f"{label}: weights '{path}'", net, state, shapes_only=True)
    if error is not None:
        raise error


def load_weights(net: nn.Module, path, label: str) -> str:
    """Load a local weights file into a zoo (or registered) network; returns the layout it had
    ("sokd" or "RepDistiller/mdistiller"). Nothing is copied unless every tensor fits."""
    if not isinstance(path, (str, Path)):
        raise SokdError(f"{label}: weights must be a path to a local state-dict file, got {path!r} "
                        "(sokd never downloads weights)")
    state = read_state_file(path, label)
    own = net.state_dict()
    if set(state) == set(own):
        _check_shapes(net, state, path, label)
        net.load_state_dict(state)
        return "sokd"
    expected = published_keys(net)
    if expected is not None:
        renamed = {ours: state[theirs] for ours, theirs in expected.items() if theirs in state}
        optional = {k for k in expected if k.endswith("num_batches_tracked")}
        if set(state) <= set(expected.values()) and set(expected) - set(renamed) <= optional:
            for key in optional - set(renamed):  # files from before PyTorch 0.4.1 lack the counter
                renamed[key] = torch.zeros_like(own[key])
            _check_shapes(net, renamed, path, label)
            net.load_state_dict(renamed)
            return LAYOUT
    raise _refusal(net, state, path, label, expected)
