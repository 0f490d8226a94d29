"""Cut torchvision (and timm) classifiers into stem / stages / head automatically.

`from_torchvision(model)` recognises, in this order:

0. Models that describe their own stages (timm's `model.feature_info`: one entry per feature
   level, naming the module whose output it is, e.g. resnet `act1, layer1..layer4`, efficientnet
   `blocks.0, blocks.1, blocks.2, blocks.4, blocks.6`, convnext `stages.0..3`): the model's
   children (Sequential / ModuleList containers of those modules expanded) form a chain; each
   named module ENDS a stage; everything before the first one is the stem (the first one
   itself when nothing precedes it, e.g. regnet `stem`); a stage without a convolution (resnet's
   `act1`, mobilenetv3's `bn1`) joins the stem or the stage before; everything after the last
   one is the head (so efficientnet's 1x1 `conv_head` is in the head, and a copied head in
   SOKD's KBM includes it). A model whose feature_info does not fit this (names inside a custom
   block, out of forward order, logits not reproduced) falls through to the heuristics below.
1. ResNet-like models (torchvision resnet*/resnext*/wide_resnet*; timm's have feature_info): children
   conv1, bn1, relu|act1, maxpool, layer1..layer4, avgpool|global_pool, fc
   -> stem = conv1-bn1-relu-maxpool, stages = layer1..layer4, head = pool-flatten-fc.
2. RegNet-like models: stem, trunk_output (block1..block4), avgpool, fc
   -> stages = the children of trunk_output.
3. Any other model whose forward is a plain chain of its children (torchvision mobilenet_v2/v3,
   efficientnet(_v2), convnext, vgg, alexnet, densenet, mnasnet, shufflenet_v2, squeezenet,
   regnet, maxvit, ...; most timm CNNs). Trailing classifier-like children (classifier / fc /
   head / pooling / flatten / dropout) form the head; the rest is the trunk, with a lone
   Sequential trunk (`features`) or children named features/blocks/stages/layers/trunk_output
   (and any ModuleList) expanded into their blocks. The first block is the stem (torchvision:
   `features[0]`); the remaining blocks are grouped by a dry forward pass on a dummy image:
   a block that changes the spatial size starts a new stage, blocks that do not join the current
   stage. Groups without any convolution (a lone ReLU, the final max-pool of VGG, densenet's
   norm0/relu0) are merged into the stage before (or the stem). Consequently the trailing
   1x1 "expand" conv of mobilenet/efficientnet (to 1280 / 576 channels) stays in the LAST STAGE,
   so a copied last stage (SOKD's knowledge bridge) includes it.

`AdaptedNet.cut_source` records which recogniser cut the model ("feature_info", "resnet",
"regnet" or "chain of children").

The head is then chosen among a few candidates (the trailing children as they are; with a
flatten after their pooling; global-average-pool + flatten before them; ReLU + pool + flatten
before them (densenet); flatten after them (squeezenet)) as the first one whose logits equal the
original model's on the dummy image in eval mode. If no recogniser reproduces the logits, a
SokdError explains that the model cannot be cut automatically and points to
`sokd.models.adapt`. The adapted net shares its modules (and parameters) with the original model.

Initialisation: `reset_parameters` of an adapted net calls each layer's own `reset_parameters`;
parameters held directly by modules without one (e.g. ConvNeXt's layer_scale) are refilled with
the constant they had when the model was built, if they were constant (otherwise left as is).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..errors import SokdError, unknown
from ..files import does_not_fit
from . import tokens
from .staged import StagedNet

PROBE_SIZES = (64, 224)
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)
_TAIL_MARKERS = (nn.Linear, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)  # classifier contents
_TAIL_TYPES = _TAIL_MARKERS + (nn.Dropout,)
_TAIL_NAMES = {"classifier", "fc", "head", "heads", "avgpool", "global_pool", "pool", "flatten",
               "dropout", "drop", "last_linear", "head_drop"}
_EXPAND_NAMES = {"features", "blocks", "stages", "layers", "trunk_output"}


class AdaptedNet(StagedNet):
    """A StagedNet cut out of an existing classifier; see the module docstring for the init rule."""

    def __init__(self, stem: nn.Module, stages: Iterable[nn.Module], head: nn.Module,
                 constants: dict | None = None, cut_source: str | None = None):
        super().__init__(stem, list(stages), head)
        self.constant_init = dict(constants or {})  # {(module type, parameter name): value}
        self.cut_source = cut_source  # which recogniser found the stages (see the module docstring)

    def init_module(self, m: nn.Module) -> None:
        super().init_module(m)
        for (cls, pname), value in self.constant_init.items():
            if type(m) is cls and isinstance(getattr(m, pname, None), nn.Parameter):
                with torch.no_grad():
                    getattr(m, pname).fill_(value)


class _CutError(Exception):
    pass


def constant_parameters(model: nn.Module) -> dict:
    """{(type, name): value} for constant-valued parameters of modules lacking reset_parameters."""
    found: dict = {}
    conflicting = set()
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            continue
        for pname, p in m.named_parameters(recurse=False):
            flat = p.detach().reshape(-1)
            if flat.numel() == 0 or not bool((flat == flat[0]).all()):
                conflicting.add((type(m), pname))
                continue
            key, value = (type(m), pname), float(flat[0])
            if found.setdefault(key, value) != value:
                conflicting.add(key)
    return {k: v for k, v in found.items() if k not in conflicting}


def _has_conv(modules: Iterable[nn.Module]) -> bool:
    return any(isinstance(x, nn.modules.conv._ConvNd) for m in modules for x in m.modules())


def _as_module(blocks: list[nn.Module]) -> nn.Module:
    return blocks[0] if len(blocks) == 1 else nn.Sequential(*blocks)


def _check_map(out, what: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _CutError(f"{what} does not output a 4-D feature map (got {shape})")
    return out


# ---------------------------------------------------------------- recognisers
def feature_info_modules(model: nn.Module) -> list[str] | None:
    """The module names of timm's `model.feature_info` (one per feature level), or None."""
    info = getattr(model, "feature_info", None)
    if info is None:
        return None
    try:
        if hasattr(info, "module_name"):  # timm FeatureInfo object (features_only models)
            names = list(info.module_name())
        else:  # plain timm classifiers: a list of {"module", "num_chs", "reduction"} dicts
            names = [entry["module"] for entry in info]
    except (TypeError, KeyError, AttributeError):
        return None
    if not names or not all(isinstance(n, str) and n for n in names):
        return None
    return names


