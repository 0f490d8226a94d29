"""The one training loop. Every method goes through `fit`; it never branches on a method's name.

`fit` resolves the device and precision once (`RunContext`), checks everything it can before the
run directory is touched, then `_fit` reads as the run goes: begin the directory, restore a
resumed run (`checkpointing.Resumed`), evaluate epoch 0, train epochs (`_run_epoch`), evaluate,
checkpoint (`checkpointing.Checkpointer`, best epochs by `selection`), and write the summary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import artifacts
from ..errors import SokdError
from ..files import load_state_strict
from . import rundir, tracking
from .checkpointing import Checkpointer, NonFiniteState, Resumed, recovery, saved_at
from . import frozen, settings as speed
from .compiled import check_setting, compile_step
from .ddp import sync_buffers
from .distributed import DistContext
from .evaluate import FrozenLogits, evaluate
from .logger import RunLogger
from .dot import backward
from .optim import build_optimizer, build_scheduler, check_optimizer
from .precision import autocast, configure_cuda, emulation_note, grad_scaler, resolve_device
from .progress import epoch_progress
from .selection import best_epoch, best_row, selected, selection_split
from .signals import ForcedStop, Interrupted, Stopped, StopRequest
from .stepstats import EpochAccumulator, EpochClock, default_sync_every
from .views import step_inputs, usual_view

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["fit", "FitContext", "RunContext", "NonFiniteLoss", "NonFiniteState", "evaluated_at", "saved_at"]


class NonFiniteLoss(SokdError):
    """A loss term became NaN/inf; the run stops before the bad step touches any checkpoint."""


@dataclass(frozen=True)
class FitContext:
    """What fit needs besides the method and data: the config, where to write, the processes."""

    cfg: "Config"
    run_dir: Path
    dist: DistContext = field(default_factory=DistContext)
    device: torch.device | None = None   # resolved by the caller (who put the data there), else by fit


@dataclass(frozen=True)
class RunContext:
    """A run's settings once resolved for this process: nothing in it changes while it trains."""

    cfg: "Config"
    run_dir: Path
    dist: DistContext
    device: torch.device
    settings: speed.Settings          # precision, channels_last and compile with `auto` resolved
    sync_every: int                  # steps between host reads of the step statistics

    @property
    def precision(self) -> str:
        return self.settings.precision

    @classmethod
    def resolve(cls, ctx: FitContext, steps: int, recorded: dict | None = None) -> "RunContext":
        """Settings for a run of `steps` optimizer steps; `recorded`: a resumed run's settings."""
        tr, dist = ctx.cfg.train, ctx.dist
        device = ctx.device or (dist.device if dist.enabled else resolve_device(tr.device))
        return cls(ctx.cfg, Path(ctx.run_dir), dist, device, speed.resolve(tr, device, steps, recorded),
                   tr.sync_every or default_sync_every(device))


def steps_per_epoch(train_spec, data) -> int:
    return len(data.train) if train_spec.steps_per_epoch is None else min(len(data.train), train_spec.steps_per_epoch)


def _apply_layout(method, data, run: RunContext) -> None:
    method.to(device=run.device, memory_format=run.settings.memory_format)
    for source in (data.train, data.test, data.val):
        if source is not None:
            source.channels_last = run.settings.channels_last


def set_views(source, views: int) -> None:
    """Ask the training batches for `views` views of every image (a second one: strongly augmented)."""
    if hasattr(source, "strong_view"):
        source.strong_view = views == 2
    elif views != 1:
        raise SokdError(f"the method trains on {views} views of every image (method.mlkd.strong_view), which "
                        f"this data source ({type(source).__name__}) cannot make; use data held in memory "
                        f"or set method.mlkd.strong_view=false")


def fit(method, data, ctx: FitContext) -> dict:
    """Train `method` on `data` per the config; returns the summary dict (also summary.json).
    `train.threads` holds for the run only: the caller's process gets its thread count back."""
    threads, before = ctx.cfg.train.threads, torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _set_up_and_fit(method, data, ctx)
    finally:
        if threads:
            torch.set_num_threads(before)


