"""Data layer: `create(cfg)` -> DataBundle with train/test (and validation) batch sources on the
target device.

Every data set is an entry of the registry (`registry`), the built-in ones too: each reader
module registers its own with `@register`, as users do. An entry declares its kind, and `create`
builds what that kind calls for: in-memory arrays (Fashion-MNIST, CIFAR-10/100, the synthetic set,
saved Hugging Face sets, users' readers) take `in_memory`, uint8 tensors on the device augmented
there in batches (`TensorBatches`); image folders take `folder_pipeline`, decoded once into memory
when small (`folder_cache`), else streamed uint8 through a torch DataLoader (`LoaderBatches`).
Both yield (float32 NCHW normalised images, int64 labels) on the device, deterministically for
(seed, epoch, rank, world_size). Which samples a run uses (stratified limits, the validation
split) is decided once, by `subsets.select`. `fingerprint(bundle)` names the training and
validation data, so a run is not resumed on others.
"""
from __future__ import annotations

import torch

# The built-in readers register themselves on import, and `list_datasets` gives them in the order
# they registered: import them first, in this order, before anything else of the data layer.
from . import idx, cifar, folders, synthetic, hf  # noqa: F401
from . import registry as _registry
from .arrays import ArraySplits
from .bundle import DataBundle, fingerprint
from .config import DataConfig
from .folder_pipeline import create_folder
from .in_memory import create_in_memory
from .registry import FOLDER, register
from .sources import BatchSource, LoaderBatches, TensorBatches, epoch_indices, shard_bounds

_registry.seal_builtins()

#: per-channel (mean, std) of the data sets that declare their own, by name (a live view of the registry)
STATS = _registry.STATS

__all__ = ["DataBundle", "DataConfig", "BatchSource", "TensorBatches", "LoaderBatches", "create",
           "list_datasets", "epoch_indices", "shard_bounds", "register", "ArraySplits", "fingerprint"]


def list_datasets() -> list[str]:
    """Built-in data set names, then those added with `register`."""
    return _registry.names()


def create(cfg: DataConfig, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
           seed: int = 0) -> DataBundle:
    """Load `cfg`'s data set and wrap both splits as batch sources for this rank, through the
    pipeline its registry entry's kind declares."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    device = torch.device(device)
    entry = _registry.find(cfg.name)
    if entry.kind == FOLDER:
        return create_folder(entry, cfg, device, rank, world_size, seed)
    return create_in_memory(entry.read(cfg), cfg, entry, device, rank, world_size, seed)