def _chain_units(module: nn.Module, prefix: str, names: list[str]) -> list[tuple[str, nn.Module]]:
    """Children of `module` in order, containers holding a named module expanded (dotted names)."""
    units = []
    for cname, child in module.named_children():
        full = prefix + cname
        if any(n.startswith(full + ".") for n in names):
            if not isinstance(child, (nn.Sequential, nn.ModuleList)):
                raise _CutError(f"feature_info names a module inside '{full}' ({type(child).__name__}), "
                                "which is not a plain chain of blocks")
            units.extend(_chain_units(child, full + ".", names))
        else:
            units.append((full, child))
    return units


def feature_info_stages(model: nn.Module) -> tuple[list[str], list[list[str]], list[str]] | None:
    """(stem, [stage, ...], head) as lists of dotted module names, from timm's feature_info.

    Each feature_info module ends a stage; what precedes the first is the stem (the first one
    itself if nothing precedes it); convolution-free stages join the stem / previous stage; what
    follows the last is the head. None when the model has no feature_info; raises _CutError when
    its names do not map onto the model's chain of children.
    """
    names = feature_info_modules(model)
    if names is None:
        return None
    units = _chain_units(model, "", names)
    index = {n: i for i, (n, _) in enumerate(units)}
    missing = [n for n in names if n not in index]
    if missing:
        raise _CutError(f"feature_info module(s) {missing[:3]} are not among the model's chained children")
    bounds = [index[n] for n in names]
    if bounds != sorted(set(bounds)):
        raise _CutError("feature_info modules are not in forward order")
    mods = dict(units)
    order = [n for n, _ in units]
    stem = order[:bounds[0]] or order[:1]
    start, groups = len(stem), []
    for b in bounds:
        if b >= start:
            groups.append(order[start:b + 1])
            start = b + 1
    head = order[start:]
    if not head:
        raise _CutError("nothing follows the last feature_info module (no classifier)")
    stages: list[list[str]] = []
    for g in groups:
        if _has_conv(mods[n] for n in g):
            stages.append(g)
        else:
            (stages[-1] if stages else stem).extend(g)
    return stem, stages, head


