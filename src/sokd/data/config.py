"""The `data:` section of a run config: a strict pydantic model.

Unknown keys are refused and every value is checked as given (no coercion: `"8"` is not a batch
size, `1` is not `true`); a bad value fails with a one-line message naming the key and what is
allowed. `Config` embeds this model; constructing it directly (`DataConfig(name=...)`) or through
`DataConfig.from_dict` runs the same validation and raises `SokdError` with the same messages.
"""
from __future__ import annotations

import os
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, \
    model_validator

from ..errors import SokdError, suggest
from ..validation import describe, invalid, validate
from .registry import FOLDER, find, names

PAD_MODES = ("reflect", "zeros")
AUGMENTS = ("auto", "cifar", "imagenet", "none")


def _dataset(name: Any) -> Any:
    """A registered data set name (built in, or added with `sokd.data.register`)."""
    known = names()
    if name not in known:
        raise invalid(f"unknown data set data.name='{name}'{suggest(name, known)}; valid: {', '.join(known)} "
                      f"(your own: @sokd.data.register in a module listed under imports:)")
    return name


def _choice(choices: tuple) -> BeforeValidator:
    def check(value: Any, info: ValidationInfo) -> Any:
        if value not in choices:
            raise invalid(f"unknown data.{info.field_name} '{value}'{suggest(str(value), choices)}; "
                          f"valid: {', '.join(choices)}")
        return value
    return BeforeValidator(check)


def _fraction(value: Any) -> Any:
    if value is None:
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
        raise invalid(f"data.val_split must be a fraction between 0 and 1 (e.g. 0.1) or null, got {value!r}")
    return float(value)


def _in_memory(value: Any) -> Any:
    if value not in ("auto", True, False):
        raise invalid(f"data.in_memory must be auto, true or false, got {value!r}")
    return value


