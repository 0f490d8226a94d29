"""Composition root: config -> data, networks, method -> engine. The CLI calls only this."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as data_layer
from . import artifacts, methods, models
from .config import Config, NetworkSpec, stored_config
from .engine import DistContext, FitContext, evaluate, fit, load_state_strict, resolve_device, safe_load
from .engine import tracking
from .errors import SokdError
from .models.staged import InputAdapter


def _close(a, b) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= 1e-6 * max(1.0, abs(float(y))) for x, y in zip(a, b))


def input_adapter(net_stats: dict, key: str, where: str, data) -> InputAdapter | None:
    """The InputAdapter that gives a network its own preprocessing (`net_stats`: the shape, mean
    and std it was trained with, any of them absent) from the run's data, or None when it matches.
    A network trained on another number of channels is refused."""
    if data is None or not net_stats:
        return None
    mean, std = [float(v) for v in net_stats.get("mean") or []], [float(v) for v in net_stats.get("std") or []]
    shape = list(net_stats.get("shape") or [])
    if shape and shape[0] != data.shape[0]:
        raise SokdError(f"{key} '{where}' was trained on {shape[0]}-channel images, but this data has "
                        f"{data.shape[0]}; use data with {shape[0]} channels or a network trained on yours")
    if len(mean) != data.shape[0] or len(std) != data.shape[0]:
        mean, std = list(data.mean), list(data.std)   # no (usable) record: the data's own
    size = tuple(shape[1:]) if shape and list(shape[1:]) != list(data.shape[1:]) else None
    if size is None and _close(mean, data.mean) and _close(std, data.std):
        return None
    return InputAdapter(data.mean, data.std, mean, std, size)


def check_preprocess(ckpt: dict, path: str, key: str, data) -> InputAdapter | None:
    """What a checkpoint's network was trained on (`artifacts.data_record`) against the run's
    data (`data`: its `DataBundle`): None when they match, else the adapter that gives the network
    its own images. Plain state dicts record nothing."""
    if artifacts.kind(ckpt) is None:
        return None
    return input_adapter(artifacts.data_record(ckpt), key, path, data)


def build_network(spec: NetworkSpec, role: str, num_classes: int, in_channels: int,
                  data=None) -> torch.nn.Module:
    """The network of a config section. One trained on other images gets its own preprocessing
    (`StagedNet.input_adapter`, `<role>.preprocess`): by default from the record of its checkpoint
    or of its Hugging Face folder (the image processor's); with `pretrained`, from timm's pretrained
    config; with `data`, none."""
    kwargs = dict(spec.kwargs)
    if spec.weights:
        if not Path(spec.weights).is_file():
            raise SokdError(f"{role}.weights file '{spec.weights}' not found; give a local state-dict path")
        kwargs["weights"] = spec.weights
    net = models.create(spec.arch, num_classes=num_classes, in_channels=in_channels, **kwargs)
    adapter = None
    if spec.checkpoint:
        ckpt = safe_load(spec.checkpoint)
        if spec.preprocess == "recorded":
            adapter = check_preprocess(ckpt, spec.checkpoint, f"{role}.checkpoint", data)
        state = artifacts.network_state(ckpt, spec.checkpoint, spec.checkpoint_role)
        load_state_strict(net, state, f"{role}.checkpoint '{spec.checkpoint}'")
    elif spec.preprocess == "pretrained" or (spec.preprocess == "recorded" and spec.arch.startswith("hf:")):
        stats = getattr(net, "pretrained_stats", None)
        if spec.preprocess == "pretrained" and not stats:
            raise SokdError(f"{role}.preprocess=pretrained, but {spec.arch} declares no pretrained normalisation; "
                            f"set {role}.preprocess=data (or recorded)")
        adapter = input_adapter(stats or {}, f"{role}.arch", spec.weights or spec.arch, data)
    if adapter is not None:
        net.input_adapter = adapter
    return net


def build_method(cfg: Config, num_classes: int, shape, require_trained: bool = True,
                 num_samples: int | None = None, data=None) -> methods.Method:
    """The method with its networks (each carries its spec, see `models.spec_of`).

    `num_samples` is the training-set size, for feature terms that keep per-sample state;
    `data` (the run's `DataBundle`) is checked against what each checkpoint was trained on.
    """
    name = cfg.method.name
    cls = methods.get(name)
    given = cfg.networks()
    for section in cls.trained_roles if require_trained else ():
        specs = given.get(section) or []
        for spec in specs if isinstance(specs, list) else [specs]:
            if not (spec.checkpoint or spec.weights):
                raise SokdError(f"method '{name}' needs a trained {section}: set {section}.checkpoint=PATH "
                                f"(train one first with method.name=vanilla) or {section}.weights=PATH")
    nets = {}
    for section, spec in given.items():
        if isinstance(spec, list):
            nets[section] = [build_network(s, f"{section}.{i}", num_classes, shape[0], data)
                             for i, s in enumerate(spec)]
        else:
            nets[section] = build_network(spec, section, num_classes, shape[0], data)
    return methods.create(name, input_shape=tuple(shape), num_samples=num_samples, **nets,
                          **cfg.method.options())


def _elastic_restart(cfg: Config) -> Config:
    """Under torchrun --max-restarts, a restarted job continues its own run from last.pt."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return cfg
    has_ckpt = (cfg.run_dir / artifacts.LAST).exists()
    output = cfg.output.model_copy(update={"resume": has_ckpt, "overwrite": not has_ckpt})
    return cfg.model_copy(update={"output": output})


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` is the host or the device running out of memory (torch reports the host's
    as a RuntimeError)."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("out of memory", "can't allocate memory", "not enough memory"))


def train(cfg: Config) -> dict | None:
    """Train one run; returns its summary (None on non-zero ranks of a distributed job).
    Running out of memory is a one-line SokdError naming the sizes to lower; the run directory
    is left as `fit` promises (rolled back before its first checkpoint)."""
    try:
        return _train(cfg)
    except Exception as err:
        if not out_of_memory(err):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SokdError(f"ran out of memory ({first[:120]}); lower data.batch_size (now {cfg.data.batch_size}) "
                        f"or data.eval_batch_size, the image size or the data set's size") from None


def _train(cfg: Config) -> dict | None:
    cfg = _elastic_restart(cfg)
    dist = DistContext.from_env(cfg.train.device, cfg.distributed.backend)
    device = dist.device if dist.enabled else resolve_device(cfg.train.device)
    if dist.is_main:  # a missing tracker package is refused before the data set is read
        tracking.check(cfg.output, cfg.run_dir)
    bundle = data_layer.create(cfg.data, device=device, rank=dist.rank, world_size=dist.world_size,
                               seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    if cfg.output.resume and (cfg.run_dir / artifacts.LAST).is_file():
        # every weight comes from last.pt: the files the run started from are not read again
        # (they may be gone); the run directory checks that last.pt is this run's
        method = build_method(_without_sources(cfg), bundle.num_classes, bundle.shape, require_trained=False,
                              num_samples=bundle.train_size)
    else:
        method = build_method(cfg, bundle.num_classes, bundle.shape, num_samples=bundle.train_size,
                              data=bundle)
    ctx = FitContext(cfg=cfg, run_dir=cfg.run_dir, dist=dist, device=device)
    summary = fit(method, bundle, ctx)
    return summary if dist.is_main else None


def rebuild_run(ckpt: dict, path: str) -> tuple[methods.Method, Config]:
    """The method of a run checkpoint with every weight loaded from it.

    The files its networks started from (teacher checkpoints, local weights) are not re-read.
    """
    cfg = stored_config(ckpt["config"], path)
    data = ckpt["data"]
    method = build_method(_without_sources(cfg), data["num_classes"], data["shape"], require_trained=False,
                          num_samples=data.get("train_size"))
    load_state_strict(method, ckpt["method"], f"checkpoint '{path}'")
    return method, cfg


class Classifiers(torch.nn.Module):
    """Networks that each classify images on their own (a model file's one network), with the
    interface evaluation reads from a method: `predict(images) -> {name: logits}`."""

    comparisons: tuple = ()

    def __init__(self, nets: dict[str, torch.nn.Module]):
        super().__init__()
        self.nets = torch.nn.ModuleDict(nets)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: net(images) for name, net in self.nets.items()}


@dataclass
class Opened:
    """A run checkpoint or model file, opened once for `sokd eval` and `sokd export`: its networks
    rebuilt with their weights (checked finite), its config, and what they were trained on."""

    path: str
    ckpt: dict
    format: str                       # artifacts.RUN_FORMAT or artifacts.MODEL_FORMAT
    networks: torch.nn.Module         # the method (run checkpoint) or Classifiers (model file)
    cfg: Config | None
    data_cfg: object                  # sokd.data.DataConfig of the data set it was trained on
    trained: dict                     # artifacts.data_record: name, shape, mean, std, num_classes

    def check_data(self, bundle, command: str) -> None:
        """SokdError unless `bundle` has the classes and image shape the networks were trained on."""
        want = self.trained
        if bundle.num_classes != want["num_classes"]:
            raise SokdError(f"'{self.path}' was trained for {want['num_classes']} classes but data set "
                            f"{bundle.name} has {bundle.num_classes}; {command} it on the data it was trained on")
        shape = want.get("shape")
        if shape is not None and list(bundle.shape) != list(shape):
            raise SokdError(f"'{self.path}' was trained on {'x'.join(map(str, shape))} images but data set "
                            f"{bundle.name} has {'x'.join(map(str, bundle.shape))}; {command} it on the "
                            f"data it was trained on")


def open_checkpoint(path: str | os.PathLike, command: str = "eval") -> Opened:
    """The one way to open a file sokd wrote for use: a run checkpoint (every role) or a model
    file (its one network). An export is named as such, with how to run it; anything else is
    refused in one line. No code named inside the file is imported (`stored_config`)."""
    from .data.config import DataConfig
    from .engine.checkpoint import check_finite
    path = str(path)
    artifacts.refuse_export(path, command)
    ckpt = artifacts.load(path)
    fmt = artifacts.kind(ckpt)
    if fmt == artifacts.RUN_FORMAT:
        networks, cfg = rebuild_run(ckpt, path)
        check_finite(networks.state_dict(), path)
    elif fmt == artifacts.MODEL_FORMAT:
        cfg = stored_config(ckpt["config"], path) if ckpt.get("config") else None
        net = artifacts.rebuild_model(ckpt, path)
        check_finite(net.state_dict(), path)
        networks = Classifiers({ckpt.get("name", "model"): net})
    else:
        raise SokdError(f"'{path}' is not a sokd run checkpoint or model file; use a run's last.pt / "
                        f"best.pt or a model file such as student.pt")
    trained = artifacts.data_record(ckpt)
    data_cfg = cfg.data if cfg is not None else DataConfig(name=trained["name"])
    return Opened(path, ckpt, fmt, networks.eval(), cfg, data_cfg, trained)


def evaluate_checkpoint(path: str, data_overrides: dict | None = None, device: str = "auto",
                        precision: str = "fp32") -> dict:
    """Score a run checkpoint (every role) or a model file on its data set's test split.

    Refused before scoring: non-finite weights, and a data set whose classes or image shape
    differ from those the networks were trained on.
    """
    from .data.config import DataConfig
    opened = open_checkpoint(path, "eval")
    dev = resolve_device(device)
    data_cfg = opened.data_cfg
    if data_overrides:
        data_cfg = DataConfig.from_dict({**data_cfg.model_dump(), **data_overrides})
    bundle = data_layer.create(data_cfg, device=dev)
    opened.check_data(bundle, "evaluate")
    opened.networks.to(dev)
    result = evaluate(opened.networks, bundle.test, dev, precision)
    result["checkpoint"] = str(path)
    result["epoch"] = opened.ckpt.get("epoch")
    return result


def _without_sources(cfg: Config) -> Config:
    """`cfg` with no network read from a file: for a run whose checkpoint holds every weight."""
    return cfg.with_networks({section: [_no_ckpt(s) for s in spec] if isinstance(spec, list) else _no_ckpt(spec)
                              for section, spec in cfg.networks().items()})


def _no_ckpt(spec: NetworkSpec) -> NetworkSpec:
    """The run checkpoint already holds the teacher's weights: don't re-read its source file."""
    return spec.model_copy(update={"checkpoint": None, "weights": None})
