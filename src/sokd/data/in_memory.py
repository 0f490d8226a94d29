"""The in-memory pipeline: a data set's uint8 splits (`ArraySplits`) -> a `DataBundle` of
`TensorBatches`.

Every data set small enough to hold (the ARRAYS entries of the registry, and image folders that
`folder_pipeline` decoded) ends here, so one set of steps decides what a run trains on: the
samples `select` keeps, the validation split, `pad_to`, the per-channel statistics, and batched
crop/flip/normalise as tensor ops on the training device, deterministic for a seed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import SokdError
from .arrays import ArraySplits
from .bundle import DataBundle, check_batches, check_nonempty, stats_for
from .config import DataConfig, eval_batch_for
from .registry import Entry
from .sources import TensorBatches
from .subsets import select


def create_in_memory(splits: ArraySplits, cfg: DataConfig, entry: Entry, device: torch.device, rank: int,
                     world_size: int, seed: int) -> DataBundle:
    """Both splits (and a validation split, shipped or held out) as TensorBatches for this rank;
    `entry` (the data set's registry entry) gives the default statistics."""
    x_train, y_train, x_test, y_test = splits.x_train, splits.y_train, splits.x_test, splits.y_test
    check_nonempty(len(y_train), len(y_test), splits.source, None)
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
    check_nonempty(len(y_train), len(y_test), splits.source, cfg)
    if cfg.pad_to is not None:
        x_train, x_test = (pad_center(x, cfg.pad_to) for x in (x_train, x_test))
        x_val = pad_center(x_val, cfg.pad_to) if x_val is not None else None

    c, h, w = (int(v) for v in x_train.shape[1:])
    mean, std = stats_for(cfg, entry, c)
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
    check_batches(train, cfg)
    return DataBundle(train=train, test=test, num_classes=splits.num_classes,
                      class_names=list(splits.class_names), shape=(c, h, w), mean=mean, std=std,
                      name=cfg.name, train_size=len(y_train), test_size=len(y_test), val=val,
                      val_size=0 if y_val is None else len(y_val))


def pad_center(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad uint8 (N,C,H,W) images to size x size, centred (extra pixel on the bottom/right)."""
    h, w = x.shape[-2:]
    if size < h or size < w:
        raise SokdError(f"data.pad_to={size} is smaller than the {h}x{w} images; use a size >= {max(h, w)} "
                        f"or remove pad_to")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top)) if (size, size) != (h, w) else x