def _set_up_and_fit(method, data, ctx: FitContext) -> dict:
    """Resolve the run's settings, check everything that can be checked before the run directory
    is touched, open it (or resume from it), then train."""
    steps = ctx.cfg.train.epochs * steps_per_epoch(ctx.cfg.train, data)
    run = RunContext.resolve(ctx, steps)
    cfg, dist, device, tr = run.cfg, run.dist, run.device, run.cfg.train
    _apply_layout(method, data, run)
    data.train.with_index = method.needs_index  # training batches then carry each sample's index
    set_views(data.train, method.views)          # and a strong view of each image, for a method that asks

    note = emulation_note(tr.precision, device)
    if note:
        dist.print(note)
    # everything that can be checked is checked before the run directory is touched
    check_setting(run.settings.compile, device)
    check_optimizer(cfg.optim, run.precision, dist.world_size)
    configure_cuda(device, tr.tf32, tr.cudnn_benchmark)
    method.param_groups(cfg.optim.lr, cfg.optim.lr_per_role)
    _check_forward(method, data, device, run.precision)
    if dist.is_main:
        tracking.check(cfg.output, run.run_dir)
    trackers = tracking.create(cfg.output, run.run_dir, cfg.name) if dist.is_main else []

    run_dir = rundir.RunDirectory(run.run_dir, cfg.schema_default) if dist.is_main else None
    ckpt = (run_dir.open(cfg.to_dict(), cfg.output.resume, cfg.output.overwrite,
                         outputs=[*(artifacts.model_file_name(n) for n in method.standalone()),
                                  *(artifacts.native_folder_name(n) for n, (_, m) in method.standalone().items()
                                    if artifacts.has_native_form(m))],
                         inputs=cfg.input_files())
            if run_dir else None)
    try:
        ckpt = dist.broadcast_object(ckpt)
        if ckpt is not None:
            check_same_data(ckpt, data, run.run_dir, cfg.output.allow_data_change)
            if ckpt.get("settings"):   # `auto` resolves as it did when the run began
                run = RunContext.resolve(ctx, steps, ckpt["settings"])
                _apply_layout(method, data, run)
        with StopRequest() as stop:
            try:
                summary = _fit(method, data, run, ckpt, run_dir, stop, trackers)
            except BaseException as err:
                stopped = isinstance(err, (Interrupted, ForcedStop, Stopped, KeyboardInterrupt))
                tracking.close_all(trackers, tracking.KILLED if stopped else tracking.FAILED)
                if run_dir is not None:
                    run_dir.rollback()
                raise
    finally:
        if run_dir is not None:
            run_dir.close()
    return summary


def check_same_data(ckpt: dict, data, run_dir: Path, allowed: bool) -> None:
    """A resumed run continues on the data it was trained on: last.pt records their fingerprint
    (checkpoints written before it was recorded are taken as they are)."""
    then = ckpt.get("data", {}).get("fingerprint")
    if then is None or then == data.fingerprint or allowed:
        return
    then_size, now_size = ckpt["data"].get("train_size"), data.train_size
    sizes = f" ({then_size} training images then, {now_size} now)" if then_size != now_size else ""
    raise SokdError(f"the training data changed since '{run_dir / artifacts.LAST}' was written{sizes}; put the "
                    f"data back as they were, or continue on the new data with output.allow_data_change=true")


def _check_forward(method, data, device, precision: str) -> None:
    """One small test batch through every network, so input the networks cannot take (images too
    small, wrong channels) is refused before anything is written."""
    images, _ = next(iter(data.test))
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad(), autocast(device, precision):
            method.predict(images[:2])
    except RuntimeError as err:
        if "memory" in str(err):  # not the images' shape: the caller reports running out of memory
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SokdError(f"the networks cannot take this data's {tuple(images.shape[1:])} images ({first[:160]}); "
                        f"use larger images (data.image_size / data.pad_to) or another architecture") from None
    finally:
        method.train(was_training)


def _fit(method, data, run: RunContext, ckpt, run_dir, stop, trackers) -> dict:
    cfg, dist, tr = run.cfg, run.dist, run.cfg.train
    if run_dir is not None:
        run_dir.begin(cfg.to_dict())
    if ckpt is not None:  # weights first, so every rank's DDP wrapper starts from them
        load_state_strict(method, ckpt["method"], f"'{run.run_dir / artifacts.LAST}' (for "
                          f"{ckpt['data'].get('train_size')} training images; the data now have {data.train_size})")
    step_module = dist.wrap(method, sync_bn=cfg.distributed.sync_bn, static_graph=cfg.distributed.static_graph)
    # after the wrap: the inference copies are buffers DDP need not know
    inference = frozen.prepare(method, _probe_batch(data, run.device), run.precision, tr.frozen_inference,
                               compile=run.settings.compile)
    try:
        return _fit_prepared(method, data, run, ckpt, run_dir, stop, trackers, step_module, inference)
    finally:
        inference.release()


def _probe_batch(data, device) -> torch.Tensor:
    """A few test images, as the step will see them (device, layout), to find and check folds."""
    images, _ = next(iter(data.test))
    return images[:8].to(device)


