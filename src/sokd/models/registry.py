"""Model names -> constructors, and `create`.

Names resolve in this order: registered names (the CIFAR zoo and anything added with `register`),
the `wrn_<depth>_<width>` pattern, `tv.<torchvision name>`, `timm.<timm name>`.
"""
from __future__ import annotations

import inspect
import re
from typing import Callable

from torch import nn

from ..errors import SokdError, unknown
from ..registry import Registry
from .staged import StagedNet

Constructor = Callable[..., StagedNet]

_REGISTRY: Registry = Registry("model")
WRN_PATTERN = re.compile(r"wrn_(\d+)_(\d+)")
WRN_EXAMPLES = ("wrn_16_1", "wrn_16_2", "wrn_28_10", "wrn_40_1", "wrn_40_2")
_PATTERN_HINT = ("; also accepted: wrn_<depth>_<width> with (depth - 4) % 6 == 0, "
                 "tv.<torchvision classification model>, timm.<timm model>, hf:<folder of a Hugging Face "
                 "image classifier>")


def register(name: str, *, overwrite: bool = False) -> Callable[[Constructor], Constructor]:
    """Decorator adding a model constructor under `name`.

    The constructor is called as `fn(num_classes=..., in_channels=..., **options)` and must return a
    `StagedNet` (see `sokd.models.adapt` to cut your own network into stem / stages / head)::

        @sokd.models.register("my_net")
        def my_net(num_classes: int, in_channels: int = 3, width: int = 64) -> StagedNet:
            ...

    Registering a name twice raises SokdError unless `overwrite=True`.
    """
    if not isinstance(name, str) or not name.strip():
        raise SokdError(f"model name must be a non-empty string, got {name!r}")

    def decorator(fn: Constructor) -> Constructor:
        if not callable(fn):
            raise SokdError(f"register('{name}') must decorate a callable, got {type(fn).__name__}")
        return _REGISTRY.add(name, fn, overwrite)

    return decorator


def list_models() -> list[str]:
    """Every concrete registered name (CIFAR zoo incl. wrn examples, plus user registrations), sorted.

    `create` also accepts any `wrn_D_W`, `tv.<name>` and `timm.<name>`; `info.source_names("tv")`
    / `info.source_names("timm")` list those (`sokd models --tv/--timm [PATTERN]`).
    """
    return sorted(set(_REGISTRY) | set(WRN_EXAMPLES))


