"""Typed, validated run configuration: YAML file + dotted `key=value` overrides -> Config.

Unknown keys and wrong types are one-line SokdErrors naming the key (with a suggestion).
Method options are validated against the chosen method's own options model.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)

from .data.config import DataConfig, usable_cpus
from .errors import SokdError, suggest
from .validation import invalid, validate


#: the largest learning rate that can mean anything for SGD / AdamW (a larger one diverges at once)
MAX_LR = 10.0
#: |train.seed| at most this: the per-epoch seeds derived from it (seed * 100_003 + epoch) stay
#: within the 64-bit range torch's generators accept
MAX_SEED = 2 ** 32 - 1


def user_path(text: str | None) -> str | None:
    """A path as the user wrote it, with `~` / `~user` expanded as a shell would (a config file
    and a dotted override are not expanded by any shell)."""
    return os.path.expanduser(text) if isinstance(text, str) else text


UserPath = Annotated[str, AfterValidator(user_path)]


def _fraction_below_one(values: tuple[float, float]) -> tuple[float, float]:
    if not all(0 <= v < 1 for v in values):
        raise ValueError("each beta must be in [0, 1)")
    return values


class Strict(BaseModel):
    # allow_inf_nan=False: an infinite or NaN number is never a meaningful setting
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class NetworkSpec(Strict):
    arch: str = Field(description="zoo name, e.g. wrn_40_2, resnet20, tv.resnet18")
    checkpoint: UserPath | None = Field(None, description="sokd run checkpoint or model file to start from")
    checkpoint_role: str | None = Field(None, description="role inside a run checkpoint (default: best guess)")
    weights: UserPath | None = Field(None, description="local state dict: tv./timm. model, or a zoo model in "
                                                  "sokd's or RepDistiller/mdistiller's layout")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra constructor arguments")
    preprocess: Literal["recorded", "pretrained", "data"] = Field(
        "recorded", description="the images this network gets: recorded = normalised (and sized) as its "
        "checkpoint or Hugging Face folder records; pretrained = as timm's pretrained config says for its "
        "weights; data = the data's own, whatever it was trained on")


class MethodSpec(BaseModel):
    """`name` plus that method's options (validated by the method's own options model)."""

    model_config = ConfigDict(extra="allow")
    name: str = "sokd"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimSpec(Strict):
    name: Literal["sgd", "adamw", "dot"] = Field(
        "sgd", description="sgd | adamw | dot (SGD with separate momentum for the task and the distillation "
                           "gradients, Zhao et al. ICCV 2023)")
    lr: float = Field(0.1, gt=0, le=MAX_LR)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    dot_delta: float = Field(0.075, ge=0, lt=1, description="dot: task momentum = momentum - dot_delta, "
                             "distillation momentum = momentum + dot_delta (CIFAR-100: 0.075; ImageNet: 0.09)")
    weight_decay: float = Field(5e-4, ge=0, lt=1, description="L2 factor per step (scaled by the lr)")
    betas: Annotated[tuple[float, float], AfterValidator(_fraction_below_one)] = (0.9, 0.999)
    lr_per_role: dict[str, float] = Field(default_factory=dict, description="e.g. {teacher: 0.01}")
    impl: Literal["auto", "fused", "foreach", "loop"] = Field(
        "auto", description="optimizer kernels: auto = fused on CUDA, PyTorch's default (a loop) "
                            "on CPU, which keeps CPU results reproducible; fused is faster on both")

    @field_validator("lr_per_role")
    @classmethod
    def _positive_role_lrs(cls, lrs: dict[str, float]) -> dict[str, float]:
        for role, lr in lrs.items():
            if not 0 < lr <= MAX_LR:
                raise ValueError(f"the lr of role '{role}' must be > 0 and <= {MAX_LR:g}")
        return lrs


class ScheduleSpec(Strict):
    name: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [100, 150])
    gamma: float = Field(0.1, gt=0, le=10, description="lr factor at each milestone")
    warmup_epochs: int = Field(0, ge=0, le=100_000)
    min_lr_factor: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")

    @field_validator("milestones")
    @classmethod
    def _increasing_milestones(cls, ms: list[int]) -> list[int]:
        if any(m < 1 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:])):
            raise ValueError("milestones must be strictly increasing epochs >= 1")
        return ms


class TrainSpec(Strict):
    epochs: int = Field(200, ge=1, le=100_000)
    seed: int = Field(0, ge=-MAX_SEED, le=MAX_SEED)
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "auto", description="auto: bf16 where the hardware computes it natively, else fp32 (engine/settings.py)")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="NHWC activations and weights; auto: on (faster convolutions; engine/settings.py)")
    compile: Literal[False, True, "auto", "max-autotune", "reduce-overhead"] = Field(
        "auto", description="torch.compile the method's forward and losses (engine/compiled.py): "
                            "false | true | max-autotune | reduce-overhead | auto (on for runs long enough "
                            "to repay compiling: engine/settings.py)")
    frozen_inference: bool = Field(
        True, description="run frozen networks as inference networks: BatchNorm folded into the convolution "
                          "before it where they never use batch statistics, weights cast once to the step's "
                          "precision (engine/frozen.py); false runs them as plain modules")
    sync_every: int | None = Field(
        None, ge=1, le=1_000_000, description="steps between host reads of the loss health, statistics and stop "
                                "flag (default per device: SYNC_EVERY in engine/stepstats.py)")
    steps_per_epoch: int | None = Field(None, ge=1, le=10 ** 9, description="cap on steps per epoch (smoke tests)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice); "
                                                        "at most the CPUs this process may use")
    eval_every: int = Field(1, ge=1, le=100_000, description="epochs between evaluations (the last epoch is "
                                                 "always evaluated; best.pt is picked among evaluated ones)")
    tf32: bool = Field(True, description="CUDA: TF32 tensor cores for fp32 matmuls and convolutions")
    cudnn_benchmark: bool = Field(True, description="CUDA: let cuDNN time its algorithms once per shape")

    @field_validator("threads")
    @classmethod
    def _threads_exist(cls, threads: int | None) -> int | None:
        cpus = usable_cpus()
        if threads is not None and threads > cpus:
            raise invalid(f"bad value for 'train.threads': this machine lets sokd use {cpus} CPU"
                          f"{'s' if cpus != 1 else ''}, so {threads} threads cannot run; use 1..{cpus} or "
                          f"leave it unset")
        return threads

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_mode(cls, value: Any) -> Any:
        if isinstance(value, bool) or value in ("auto", "max-autotune", "reduce-overhead"):
            return value
        raise invalid(f"bad value for 'train.compile': use auto, false, true, max-autotune or reduce-overhead "
                      f"(got {value!r})")


PLACEHOLDERS = ("name", "method", "seed")


class MlflowSpec(Strict):
    """`output.mlflow: true` or these keys (needs `pip install 'sokd[mlflow]'`)."""

    uri: str | None = Field(None, description="tracking URI (default: a SQLite store in <run dir>/mlflow)")
    experiment: str = Field("sokd", min_length=1, description="MLflow experiment name")


class WandbSpec(Strict):
    """`output.wandb: true` or these keys (needs `pip install 'sokd[wandb]'`)."""

    project: str = Field("sokd", min_length=1)
    entity: str | None = None
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files in <run dir>/wandb, `wandb sync` uploads them later")


def _tracker_switch(value: Any, info: ValidationInfo) -> Any:
    """`true` turns a tracker on with its defaults, `false`/null leaves it off."""
    if value is True:
        return {}
    if value is False:
        return None
    if value is None or isinstance(value, dict):
        return value
    keys = (MlflowSpec if info.field_name == "mlflow" else WandbSpec).model_fields
    raise invalid(f"output.{info.field_name} must be true, false or a mapping of {', '.join(keys)}; "
                  f"got {value!r}")


class OutputSpec(Strict):
    dir: UserPath = Field("runs/{name}", description="run directory; {name}, {method}, {seed} are replaced")

    @field_validator("dir")
    @classmethod
    def _known_placeholders(cls, text: str) -> str:
        import string
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
        except ValueError:
            raise ValueError("it has an unmatched brace") from None
        unknown = [f for f in fields if f not in PLACEHOLDERS]
        if unknown:
            raise ValueError(f"unknown placeholder {{{unknown[0]}}}; known: "
                             f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
        return text
    resume: bool = False
    allow_data_change: bool = Field(
        False, description="resume even though the training data differ from those last.pt was "
                           "trained on (recorded as a fingerprint); off: such a resume is refused")
    overwrite: bool = False
    tensorboard: bool = True
    mlflow: MlflowSpec | None = Field(None, description="MLflow tracking (true, or uri/experiment)")
    wandb: WandbSpec | None = Field(None, description="Weights & Biases tracking (true, or project/entity/mode)")
    progress: bool = True
    save_every: int = Field(1, ge=1, le=100_000, description="epochs between last.pt writes (also written at the "
                                                 "first and last epoch and whenever a run stops)")

    _trackers_on_off = field_validator("mlflow", "wandb", mode="before")(_tracker_switch)


class DistributedSpec(Strict):
    sync_bn: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    static_graph: bool = Field(True, description="DDP static_graph: the step's autograd graph is "
                                                 "the same every step (true for every built-in method)")


#: the network sections every config knows; a method's other config roles (declared by a plugin
#: method, e.g. a teaching assistant) are sections of their own names, checked against the method
NETWORK_SECTIONS = ("model", "teacher", "student", "peers")


class Config(Strict):
    # extra top-level keys are allowed only as network sections the chosen method declares
    model_config = ConfigDict(extra="allow", protected_namespaces=(), allow_inf_nan=False)
    name: str = "run"
    imports: list[UserPath] = Field(default_factory=list, description=(
        "Python modules or .py files imported first, e.g. to register your own models"))
    method: MethodSpec = Field(default_factory=MethodSpec)
    model: NetworkSpec | None = None
    teacher: NetworkSpec | None = None
    student: NetworkSpec | None = None
    peers: list[NetworkSpec] = Field(default_factory=list)
    data: DataConfig
    optim: OptimSpec = Field(default_factory=OptimSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)

    @model_validator(mode="before")
    @classmethod
    def _import_plugins_first(cls, values: Any, info: ValidationInfo) -> Any:
        """Modules under `imports:` run before the other sections are checked, so the names they
        register (models, data sets) are valid in the same config. A config read from a file sokd
        did not get from the user (a checkpoint's) is validated with `context={"imports": False}`:
        it never imports code (see `stored_config`)."""
        if (info.context or {}).get("imports", True) is False:
            return values
        if isinstance(values, dict) and isinstance(values.get("imports"), list) \
                and all(isinstance(v, str) for v in values["imports"]):
            import_plugins([user_path(v) for v in values["imports"]])
        return values

    @model_validator(mode="after")
    def _check_method(self):
        from . import methods
        validate(methods.options_model(self.method.name), self.method.options(), prefix="method.")
        self._check_role_sections(methods.get(self.method.name))
        return self

    def _check_role_sections(self, method) -> None:
        """Each extra top-level key must be a config role the method declares (see
        `sokd.methods.Role`); its value is a network spec (a list of them for a `many` role)."""
        extra = self.__pydantic_extra__ or {}
        for key, value in list(extra.items()):
            declared = method.roles.get(key)
            if declared is None or not declared.config:
                valid = list(type(self).model_fields) + [r for r in method.config_roles if r not in NETWORK_SECTIONS]
                raise invalid(f"unknown config key '{key}'{suggest(key, valid)}; valid keys here: {', '.join(valid)}")
            if declared.many:
                items = value if isinstance(value, list) else [value]
                extra[key] = [validate(NetworkSpec, v, prefix=f"{key}.{i}.") for i, v in enumerate(items)]
            elif value is not None:
                extra[key] = validate(NetworkSpec, value, prefix=f"{key}.")

    def networks(self) -> dict[str, "NetworkSpec | list[NetworkSpec]"]:
        """Every network section the config gives, in order: model, teacher, student, peers, then
        the sections of other roles the method declares; empty ones are left out."""
        given = {key: getattr(self, key) for key in NETWORK_SECTIONS}
        given.update(self.__pydantic_extra__ or {})
        return {key: spec for key, spec in given.items() if spec}

    def with_networks(self, networks: dict[str, "NetworkSpec | list[NetworkSpec]"]) -> "Config":
        """This config with the given network sections replaced (validated again, importing nothing)."""
        tree = self.to_dict()
        for key, spec in networks.items():
            tree[key] = [s.model_dump(mode="json") for s in spec] if isinstance(spec, list) else \
                (spec.model_dump(mode="json") if spec is not None else None)
        return validate(type(self), tree, context={"imports": False})

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir.replace("{name}", self.name).replace("{method}", self.method.name)
                    .replace("{seed}", str(self.train.seed)))

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def input_files(self) -> dict[str, str]:
        """{config key: path} of every file the run reads its networks from."""
        specs = {}
        for section, spec in self.networks().items():
            specs.update({f"{section}.{i}": s for i, s in enumerate(spec)} if isinstance(spec, list)
                         else {section: spec})
        return {f"{role}.{key}": getattr(spec, key) for role, spec in specs.items()
                for key in ("checkpoint", "weights") if getattr(spec, key)}

    @staticmethod
    def schema_default(path: tuple[str, ...]):
        return schema_default(path)


#: what `schema_default` returns for an entry without a default
NO_DEFAULT = object()


def schema_default(path: tuple[str, ...]):
    """The JSON value a config entry (e.g. ("train", "eval_every")) has when nobody sets it, or
    NO_DEFAULT. A run saved by an older sokd lacks the entries added since; resuming it is
    the same run when each of them is at this default."""
    import typing
    from pydantic_core import to_jsonable_python
    model = Config
    for i, key in enumerate(path):
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return NO_DEFAULT
        if i == len(path) - 1:
            if field.is_required():
                return NO_DEFAULT
            return to_jsonable_python(field.get_default(call_default_factory=True))
        model = next((a for a in (field.annotation, *typing.get_args(field.annotation))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return NO_DEFAULT
    return NO_DEFAULT


def _plugin_module_name(name: str) -> str:
    """The name under which `import_plugins` imports `name` (a module name or a .py path)."""
    return f"sokd_plugin_{Path(name).stem}" if name.endswith(".py") else name


class PluginNeeded(SokdError):
    """A checkpoint's config names plugins (`imports:`) that the user has not imported."""


def stored_config(tree: dict, path: str | os.PathLike) -> Config:
    """The config stored inside a checkpoint, validated without running any code.

    A checkpoint is data: a file that passes `torch.load(weights_only=True)` must not be able to
    run code by naming a module or a .py file under `imports:`. Plugins come only from the user
    (their config's `imports:` or `--import` on the command line); a stored config whose plugins
    are not imported yet is refused, naming them and how to allow them.
    """
    import sys
    imports = tree.get("imports") if isinstance(tree, dict) else None
    wanted = [str(n) for n in imports] if isinstance(imports, list) else []
    missing = [n for n in wanted if _plugin_module_name(n) not in sys.modules]
    if missing:
        shown = ", ".join(f"'{n}'" for n in missing)
        raise PluginNeeded(f"checkpoint '{path}' was trained with the plugin{'s' if len(missing) > 1 else ''} "
                           f"{shown} (its config's imports:), and sokd never imports code named inside a "
                           f"file it reads; if you trust that code, add --import {missing[0]}"
                           f"{' (once per plugin)' if len(missing) > 1 else ''}")
    return validate(Config, tree, context={"imports": False})


def import_plugins(names: list[str]) -> None:
    """Import user modules (dotted names or .py paths) so their @register decorators run."""
    import importlib
    import importlib.util
    import sys
    for name in map(user_path, names):
        try:
            if name.endswith(".py"):
                path = Path(name).resolve()
                if not path.is_file():
                    raise SokdError(f"imports: file '{name}' not found")
                mod_name = f"sokd_plugin_{path.stem}"
                if mod_name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except SokdError:
            raise
        except ImportError as err:
            sys.modules.pop(f"sokd_plugin_{Path(name).stem}", None)
            raise SokdError(f"imports: cannot import '{name}' ({err}); check the module name / PYTHONPATH") from None
        except SyntaxError as err:
            sys.modules.pop(f"sokd_plugin_{Path(name).stem}", None)
            raise SokdError(f"imports: '{err.filename or name}' line {err.lineno} has a syntax error "
                            f"({err.msg}); fix that file") from None
        except Exception as err:  # noqa: BLE001 - the user's module failed while importing
            sys.modules.pop(f"sokd_plugin_{Path(name).stem}", None)
            raise SokdError(f"imports: '{name}' raised {type(err).__name__} while being imported "
                            f"({str(err)[:160]}); fix that module") from None


def parse_value(raw: str) -> Any:
    """An override's value: the whole text after `=`, typed as YAML would type it (5 -> int,
    true -> bool, [1, 2] -> list), but never cut short: YAML would read `runs/exp #2` as
    `runs/exp` plus a comment, and a path must not lose its tail, so text that YAML does not
    consume to its end stays the text it is."""
    if raw.strip() == "":
        return raw
    try:
        node = yaml.compose(raw, Loader=yaml.SafeLoader)
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if node is None or node.end_mark.index < len(raw.rstrip()):
        return raw
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise SokdError(f"override '{text}' is not key=value (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise SokdError(f"override '{text}' has an empty key part")
    return key.split("."), parse_value(raw)


def data_overrides(texts: list[str], command: str) -> dict:
    """`data.KEY=VALUE` arguments of eval/export as {KEY: VALUE}; anything else is an error."""
    out = {}
    for text in texts:
        path, value = parse_override(text)
        if len(path) != 2 or path[0] != "data":
            raise SokdError(f"{command} accepts only data.KEY=VALUE overrides, got '{text}'")
        out[path[1]] = value
    return out


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Set dotted keys (creating missing mappings); validation later rejects unknown ones."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise SokdError(f"override '{text}': '{'.'.join(path[:i + 1])}' is not a section")
            node = nxt
        node[path[-1]] = value
    return tree


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key that appears twice in one mapping (YAML keeps the last
    silently, which hides typos such as two `lr:` lines)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a YAML config; a `base: other.yaml` key (relative to this file) is merged underneath."""
    path = Path(path)
    if not path.is_file():
        raise SokdError(f"config file '{path}' not found; pass a YAML file such as configs/fmnist/sokd.yaml")
    if path.resolve() in _seen:
        raise SokdError(f"config '{path}' includes itself through `base`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SokdError(f"config '{path}' is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise SokdError(f"cannot read config '{path}' ({err.strerror}); check its permissions") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or ""
        detail = f" ({problem})" if problem.startswith("duplicate key") else ""
        raise SokdError(f"config '{path}' is not valid YAML{where}{detail}; fix the syntax") from None
    if not isinstance(tree, dict):
        raise SokdError(f"config '{path}' must be a mapping of keys to values")
    base = tree.pop("base", None)
    if base is not None:
        bases = [base] if isinstance(base, str) else base
        if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
            raise SokdError(f"config '{path}': base must be a file name or a list of them "
                            f"(e.g. base: ../common.yaml), got {base!r}")
        merged: dict = {}
        for b in bases:
            merged = _deep_merge(merged, read_yaml(path.parent / b, _seen + (path.resolve(),)))
        tree = _deep_merge(merged, tree)
    return tree


def build(tree: dict) -> Config:
    return validate(Config, tree)


def load(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    tree = read_yaml(path) if path is not None else {}
    return build(apply_overrides(tree, list(overrides)))
