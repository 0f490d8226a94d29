"""Parameter and MAC counts."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SokdError
from .registry import create


def model_info(name_or_net: str | nn.Module, input_shape: tuple[int, ...] = (3, 32, 32),
               num_classes: int = 100) -> dict[str, int]:
    """{'params': trainable + frozen parameter count, 'macs': multiply-accumulates per image}.

    MACs are FLOPs / 2 as counted by `torch.utils.flop_counter.FlopCounterMode` (convolutions and
    matrix products; norms, activations and pooling are not counted) for one image of
    `input_shape` (C, H, W) in eval mode. A name is built with `create(name, num_classes,
    in_channels=input_shape[0])`; a module is measured as is (`num_classes` is then ignored).
    """
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise SokdError(f"input_shape must be (channels, height, width), got {input_shape!r}")
    net = create(name_or_net, num_classes, in_channels=shape[0]) if isinstance(name_or_net, str) else name_or_net
    if not isinstance(net, nn.Module):
        raise SokdError(f"model_info needs a model name or an nn.Module, got {type(net).__name__}")
    params = sum(p.numel() for p in net.parameters())
    first = next(iter(net.parameters()), None)
    x = torch.zeros(1, *shape, device=first.device if first is not None else None,
                    dtype=first.dtype if first is not None and first.is_floating_point() else None)
    was_training = net.training
    net.eval()
    from torch.utils.flop_counter import FlopCounterMode   # imports triton where installed: on use only
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            net(x)
    finally:
        net.train(was_training)
    return {"params": int(params), "macs": int(counter.get_total_flops() // 2)}


# ---------------------------------------------------------------- listings (sokd models)
SOURCES = {"zoo": "", "tv": "tv.", "timm": "timm."}
TIMM_MISSING = ("timm is not installed: pip install sokd[timm] (in a sokd checkout: .venv/bin/pip install timm)")
_WILDCARDS = "*?["


def timm_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("timm") is not None


def _natural(name: str) -> list:
    """Sort key putting resnet18 before resnet101 (timm.list_models' order)."""
    import re
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name.lower())]


def source_names(source: str) -> list[str]:
    """Names (without prefix) `create` accepts from `source`: 'zoo', 'tv' (torchvision
    classification models, `torchvision.models.list_models(module=torchvision.models)`) or 'timm'
    (`timm.list_models()`; SokdError if timm is missing), tv / timm in natural order."""
    if source == "zoo":
        from .registry import list_models
        return list_models()
    if source == "tv":
        import torchvision
        return sorted(torchvision.models.list_models(module=torchvision.models), key=_natural)
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise SokdError(TIMM_MISSING) from None
        return sorted(timm.list_models(), key=_natural)
    raise SokdError(f"unknown model source '{source}'; valid: {', '.join(SOURCES)}")


def match_names(source: str, names: list[str], patterns: list[str]) -> list[str]:
    """Names matching any of `patterns`, in `names` order.

    A pattern is an exact name (`resnet18`: that model only), a shell wildcard (`resnet*`,
    `*mobilenet*`, as `timm.list_models(pattern)`), or plain text matched as a substring. A
    `tv.` / `timm.` prefix is ignored. A pattern matching nothing is a SokdError.
    """
    if not patterns:
        return list(names)
    import difflib
    import fnmatch
    prefix = SOURCES[source]
    chosen: set[str] = set()
    for raw in patterns:
        p = raw[len(prefix):] if prefix and raw.startswith(prefix) else raw
        if p in names:
            hits = [p]
        elif any(c in p for c in _WILDCARDS):
            hits = fnmatch.filter(names, p)
        else:
            hits = [n for n in names if p in n]
        if not hits:
            close = difflib.get_close_matches(p, names, n=3, cutoff=0.6)
            what = {"zoo": "zoo model", "tv": "torchvision model", "timm": "timm model"}[source]
            raise SokdError(f"no {what} matches '{raw}'"
                            + (f" (close: {', '.join(prefix + c for c in close)})" if close else "")
                            + f"; list them with: sokd models{' --' + source if prefix else ''}")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def _raw_model(source: str, name: str, num_classes: int, in_channels: int) -> nn.Module:
    """The library's own model (uncut), for params / MACs of models sokd cannot cut."""
    if source == "tv":
        import torchvision
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    import timm
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def describe(source: str, name: str, input_shape: tuple[int, int, int], num_classes: int) -> dict:
    """One listing row: {"model", "params", "macs", "stages", "cut", "note"}.

    `cut` is how the stages were found (zoo, feature_info, resnet, regnet, chain of children) or
    "refused" (then `note` says why, params/MACs are the uncut model's, `macs` None if it does not
    run at `input_shape`).
    """
    arch = SOURCES[source] + name
    try:
        net = create(arch, num_classes, in_channels=input_shape[0])
    except SokdError as err:
        if source == "zoo":
            raise
        row = {"model": arch, "params": None, "macs": None, "stages": None, "cut": "refused", "note": str(err)}
        try:
            raw = _raw_model(source, name, num_classes, input_shape[0])
            row["params"] = sum(p.numel() for p in raw.parameters())
            row["macs"] = model_info(raw, input_shape)["macs"]
        except Exception:  # the uncut model does not run at this input size
            pass
        return row
    cut = getattr(net, "cut_source", None) or "zoo"
    try:
        info = model_info(net, input_shape)
    except (AssertionError, RuntimeError) as err:   # e.g. a ViT built for another image size
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        size = "x".join(map(str, input_shape))
        return {"model": arch, "params": sum(p.numel() for p in net.parameters()), "macs": None,
                "stages": net.num_stages, "cut": cut,
                "note": f"does not run on {size} images ({first}); give --input at its image size, or build it "
                        f"for yours (kwargs: {{img_size: N}} for a vision transformer)"}
    return {"model": arch, "params": info["params"], "macs": info["macs"], "stages": net.num_stages,
            "cut": cut, "note": None}


def listing(source: str, patterns: list[str], input_shape: tuple[int, int, int], num_classes: int,
            max_details: int, contains: str = "") -> dict:
    """{"source", "names": [full names], "rows": [describe(...)] or None if more than max_details}.

    Names are those of `source` matching `patterns` (see `match_names`) whose full name (with
    its tv. / timm. prefix) contains `contains`; the zoo is always described.
    """
    names = [n for n in match_names(source, source_names(source), patterns) if contains in SOURCES[source] + n]
    if source == "zoo":  # small CIFAR nets: always with params and MACs
        max_details = len(names)
    rows = None
    if len(names) <= max_details:
        rows = [describe(source, n, input_shape, num_classes) for n in names]
    return {"source": source, "names": [SOURCES[source] + n for n in names], "rows": rows}
