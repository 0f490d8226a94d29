"""Data layer: `create(cfg)` -> DataBundle with train/test (and validation) batch sources on the
target device.

Fashion-MNIST, CIFAR-10/100, the synthetic set, saved Hugging Face sets, registered readers and
small image folders (decoded once, `folder_cache`) are held in memory as uint8 tensors on the
device and augmented there in batches (`TensorBatches`); larger image folders (and ImageNet)
stream uint8 through a torch DataLoader (`LoaderBatches`). Both yield (float32 NCHW normalised
images, int64 labels) on the device, deterministically for (seed, epoch, rank, world_size).
Which samples a run uses (stratified limits, the validation split) is decided once, by `select`.
`fingerprint(bundle)` names the training and validation data, so a run is not resumed on others.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import SokdError
from .arrays import ArraySplits, first_per_class
from .cifar import load_cifar
from .config import DATASETS, DataConfig, eval_batch_for, workers_for
from .folders import find_image_folder, image_folders
from .idx import load_fashion_mnist
from .registry import register
from .sources import BatchSource, LoaderBatches, TensorBatches, epoch_indices, shard_bounds
from .subsets import stratified_subset, validation_split, warn_lost_classes
from .synthetic import make_synthetic

__all__ = ["DataBundle", "DataConfig", "BatchSource", "TensorBatches", "LoaderBatches", "create",
           "list_datasets", "epoch_indices", "shard_bounds", "register", "ArraySplits", "fingerprint"]

STATS = {  # (mean, std) per channel of the training images, in [0, 1] units
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
STATS["imagefolder"] = STATS["imagenet"]


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


def list_datasets() -> list[str]:
    """Built-in data set names, then those added with `register`."""
    from .registry import registered
    return list(DATASETS) + [n for n in registered() if n not in DATASETS]


def create(cfg: DataConfig, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
           seed: int = 0) -> DataBundle:
    """Load `cfg`'s data set and wrap both splits as batch sources for this rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    device = torch.device(device)
    if cfg.name in ("imagefolder", "imagenet"):
        return _create_folder(cfg, device, rank, world_size, seed)

    return _create_in_memory(_read_arrays(cfg), cfg, device, rank, world_size, seed)


def _read_arrays(cfg: DataConfig) -> ArraySplits:
    """Both splits of an in-memory data set as uint8 tensors (validated by its reader)."""
    if cfg.name == "synthetic":
        return make_synthetic(cfg.synthetic_size, cfg.synthetic_shape, cfg.synthetic_classes)
    if cfg.name == "fashion_mnist":
        return load_fashion_mnist(cfg.root, cfg.download)
    if cfg.name in ("cifar10", "cifar100"):
        return load_cifar(cfg.name, cfg.root, cfg.download)
    if cfg.name == "hf":
        from .hf import load_hf
        return load_hf(cfg)
    from .plugin import load_registered
    return load_registered(cfg)


def _create_in_memory(splits: ArraySplits, cfg: DataConfig, device, rank: int, world_size: int,
                      seed: int) -> DataBundle:
    x_train, y_train, x_test, y_test = splits.x_train, splits.y_train, splits.x_test, splits.y_test
    _check_nonempty(len(y_train), len(y_test), splits.source, None)
    chosen = select(y_train, y_test, cfg, splits.num_classes, quiet=rank != 0)
    if cfg.augment == "imagenet":
        raise SokdError(f"data.augment=imagenet (random resized crops) applies to streamed image folders; "
                        f"{cfg.name} is held in memory: use data.augment=cifar (pad-crop-flip) or none")
    x_val, y_val = splits.x_val, splits.y_val     # a validation split the data set ships
    if chosen.val is not None:
        x_val, y_val = x_train[chosen.val], y_train[chosen.val]
    if chosen.train is not None:
        x_train, y_train = x_train[chosen.train], y_train[chosen.train]
    if chosen.test is not None:
        x_test, y_test = x_test[chosen.test], y_test[chosen.test]
    _check_nonempty(len(y_train), len(y_test), splits.source, cfg)
    if cfg.pad_to is not None:
        x_train, x_test = (pad_center(x, cfg.pad_to) for x in (x_train, x_test))
        x_val = pad_center(x_val, cfg.pad_to) if x_val is not None else None

    c, h, w = (int(v) for v in x_train.shape[1:])
    mean, std = _stats(cfg, c)
    crop = cfg.crop_padding if cfg.augment != "none" else 0
    if crop and cfg.pad_mode == "reflect" and crop >= min(h, w):
        raise SokdError(f"data.crop_padding={crop} must be smaller than the {h}x{w} images for "
                        f"reflect padding; lower it or set data.pad_mode=zeros")
    train = TensorBatches(x_train, y_train, cfg.batch_size, mean, std, device=device, mode="train",
                          crop_padding=crop, pad_mode=cfg.pad_mode, hflip=cfg.hflip and cfg.augment != "none",
                          drop_last=cfg.drop_last, seed=seed, rank=rank, world_size=world_size)
    test = TensorBatches(x_test, y_test, eval_batch_for(cfg, device), mean, std, device=device, mode="shard",
                         rank=rank, world_size=world_size)
    val = None
    if x_val is not None:
        val = TensorBatches(x_val, y_val, eval_batch_for(cfg, device), mean, std, device=device, mode="shard",
                            rank=rank, world_size=world_size)
    _check_batches(train, cfg)
    return DataBundle(train=train, test=test, num_classes=splits.num_classes,
                      class_names=list(splits.class_names), shape=(c, h, w), mean=mean, std=std,
                      name=cfg.name, train_size=len(y_train), test_size=len(y_test), val=val,
                      val_size=0 if y_val is None else len(y_val))


