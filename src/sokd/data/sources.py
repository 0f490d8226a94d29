"""Batch sources: what the engine iterates over.

`TensorBatches` keeps a whole split as uint8 tensors on the device and builds augmented batches
with batched tensor ops (the fast path for Fashion-MNIST / CIFAR / synthetic). `LoaderBatches` wraps
a torch DataLoader for image folders. Both follow the `BatchSource` protocol and share the same
per-epoch index plan (`epoch_indices` / `shard_bounds`), so sample order is a pure function of
(seed, epoch, rank, world_size). With `with_index` set, both also yield each sample's index
(its position in the split as loaded, subset limits applied), for terms that keep per-sample
state; the index of a sample is the same in every epoch, order, resume and rank.
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ..errors import SokdError
from . import augment, strong

Batch = tuple[torch.Tensor, ...]  # (images, labels[, index with `with_index`][, strong view with `strong_view`])
_MASK64 = (1 << 64) - 1


@runtime_checkable
class BatchSource(Protocol):
    """Batches of (float32 NCHW normalised images, int64 labels), both on the target device;
    with `with_index`, (images, labels, int64 index of each sample in the split)."""

    num_samples: int           # samples this rank yields per epoch
    channels_last: bool        # the engine may set this to get channels_last image tensors
    with_index: bool           # the engine sets this when the method needs sample indices

    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...
    def iter_from(self, step: int) -> Iterator[Batch]: ...


@contextmanager
def _one_thread(enabled: bool):
    """Run small, memory-bound CPU tensor ops on one thread.

    A batch is ~0.4 MB; splitting it across OpenMP threads costs far more than it saves (and
    milliseconds when the cores are busy with training or other processes).
    """
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def mix_seed(*values: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 chain; same in every process)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h >> 1


def epoch_indices(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                  drop_last: bool = True, shuffle: bool = True) -> torch.Tensor:
    """This rank's sample indices (CPU int64) for one training epoch.

    The permutation depends only on (seed, epoch), so it is identical on every rank. With
    drop_last the tail is cut to floor(n/world)*world; otherwise it is padded by wrapping around
    to ceil(n/world)*world. Rank r takes every world-th index starting at r.
    """
    if shuffle:
        g = torch.Generator().manual_seed(mix_seed(seed, epoch))
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    if world_size > 1:
        if drop_last:
            order = order[: (n // world_size) * world_size]
        else:
            total = math.ceil(n / world_size) * world_size
            if total > n:
                order = order.repeat(math.ceil(total / n))[:total]
        order = order[rank::world_size]
    return order


def shard_bounds(n: int, rank: int = 0, world_size: int = 1) -> tuple[int, int]:
    """[start, stop) of rank's contiguous evaluation shard; all shards tile [0, n) exactly."""
    return n * rank // world_size, n * (rank + 1) // world_size


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")


