"""The in-memory form of a data set and the checks every reader applies to it.

Readers return `ArraySplits`: uint8 (N,C,H,W) image tensors and int64 (N,) label tensors on the
CPU. `to_nchw` / `to_labels` turn numpy arrays into those (or a one-line `SokdError` naming what
is wrong), `check_splits` checks both splits together.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SokdError


@dataclass
class ArraySplits:
    """Both splits of an in-memory data set: uint8 (N,C,H,W) images and int64 (N,) labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str]
    source: str                 # where it was read from, for messages
    x_val: torch.Tensor | None = None   # a validation split the data set ships (image folders)
    y_val: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def to_nchw(x: np.ndarray, what: str) -> torch.Tensor:
    """Validate an image array (N,H,W) or (N,H,W,C) uint8 and return a uint8 (N,C,H,W) tensor."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        dtype = getattr(x, "dtype", type(x).__name__)
        raise SokdError(f"{what} must be a uint8 image array, got dtype {dtype}; store pixels as uint8 0..255")
    if x.ndim not in (3, 4):
        raise SokdError(f"{what} has shape {x.shape}; expected (N, H, W) or (N, H, W, C) uint8 images")
    if x.ndim == 4 and not 1 <= x.shape[3] <= 4:
        raise SokdError(f"{what} has shape {x.shape}: {x.shape[3]} channels in the last axis; "
                        f"store images as (N, H, W, C) with C = 1 or 3")
    if not x.flags.writeable:  # e.g. np.frombuffer over bytes: torch wants writable memory
        x = x.copy()
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.unsqueeze(1) if x.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()


def to_labels(y, n: int | None, what: str) -> torch.Tensor:
    """Validate integer labels (1-D, length n) and return an int64 tensor."""
    y = np.asarray(y) if not isinstance(y, np.ndarray) else y
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or (y.dtype == object and y.size == 0)):
        raise SokdError(f"{what} must be a 1-D integer array, got dtype {y.dtype} shape {y.shape}")
    if n is not None and y.shape[0] != n:
        raise SokdError(f"{what} has {y.shape[0]} labels but there are {n} images; they must match")
    return torch.from_numpy(y.astype(np.int64))


def check_splits(s: ArraySplits) -> ArraySplits:
    """Cross-split checks: matching image shapes, labels in [0, num_classes)."""
    k = s.num_classes
    if s.x_train.shape[1:] != s.x_test.shape[1:]:
        raise SokdError(f"{s.source}: train images are {tuple(s.x_train.shape[1:])} but test images are "
                        f"{tuple(s.x_test.shape[1:])} (C,H,W); both splits need one shape")
    for split, y in (("train", s.y_train), ("test", s.y_test)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise SokdError(f"{s.source}: {split} label {bad} is outside 0..{k - 1} ({k} classes); "
                            f"fix the labels (or, in an .npz, store one class_names entry per class)")
    return s


def first_per_class(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (ascending, i.e. file order) of the first `n` samples of each class."""
    if labels.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    counts = torch.bincount(sorted_labels)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(labels.numel()) - starts[sorted_labels]
    return torch.sort(order[rank_in_class < n]).values
