"""One epoch's training statistics and loss health, kept on the training device.

Reading a device tensor on the host (`.item()`, `float()`, `bool()`, `.tolist()`) waits for every
kernel queued before it, so a training step that reads one stalls a GPU once per read. The step
therefore only adds to device tensors: one float64 vector of sums (the loss and each term times
the batch size, each role's correct predictions) and one int64 vector holding the first step of
the epoch whose loss was non-finite (in the loss's slot, and in the slot of every term that was
non-finite at that step). The host reads both in `poll`: every `train.sync_every` steps, at the
end of every epoch and before any checkpoint is written; each poll is one read.

A non-finite loss is therefore noticed up to `sync_every - 1` steps after it happened. Those steps
still run (and the optimizer applies their NaN gradients), but nothing they produce is kept: the
poll that sees the NaN raises before any checkpoint is written, and the message names the step
and the term where it happened, not where it was noticed.

Both vectors are laid out by sorted key, so every process of a distributed run holds them in the
same order (a resumed rank 0 restarts from a checkpoint's sums, the other ranks from zero).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

#: steps between host reads when `train.sync_every` is not set. On CUDA a read stalls the queue,
#: so it is rare; 50 steps of a CIFAR network are well under a second on a current GPU, which
#: bounds the delay of a SIGTERM in a distributed run. On a CPU the host runs the kernels itself,
#: so a read costs nothing beyond the steps it would let run past a NaN: 10 keeps that waste
#: small while the step still runs the same read-free path as on a GPU.
SYNC_EVERY = {"cuda": 50}
SYNC_EVERY_OTHER = 10
#: "no non-finite loss yet" in the int64 vector (exactly representable as float64 too)
_CLEAN = 2 ** 62


def default_sync_every(device: torch.device) -> int:
    return SYNC_EVERY.get(device.type, SYNC_EVERY_OTHER)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Poll:
    """What one host read tells the loop."""

    stop: bool                      # a stop was requested (on any process)
    bad_step: int | None            # first step of the epoch with a non-finite loss
    bad_term: str | None            # the first term non-finite at that step ("loss" if none was)
    loss: float                     # this process's mean loss of the epoch so far


class EpochAccumulator:
    """Running sums of one epoch's training statistics (saved in mid-epoch checkpoints).

    `sums`, `samples`, `seconds`: a checkpoint's state to continue from (`state()` is the inverse);
    `step`: the epoch's step the next `add` belongs to (counted on from there).
    """

    def __init__(self, sums: dict[str, float] | None = None, samples: int = 0, seconds: float = 0.0,
                 step: int = 0):
        self._start = {k: float(v) for k, v in (sums or {}).items()}
        self.keys: list[str] = sorted(self._start)
        self._sums: torch.Tensor | None = None     # float64, one entry per key
        self._bad: torch.Tensor | None = None      # int64, one entry per key
        self._layouts: dict[tuple[str, ...], torch.Tensor | None] = {}
        self.samples = int(samples)
        self.seconds = float(seconds)
        self.step = int(step)

    # -- the step: device work only ---------------------------------------------------------
    def add(self, out: dict, labels: torch.Tensor) -> None:
        """Add one step's statistics (its step number is recorded if its loss is non-finite)."""
        step, self.step = self.step, self.step + 1
        n = labels.numel()
        self.samples += n
        terms, logits = out["terms"], out["logits"]
        head = torch.stack([out["loss"].detach().float()] + [t.detach().float().reshape(()) for t in terms.values()])
        hits = [z.detach().argmax(1).eq(labels).sum() for z in logits.values()]
        values = torch.cat([head.double() * n, torch.stack(hits).double()]) if hits else head.double() * n
        names = ("loss", *(f"terms/{k}" for k in terms), *(f"top1/{r}" for r in logits))
        where = self._layout(names, values.device)
        bad = ~torch.isfinite(values)
        first = bad[0] & (self._bad[self.keys.index("loss")] == _CLEAN)  # the loss, for the first time
        if where is None:
            self._sums.add_(values)
            self._bad = torch.where(bad & first, step, self._bad)
        else:
            self._sums.index_add_(0, where, values)
            flags = torch.zeros(len(self.keys), dtype=torch.bool, device=values.device)
            flags = flags.index_copy(0, where, bad & first)
            self._bad = torch.where(flags, step, self._bad)

    def _layout(self, names: tuple[str, ...], device: torch.device) -> torch.Tensor | None:
        """Where this step's values go in the sorted vectors: None when they are the vectors'
        own order (the usual case), else an index tensor. New keys extend the vectors."""
        if names in self._layouts:
            return self._layouts[names]
        if self._sums is None:
            self.keys = sorted(set(self._start) | set(names))
            self._sums = torch.tensor([self._start.get(k, 0.0) for k in self.keys], dtype=torch.float64,
                                      device=device)
            self._bad = torch.full((len(self.keys),), _CLEAN, dtype=torch.int64, device=device)
        missing = sorted(set(names) - set(self.keys))
        if missing:  # a term that appears mid-epoch: rare, so rebuilding the vectors is fine
            keys = sorted(set(self.keys) | set(missing))
            pos = torch.tensor([keys.index(k) for k in self.keys], device=device)
            self._sums = torch.zeros(len(keys), dtype=torch.float64, device=device).index_copy(0, pos, self._sums)
            self._bad = torch.full((len(keys),), _CLEAN, dtype=torch.int64, device=device).index_copy(0, pos, self._bad)
            self.keys = keys
            self._layouts.clear()
        where = None if list(names) == self.keys else torch.tensor([self.keys.index(k) for k in names], device=device)
        self._layouts[names] = where
        return where

    # -- host reads -------------------------------------------------------------------------
    def poll(self, dist, stop: bool = False) -> Poll:
        """One host read: the non-finite record and the stop flag (both reduced over processes:
        every process then raises the same error or stops at the same step) and the mean loss."""
        if self._sums is None:
            return Poll(dist.any_flag(stop), None, None, 0.0)
        flag = torch.full((1,), -1.0 if stop else 0.0, dtype=torch.float64, device=self._sums.device)
        watch = torch.cat([flag, self._bad.double()])
        if dist.enabled:
            watch = dist.all_reduce_min(watch)
        loss_at = self.keys.index("loss")
        values = torch.cat([watch, self._sums[loss_at:loss_at + 1]]).tolist()
        first = [int(v) for v in values[1:-1]]
        bad_step = first[loss_at] if first[loss_at] != _CLEAN else None
        bad_term = None
        if bad_step is not None:
            bad_term = next((k.split("/", 1)[1] for k, s in zip(self.keys, first)
                             if k.startswith("terms/") and s == bad_step), "loss")
        return Poll(values[0] < 0, bad_step, bad_term, values[-1] / max(self.samples, 1))

    def state(self) -> dict:
        """The sums as plain numbers (one host read), as checkpoints store them."""
        sums = dict(self._start) if self._sums is None else dict(zip(self.keys, self._sums.tolist()))
        return {"sums": sums, "samples": self.samples, "seconds": self.seconds}

    def result(self) -> dict:
        state = self.state()
        n = max(self.samples, 1)
        sums = state["sums"]
        out: dict = {"loss": sums.get("loss", 0.0) / n, "terms": {}, "top1": {}}
        for k, v in sums.items():
            if "/" in k:
                group, name = k.split("/", 1)
                out[group][name] = v / n * (100.0 if group == "top1" else 1.0)
        out["images_per_s"] = self.samples / self.seconds if self.seconds > 0 else 0.0
        out["samples"], out["seconds"] = self.samples, self.seconds
        return out

    def reduced(self, dist) -> "EpochAccumulator":
        """Sums over every rank (each rank saw its own shard of the epoch)."""
        if not dist.enabled:
            return self
        sums = self.state()["sums"]
        keys = sorted(sums)
        packed = torch.tensor([sums[k] for k in keys] + [float(self.samples)], dtype=torch.float64,
                              device=dist.device)
        packed = dist.all_reduce_sum(packed).tolist()
        return EpochAccumulator(dict(zip(keys, packed[:-1])), int(packed[-1]), self.seconds)


class EpochClock:
    """Training seconds of an epoch: `seconds()` drains the device's queue before reading the
    clock, so asynchronous kernels count in the epoch that launched them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = time.perf_counter()

    def peek(self) -> float:
        """Seconds so far without waiting for the device (exact right after a host read)."""
        return time.perf_counter() - self.t0

    def seconds(self) -> float:
        synchronize(self.device)
        return self.peek()