@dataclass
class Selection:
    """Indices a run keeps of a reader's splits (None: the whole split, in file order)."""

    train: torch.Tensor | None
    test: torch.Tensor | None
    val: torch.Tensor | None = None     # held out of the training split for model selection


def select(y_train: torch.Tensor, y_test: torch.Tensor, cfg: DataConfig, num_classes: int,
           quiet: bool = False) -> Selection:
    """Apply train_per_class (first N of each class, file order), then train_limit (stratified),
    then val_split (stratified, out of what the limits kept), and test_limit (stratified).

    Subsets are drawn with `data.split_seed`, so every training seed gets the same images. A
    limit that leaves out classes gets one warning line on stderr (unless `quiet`).
    """
    y_train, y_test = y_train.to(torch.int64).cpu(), y_test.to(torch.int64).cpu()
    train = None
    if cfg.train_per_class is not None:
        train = first_per_class(y_train, cfg.train_per_class)
    if cfg.train_limit is not None:
        pool = train if train is not None else torch.arange(len(y_train))
        train = pool[stratified_subset(y_train[pool], cfg.train_limit, cfg.split_seed)]
        warn_lost_classes(y_train[train], num_classes, "training", "data.train_limit", quiet)
    val = None
    if cfg.val_split is not None:
        pool = train if train is not None else torch.arange(len(y_train))
        keep, held = validation_split(y_train[pool], cfg.val_split, cfg.split_seed)
        train, val = pool[keep], pool[held]
    test = None
    if cfg.test_limit is not None:
        test = stratified_subset(y_test, cfg.test_limit, cfg.split_seed)
        warn_lost_classes(y_test[test], num_classes, "test", "data.test_limit", quiet)
    return Selection(train=train, test=test, val=val)