def _fit_prepared(method, data, run: RunContext, ckpt, run_dir, stop, trackers, step_module, inference) -> dict:
    cfg, dist, tr = run.cfg, run.dist, run.cfg.train
    dist.print(run.settings.line(run.device, tuple(inference.notes)))
    for role, net in method.nets.items():   # a network trained on other images gets its own
        adapter = getattr(net, "input_adapter", None)
        if adapter is not None:
            dist.print(f"{role}: {adapter.describe()}")
    optimizer = build_optimizer(method, cfg.optim, run.device)
    scheduler = build_scheduler(optimizer, cfg.schedule, tr.epochs)
    scaler = grad_scaler(run.device, run.precision)
    resumed = (Resumed.restore(ckpt, optimizer, scheduler, scaler, run.device, dist.print)
               if ckpt is not None else None)
    checkpoints = Checkpointer(run, method, data, optimizer, scheduler, scaler, resumed, run_dir, stop)
    history = checkpoints.history
    if resumed is not None:
        if dist.is_main:
            checkpoints.repair_best(ckpt)
        if resumed.epoch >= tr.epochs:
            dist.print(f"run already finished {resumed.epoch} epochs; raise train.epochs to train more")
    start = resumed or Resumed()

    logger = RunLogger(run.run_dir, trackers, cfg.to_dict(), history if ckpt else None) if dist.is_main else None
    step_module = compile_step(step_module, run.settings.compile, run.device, dist.print)

    kept = {split: FrozenLogits(method.constant_roles) for split in ("test", "val")}

    def scores() -> dict:
        """Test accuracy of every role and the role comparisons, plus the validation split's."""
        result = evaluate(method, data.test, run.device, run.precision, reduce=dist.all_reduce_sum,
                          cache=kept["test"])
        val = ({"val": evaluate(method, data.val, run.device, run.precision, reduce=dist.all_reduce_sum,
                                cache=kept["val"])["roles"]}
               if getattr(data, "val", None) is not None else {})
        return {"test": result["roles"], **val, "compare": result["compare"]}

    checkpoints.start_clock()
    if ckpt is None:
        row = {"epoch": 0, **scores()}
        history.append(row)
        if logger:
            logger.log(row)

    step_at, accum_at = start.step, start.accum
    for epoch in range(start.epoch, tr.epochs):
        data.train.set_epoch(epoch)
        method.set_epoch(epoch)  # term-weight warm-up follows the epoch, also after a resume
        if not step_at:  # a mid-epoch resume restored the RNG state from the checkpoint
            torch.manual_seed(tr.seed * 100_003 + epoch)
        # a mid-epoch checkpoint holds the epoch's sums so far, already reduced over ranks
        keep = step_at and accum_at and dist.is_main
        accum = EpochAccumulator(**accum_at, step=step_at) if keep else EpochAccumulator(step=step_at)
        step = step_at
        step_at, accum_at = 0, None
        total = steps_per_epoch(tr, data)
        bar = epoch_progress(total, step, f"epoch {epoch + 1}/{tr.epochs}", cfg.output.progress and dist.is_main)
        method.train()
        try:
            stopped = _run_epoch(step_module, data, optimizer, scaler, accum, step, total, bar, stop, run, epoch)
        finally:
            bar.close()
        sync_buffers(method, dist)  # every rank's BatchNorm statistics, before any read or save
        if stopped is not None:
            checkpoints.save(epoch, stopped, accum.reduced(dist))
            raise Interrupted(stop.signum or 15, epoch, stopped, run.run_dir)
        lrs = {g["role"]: g["lr"] for g in optimizer.param_groups}
        scheduler.step()
        done = epoch + 1
        row = {"epoch": done, "wall_time_s": checkpoints.elapsed(), "lr": lrs, "train": accum.reduced(dist).result()}
        if evaluated_at(done, tr.eval_every, tr.epochs):
            row.update(scores())
        history.append(row)
        best = "test" in row and best_epoch(history, method.primary) == done
        if best or saved_at(done, cfg.output.save_every, tr.epochs, first=epoch == start.epoch):
            checkpoints.save(done, 0)
        if logger:
            logger.log(row)
        if dist.is_main and best:
            checkpoints.write_best()
        dist.print(_epoch_line(row))
        if epoch + 1 < tr.epochs and dist.any_flag(stop.requested):
            raise Interrupted(stop.signum or 15, epoch + 1, 0, run.run_dir)

    # a signal arriving from now on changes nothing: the run is complete, finish writing it
    stop.finish()
    summary = _summary(run, method, data, history)
    if dist.is_main:
        checkpoints.save_standalone()
        logger.summary(summary)
        logger.close()
    return summary