def _check_int(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SokdError(f"{what} must be a positive integer, got {value!r}")
    return value


def _call(name: str, fn: Constructor, num_classes: int, in_channels: int, kwargs: dict) -> StagedNet:
    try:
        inspect.signature(fn).bind(num_classes=num_classes, in_channels=in_channels, **kwargs)
    except TypeError as err:
        params = [p for p in inspect.signature(fn).parameters if p not in ("num_classes", "in_channels")]
        raise SokdError(f"model '{name}' does not accept options {sorted(kwargs)} ({err}); "
                        f"accepted: {', '.join(params) or 'none'}") from None
    except ValueError:  # no signature available (builtins); just call it
        pass
    return fn(num_classes=num_classes, in_channels=in_channels, **kwargs)


def create(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> StagedNet:
    """Build a freshly initialised network by name.

    Args:
        name: a name from `list_models()`, any `wrn_<depth>_<width>`, `tv.<torchvision name>`
            (e.g. `tv.resnet18`; never downloads weights, `weights=<path to local state dict>`
            loads one) or `timm.<name>` (needs `pip install sokd[timm]`; stages from timm's
            `feature_info`; vision transformers by `models.tokens`, see `torchvision_adapter.create_timm`).
        num_classes: size of the classifier.
        in_channels: input channels (1 for MNIST-like data); CIFAR-zoo models work at any
            resolution >= 28 px thanks to global average pooling.
        **kwargs: model options (e.g. `dropout` for wrn, `width_mult` for mobilenetv2);
            `weights=PATH` loads a local state dict after construction — for the CIFAR zoo in
            sokd's layout or as released with RepDistiller / mdistiller (`models.published`).
    Raises:
        SokdError: unknown name (the message lists valid ones), invalid wrn depth, bad options.
    """
    if not isinstance(name, str):
        raise SokdError(f"model name must be a string, got {name!r}")
    name = name.strip()
    _check_int("num_classes", num_classes)
    _check_int("in_channels", in_channels)

    weights = None
    if "weights" in kwargs and not name.startswith(("tv.", "timm.", "hf:")) and not _takes_weights(_REGISTRY.get(name)):
        weights = kwargs.pop("weights")  # loaded below, in sokd's or a published layout
    if name in _REGISTRY:
        net = _call(name, _REGISTRY[name], num_classes, in_channels, kwargs)
    elif (m := WRN_PATTERN.fullmatch(name)) is not None:
        from .wrn import wide_resnet
        net = _call(name, wide_resnet, num_classes, in_channels,
                    {"depth": int(m.group(1)), "width": int(m.group(2)), **kwargs})
    elif name.startswith("tv."):
        from .torchvision_adapter import create_torchvision
        net = create_torchvision(name[3:], num_classes, in_channels, **kwargs)
    elif name.startswith("timm."):
        from .torchvision_adapter import create_timm
        net = create_timm(name[5:], num_classes, in_channels, **kwargs)
    elif name.startswith("hf:"):
        from .hf import create_hf
        net = create_hf(name, num_classes, in_channels, **kwargs)
    else:
        err = unknown("model", name, list_models())
        raise SokdError(str(err) + _PATTERN_HINT)

    if not isinstance(net, StagedNet):
        raise SokdError(f"model constructor for '{name}' returned {type(net).__name__}, not a StagedNet; "
                        "wrap it with sokd.models.adapt(stem, stages, head)")
    # what rebuilds this network (local weight files are a loading step, not part of its shape)
    set_spec(net, {"arch": name, "num_classes": num_classes, "in_channels": in_channels,
                   "kwargs": {k: v for k, v in kwargs.items() if k != "weights"}})
    if weights is not None:
        from .published import load_weights
        load_weights(net, weights, f"model '{name}'")
    return net


def _takes_weights(fn) -> bool:
    """Whether a registered constructor loads `weights` itself."""
    try:
        return fn is not None and "weights" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


SPEC_ATTR = "sokd_spec"


def set_spec(net: nn.Module, spec: dict) -> nn.Module:
    """Attach the facts `create` needs to rebuild `net` (as timm attaches `pretrained_cfg`)."""
    setattr(net, SPEC_ATTR, dict(spec, kwargs=dict(spec.get("kwargs", {}))))
    return net


def spec_of(net: nn.Module) -> dict | None:
    """{"arch", "num_classes", "in_channels", "kwargs"} of a network built by `create`, else None."""
    spec = getattr(net, SPEC_ATTR, None)
    return dict(spec, kwargs=dict(spec["kwargs"])) if spec is not None else None


def adapt(stem: nn.Module, stages, head: nn.Module) -> StagedNet:
    """Cut your own classifier into the StagedNet shape every sokd method works with.

    `stem` runs first, then each of `stages` in order (their outputs are the features that
    feature-distillation terms and the SOKD knowledge-bridge module use), then `head` maps the
    last stage's output to logits (final norm/activation, pooling, flatten, classifier).
    Modules are used as given (not copied). Example::

        from torch import nn
        import sokd.models

        class MyNet(nn.Module):  # your model
            def __init__(self):
                super().__init__()
                self.conv = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU())
                self.block1 = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU())
                self.block2 = nn.Sequential(nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU())
                self.fc = nn.Linear(128, 10)

        m = MyNet()
        net = sokd.models.adapt(
            stem=m.conv,
            stages=[m.block1, m.block2],
            head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), m.fc))

        @sokd.models.register("mynet")          # optional: make it available by name (configs, CLI)
        def build(num_classes, in_channels=3):
            ...
            return sokd.models.adapt(...)

    The resulting net re-initialises layers with each layer's own `reset_parameters`; subclass
    `StagedNet` and override `init_module` for a custom scheme.
    """
    if not isinstance(stem, nn.Module) or not isinstance(head, nn.Module):
        raise SokdError("adapt(stem, stages, head): stem and head must be torch.nn.Module instances")
    if isinstance(stages, nn.Module) and not isinstance(stages, (nn.ModuleList, nn.Sequential)):
        stages = [stages]
    stages = list(stages)
    if not stages or not all(isinstance(s, nn.Module) for s in stages):
        raise SokdError("adapt(stem, stages, head): stages must be a non-empty list of nn.Module")
    return StagedNet(stem, stages, head)