def _feature_info_like(model: nn.Module, x: torch.Tensor):
    cut = feature_info_stages(model)
    if cut is None:
        return None
    mods = dict(_chain_units(model, "", feature_info_modules(model)))
    stem, stages, head = cut
    return (_as_module([mods[n] for n in stem]), [_as_module([mods[n] for n in g]) for g in stages],
            [mods[n] for n in head])


def _resnet_like(model: nn.Module, x: torch.Tensor):
    c = dict(model.named_children())
    act = c.get("relu", c.get("act1"))
    pool = c.get("avgpool", c.get("global_pool"))
    needed = ("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4", "fc")
    if act is None or pool is None or not all(k in c for k in needed):
        return None
    stem = nn.Sequential(c["conv1"], c["bn1"], act, c["maxpool"])
    return stem, [c[f"layer{i}"] for i in range(1, 5)], [pool, c["fc"]]


def _regnet_like(model: nn.Module, x: torch.Tensor):
    c = dict(model.named_children())
    if not all(k in c for k in ("stem", "trunk_output", "avgpool", "fc")):
        return None
    return c["stem"], list(c["trunk_output"].children()), [c["avgpool"], c["fc"]]


def _is_tail(name: str, m: nn.Module) -> bool:
    if name in _TAIL_NAMES or isinstance(m, _TAIL_TYPES):
        return True
    return isinstance(m, nn.Sequential) and any(isinstance(c, _TAIL_MARKERS) for c in m.children())


def _chain_like(model: nn.Module, x: torch.Tensor):
    children = list(model.named_children())
    cut = len(children)
    while cut > 0 and _is_tail(*children[cut - 1]):
        cut -= 1
    trunk, tail = children[:cut], [m for _, m in children[cut:]]
    if not trunk or not tail:
        raise _CutError("no trunk/classifier split among the model's children")
    blocks: list[nn.Module] = []
    for name, m in trunk:
        if isinstance(m, nn.ModuleList) or (name in _EXPAND_NAMES and isinstance(m, nn.Sequential)) \
                or (len(trunk) == 1 and isinstance(m, nn.Sequential)):
            blocks.extend(m.children())
        else:
            blocks.append(m)
    if len(blocks) < 3:
        raise _CutError("the trunk has fewer than 3 blocks")

    h = _check_map(blocks[0](x.clone()), "the first block")
    stem, groups = [blocks[0]], []
    for b in blocks[1:]:
        out = _check_map(b(h), f"block {type(b).__name__}")
        if not groups or out.shape[-2:] != h.shape[-2:]:
            groups.append([b])
        else:
            groups[-1].append(b)
        h = out
    stages: list[list[nn.Module]] = []
    for g in groups:
        if _has_conv(g):
            stages.append(g)
        else:
            (stages[-1] if stages else stem).extend(g)
    return _as_module(stem), [_as_module(g) for g in stages], tail


