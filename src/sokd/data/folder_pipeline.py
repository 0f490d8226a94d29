"""The folder pipeline: a FOLDER entry's layout (`folders.FolderLayout`) -> a `DataBundle`.

An image folder is decoded once into memory when it is small and its augmentation is one the
in-memory path runs (see `folder_cache`; the bundle then comes from `in_memory`, like CIFAR's).
Otherwise it streams through DataLoader workers as uint8 (`LoaderBatches`) and is normalised on
the training device; the samples a run keeps are chosen by the same `select` as in memory.
"""
from __future__ import annotations

import sys

import torch

from ..errors import SokdError
from .arrays import ArraySplits
from .bundle import DataBundle, check_batches, check_nonempty, stats_for
from .config import DataConfig, eval_batch_for, workers_for
from .folders import image_folders
from .in_memory import create_in_memory
from .registry import Entry
from .sources import LoaderBatches
from .subsets import select


def create_folder(entry: Entry, cfg: DataConfig, device: torch.device, rank: int, world_size: int,
                  seed: int) -> DataBundle:
    """An image folder (`entry.read(cfg)` finds its layout): decoded once into memory when small
    (see `folder_cache`), else streamed through DataLoader workers as uint8 and normalised on the
    training device."""
    from torchvision import transforms as T

    from . import folder_cache

    if cfg.pad_to is not None:
        raise SokdError(f"data.pad_to applies to in-memory data sets, not {cfg.name}; use data.image_size")
    mean, std = stats_for(cfg, entry, 3)
    layout = entry.read(cfg)
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

    if fits_in_memory(cfg, augment, size, [train_ds, test_ds, val_ds], layout.root):
        parts = {}
        for split, ds in (("train", train_ds), ("test", test_ds), ("val", val_ds)):
            if ds is not None:
                parts[split] = folder_cache.load_or_decode(ds, split, size, cfg.cache_dir, workers_for(cfg),
                                                           cfg.skip_unreadable, progress=rank == 0)
        val = parts.get("val", (None, None))
        splits = ArraySplits(*parts["train"], *parts["test"], classes, str(layout.root), x_val=val[0], y_val=val[1])
        return create_in_memory(splits, cfg, entry, device, rank, world_size, seed)

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
    check_nonempty(len(train_ds), len(test_ds), str(layout.root), None)
    chosen = select(targets, torch.as_tensor(test_ds.targets, dtype=torch.int64), cfg, len(classes),
                    quiet=rank != 0)
    if chosen.val is not None:  # held out of train/: evaluated without augmentation
        val_ds = torch.utils.data.Subset(_with_transform(train_ds, test_ds.transform), chosen.val.tolist())
    if chosen.train is not None:
        train_ds = torch.utils.data.Subset(train_ds, chosen.train.tolist())
    if chosen.test is not None:
        test_ds = torch.utils.data.Subset(test_ds, chosen.test.tolist())
    check_nonempty(len(train_ds), len(test_ds), str(layout.root), cfg)

    def source(ds, batch_size: int, train: bool, split: str) -> LoaderBatches:
        return LoaderBatches(ds, batch_size, device=device, shuffle=train, drop_last=cfg.drop_last and train,
                             num_workers=workers_for(cfg), seed=seed, rank=rank, world_size=world_size,
                             shard=not train, skip_unreadable=cfg.skip_unreadable, split=split,
                             mean=mean, std=std)

    train = source(train_ds, cfg.batch_size, True, "train")
    test = source(test_ds, eval_batch_for(cfg, device), False, layout.test.name)
    val = source(val_ds, eval_batch_for(cfg, device), False, "validation") if val_ds is not None else None
    check_batches(train, cfg)
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


def fits_in_memory(cfg: DataConfig, augment: str, size: int, splits, root) -> bool:
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
