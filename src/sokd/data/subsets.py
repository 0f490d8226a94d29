"""Which samples of a split a run uses: class-stratified, seeded subsets and validation splits.

Data files are often stored sorted by class (CIFAR-100's .npz, every image folder), so "the first
N" of a split is a handful of classes, and a model scored on it looks far better than it is.
Every limit therefore takes the same share of each class, chosen at random with a seed that is a
data setting (`data.split_seed`), not the training seed: runs with different training seeds see
the same subset and the same validation images, so their numbers stay comparable.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..errors import SokdError
from .arrays import first_per_class
from .config import DataConfig
from .sources import mix_seed


def class_quotas(counts: torch.Tensor, n: int) -> torch.Tensor:
    """How many of `n` samples each class gets: proportional to `counts`, largest remainders first
    (ties to the lower class index), never more than a class has."""
    total = int(counts.sum())
    n = min(int(n), total)
    if total == 0 or n == 0:
        return torch.zeros_like(counts)
    exact = counts.double() * n / total
    quota = exact.floor().long()
    left = n - int(quota.sum())
    if left:
        remainder = exact - quota.double()
        # sort by remainder descending, class index ascending (stable sort on the negated remainder)
        order = torch.sort(-remainder, stable=True).indices
        room = (quota < counts)[order]
        quota[order[room][:left]] += 1
    return quota


def _rank_in_class(labels: torch.Tensor) -> torch.Tensor:
    """Position of each sample among the samples of its class, in the given order."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(labels.numel()) - starts[labels[order]]
    return rank


def stratified_pick(labels: torch.Tensor, quota: torch.Tensor, seed: int) -> torch.Tensor:
    """Indices (ascending) of `quota[c]` random samples of each class c, fixed by `seed`."""
    labels = labels.to(torch.int64).cpu()
    if labels.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    g = torch.Generator().manual_seed(mix_seed(seed, 0x5B5E7))
    perm = torch.randperm(labels.numel(), generator=g)
    shuffled = labels[perm]
    quota = torch.cat([quota, quota.new_zeros(max(0, int(shuffled.max()) + 1 - quota.numel()))])
    keep = _rank_in_class(shuffled) < quota[shuffled]
    return torch.sort(perm[keep]).values


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices (ascending) of `n` samples with each class's share kept (see `class_quotas`)."""
    labels = labels.to(torch.int64).cpu()
    if labels.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    return stratified_pick(labels, class_quotas(torch.bincount(labels), n), seed)


def validation_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices, each ascending: `fraction` of every class (rounded, at least one
    sample) held out for validation. A class too small to give both parts a sample is an error."""
    labels = labels.to(torch.int64).cpu()
    counts = torch.bincount(labels)
    present = counts > 0
    val_quota = torch.where(present, (counts.double() * fraction).round().long().clamp(min=1), 0)
    short = torch.nonzero(present & (counts - val_quota < 1)).flatten()
    if short.numel():
        c = int(short[0])
        raise SokdError(f"data.val_split={fraction} leaves class {c} ({int(counts[c])} training image(s)) "
                        f"without training images; lower data.val_split or use more training data")
    val = stratified_pick(labels, val_quota, seed)
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).flatten(), val


def warn_lost_classes(labels: torch.Tensor, num_classes: int, what: str, key: str, quiet: bool) -> None:
    """One stderr line when a subset has fewer classes than the data set."""
    if quiet or labels.numel() == 0:
        return
    kept = int(torch.unique(labels).numel())
    if kept < num_classes:
        print(f"warning: {key} keeps {kept} of the {num_classes} classes in the {what} split; scores on it "
              f"are not comparable with the full data set (raise {key} to at least {num_classes})",
              file=sys.stderr, flush=True)


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
    limit that leaves out classes gets one warning line on stderr (unless `quiet`). Both
    pipelines (in memory and streamed folders) choose their samples here, from labels alone.
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
