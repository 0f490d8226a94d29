"""What `sokd.data.create` hands the engine (`DataBundle`), and the checks both pipelines share.

A bundle is the same whether its batches come from tensors held in memory (`in_memory`) or from
a streamed image folder (`folder_pipeline`): the engine never asks which. The checks live here so
that both pipelines refuse empty splits, mismatched statistics and batch-less epochs with the
same one-line messages.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SokdError
from .config import DataConfig
from .registry import Entry
from .sources import BatchSource, TensorBatches

#: per-channel (mean, std) of a data set that declares none (the synthetic set, users' readers)
GENERIC_STATS = ((0.5,), (0.25,))


@dataclass
class DataBundle:
    train: BatchSource          # training batches (augmented, shuffled, rank-strided)
    test: BatchSource           # test batches (no augmentation, file order, this rank's shard)
    num_classes: int
    class_names: list[str]
    shape: tuple[int, int, int]  # C, H, W of a model input (after any pad_to)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    train_size: int             # training images in the whole data set (after per-class/limits)
    test_size: int              # test images in the whole data set (after test_limit)
    val: BatchSource | None = None   # validation batches (no augmentation), when the run has a split
    val_size: int = 0

    @property
    def fingerprint(self) -> str:
        """16 hex digits naming the training and validation data (see `sokd.data.fingerprint`)."""
        return fingerprint(self)


def fingerprint(bundle: DataBundle) -> str:
    """16 hex digits naming the bundle's training split and validation split (if any): their
    samples' content (in-memory images and labels, or each streamed file's relative path, label,
    size and modification time) in the split's order, independent of seed and epoch order. A
    changed pixel, label or file changes it; creating the bundle again from the same data does
    not. Computed on first use (about 0.1 s per 150 MB of in-memory images; one stat per file of
    a streamed folder) and kept on the bundle, so a run can refuse to resume on data that changed."""
    cached = bundle.__dict__.get("_fingerprint")
    if cached is None:
        from .digest import bundle_fingerprint
        cached = bundle.__dict__["_fingerprint"] = bundle_fingerprint(bundle)
    return cached


def stats_for(cfg: DataConfig, entry: Entry, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std: the config's, else those the data set's registry `entry` declares,
    else GENERIC_STATS (one value, repeated for every channel)."""
    default = (entry.mean, entry.std) if entry.mean is not None else GENERIC_STATS
    if len(default[0]) == 1 and channels > 1:
        default = (default[0] * channels, default[1] * channels)
    for key, given, fallback in (("mean", cfg.mean, default[0]), ("std", cfg.std, default[1])):
        if given is not None and len(given) != channels:
            raise SokdError(f"data.{key} has {len(given)} values but the {cfg.name} images have {channels} "
                            f"channel(s); give one value per channel")
        if given is None and len(fallback) != channels:
            raise SokdError(f"the default {cfg.name} {key} has {len(fallback)} values but these images have "
                            f"{channels} channel(s); set data.mean and data.std (one value per channel)")
    mean = tuple(cfg.mean) if cfg.mean is not None else tuple(default[0])
    std = tuple(cfg.std) if cfg.std is not None else tuple(default[1])
    return mean, std


def check_nonempty(n_train: int, n_test: int, source: str, cfg: DataConfig | None) -> None:
    """Empty splits are errors; with `cfg`, blame the limits that were applied (if any)."""
    for split, n, keys in (("train", n_train, ("train_per_class", "train_limit")),
                           ("test", n_test, ("test_limit",))):
        if n == 0:
            used = [f"data.{k}" for k in keys if cfg is not None and getattr(cfg, k) is not None]
            if used:
                raise SokdError(f"the {split} split of {source} is empty after {' / '.join(used)}; raise them")
            raise SokdError(f"the {split} split of {source} is empty (no images); check the data files")


def check_batches(train, cfg: DataConfig) -> None:
    """A training source that gives no batch (drop_last with fewer images than a batch) is an
    error before the first epoch, not an epoch that silently trains nothing."""
    if len(train) == 0:
        per_rank = train._count() if isinstance(train, TensorBatches) else len(train.sampler.indices)
        raise SokdError(f"only {per_rank} training images per process but data.batch_size={cfg.batch_size} "
                        f"with data.drop_last=true gives no batches; lower data.batch_size or set "
                        f"data.drop_last=false")
