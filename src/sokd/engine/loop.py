"""The one training loop. Every method goes through `fit`; it never branches on a method's name."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import artifacts
from ..errors import SokdError
from . import rundir, tracking
from ..files import atomic_save, atomic_write_bytes, load_state_strict, safe_load
from .checkpoint import non_finite_tensors
from .ddp import sync_buffers
from .distributed import DistContext
from .evaluate import evaluate
from .logger import RunLogger
from .progress import epoch_progress
from .optim import build_optimizer, build_scheduler, rebase_lr
from .precision import (autocast, configure_cuda, emulation_note, grad_scaler, resolve_device,
                        resolve_precision)
from .signals import ForcedStop, Interrupted, Stopped, StopRequest, position
from .stepstats import EpochAccumulator, EpochClock, default_sync_every
from .compiled import check_setting, compile_step

if TYPE_CHECKING:
    from ..config import Config


class NonFiniteLoss(SokdError):
    """A loss term became NaN/inf; the run stops before the bad step touches any checkpoint."""


class NonFiniteState(SokdError):
    """Weights or buffers became NaN/inf; the run stops instead of writing them to a checkpoint."""


def _recovery(saved: str, lr: float) -> str:
    """What a user can do after a numeric failure, given what is on disk."""
    if saved.startswith("last.pt"):
        return (f"{saved}; continue from it with a lower learning rate: the same command plus "
                f"output.resume=true optim.lr={lr / 10:g}")
    return f"{saved}; start again with a lower learning rate (e.g. optim.lr={lr / 10:g})"


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class FitContext:
    """What fit needs besides the method and data: the config and where to write."""

    cfg: "Config"
    run_dir: Path
    dist: DistContext = field(default_factory=DistContext)
    precision: str = "fp32"          # train.precision with `auto` resolved for the device


def fit(method, data, ctx: FitContext) -> dict:
    """Train `method` on `data` per the config; returns the summary dict (also summary.json)."""
    cfg, dist = ctx.cfg, ctx.dist
    tr = cfg.train
    device = resolve_device(tr.device) if not dist.enabled else dist.device
    if tr.threads:
        torch.set_num_threads(tr.threads)
    memory_format = torch.channels_last if tr.channels_last else torch.contiguous_format
    method.to(device=device, memory_format=memory_format)
    for source in (data.train, data.test, data.val):
        if source is not None:
            source.channels_last = tr.channels_last
    data.train.with_index = method.needs_index  # training batches then carry each sample's index

    ctx.precision = resolve_precision(tr.precision, device)
    note = emulation_note(tr.precision, device)
    if note:
        dist.print(note)
    # everything that can be checked is checked before the run directory is touched
    check_setting(tr.compile, device)
    configure_cuda(device, tr.tf32, tr.cudnn_benchmark)
    method.param_groups(cfg.optim.lr, cfg.optim.lr_per_role)
    _check_forward(method, data, device, ctx.precision)
    if dist.is_main:
        tracking.check(cfg.output, ctx.run_dir)
    trackers = tracking.create(cfg.output, ctx.run_dir, cfg.name) if dist.is_main else []

    run_dir = rundir.RunDirectory(ctx.run_dir, cfg.schema_default) if dist.is_main else None
    ckpt = (run_dir.open(cfg.to_dict(), cfg.output.resume, cfg.output.overwrite,
                         outputs=[artifacts.model_file_name(n) for n in method.standalone()],
                         inputs=cfg.input_files())
            if run_dir else None)
    try:
        ckpt = dist.broadcast_object(ckpt)
        if ckpt is not None:
            check_same_data(ckpt, data, ctx.run_dir, cfg.output.allow_data_change)
        with StopRequest() as stop:
            try:
                summary = _fit(method, data, ctx, device, ckpt, run_dir, stop, trackers)
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


def _fit(method, data, ctx: FitContext, device, ckpt, run_dir, stop, trackers) -> dict:
    cfg, dist = ctx.cfg, ctx.dist
    tr = cfg.train
    if run_dir is not None:
        run_dir.begin(cfg.to_dict())

    start_epoch, start_step, history, accum_state, prior_wall = 0, 0, [], None, 0.0
    if ckpt is not None:  # weights first, so every rank's DDP wrapper starts from them
        load_state_strict(method, ckpt["method"], f"'{ctx.run_dir / artifacts.LAST}' (for "
                          f"{ckpt['data'].get('train_size')} training images; the data now have {data.train_size})")
    step_module = dist.wrap(method, sync_bn=cfg.distributed.sync_bn, static_graph=cfg.distributed.static_graph)
    optimizer = build_optimizer(method, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.schedule, tr.epochs)
    scaler = grad_scaler(device, ctx.precision)
    if ckpt is not None:
        wanted = [g["lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        changed = rebase_lr(optimizer, scheduler, wanted)
        if changed:
            dist.print(f"note: learning rate re-based on resume ({changed}); later epochs follow the "
                       f"schedule from the new value")
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_step = int(ckpt["epoch"]), int(ckpt["step"])
        history = list(ckpt.get("history", []))
        accum_state = ckpt.get("accum")
        prior_wall = float(ckpt.get("wall_time_s", 0.0))
        _set_rng_state(ckpt["rng"], device)
        stop.saved = _saved_note(start_epoch, start_step)
        if dist.is_main:
            _repair_best(ctx.run_dir, ckpt, history, method.primary)
        if start_epoch >= tr.epochs:
            dist.print(f"run already finished {start_epoch} epochs; raise train.epochs to train more")

    logger = RunLogger(ctx.run_dir, trackers, cfg.to_dict(), history if ckpt else None) if dist.is_main else None
    step_module = compile_step(step_module, tr.compile, device, dist.print)
    every = tr.sync_every or default_sync_every(device)

    def save(epoch: int, step: int, accum: EpochAccumulator | None) -> None:
        """last.pt at this point (never a non-finite state); the first one commits the run."""
        bad = non_finite_tensors(method.state_dict())
        if bad:
            raise NonFiniteState(
                f"{len(bad)} weight/buffer tensor(s) became non-finite by {position(epoch, step)} (e.g. {bad[0]}), so "
                f"nothing was saved; {_recovery(stop.saved, cfg.optim.lr)}")
        state = artifacts.run_state(
            method=method, epoch=epoch, step=step, data=data, config=cfg.to_dict(),
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
            wall_time_s=prior_wall + time.perf_counter() - wall0, rng=_rng_state(device), history=history,
            accum=accum.state() if accum else None)
        if dist.is_main:
            atomic_save(state, ctx.run_dir / artifacts.LAST)
            run_dir.commit()
        stop.saved = _saved_note(epoch, step)

    def run_eval() -> dict:
        return evaluate(method, data.test, device, ctx.precision, reduce=dist.all_reduce_sum)

    def run_val() -> dict:
        """{"val": per-role accuracy on the validation split} when the run has one, else {}."""
        if getattr(data, "val", None) is None:
            return {}
        return {"val": evaluate(method, data.val, device, ctx.precision, reduce=dist.all_reduce_sum)["roles"]}

    wall0 = time.perf_counter()
    if ckpt is None:
        initial = run_eval()
        row = {"epoch": 0, "test": initial["roles"], **run_val(), "compare": initial["compare"]}
        history.append(row)
        if logger:
            logger.log(row)

    for epoch in range(start_epoch, tr.epochs):
        data.train.set_epoch(epoch)
        method.set_epoch(epoch)  # term-weight warm-up follows the epoch, also after a resume
        if not start_step:  # a mid-epoch resume restored the RNG state from the checkpoint
            torch.manual_seed(tr.seed * 100_003 + epoch)
        # a mid-epoch checkpoint holds the epoch's sums so far, already reduced over ranks
        keep = start_step and accum_state and dist.is_main
        accum = EpochAccumulator(**accum_state, step=start_step) if keep else EpochAccumulator(step=start_step)
        step = start_step
        start_step, accum_state = 0, None
        total = len(data.train) if tr.steps_per_epoch is None else min(len(data.train), tr.steps_per_epoch)
        bar = epoch_progress(total, step, f"epoch {epoch + 1}/{tr.epochs}", cfg.output.progress and dist.is_main)
        method.train()
        try:
            stopped = _run_epoch(step_module, data, optimizer, scaler, accum, step, total, bar, stop,
                                 every, ctx, device, epoch)
        finally:
            bar.close()
        sync_buffers(method, dist)  # every rank's BatchNorm statistics, before any read or save
        if stopped is not None:
            save(epoch, stopped, accum.reduced(dist))
            raise Interrupted(stop.signum or 15, epoch, stopped, ctx.run_dir)
        lrs = {g["role"]: g["lr"] for g in optimizer.param_groups}
        scheduler.step()
        done = epoch + 1
        row = {"epoch": done, "wall_time_s": time.perf_counter() - wall0 + prior_wall, "lr": lrs,
               "train": accum.reduced(dist).result()}
        if evaluated_at(done, tr.eval_every, tr.epochs):
            result = run_eval()
            row.update(test=result["roles"], **run_val(), compare=result["compare"])
        history.append(row)
        best = "test" in row and _best_epoch(history, method.primary) == done
        # a best epoch writes last.pt too: best.pt never holds a state that a resumed run, going
        # back to last.pt, would not pass through again (nor disagree with its summary)
        saved = best or saved_at(done, cfg.output.save_every, tr.epochs, first=epoch == start_epoch)
        if saved:
            save(done, 0, None)
        if logger:
            logger.log(row)
        if dist.is_main and best:
            write_best(ctx.run_dir)
        dist.print(_epoch_line(row))
        if epoch + 1 < tr.epochs and dist.any_flag(stop.requested):
            raise Interrupted(stop.signum or 15, epoch + 1, 0, ctx.run_dir)

    # a signal arriving from now on changes nothing: the run is complete, finish writing it
    stop.finish()
    summary = _summary(cfg, method, data, history, ctx, device)
    if dist.is_main:
        _save_standalone(method, data, ctx)
        logger.summary(summary)
        logger.close()
    return summary


def _run_epoch(step_module, data, optimizer, scaler, accum: EpochAccumulator, step: int, total: int,
               bar, stop, every: int, ctx: FitContext, device, epoch: int) -> int | None:
    """The steps of one epoch from `step` to `total`; the step a stop was requested at, else None.

    The step itself never reads a device tensor on the host: statistics and the non-finite record
    stay on the device (`EpochAccumulator`) and are read every `every` steps, at the last step and
    when a stop is requested (so always before a checkpoint). A single process looks at its stop
    flag every step (a Python flag); a distributed run exchanges it in the same read, so every
    process stops at the same step. `accum.seconds` gains the epoch's training time.
    """
    cfg, dist = ctx.cfg, ctx.dist
    clock = EpochClock(device)
    done = step
    try:
        for batch in data.train.iter_from(step):
            if step >= total:
                break
            images, labels = batch[0], batch[1]
            extra = {"index": batch[2]} if data.train.with_index else {}
            with autocast(device, ctx.precision):
                out = step_module(images, labels, **extra)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            accum.add(out, labels)
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
                    f"{_recovery(stop.saved, cfg.optim.lr)} (or use fp32/bf16 instead of fp16)")
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


def saved_at(epoch: int, every: int, epochs: int, first: bool) -> bool:
    """Whether last.pt is written at the end of `epoch`: every `every` epochs, the last epoch,
    and the first epoch this process trains (so a run directory holds a checkpoint, and a
    resumed run a fresh one, as soon as possible)."""
    return first or epoch % every == 0 or epoch == epochs


def write_best(run_dir: Path) -> None:
    """best.pt as a byte copy of the last.pt just written (a best epoch always writes last.pt),
    atomic like every checkpoint write: no second serialisation of the same tensors."""
    atomic_write_bytes(run_dir / artifacts.BEST, (run_dir / artifacts.LAST).read_bytes())


def _saved_note(epoch: int, step: int) -> str:
    return f"last.pt holds the run at {position(epoch, step)} (its last finite state)"


def selection_split(history: list[dict]) -> str:
    """The split that picks the best epoch: "val" when the run evaluates one, else "test"."""
    return "val" if any("val" in r for r in history) else "test"


def _best_epoch(history: list[dict], primary: str) -> int | None:
    """The epoch best.pt should hold: the latest epoch with the best primary top-1 on the
    validation split when there is one, else on the test split."""
    split = selection_split(history)
    scored = [(r[split][primary]["top1"], r["epoch"]) for r in history[1:] if primary in r.get(split, {})]
    return max(scored)[1] if scored else None


def _repair_best(run_dir: Path, ckpt: dict, history: list[dict], primary: str) -> None:
    """A kill between the last.pt and best.pt writes leaves best.pt one epoch behind: rewrite it
    from last.pt when the history says last.pt's epoch is the best one."""
    best_epoch = _best_epoch(history, primary)
    if best_epoch is None or best_epoch != ckpt["epoch"] or ckpt["step"] != 0:
        return
    path = run_dir / artifacts.BEST
    try:
        current = safe_load(path).get("epoch") if path.exists() else None
    except SokdError:
        current = None
    if current != best_epoch:
        atomic_save(ckpt, path)
        print(f"note: best.pt repaired: it now holds epoch {best_epoch} (was "
              f"{'missing' if current is None else f'epoch {current}'})", flush=True)


