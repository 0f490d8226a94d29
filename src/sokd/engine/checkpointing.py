"""What a run writes and reads back: last.pt, best.pt, the standalone model files, and the state
a resumed run restores from last.pt.

* `Checkpointer.save` writes last.pt (never a non-finite state; the first one commits the run
  directory) and remembers, for every message, which checkpoint is on disk.
* `Checkpointer.write_best` makes best.pt a byte copy of the last.pt just written: a best epoch
  always writes last.pt (`saved_at`), so best.pt never holds a state that a resumed run, going
  back to last.pt, would not pass through again.
* `Resumed.restore` puts optimizer, schedule, scaler and RNG back as last.pt holds them and
  repairs a best.pt left one epoch behind by a kill between the two writes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import artifacts
from ..errors import SokdError
from ..files import atomic_save, atomic_write_bytes, safe_load
from .checkpoint import non_finite_tensors
from .optim import rebase_lr
from .selection import best_epoch
from .signals import position


class NonFiniteState(SokdError):
    """Weights or buffers became NaN/inf; the run stops instead of writing them to a checkpoint."""


def recovery(saved: str, lr: float) -> str:
    """What a user can do after a numeric failure, given what is on disk."""
    if saved.startswith(artifacts.LAST):
        return (f"{saved}; continue from it with a lower learning rate: the same command plus "
                f"output.resume=true optim.lr={lr / 10:g}")
    return f"{saved}; start again with a lower learning rate (e.g. optim.lr={lr / 10:g})"


def saved_note(epoch: int, step: int) -> str:
    return f"{artifacts.LAST} holds the run at {position(epoch, step)} (its last finite state)"


def saved_at(epoch: int, every: int, epochs: int, first: bool) -> bool:
    """Whether last.pt is written at the end of `epoch`: every `every` epochs, the last epoch,
    and the first epoch this process trains (so a run directory holds a checkpoint, and a
    resumed run a fresh one, as soon as possible). A best epoch is written as well (see module doc)."""
    return first or epoch % every == 0 or epoch == epochs


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class Resumed:
    """Where a run starts: epoch and step, the history so far, the running sums of a
    mid-epoch checkpoint, and the wall time already spent (all zero for a new run)."""

    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    accum: dict | None = None
    wall_time_s: float = 0.0

    @classmethod
    def restore(cls, ckpt: dict, optimizer, scheduler, scaler, device, note=print) -> "Resumed":
        """Optimizer, schedule (re-based on a changed optim.lr), scaler and RNG as last.pt holds them."""
        wanted = [g["lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        changed = rebase_lr(optimizer, scheduler, wanted)
        if changed:
            note(f"note: learning rate re-based on resume ({changed}); later epochs follow the "
                 f"schedule from the new value")
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], device)
        return cls(int(ckpt["epoch"]), int(ckpt["step"]), list(ckpt.get("history", [])), ckpt.get("accum"),
                   float(ckpt.get("wall_time_s", 0.0)))


class Checkpointer:
    """The run's checkpoint files (see module doc). Only the main process builds and writes a
    checkpoint; every process checks the state is finite and keeps the same note."""

    def __init__(self, run, method, data, optimizer, scheduler, scaler, resumed: Resumed | None, run_dir, stop):
        self.run, self.method, self.data = run, method, data
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.history = resumed.history if resumed else []
        self.prior_wall = resumed.wall_time_s if resumed else 0.0
        self.run_dir = run_dir          # the RunDirectory (main process), committed by the first save
        self.stop = stop                # its note of what is on disk goes into every stop message
        self.wall0 = time.perf_counter()
        if resumed is not None:
            self.saved = saved_note(resumed.epoch, resumed.step)

    @property
    def saved(self) -> str:
        """Which checkpoint is on disk, for messages ("no checkpoint had been written yet" first)."""
        return self.stop.saved

    @saved.setter
    def saved(self, note: str) -> None:
        self.stop.saved = note

    def start_clock(self) -> None:
        """The run's wall time counts from now (after set-up, compilation excluded)."""
        self.wall0 = time.perf_counter()

    def elapsed(self) -> float:
        """Wall time of the whole run so far, across resumptions."""
        return self.prior_wall + time.perf_counter() - self.wall0

    def save(self, epoch: int, step: int, accum=None) -> None:
        """last.pt at this point (never a non-finite state); the first one commits the run."""
        run = self.run
        bad = non_finite_tensors(self.method.state_dict())
        if bad:
            raise NonFiniteState(
                f"{len(bad)} weight/buffer tensor(s) became non-finite by {position(epoch, step)} (e.g. {bad[0]}), so "
                f"nothing was saved; {recovery(self.saved, run.cfg.optim.lr)}")
        if run.dist.is_main:  # only the writer builds the file's state
            state = artifacts.run_state(
                method=self.method, epoch=epoch, step=step, data=self.data, config=run.cfg.to_dict(),
                optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict(), wall_time_s=self.elapsed(), rng=rng_state(run.device),
                settings=run.settings.record(),
                history=self.history, accum=accum.state() if accum else None)
            atomic_save(state, run.run_dir / artifacts.LAST)
            self.run_dir.commit()
        self.saved = saved_note(epoch, step)

    def write_best(self) -> None:
        """best.pt as a byte copy of the last.pt just written, atomic like every checkpoint write:
        no second serialisation of the same tensors."""
        run_dir = self.run.run_dir
        atomic_write_bytes(run_dir / artifacts.BEST, (run_dir / artifacts.LAST).read_bytes())

    def repair_best(self, ckpt: dict) -> None:
        """A kill between the last.pt and best.pt writes leaves best.pt one epoch behind: rewrite it
        from last.pt when the history says last.pt's epoch is the best one."""
        best = best_epoch(self.history, self.method.primary)
        if best is None or best != ckpt["epoch"] or ckpt["step"] != 0:
            return
        path = self.run.run_dir / artifacts.BEST
        try:
            current = safe_load(path).get("epoch") if path.exists() else None
        except SokdError:
            current = None
        if current != best:
            atomic_save(ckpt, path)
            print(f"note: best.pt repaired: it now holds epoch {best} (was "
                  f"{'missing' if current is None else f'epoch {current}'})", flush=True)

    def save_standalone(self) -> None:
        """Each network worth shipping as its own classifier file (`sokd eval` / `sokd export` read it)."""
        method, cfg = self.method, self.run.cfg.to_dict()
        for name, (arch_role, module) in method.standalone().items():
            atomic_save(artifacts.model_file(name, module, method.nets[arch_role], self.data, cfg),
                        self.run.run_dir / artifacts.model_file_name(name))
            if artifacts.has_native_form(module):
                save_native_folder(module, self.run.run_dir / artifacts.native_folder_name(name), self.data)


def save_native_folder(module, folder, data) -> None:
    """The network in its source library's own format (a Hugging Face folder), written beside a
    temporary name and moved into place; a folder there already is replaced only when sokd wrote it."""
    import os
    import shutil
    from ..models.hf import save_native
    if folder.is_symlink() or (folder.exists() and not (folder / artifacts.NATIVE_MARK).is_file()):
        raise SokdError(f"'{folder}' exists and sokd did not write it; move it away to get the trained "
                        f"network as a Hugging Face folder (the run's .pt files are written)")
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.sokd.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    save_native(module, staging, data.mean, data.std)
    (staging / artifacts.NATIVE_MARK).write_text("written by sokd; replaced by its next run\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(staging, folder)