def _run_epoch(step_module, data, optimizer, scaler, accum: EpochAccumulator, step: int, total: int,
               bar, stop, run: RunContext, epoch: int) -> int | None:
    """The steps of one epoch from `step` to `total`; the step a stop was requested at, else None.

    The step itself never reads a device tensor on the host: statistics and the non-finite record
    stay on the device (`EpochAccumulator`) and are read every `every` steps, at the last step and
    when a stop is requested (so always before a checkpoint). A single process looks at its stop
    flag every step (a Python flag); a distributed run exchanges it in the same read, so every
    process stops at the same step. `accum.seconds` gains the epoch's training time.
    """
    cfg, dist, every = run.cfg, run.dist, run.sync_every
    views = 2 if getattr(data.train, "strong_view", False) else 1
    clock = EpochClock(run.device)
    done = step
    try:
        for batch in data.train.iter_from(step):
            if step >= total:
                break
            labels = batch[1]
            images, step_labels, extra = step_inputs(batch, data.train.with_index, views)
            with autocast(run.device, run.precision):
                out = step_module(images, step_labels, **extra)
            backward(out, optimizer, scaler)
            scaler.step(optimizer)
            scaler.update()
            accum.add(usual_view(out, len(labels), views), labels)
            del out
            step += 1
            due = step % every == 0 or step == total
            if not (due or not dist.enabled):
                continue
            requested = stop.requested      # read once per step (one process) or per poll (DDP)
            if not (due or requested):
                bar.update(step - done)
                done = step
                continue
            seen = accum.poll(dist, requested)
            if seen.bad_step is not None:
                raise NonFiniteLoss(
                    f"non-finite loss in term '{seen.bad_term}' at epoch {epoch + 1} step {seen.bad_step}; "
                    f"{recovery(stop.saved, cfg.optim.lr)} (or use fp32/bf16 instead of fp16)")
            bar.update(step - done)
            done = step
            elapsed = accum.seconds + clock.peek()
            bar.set_postfix(loss=f"{seen.loss:.3f}",
                            img_s=f"{accum.samples * dist.world_size / max(elapsed, 1e-9):.0f}")
            if seen.stop:
                return step
        return None
    finally:
        accum.seconds += clock.seconds()


def evaluated_at(epoch: int, every: int, epochs: int) -> bool:
    """Whether the end of (1-based) `epoch` is evaluated: every `every` epochs and the last."""
    return epoch % every == 0 or epoch == epochs


def _epoch_line(row: dict) -> str:
    tests = "  ".join(f"{r} {m['top1']:.2f}" for r, m in row.get("test", {}).items()) or "not evaluated"
    vals = "  ".join(f"{r} {m['top1']:.2f}" for r, m in row.get("val", {}).items())
    return (f"epoch {row['epoch']:>3}  loss {row['train']['loss']:.4f}  "
            f"{row['train']['images_per_s']:.0f} img/s  test top-1: {tests}" + (f"  val top-1: {vals}" if vals else ""))


def _summary(run: RunContext, method, data, history: list[dict]) -> dict:
    cfg = run.cfg
    trained_rows = [r for r in history if "train" in r]
    samples = sum(r["train"]["samples"] for r in trained_rows)
    seconds = sum(r["train"]["seconds"] for r in trained_rows)
    nets = {}
    evaluated = [r for r in history if "test" in r]
    for role in evaluated[-1]["test"] if evaluated else []:
        curve = [r for r in history if role in r.get("test", {})]
        best = best_row(history, role, "test") or curve[0]   # before training when nothing trained
        info = artifacts.network_info(method.nets[role]) if role in method.nets else {}
        nets[role] = {
            "arch": info.get("arch"), "params": info.get("params"),
            "top1_final": curve[-1]["test"][role]["top1"], "top5_final": curve[-1]["test"][role]["top5"],
            "top1_best": best["test"][role]["top1"], "best_epoch": best["epoch"],
            "top1_initial": curve[0]["test"][role]["top1"] if curve[0]["epoch"] == 0 else None,
        }
        nets[role].update(selected(history, role))
    return {
        "method": cfg.method.name, "name": cfg.name, "dataset": data.name,
        "data_fingerprint": getattr(data, "fingerprint", None), "versions": artifacts.software_versions(),
        "epochs": history[-1]["epoch"] if history else 0, "seed": cfg.train.seed,
        "precision": run.precision, "channels_last": run.settings.channels_last,
        "compiled": bool(run.settings.compile),
        "device": str(run.device), "world_size": run.dist.world_size,
        "wall_time_s": history[-1].get("wall_time_s", 0.0) if history else 0.0,
        "train_images_per_s": samples / seconds if seconds else None,
        "primary_role": method.primary, "networks": nets, "term_weights": method.term_weights,
        "compare": evaluated[-1].get("compare", {}) if evaluated else {},
        "val_size": getattr(data, "val_size", 0),
        "note": ("top1_final = last epoch; top1_best = best epoch on the test set (optimistic); "
                 + ("top1_selected = test top-1 at the epoch with the best validation top-1 (selected_epoch), "
                    "the honest pick" if selection_split(history) == "val"
                    else "no validation split (data.val_split) for an honest selected epoch")),
    }