_RECOGNISERS = (("feature_info", _feature_info_like), ("resnet", _resnet_like), ("regnet", _regnet_like),
                ("chain of children", _chain_like))


def _head_candidates(tail: list[nn.Module]) -> list[nn.Module]:
    cands = [nn.Sequential(*tail)]
    pools = [i for i, m in enumerate(tail) if isinstance(m, _POOLS)]
    if pools:
        i = pools[-1] + 1
        cands.append(nn.Sequential(*tail[:i], nn.Flatten(1), *tail[i:]))
    cands.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), *tail))
    cands.append(nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), *tail))
    cands.append(nn.Sequential(*tail, nn.Flatten(1)))
    return cands


def _same(out, ref: torch.Tensor) -> bool:
    return (isinstance(out, torch.Tensor) and out.shape == ref.shape
            and torch.allclose(out, ref, rtol=1e-4, atol=1e-5))


def _pick_head(stem, stages, tail, x, ref):
    if len(stages) < 2:
        raise _CutError(f"found {len(stages)} stage(s), need at least 2")
    h = _check_map(stem(x.clone()), "the stem")
    for i, stage in enumerate(stages):
        h = _check_map(stage(h), f"stage {i}")
    for head in _head_candidates(tail):
        try:
            out = head(h.clone())
        except Exception:  # a wrong candidate usually fails on shapes
            continue
        if _same(out, ref):
            return head
    raise _CutError("no head reproduces the model's logits")


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    return None


def from_torchvision(module: nn.Module, *, probe_size: int | None = None,
                     constants: dict | None = None) -> StagedNet:
    """Wrap a torchvision (or timm / similar) classifier as a StagedNet, finding its stages.

    The returned net shares modules with `module`, and gives the same logits (checked on a dummy
    image in eval mode). See the module docstring for how stages are found. `probe_size` fixes the
    dummy image size (default: 64, then 224 if the model fails at 64). `constants` overrides the
    constant parameter values used by `reset_parameters` (default: read from `module`).
    Raises SokdError when the model cannot be cut automatically; use `sokd.models.adapt` then.
    """
    if isinstance(module, StagedNet):
        return module
    if not isinstance(module, nn.Module):
        raise SokdError(f"from_torchvision needs an nn.Module, got {type(module).__name__}")
    first = _first_conv(module)
    in_channels = first[1].in_channels if first is not None else 3
    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else None
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = module.training
    reasons: list[str] = []
    module.eval()
    try:
        with torch.no_grad():
            for size in ((probe_size,) if probe_size else PROBE_SIZES):
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(1, in_channels, size, size, generator=gen).to(device=device, dtype=dtype)
                try:
                    ref = module(x.clone())
                except Exception as err:
                    reasons.append(f"forward on a 1x{in_channels}x{size}x{size} image failed: {err}")
                    continue
                if not isinstance(ref, torch.Tensor) or ref.dim() != 2:
                    reasons.append("the model does not return a (batch, classes) logits tensor")
                    break
                for label, recognise in _RECOGNISERS:
                    try:
                        cut = recognise(module, x)
                        if cut is None:
                            continue
                        head = _pick_head(*cut, x, ref)
                    except Exception as err:
                        reasons.append(f"{label}: {err}")
                        continue
                    net = AdaptedNet(cut[0], cut[1], head,
                                     constant_parameters(module) if constants is None else constants,
                                     cut_source=label)
                    return net.train(was_training)
                break
    finally:
        module.train(was_training)
    raise SokdError(f"{type(module).__name__} cannot be cut into stem / stages / head automatically "
                    f"({'; '.join(reasons)}); build the StagedNet yourself with "
                    "sokd.models.adapt(stem, stages, head)")


# ---------------------------------------------------------------- construction by name
def load_weights(model: nn.Module, path, label: str) -> None:
    """Load a local state-dict file into `model`, with a SokdError naming any mismatching tensors."""
    from .published import read_state_file
    obj = read_state_file(path, label)
    error = does_not_fit(f"{label}: weights '{path}'", model, obj)
    if error is not None:
        raise error
    model.load_state_dict(obj)