def pad_center(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad uint8 (N,C,H,W) images to size x size, centred (extra pixel on the bottom/right)."""
    h, w = x.shape[-2:]
    if size < h or size < w:
        raise SokdError(f"data.pad_to={size} is smaller than the {h}x{w} images; use a size >= {max(h, w)} "
                        f"or remove pad_to")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top)) if (size, size) != (h, w) else x


def _check_nonempty(n_train: int, n_test: int, source: str, cfg: DataConfig | None) -> None:
    """Empty splits are errors; with `cfg`, blame the limits that were applied (if any)."""
    for split, n, keys in (("train", n_train, ("train_per_class", "train_limit")),
                           ("test", n_test, ("test_limit",))):
        if n == 0:
            used = [f"data.{k}" for k in keys if cfg is not None and getattr(cfg, k) is not None]
            if used:
                raise SokdError(f"the {split} split of {source} is empty after {' / '.join(used)}; raise them")
            raise SokdError(f"the {split} split of {source} is empty (no images); check the data files")


def _stats(cfg: DataConfig, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std: the config's, else the data set's defaults (synthetic: 0.5 / 0.25)."""
    default = STATS.get(cfg.name, ((0.5,), (0.25,)))
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


def _check_batches(train, cfg: DataConfig) -> None:
    if len(train) == 0:
        per_rank = train._count() if isinstance(train, TensorBatches) else len(train.sampler.indices)
        raise SokdError(f"only {per_rank} training images per process but data.batch_size={cfg.batch_size} "
                        f"with data.drop_last=true gives no batches; lower data.batch_size or set "
                        f"data.drop_last=false")


def _create_folder(cfg: DataConfig, device: torch.device, rank: int, world_size: int, seed: int) -> DataBundle:
    """An image folder: decoded once into memory when small (see `folder_cache`), else streamed
    through DataLoader workers as uint8 and normalised on the training device."""
    from torchvision import transforms as T

    from . import folder_cache

    if cfg.pad_to is not None:
        raise SokdError(f"data.pad_to applies to in-memory data sets, not {cfg.name}; use data.image_size")
    mean, std = _stats(cfg, 3)
    layout = find_image_folder(cfg.name, cfg.root, cfg.val)
    train_ds, test_ds, val_ds = image_folders(layout, None, None)
    classes = list(train_ds.classes)
    native = folder_cache.image_size_of(train_ds.samples[0][0])
    augment = cfg.augment if cfg.augment != "auto" else ("cifar" if max(native) <= 64 else "imagenet")
    size = cfg.image_size or (224 if augment == "imagenet" else max(native))
    if val_ds is not None and cfg.val_split is not None:
        raise SokdError(f"'{layout.val}' is this data set's validation split, so data.val_split does not apply; "
                        f"remove data.val_split (or the folder)")
    if val_ds is not None and rank == 0:
        print(f"note: model selection uses the validation folder {layout.val}; the test split is {layout.test}",
              file=sys.stderr, flush=True)

    if _in_memory(cfg, augment, size, [train_ds, test_ds, val_ds], layout.root):
        parts = {}
        for split, ds in (("train", train_ds), ("test", test_ds), ("val", val_ds)):
            if ds is not None:
                parts[split] = folder_cache.load_or_decode(ds, split, size, cfg.cache_dir, workers_for(cfg),
                                                           cfg.skip_unreadable, progress=rank == 0)
        val = parts.get("val", (None, None))
        splits = ArraySplits(*parts["train"], *parts["test"], classes, str(layout.root), x_val=val[0], y_val=val[1])
        return _create_in_memory(splits, cfg, device, rank, world_size, seed)

    fixed = FixedSize(size)
    if augment == "imagenet":
        train_tf = [T.RandomResizedCrop(size)] + ([T.RandomHorizontalFlip()] if cfg.hflip else [])
        eval_tf = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    else:
        crop = cfg.crop_padding if augment == "cifar" else 0
        mode = "reflect" if cfg.pad_mode == "reflect" else "constant"
        train_tf = [fixed] + ([T.RandomCrop(size, padding=crop, padding_mode=mode)] if crop else []) \
            + ([T.RandomHorizontalFlip()] if cfg.hflip and augment == "cifar" else [])
        eval_tf = [fixed]
    train_ds.transform = T.Compose(train_tf + [T.PILToTensor()])
    for ds in (test_ds, val_ds):
        if ds is not None:
            ds.transform = T.Compose(eval_tf + [T.PILToTensor()])
    targets = torch.as_tensor(train_ds.targets, dtype=torch.int64)
    _check_nonempty(len(train_ds), len(test_ds), str(layout.root), None)
    chosen = select(targets, torch.as_tensor(test_ds.targets, dtype=torch.int64), cfg, len(classes),
                    quiet=rank != 0)
    if chosen.val is not None:  # held out of train/: evaluated without augmentation
        val_ds = torch.utils.data.Subset(_with_transform(train_ds, test_ds.transform), chosen.val.tolist())
    if chosen.train is not None:
        train_ds = torch.utils.data.Subset(train_ds, chosen.train.tolist())
    if chosen.test is not None:
        test_ds = torch.utils.data.Subset(test_ds, chosen.test.tolist())
    _check_nonempty(len(train_ds), len(test_ds), str(layout.root), cfg)

    def source(ds, batch_size: int, train: bool, split: str) -> LoaderBatches:
        return LoaderBatches(ds, batch_size, device=device, shuffle=train, drop_last=cfg.drop_last and train,
                             num_workers=workers_for(cfg), seed=seed, rank=rank, world_size=world_size,
                             shard=not train, skip_unreadable=cfg.skip_unreadable, split=split,
                             mean=mean, std=std)

    train = source(train_ds, cfg.batch_size, True, "train")
    test = source(test_ds, eval_batch_for(cfg, device), False, layout.test.name)
    val = source(val_ds, eval_batch_for(cfg, device), False, "validation") if val_ds is not None else None
    _check_batches(train, cfg)
    return DataBundle(train=train, test=test, num_classes=len(classes), class_names=classes,
                      shape=(3, size, size), mean=mean, std=std, name=cfg.name,
                      train_size=len(train_ds), test_size=len(test_ds), val=val,
                      val_size=len(val_ds) if val_ds is not None else 0)


class FixedSize:
    """Resize a PIL image to size x size unless it already is (a no-op for uniform folders)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img):
        from torchvision.transforms import functional as TF
        return img if img.size == (self.size, self.size) else TF.resize(img, [self.size, self.size], antialias=True)

    def __repr__(self) -> str:
        return f"FixedSize({self.size})"


def _with_transform(ds, transform):
    """A shallow copy of an ImageFolder with another transform (validation images of train/)."""
    import copy
    out = copy.copy(ds)
    out.transform = transform
    return out


def _in_memory(cfg: DataConfig, augment: str, size: int, splits, root) -> bool:
    """Whether to decode the folder into memory: asked for, or (auto) when it fits the cap and the
    augmentation is one the in-memory path runs (pad-crop-flip or none)."""
    from .folder_cache import decoded_bytes

    need = decoded_bytes(sum(len(s) for s in splits if s is not None), size)
    cap = cfg.memory_cap_gb * 2**30
    if cfg.in_memory is True:
        if augment == "imagenet":
            raise SokdError("data.in_memory=true keeps decoded images for pad-crop-flip augmentation; with "
                            "data.augment=imagenet set data.in_memory=false (or data.augment=cifar)")
        if need > cap:
            amount = f"{need / 2**30:.1f} GiB" if need >= 2**30 else f"{need / 2**20:.1f} MiB"
            raise SokdError(f"'{root}' decoded at {size}x{size} needs {amount}, above "
                            f"data.memory_cap_gb={cfg.memory_cap_gb:g}; raise the cap or set data.in_memory=false")
        return True
    return cfg.in_memory == "auto" and augment != "imagenet" and need <= cap