class TensorBatches:
    """In-memory split: uint8 images (N,C,H,W) and int64 labels, moved once to `device`.

    mode="train": per epoch a (seed, epoch) permutation, rank-strided for DDP; each batch is
    cropped/flipped with a generator seeded by (seed, epoch, rank, batch index), so `iter_from(k)`
    reproduces exactly the batches a full pass yields from index k.
    mode="shard": evaluation; rank r gets the r-th contiguous shard in file order, no
    augmentation, no drop, no padding -> all ranks together see every sample exactly once.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], *, device: torch.device | str = "cpu",
                 mode: str = "train", crop_padding: int = 0, pad_mode: str = "reflect",
                 hflip: bool = False, drop_last: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False):
        if mode not in ("train", "shard"):
            raise ValueError(f"mode must be 'train' or 'shard', got {mode!r}")
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N,C,H,W), got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError("labels must be 1-D with one entry per image")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean/std need {images.shape[1]} values")
        if pad_mode not in augment.PAD_MODES:
            raise ValueError(f"unknown pad mode {pad_mode!r}")
        _check_rank(rank, world_size)
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = int(batch_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self._scale, self._shift = augment.normalize_params(mean, std, self.device)
        self.mode = mode
        self.crop_padding = int(crop_padding) if mode == "train" else 0
        self.pad_mode = pad_mode
        self.hflip = bool(hflip) and mode == "train"
        self.drop_last = bool(drop_last) and mode == "train"
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.channels_last = channels_last
        self.with_index = False
        #: the engine sets this when the method trains on a strongly augmented second view
        #: (`strong.strong_view`): training batches then end with it
        self.strong_view = False
        self.epoch = -1
        self.set_epoch(0)

    @property
    def augment(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def __repr__(self) -> str:
        return (f"TensorBatches(mode={self.mode}, n={self.images.shape[0]}, shape={tuple(self.images.shape[1:])}, "
                f"batch_size={self.batch_size}, batches={len(self)}, rank={self.rank}/{self.world_size})")

    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        if epoch == self.epoch:
            return
        self.epoch = epoch
        n = self.images.shape[0]
        if self.mode == "train":
            idx = epoch_indices(n, self.seed, epoch, self.rank, self.world_size, self.drop_last)
            self._index = idx.to(self.device)
        else:
            start, stop = shard_bounds(n, self.rank, self.world_size)
            self._index = None
            self._range = (start, stop)

    def _count(self) -> int:
        if self._index is not None:
            return int(self._index.numel())
        return self._range[1] - self._range[0]

    def __len__(self) -> int:
        count = self._count()
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (after the rank split and drop_last)."""
        return len(self) * self.batch_size if self.drop_last else self._count()

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, step: int) -> Iterator[Batch]:
        """Batches step, step+1, ... of the current epoch (identical to a full pass's tail)."""
        for b in range(max(0, int(step)), len(self)):
            yield self.batch(b)

    def batch(self, b: int) -> Batch:
        """Batch number `b` of the current epoch."""
        with _one_thread(self.device.type == "cpu"):
            return self._batch(b)

    def _batch(self, b: int) -> Batch:
        lo, hi = b * self.batch_size, (b + 1) * self.batch_size
        if self._index is None:  # shard: contiguous slice, no copy until normalisation
            start, stop = self._range
            lo, hi = start + lo, min(start + hi, stop)
            x, y = self.images[lo:hi], self.labels[lo:hi]
            sel = torch.arange(lo, hi, device=self.device) if self.with_index else None
        else:
            sel = self._index[lo:hi]
            x, y = self.images.index_select(0, sel), self.labels.index_select(0, sel)
        raw = x
        if self.augment:
            x = self._augment(x, b)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = augment._affine(x, self._scale, self._shift, fmt)
        batch = (x, y, sel) if self.with_index else (x, y)
        if self.strong_view and self.mode == "train":
            gen = self._generator(b, 0x5706)
            xs = strong.strong_view(self._augment(raw, b, gen), gen)
            batch = (*batch, augment._affine(xs, self._scale, self._shift, fmt))
        return batch

    def _generator(self, b: int, salt: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(mix_seed(self.seed, self.epoch, self.rank, b, salt))
        return gen

    def _augment(self, x: torch.Tensor, b: int, gen: torch.Generator | None = None) -> torch.Tensor:
        """The usual crop and flip of batch `b` (drawn from `gen`: by default the batch's own)."""
        gen = gen if gen is not None else self._generator(b, 0xA06)
        n = x.shape[0]
        p = self.crop_padding
        if p:
            top, left = augment.crop_offsets(n, p, gen, self.device)
        else:
            top = left = torch.zeros(n, dtype=torch.int64, device=self.device)
        flip = augment.random_flip_mask(n, gen, self.device) if self.hflip else None
        return augment.crop_flip(x, top, left, flip, p, self.pad_mode)


class EpochSampler(Sampler[int]):
    """Sampler over `epoch_indices` (train) or a contiguous shard (eval) that can start mid-epoch.

    Used instead of DistributedSampler so that LoaderBatches and TensorBatches share one index
    plan and `iter_from(step)` skips batches without loading their images.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True, shard: bool = False):
        _check_rank(rank, world_size)
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.drop_last, self.shard = rank, world_size, drop_last, shard
        self.start = 0
        self.epoch = -1
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:
            return
        self.epoch = epoch
        if self.shard:
            lo, hi = shard_bounds(self.n, self.rank, self.world_size)
            self.indices = torch.arange(lo, hi)
        else:
            self.indices = epoch_indices(self.n, self.seed, epoch, self.rank, self.world_size,
                                         self.drop_last, self.shuffle)

    def __iter__(self):
        start, self.start = self.start, 0  # a start offset applies to one pass only
        return iter(self.indices[start:].tolist())

    def __len__(self) -> int:
        return len(self.indices)


class UnreadableImage(Exception):
    """An image file that cannot be opened or decoded; picklable, its message names the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = str(path), str(reason)

    def __str__(self) -> str:
        return f"cannot read image '{self.path}' ({self.reason})"


class SeededSampler(EpochSampler):
    """EpochSampler yielding (index, epoch seed) pairs, epoch seed = mix_seed(seed, epoch).

    With `SeededSamples` this makes each sample's random augmentation a pure function of
    (seed, epoch, index), whichever process or worker loads it.
    """

    def __iter__(self):
        indices = super().__iter__()
        epoch_seed = mix_seed(self.seed, self.epoch, 0x5EED)
        return ((i, epoch_seed) for i in indices)


class SeededSamples(Dataset):
    """`samples[(index, epoch_seed)]` -> (x, label, problem, index) from a map-style (x, label)
    dataset.

    The dataset's transforms run with torch's CPU generator seeded by mix_seed(epoch_seed, index)
    (the caller's generator state is restored afterwards). A sample whose image raises
    UnreadableImage gives problem=(path, reason) and, with `replace`, the next readable sample in
    dataset order (wrapping around) instead, else x=None. Readable samples give problem=None.
    The index returned is always the requested one (a replacement stands in for that sample), so
    a batch's indices are those of the sampler's plan, unique within an epoch on one rank.
    """

    def __init__(self, dataset: Dataset, replace: bool = False):
        self.dataset, self.replace = dataset, replace

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch_seed = key
        seed = mix_seed(epoch_seed, index)
        try:
            x, y = self._load(index, seed)
            return x, y, None, index
        except UnreadableImage as err:
            problem = (err.path, err.reason)
        n = len(self.dataset)
        for k in range(1, n if self.replace else 1):
            try:
                x, y = self._load((index + k) % n, seed)
                return x, y, problem, index
            except UnreadableImage:
                continue
        return None, -1, problem, index

    def _load(self, index: int, seed: int):
        state = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(seed)
            x, y = self.dataset[index]
        finally:
            torch.set_rng_state(state)
        return x, int(y)


def _collate(samples: list) -> tuple:
    """(images, labels, problems, dropped, indices) of the samples that have an image."""
    kept = [(x, y, i) for x, y, _, i in samples if x is not None]
    problems = [p for _, _, p, _ in samples if p is not None]
    if kept:
        images, labels, indices = default_collate(kept)
    else:
        images, labels = torch.empty(0), torch.empty(0, dtype=torch.int64)
        indices = torch.empty(0, dtype=torch.int64)
    return images, labels, problems, len(samples) - len(kept), indices


class LoaderBatches:
    """A torch DataLoader over a map-style dataset of (CHW image tensor, int label), with batches
    moved to `device` (non_blocking; pinned memory when the device is CUDA).

    With `mean`/`std` the dataset yields uint8 images: batches cross worker shared memory and the
    host-to-device copy at a quarter of float32's size, and conversion, normalisation and the
    memory format change happen on the device in one step. Without them the dataset's tensors are
    passed through as they are (already normalised floats).

    Sample order follows `EpochSampler` (deterministic per (seed, epoch), rank-strided like
    TensorBatches), and each sample's random augmentation is seeded by (seed, epoch, index)
    (`SeededSamples`): batches are identical for any number of workers, and `iter_from(step)`,
    which starts the sampler at step * batch_size without loading the skipped batches, reproduces
    a full pass's tail exactly.

    An image that raises UnreadableImage is a SokdError naming the file, unless
    `skip_unreadable`: then a training sample is replaced by the next readable one (batches keep
    their size), an evaluation sample is left out, and each pass ends with a one-line warning on
    stderr counting the skipped images of `split`.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, device: torch.device | str = "cpu",
                 shuffle: bool = True, drop_last: bool = True, num_workers: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shard: bool = False, channels_last: bool = False,
                 skip_unreadable: bool = False, split: str = "train", mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, prefetch_factor: int | None = None):
        self.dataset = dataset
        self.device = torch.device(device)
        self._norm = augment.normalize_params(mean, std, self.device) if mean is not None else None
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last) and not shard
        self.channels_last = channels_last
        self.with_index = False
        self.skip_unreadable = bool(skip_unreadable)
        self.where = split if world_size == 1 else f"{split} on rank {rank}"  # for messages
        self.sampler = SeededSampler(len(dataset), shuffle=shuffle and not shard, seed=seed, rank=rank,
                                     world_size=world_size, drop_last=self.drop_last, shard=shard)
        self.replace = self.skip_unreadable and not shard
        gen = torch.Generator().manual_seed(mix_seed(seed, rank, 0x10AD))  # worker base seeds
        self.loader = DataLoader(
            SeededSamples(dataset, replace=self.replace), batch_size=self.batch_size,
            sampler=self.sampler, drop_last=self.drop_last, collate_fn=_collate,
            num_workers=num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0, generator=gen,
            prefetch_factor=(prefetch_factor or 4) if num_workers > 0 else None)

    def __repr__(self) -> str:
        return (f"LoaderBatches(n={len(self.dataset)}, batch_size={self.batch_size}, batches={len(self)}, "
                f"workers={self.loader.num_workers})")

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(int(epoch))

    def __len__(self) -> int:
        count = len(self.sampler.indices)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self) * self.batch_size if self.drop_last else len(self.sampler.indices)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, step: int) -> Iterator[Batch]:
        step = max(0, int(step))
        if step >= len(self):
            return
        self.sampler.start = step * self.batch_size  # consumed when the loader first reads the sampler
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        skipped: list[str] = []
        try:
            for images, labels, problems, dropped, indices in self.loader:
                if problems:
                    path, reason = problems[0]
                    if not self.skip_unreadable:
                        raise SokdError(f"cannot read image '{path}' ({reason}); remove or replace it, "
                                        f"or set data.skip_unreadable=true")
                    if dropped and self.replace:
                        raise SokdError(f"no image in {self.where} can be read (first: '{path}' ({reason})); "
                                        f"check the image files")
                    skipped += [p for p, _ in problems]
                if not labels.numel():
                    continue
                images = images.to(self.device, non_blocking=True)
                if self._norm is not None:
                    with _one_thread(self.device.type == "cpu"):
                        images = augment._affine(images, *self._norm, fmt)
                else:
                    images = images.contiguous(memory_format=fmt)
                labels = labels.to(self.device, torch.int64, non_blocking=True)
                if self.with_index:
                    yield images, labels, indices.to(self.device, torch.int64, non_blocking=True)
                else:
                    yield images, labels
        finally:
            if skipped:
                print(f"warning: skipped {len(skipped)} unreadable image(s) in {self.where} "
                      f"(first: {skipped[0]})", file=sys.stderr, flush=True)