def _positive(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise invalid(f"data.{info.field_name} must be a positive number, got {value!r}")
    return float(value)


def _pad_mode(mode: Any) -> Any:
    if mode not in PAD_MODES:
        raise invalid(f"unknown data.pad_mode '{mode}'{suggest(mode, PAD_MODES)}; valid: {', '.join(PAD_MODES)}")
    return mode


def _path_text(root: Any) -> Any:
    """A path given as an object (e.g. pathlib.Path) is kept as its text; `~` is the home
    directory, as a shell would expand it (nothing expands it in a config file or an override)."""
    return root if root is None else os.path.expanduser(str(root))


def _flag(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, bool):
        raise invalid(f"data.{info.field_name} must be true or false, got {value!r}")
    return value


def _at_least(low: int, optional: bool = False) -> BeforeValidator:
    """An integer (not a bool) >= low; with `optional`, None is allowed too."""
    def check(value: Any, info: ValidationInfo) -> Any:
        if value is None and optional:
            return value
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            what = f"an integer >= {low}" + (" or null" if optional else "")
            raise invalid(f"data.{info.field_name} must be {what}, got {value!r}")
        return value
    return BeforeValidator(check)


def _workers(value: Any) -> Any:
    """An integer >= 0, or null / "auto" (both kept as None: the machine decides, `workers_for`)."""
    if value is None or value == "auto":
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise invalid(f"data.num_workers must be auto (or null) or an integer >= 0, got {value!r}")
    return value


#: the most DataLoader workers `data.num_workers: auto` starts
AUTO_WORKERS = 4


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as torch's DataLoader counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def workers_for(cfg: "DataConfig") -> int:
    """DataLoader worker processes for an image folder: `data.num_workers` when given, else
    min(AUTO_WORKERS, usable CPUs). The automatic number never exceeds the CPUs, so torch never
    warns about too many workers for a number sokd chose; an explicit number is the user's."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    return min(AUTO_WORKERS, usable_cpus())


def _shape(shape: Any) -> Any:
    if (not isinstance(shape, (list, tuple)) or len(shape) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)):
        raise invalid(f"data.synthetic_shape must be [C, H, W] with positive integers, got {shape!r}")
    if shape[0] > 4:
        raise invalid(f"data.synthetic_shape has {shape[0]} channels; use 1 to 4 (e.g. [3, 32, 32])")
    return shape


def _per_channel(values: Any, info: ValidationInfo) -> Any:
    """None, or a non-empty list of numbers (ints become floats); std must be positive."""
    if values is None:
        return values
    if (not isinstance(values, (list, tuple)) or not values
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise invalid(f"data.{info.field_name} must be a list of numbers (one per channel), got {values!r}")
    values = [float(v) for v in values]
    if info.field_name == "std" and any(v <= 0 for v in values):
        raise invalid(f"data.std must be positive, got {values}")
    return values


Flag = Annotated[bool, BeforeValidator(_flag)]
PerChannel = Annotated[list[float] | None, BeforeValidator(_per_channel)]


def _column(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, str) or not value:
        raise invalid(f"data.hf.{info.field_name} must be a non-empty string, got {value!r}")
    return value


Column = Annotated[str, BeforeValidator(_column)]


class HFColumns(BaseModel):
    """Where a Hugging Face data set saved with `save_to_disk` keeps images, labels and splits."""

    model_config = ConfigDict(extra="forbid")

    image: Column = "image"
    label: Column = "label"
    train_split: Column = "train"
    test_split: Column = "test"


class DataConfig(BaseModel):
    # allow_inf_nan=False: an infinite or NaN mean/std is never a meaningful setting
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    name: Annotated[str, BeforeValidator(_dataset)]
    root: Annotated[str | None, BeforeValidator(_path_text)] = None
    batch_size: Annotated[int, _at_least(1)] = 128
    # None: chosen by device (`eval_batch_for`)
    eval_batch_size: Annotated[int | None, _at_least(1, optional=True)] = None
    download: Flag = False
    train_per_class: Annotated[int | None, _at_least(1, optional=True)] = None
    train_limit: Annotated[int | None, _at_least(1, optional=True)] = None   # class-stratified
    test_limit: Annotated[int | None, _at_least(1, optional=True)] = None    # class-stratified
    # the seed of every subset and of the validation split: the same images for every training seed
    split_seed: Annotated[int, _at_least(0)] = 0
    val_split: Annotated[float | None, BeforeValidator(_fraction)] = None    # held out of train
    val: Annotated[str | None, BeforeValidator(_path_text)] = None           # a shipped validation folder
    in_memory: Annotated[bool | str, BeforeValidator(_in_memory)] = "auto"   # image folders
    augment: Annotated[str, _choice(AUGMENTS)] = "auto"
    cache_dir: Annotated[str | None, BeforeValidator(_path_text)] = None     # decoded image folders
    memory_cap_gb: Annotated[float, BeforeValidator(_positive)] = 4.0         # for in_memory folders
    options: dict[str, Any] = Field(default_factory=dict)                     # for registered readers
    hf: HFColumns = Field(default_factory=HFColumns)
    pad_to: Annotated[int | None, _at_least(1, optional=True)] = None
    crop_padding: Annotated[int, _at_least(0)] = 4
    pad_mode: Annotated[str, BeforeValidator(_pad_mode)] = "reflect"
    hflip: Flag = True
    mean: PerChannel = None
    std: PerChannel = None
    drop_last: Flag = True
    num_workers: Annotated[int | None, BeforeValidator(_workers)] = Field(
        default=None, description="DataLoader worker processes for image folders; null or auto: "
                                  "min(4, the CPUs this process may use); data sets held in memory use none")
    skip_unreadable: Flag = False   # image folders: skip (and count) images that cannot be decoded
    # image folders; null: 224 with imagenet augmentation, else the images' own size
    image_size: Annotated[int | None, _at_least(8, optional=True)] = None
    synthetic_size: Annotated[int, _at_least(4)] = 512
    synthetic_shape: Annotated[list[int], BeforeValidator(_shape)] = Field(default_factory=lambda: [3, 32, 32])
    synthetic_classes: Annotated[int, _at_least(2)] = 10

    def __init__(self, /, **values: Any) -> None:
        """Keyword construction; any problem is a one-line SokdError (as in a config file)."""
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise SokdError(describe(err, type(self), prefix="data.")) from None

    @classmethod
    def from_dict(cls, values: dict) -> "DataConfig":
        """Build from a mapping; unknown keys and bad values are one-line SokdErrors."""
        return validate(cls, values, prefix="data.")

    @model_validator(mode="after")
    def _consistent(self) -> "DataConfig":
        if self.val is not None and self.val_split is not None:
            raise invalid(f"data.val='{self.val}' and data.val_split={self.val_split} both choose a validation "
                          f"set; keep one")
        if self.val is not None and find(self.name).kind != FOLDER:
            raise invalid(f"data.val (a validation folder) applies to image folders, not {self.name}; "
                          f"use data.val_split=0.1 to hold out part of the training set")
        return self

    @model_validator(mode="after")
    def _same_channel_count(self) -> "DataConfig":
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise invalid(f"data.mean has {len(self.mean)} values but data.std has {len(self.std)}; "
                          f"give one per channel in both")
        return self


#: evaluation batch on a CPU: a 512-image test batch evaluates ~1.6x slower than 128 there
#: (cache), measured on wrn_16_2 and wrn_40_2 in bf16
CPU_EVAL_BATCH = 128
#: evaluation batch on a GPU, as a multiple of the training batch: evaluation keeps no
#: activations for a backward pass, so this many times the training batch still needs less
#: memory than a training step, and fewer, larger batches keep a GPU busy
GPU_EVAL_BATCH_FACTOR = 4


def eval_batch_for(cfg: "DataConfig", device) -> int:
    """`data.eval_batch_size`, or its default for `device` when unset."""
    if cfg.eval_batch_size is not None:
        return cfg.eval_batch_size
    if getattr(device, "type", str(device)) == "cuda":
        return GPU_EVAL_BATCH_FACTOR * cfg.batch_size
    return CPU_EVAL_BATCH
