#!/usr/bin/env python3
"""What a whole `sokd train` epoch spends besides training steps, on the CIFAR-100 recipe.

Runs kd and sokd (wrn_40_2 -> wrn_40_1, the recipe's batch 128 and augmentation) through the
real runner for `--epochs` epochs of `--steps` steps each, with the full 10,000-image test set
evaluated after every epoch and last.pt written every epoch, and times, per epoch:
- the training steps (the loop's own clock, data loading included),
- evaluation (every call of the loop's `evaluate`),
- checkpoints (every `atomic_save`: last.pt, best.pt is a byte copy, model files at the end),
- the rest (logging, metrics.jsonl, the epoch line).
The fraction is taken for a full epoch of the recipe (390 steps): the measured seconds per step
times 390, plus the measured evaluation, checkpoint and other seconds of an epoch. The first
epoch is reported apart (it evaluates epoch 0 too and fills the frozen teacher's logit cache).

It also runs the default config (no precision / channels_last / compile keys) and the best
explicit setting found by benchmarks/peers.py on this machine, alternately, and compares their
training images/s: the defaults should be as fast as the best explicit choice.

    .venv/bin/python benchmarks/run_overhead.py --data ../shared/data/cifar100.npz --steps 60 --epochs 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sokd import config, runner
from sokd.engine import checkpointing
from sokd.engine import loop as loop_mod

FULL_EPOCH_STEPS = 390   # 50,000 images / batch 128, drop_last


def run(method: str, data_root: str, steps: int, epochs: int, teacher: str, train_extra: dict, out: Path) -> dict:
    timings = {"eval": [], "save": []}
    evaluate, atomic_save = loop_mod.evaluate, checkpointing.atomic_save

    def timed_eval(*a, **k):
        t0 = time.perf_counter()
        try:
            return evaluate(*a, **k)
        finally:
            timings["eval"].append((time.perf_counter() - t0))

    def timed_save(obj, path):
        t0 = time.perf_counter()
        atomic_save(obj, path)
        timings["save"].append((Path(path).name, time.perf_counter() - t0))

    loop_mod.evaluate, checkpointing.atomic_save = timed_eval, timed_save
    cfg = {
        "name": method, "method": {"name": method},
        "data": {"name": "cifar100", "root": data_root, "batch_size": 128, "crop_padding": 4,
                 "pad_mode": "zeros", "hflip": True},
        "teacher": {"arch": "wrn_40_2", "checkpoint": teacher}, "student": {"arch": "wrn_40_1"},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "constant"},
        "train": {"epochs": epochs, "seed": 0, "steps_per_epoch": steps, **train_extra},
        "output": {"dir": str(out), "tensorboard": False, "progress": False},
    }
    t0 = time.perf_counter()
    try:
        summary = runner.train(config.build(cfg))
    finally:
        loop_mod.evaluate, checkpointing.atomic_save = evaluate, atomic_save
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train" in r]
    return {"summary": summary, "rows": rows, "trained": trained, "timings": timings, "wall": wall}


def epochs_breakdown(result: dict) -> list[dict]:
    """Per trained epoch: train, eval, save and other seconds (the first epoch also carries
    epoch 0's evaluation)."""
    rows, trained = result["rows"], result["trained"]
    evals = list(result["timings"]["eval"])
    saves = [s for name, s in result["timings"]["save"] if name == "last.pt"]
    out, prev_wall = [], 0.0
    for i, row in enumerate(trained):
        n_eval = 2 if i == 0 else 1   # epoch 0's evaluation, then this epoch's
        ev = sum(evals[:n_eval])
        evals = evals[n_eval:]
        sv = saves[i] if i < len(saves) else 0.0
        wall = row["wall_time_s"] - prev_wall
        prev_wall = row["wall_time_s"]
        out.append({"train_s": row["train"]["seconds"], "eval_s": ev, "save_s": sv,
                    "other_s": max(wall - row["train"]["seconds"] - ev - sv, 0.0),
                    "steps": row["train"]["samples"] / 128})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="CIFAR-100 (.npz or cifar-100-python folder)")
    ap.add_argument("--steps", type=int, default=60, help="training steps per epoch (the full epoch is 390)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=2, help="default-vs-explicit runs, alternated")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = {"machine": _machine(), "threads": torch.get_num_threads(), "steps": args.steps, "epochs": args.epochs}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_cfg = {"name": "teacher", "method": {"name": "vanilla"}, "model": {"arch": "wrn_40_2"},
                       "data": {"name": "cifar100", "root": args.data, "batch_size": 128},
                       "optim": {"lr": 0.05}, "schedule": {"name": "constant"},
                       "train": {"epochs": 1, "seed": 0, "steps_per_epoch": 20},
                       "output": {"dir": str(tmp / "teacher"), "tensorboard": False, "progress": False}}
        runner.train(config.build(teacher_cfg))
        teacher = str(tmp / "teacher" / "model.pt")
        for method in ("kd", "sokd"):
            res = run(method, args.data, args.steps, args.epochs, teacher, {}, tmp / f"{method}")
            per = epochs_breakdown(res)
            later = per[1:] or per
            step_s = statistics.median(e["train_s"] / e["steps"] for e in later)
            ev, sv, ot = (statistics.median(e[k] for e in later) for k in ("eval_s", "save_s", "other_s"))
            full_train = step_s * FULL_EPOCH_STEPS
            frac = (ev + sv + ot) / (full_train + ev + sv + ot)
            results[method] = {"per_epoch": per, "step_ms": 1000 * step_s, "eval_s": ev, "save_s": sv, "other_s": ot,
                               "full_epoch_train_s": full_train, "overhead_fraction": frac,
                               "first_epoch_eval_s": per[0]["eval_s"], "settings": {
                                   k: res["summary"].get(k) for k in ("precision", "channels_last", "compiled")}}
            print(f"{method}: {1000 * step_s:.0f} ms/step in the fit; per epoch: evaluation {ev:.1f} s, last.pt "
                  f"{sv:.2f} s, other {ot:.2f} s; a full {FULL_EPOCH_STEPS}-step epoch trains {full_train:.0f} s, "
                  f"so evaluation + checkpoint + logging are {100 * frac:.1f}% of it (first epoch's evaluation, "
                  f"epoch 0 included: {per[0]['eval_s']:.1f} s)", flush=True)
        # default config against the best explicit setting, alternately
        best = {"precision": results["kd"]["settings"]["precision"], "channels_last": True, "compile": False}
        rates = {"default": [], "explicit": []}
        for i in range(args.pairs):
            for label, extra in (("default", {}), ("explicit", best)):
                res = run("kd", args.data, args.steps, 1, teacher, extra, tmp / f"pair{i}_{label}")
                rates[label].append(res["summary"]["train_images_per_s"])
        results["default_vs_explicit"] = {"explicit": best, "images_per_s": rates,
                                          "ratio": statistics.median(rates["default"]) / statistics.median(rates["explicit"])}
        print(f"kd, default config vs explicit {best}: {rates} img/s; default / explicit = "
              f"{results['default_vs_explicit']['ratio']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