def _epoch_line(row: dict) -> str:
    tests = "  ".join(f"{r} {m['top1']:.2f}" for r, m in row.get("test", {}).items()) or "not evaluated"
    vals = "  ".join(f"{r} {m['top1']:.2f}" for r, m in row.get("val", {}).items())
    return (f"epoch {row['epoch']:>3}  loss {row['train']['loss']:.4f}  "
            f"{row['train']['images_per_s']:.0f} img/s  test top-1: {tests}" + (f"  val top-1: {vals}" if vals else ""))


def _save_standalone(method, data, ctx: FitContext) -> None:
    """Each network worth shipping as its own classifier file (`sokd eval` / `sokd export` read it)."""
    for name, (arch_role, module) in method.standalone().items():
        atomic_save(artifacts.model_file(name, module, method.nets[arch_role], data, ctx.cfg.to_dict()),
                    ctx.run_dir / artifacts.model_file_name(name))


def _summary(cfg, method, data, history, ctx, device) -> dict:
    trained_rows = [r for r in history if "train" in r]
    samples = sum(r["train"]["samples"] for r in trained_rows)
    seconds = sum(r["train"]["seconds"] for r in trained_rows)
    nets = {}
    evaluated = [r for r in history if "test" in r]
    for role in evaluated[-1]["test"] if evaluated else []:
        curve = [(r["epoch"], r["test"][role]) for r in history if role in r.get("test", {})]
        trained = [(e, m) for e, m in curve if e > 0] or curve
        # the latest among ties, as best.pt holds (`_best_epoch`)
        best_epoch, best = max(trained, key=lambda em: (em[1]["top1"], em[0]))
        info = artifacts.network_info(method.nets[role]) if role in method.nets else {}
        nets[role] = {
            "arch": info.get("arch"), "params": info.get("params"),
            "top1_final": curve[-1][1]["top1"], "top5_final": curve[-1][1]["top5"],
            "top1_best": best["top1"], "best_epoch": best_epoch,
            "top1_initial": curve[0][1]["top1"] if curve[0][0] == 0 else None,
        }
        nets[role].update(_selected(history, role))
    return {
        "method": cfg.method.name, "name": cfg.name, "dataset": data.name,
        "epochs": history[-1]["epoch"] if history else 0, "seed": cfg.train.seed,
        "precision": ctx.precision, "channels_last": cfg.train.channels_last,
        "device": str(device), "world_size": ctx.dist.world_size,
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


def _selected(history: list[dict], role: str) -> dict:
    """Test top-1 at the epoch the validation split picks (latest among ties), when there is one."""
    rows = [r for r in history if r["epoch"] > 0 and role in r.get("val", {}) and role in r.get("test", {})]
    if not rows:
        return {}
    pick = max(rows, key=lambda r: (r["val"][role]["top1"], r["epoch"]))
    return {"top1_val_best": pick["val"][role]["top1"], "selected_epoch": pick["epoch"],
            "top1_selected": pick["test"][role]["top1"]}
