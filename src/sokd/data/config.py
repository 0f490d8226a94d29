"""The `data:` section of a run config, as a plain dataclass.

The lead's pydantic `Config` embeds this class (pydantic validates the field types and forbids
unknown keys); `__post_init__` then checks the values and raises a one-line `SokdError` naming the
key and the fix. Constructing it directly (tests, `sokd eval` overrides) runs the same checks.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..errors import SokdError, suggest

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "imagenet", "synthetic")
PAD_MODES = ("reflect", "zeros")


@dataclass
class DataConfig:
    name: str
    root: str | None = None
    batch_size: int = 128
    # 128, not larger: on CPU a 512-image test batch evaluates ~1.6x slower (cache), measured on
    # wrn_16_2 and wrn_40_2 in bf16; on a GPU a larger value may pay off.
    eval_batch_size: int = 128
    download: bool = False
    train_per_class: int | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    pad_to: int | None = None
    crop_padding: int = 4
    pad_mode: str = "reflect"
    hflip: bool = True
    mean: list[float] | None = None
    std: list[float] | None = None
    drop_last: bool = True
    num_workers: int = 4
    skip_unreadable: bool = False   # image folders: skip (and count) images that cannot be decoded
    image_size: int = 224
    synthetic_size: int = 512
    synthetic_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    synthetic_classes: int = 10

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, values: dict) -> "DataConfig":
        """Build from a mapping; unknown keys are a SokdError (with a suggestion), not a TypeError."""
        valid = [f.name for f in fields(cls)]
        for key in values:
            if key not in valid:
                raise SokdError(f"unknown config key 'data.{key}'{suggest(key, valid)}; "
                                f"valid keys here: {', '.join(valid)}")
        if "name" not in values:
            raise SokdError("missing required config key 'data.name'")
        return cls(**values)

    def validate(self) -> None:
        """Raise SokdError for the first bad value (names the key and what is allowed)."""
        if self.name not in DATASETS:
            raise SokdError(f"unknown data set data.name='{self.name}'{suggest(self.name, DATASETS)}; "
                            f"valid: {', '.join(DATASETS)}")
        if self.root is not None and not isinstance(self.root, str):
            self.root = str(self.root)  # accept pathlib.Path
        for key in ("download", "hflip", "drop_last", "skip_unreadable"):
            if not isinstance(getattr(self, key), bool):
                raise SokdError(f"data.{key} must be true or false, got {getattr(self, key)!r}")
        _int(self, "batch_size", 1)
        _int(self, "eval_batch_size", 1)
        _int(self, "train_per_class", 1, optional=True)
        _int(self, "train_limit", 1, optional=True)
        _int(self, "test_limit", 1, optional=True)
        _int(self, "pad_to", 1, optional=True)
        _int(self, "crop_padding", 0)
        _int(self, "num_workers", 0)
        _int(self, "image_size", 8)
        _int(self, "synthetic_size", 4)
        _int(self, "synthetic_classes", 2)
        if self.pad_mode not in PAD_MODES:
            raise SokdError(f"unknown data.pad_mode '{self.pad_mode}'{suggest(self.pad_mode, PAD_MODES)}; "
                            f"valid: {', '.join(PAD_MODES)}")
        shape = self.synthetic_shape
        if (not isinstance(shape, (list, tuple)) or len(shape) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)):
            raise SokdError(f"data.synthetic_shape must be [C, H, W] with positive integers, got {shape!r}")
        if shape[0] > 4:
            raise SokdError(f"data.synthetic_shape has {shape[0]} channels; use 1 to 4 (e.g. [3, 32, 32])")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is None:
                continue
            if (not isinstance(value, (list, tuple)) or not value
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise SokdError(f"data.{key} must be a list of numbers (one per channel), got {value!r}")
            setattr(self, key, [float(v) for v in value])
        if self.std is not None and any(v <= 0 for v in self.std):
            raise SokdError(f"data.std must be positive, got {self.std}")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise SokdError(f"data.mean has {len(self.mean)} values but data.std has {len(self.std)}; "
                            f"give one per channel in both")


def _int(cfg: DataConfig, key: str, low: int, optional: bool = False) -> None:
    value = getattr(cfg, key)
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        what = f"an integer >= {low}" + (" or null" if optional else "")
        raise SokdError(f"data.{key} must be {what}, got {value!r}")