def replace_first_conv(model: nn.Module, in_channels: int, pretrained: bool) -> None:
    """Swap the first Conv2d for one taking `in_channels` inputs.

    Fresh models get a freshly initialised conv. With loaded weights the RGB kernels are summed
    and spread evenly over the new channels (for 1 channel: exactly the model applied to the
    grey image replicated to RGB).
    """
    found = _first_conv(model)
    if found is None:
        raise SokdError(f"{type(model).__name__} has no Conv2d whose input channels could be changed")
    name, old = found
    if old.in_channels == in_channels:
        return
    if old.groups != 1:
        raise SokdError(f"{type(model).__name__}: the first conv is grouped; cannot change its input channels")
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    1, old.bias is not None, old.padding_mode, device=old.weight.device, dtype=old.weight.dtype)
    if pretrained:
        with torch.no_grad():
            new.weight.copy_(old.weight.sum(1, keepdim=True).expand_as(new.weight) / in_channels)
            if old.bias is not None:
                new.bias.copy_(old.bias)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def create_torchvision(name: str, num_classes: int, in_channels: int = 3, weights=None, **kwargs) -> StagedNet:
    """`tv.<name>`: torchvision.models.get_model(name, weights=None, num_classes=...), adapted.

    `weights`: path to a local state dict for that torchvision model (loaded before adapting).
    Other kwargs go to the torchvision builder (e.g. dropout).
    """
    import torchvision

    valid = torchvision.models.list_models(module=torchvision.models)
    if name not in valid:
        raise unknown("torchvision model", f"tv.{name}", [f"tv.{v}" for v in valid])
    if weights is not None and not isinstance(weights, (str, Path)):
        raise SokdError(f"tv.{name}: weights must be a path to a local state-dict file, got {weights!r} "
                        "(sokd never downloads weights)")
    if "pretrained" in kwargs:
        raise SokdError(f"tv.{name}: 'pretrained' is not supported; pass weights=<path to a state dict>")
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as err:
        raise SokdError(f"tv.{name}: invalid options {sorted(kwargs)}: {err}") from None
    constants = constant_parameters(model)
    if weights is not None:
        load_weights(model, weights, f"tv.{name}")
    if in_channels != 3:
        replace_first_conv(model, in_channels, pretrained=weights is not None)
    return from_torchvision(model, constants=constants)


def _timm_head_dropout(net: StagedNet, model: nn.Module) -> None:
    """timm heads apply `drop_rate` functionally (F.dropout in forward_head): put it in the head."""
    p = float(getattr(model, "drop_rate", 0) or 0)
    head = net.head
    if p <= 0 or not isinstance(head, nn.Sequential) or not isinstance(head[-1], nn.Linear):
        return
    if any(isinstance(m, nn.Dropout) and m.p == p for m in head.modules()):
        return
    net.head = nn.Sequential(*head[:-1], nn.Dropout(p), head[-1])


