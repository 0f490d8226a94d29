"""Data layer: `create(cfg)` -> DataBundle with train/test batch sources on the target device.

Fashion-MNIST, CIFAR-10/100 and the synthetic set are held in memory as uint8 tensors on the
device and augmented there in batches (`TensorBatches`); image folders (and ImageNet) stream
through a torch DataLoader (`LoaderBatches`). Both yield (float32 NCHW normalised images, int64
labels) already on the device, deterministically for (seed, epoch, rank, world_size).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import SokdError
from .arrays import first_per_class
from .cifar import load_cifar
from .config import DATASETS, DataConfig
from .folders import find_image_folder, image_folders
from .idx import load_fashion_mnist
from .sources import BatchSource, LoaderBatches, TensorBatches, epoch_indices, shard_bounds
from .synthetic import make_synthetic

__all__ = ["DataBundle", "DataConfig", "BatchSource", "TensorBatches", "LoaderBatches", "create",
           "list_datasets", "epoch_indices", "shard_bounds"]

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


def list_datasets() -> list[str]:
    return list(DATASETS)


def create(cfg: DataConfig, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
           seed: int = 0) -> DataBundle:
    """Load `cfg`'s data set and wrap both splits as batch sources for this rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    device = torch.device(device)
    if cfg.name in ("imagefolder", "imagenet"):
        return _create_folder(cfg, device, rank, world_size, seed)

    if cfg.name == "synthetic":
        splits = make_synthetic(cfg.synthetic_size, cfg.synthetic_shape, cfg.synthetic_classes)
    elif cfg.name == "fashion_mnist":
        splits = load_fashion_mnist(cfg.root, cfg.download)
    else:
        splits = load_cifar(cfg.name, cfg.root, cfg.download)

    x_train, y_train, x_test, y_test = splits.x_train, splits.y_train, splits.x_test, splits.y_test
    _check_nonempty(len(y_train), len(y_test), splits.source, None)
    keep = _train_subset(y_train, cfg)
    if keep is not None:
        x_train, y_train = x_train[keep], y_train[keep]
    if cfg.test_limit is not None:
        x_test, y_test = x_test[: cfg.test_limit], y_test[: cfg.test_limit]
    _check_nonempty(len(y_train), len(y_test), splits.source, cfg)
    if cfg.pad_to is not None:
        x_train, x_test = (pad_center(x, cfg.pad_to) for x in (x_train, x_test))

    c, h, w = (int(v) for v in x_train.shape[1:])
    mean, std = _stats(cfg, c)
    if cfg.crop_padding and cfg.pad_mode == "reflect" and cfg.crop_padding >= min(h, w):
        raise SokdError(f"data.crop_padding={cfg.crop_padding} must be smaller than the {h}x{w} images for "
                        f"reflect padding; lower it or set data.pad_mode=zeros")
    train = TensorBatches(x_train, y_train, cfg.batch_size, mean, std, device=device, mode="train",
                          crop_padding=cfg.crop_padding, pad_mode=cfg.pad_mode, hflip=cfg.hflip,
                          drop_last=cfg.drop_last, seed=seed, rank=rank, world_size=world_size)
    test = TensorBatches(x_test, y_test, cfg.eval_batch_size, mean, std, device=device, mode="shard",
                         rank=rank, world_size=world_size)
    _check_batches(train, cfg)
    return DataBundle(train=train, test=test, num_classes=splits.num_classes,
                      class_names=list(splits.class_names), shape=(c, h, w), mean=mean, std=std,
                      name=cfg.name, train_size=len(y_train), test_size=len(y_test))


def pad_center(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad uint8 (N,C,H,W) images to size x size, centred (extra pixel on the bottom/right)."""
    h, w = x.shape[-2:]
    if size < h or size < w:
        raise SokdError(f"data.pad_to={size} is smaller than the {h}x{w} images; use a size >= {max(h, w)} "
                        f"or remove pad_to")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top)) if (size, size) != (h, w) else x


def _train_subset(labels: torch.Tensor, cfg: DataConfig) -> torch.Tensor | slice | None:
    """Indices kept by train_per_class (first N of each class, file order) then train_limit."""
    keep = None
    if cfg.train_per_class is not None:
        keep = first_per_class(labels, cfg.train_per_class)
    if cfg.train_limit is not None:
        keep = keep[: cfg.train_limit] if keep is not None else slice(0, cfg.train_limit)
    return keep


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
    from torchvision import transforms as T

    if cfg.pad_to is not None:
        raise SokdError(f"data.pad_to applies to in-memory data sets, not {cfg.name}; use data.image_size")
    mean, std = _stats(cfg, 3)
    root = find_image_folder(cfg.name, cfg.root)
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose([T.RandomResizedCrop(cfg.image_size)]
                         + ([T.RandomHorizontalFlip()] if cfg.hflip else []) + norm)
    val_tf = T.Compose([T.Resize(round(cfg.image_size * 256 / 224)), T.CenterCrop(cfg.image_size)] + norm)
    train_ds, val_ds = image_folders(root, train_tf, val_tf)
    classes = list(train_ds.classes)
    _check_nonempty(len(train_ds), len(val_ds), str(root), None)
    targets = torch.as_tensor(train_ds.targets, dtype=torch.int64)
    keep = _train_subset(targets, cfg)
    if keep is not None:
        idx = torch.arange(len(targets))[keep].tolist()
        train_ds = torch.utils.data.Subset(train_ds, idx)
    if cfg.test_limit is not None:
        val_ds = torch.utils.data.Subset(val_ds, range(min(cfg.test_limit, len(val_ds))))
    _check_nonempty(len(train_ds), len(val_ds), str(root), cfg)
    train = LoaderBatches(train_ds, cfg.batch_size, device=device, shuffle=True, drop_last=cfg.drop_last,
                          num_workers=cfg.num_workers, seed=seed, rank=rank, world_size=world_size,
                          skip_unreadable=cfg.skip_unreadable, split="train")
    test = LoaderBatches(val_ds, cfg.eval_batch_size, device=device, shuffle=False, drop_last=False,
                         num_workers=cfg.num_workers, seed=seed, rank=rank, world_size=world_size, shard=True,
                         skip_unreadable=cfg.skip_unreadable, split="val")
    _check_batches(train, cfg)
    return DataBundle(train=train, test=test, num_classes=len(classes), class_names=classes,
                      shape=(3, cfg.image_size, cfg.image_size), mean=mean, std=std, name=cfg.name,
                      train_size=len(train_ds), test_size=len(val_ds))