def create_timm(name: str, num_classes: int, in_channels: int = 3, weights=None, **kwargs) -> StagedNet:
    """`timm.<name>`: timm.create_model(name, pretrained=False, ...), adapted (needs sokd[timm]).

    Stages come from the model's own `feature_info` where it maps onto its chain of children
    (see the module docstring), else from the heuristics. Vision transformers (ViT, DeiT: token
    sequences; `stages=[last block of each stage, ...]` groups their blocks;
    `distillation_token=True` gives a plain ViT DeiT's distillation token and head) and Swin-style models
    (channels-last maps) are cut by `models.tokens`. A `drop_rate` option is kept as a Dropout
    before the classifier.
    """
    try:
        import timm
    except ImportError:
        raise SokdError(f"timm.{name} needs the optional timm package: pip install sokd[timm]") from None
    label = f"timm.{name}"
    if kwargs.pop("pretrained", False):
        raise SokdError(f"{label}: pretrained=True is not supported; pass weights=<path to a state dict>")
    if weights is not None and not isinstance(weights, (str, Path)):
        raise SokdError(f"{label}: weights must be a path to a local state-dict file, got {weights!r} "
                        "(sokd never downloads weights)")
    known = timm.is_model(name) if hasattr(timm, "is_model") else name in timm.list_models()
    if not known:
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise SokdError(f"unknown timm model '{label}'"
                        + (f" (close: {', '.join('timm.' + c for c in close)})" if close else "")
                        + "; see sokd models --timm PATTERN")
    cuts = kwargs.pop("stages", None)
    distillation_token = kwargs.pop("distillation_token", False)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except (TypeError, ValueError) as err:
        raise SokdError(f"{label}: invalid options {sorted(kwargs)}: {err}") from None
    fmt = getattr(model, "output_fmt", None) or "NCHW"
    fmt = str(getattr(fmt, "value", fmt)).upper()  # a str or timm's Format enum
    token_model = tokens.is_token_model(model)
    if cuts is not None and not token_model:
        raise SokdError(f"{label}: `stages` (block groups) applies to vision transformers; this model's stages "
                        f"come from its own structure, so remove it")
    if fmt not in ("NCHW", "NHWC") or (fmt == "NHWC" and not token_model and not tokens.is_channels_last_stack(model)):
        raise SokdError(f"{label} outputs {fmt} feature maps in a layout sokd does not cut automatically; cut it "
                        f"yourself with sokd.models.adapt(stem, stages, head), see docs/byom.md")
    constants = constant_parameters(model)
    if distillation_token is not True and distillation_token is not False:
        raise SokdError(f"{label}: distillation_token must be true or false, got {distillation_token!r}")
    if distillation_token and not token_model:
        raise SokdError(f"{label}: distillation_token applies to vision transformers (ViT, DeiT); remove it")
    if weights is not None:
        load_weights(model, weights, label)
    stats = _pretrained_stats(model, in_channels)
    net = _cut_timm(model, label, cuts, fmt, token_model, constants)
    if distillation_token:
        tokens.add_distillation_token(net, label)
    net.pretrained_stats = stats
    return net


def _pretrained_stats(model: nn.Module, channels: int) -> dict:
    """The normalisation timm's pretrained config declares for the model's weights (used when
    the run loads `weights=`): {"mean", "std"} with one value per input channel, or {}."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if not mean or not std or len(mean) != channels or len(std) != channels:
        return {}
    return {"mean": list(mean), "std": list(std)}


def _cut_timm(model, label, cuts, fmt, token_model, constants) -> StagedNet:
    if token_model:
        net = AdaptedNet(*tokens.staged_token_model(model, label, cuts), constants=constants, cut_source="tokens")
        net.prefix_tokens = int(model.num_prefix_tokens)
        _check_same_logits(net, model, label)
        return net
    if fmt == "NHWC":
        net = AdaptedNet(*tokens.staged_nhwc_model(model), constants=constants, cut_source="channels-last layers")
        _check_same_logits(net, model, label)
        return net
    net = from_torchvision(model, constants=constants)
    _timm_head_dropout(net, model)
    return net


def _check_same_logits(net: StagedNet, model: nn.Module, label: str) -> None:
    """The cut net computes the model's logits (eval mode, one image of the model's input size)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or (PROBE_SIZES[-1],) * 2
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(0))
            same = torch.allclose(net(x), model(x), atol=1e-5, rtol=1e-4)
    finally:
        model.train(was)
    if not same:
        raise SokdError(f"{label}: its stem / stages / head do not reproduce the model's logits, so sokd does "
                        f"not cut it automatically; cut it with sokd.models.adapt, see docs/byom.md")
