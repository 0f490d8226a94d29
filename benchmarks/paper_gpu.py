#!/usr/bin/env python3
"""The paper's full CIFAR-100 recipe on one GPU: the WRN-40-2 teacher, then SOKD WRN-40-1 on it.

    .venv/bin/python benchmarks/paper_gpu.py [--data ../shared/data/cifar100.npz] [--out runs/paper_gpu]
    .venv/bin/python benchmarks/paper_gpu.py --smoke --out /tmp/paper   # the same logic on a CPU, in seconds

`configs/cifar100/vanilla_wrn_40_2.yaml` and `configs/cifar100/wrn_40_2-wrn_40_1.yaml` (200
epochs, lr 0.1, x0.1 at 100 and 150, batch 128), with what suits a GPU: bf16 + channels_last,
`train.compile=true` (unless --no-compile), evaluation every 5 epochs and at the end. Resumable:
rerunning the same command skips finished runs (summary.json), continues a stopped one from its
last.pt (output.resume=true), then prints the table of both runs and writes it to OUT/table.md.
Designed to finish on one H100-class GPU in under 10 minutes; that is an estimate from the
step's FLOPs, not a measurement: nothing here has run on a GPU yet (docs/gpu.md).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "cifar100"

#: (run name, config, overrides) in order; the SOKD run distils from the teacher run's model.pt
RUNS = (("teacher", CONFIGS / "vanilla_wrn_40_2.yaml", []),
        ("sokd", CONFIGS / "wrn_40_2-wrn_40_1.yaml", ["teacher.checkpoint={out}/teacher/model.pt"]))


def overrides(args) -> list[str]:
    """What every run gets besides its config: the data, the device settings, or toy sizes."""
    if args.smoke:
        return ["data.name=synthetic", "data.synthetic_size=64", "data.synthetic_shape=[3,16,16]",
                "data.synthetic_classes=4", "data.batch_size=16", "train.epochs=2", "train.precision=fp32",
                "train.channels_last=false", "train.device=cpu", "train.threads=1", "teacher.arch=resnet14",
                "student.arch=resnet8", "model.arch=resnet14", "schedule.milestones=[1]",
                "output.tensorboard=false", "output.progress=false"]
    return [f"data.root={args.data}", "train.precision=bf16", "train.channels_last=true",
            f"train.compile={'false' if args.no_compile else 'true'}", "train.eval_every=5",
            "output.tensorboard=false"]


def run(name: str, cfg: Path, extra: list[str], args) -> dict:
    """Train (or continue) one run unless it has finished; its summary."""
    out = args.out / name
    if (out / "summary.json").is_file():
        print(f"done     {name} ({out})", flush=True)
        return json.loads((out / "summary.json").read_text())
    resume = (out / "last.pt").is_file()
    keep = [o for o in overrides(args) if not (o.startswith("model.") and name != "teacher")
            and not (o.startswith(("teacher.", "student.")) and name == "teacher")]
    cmd = [sys.executable, "-m", "sokd", "train", str(cfg), *keep,
           *(e.format(out=args.out) for e in extra), f"output.dir={out}", f"output.resume={str(resume).lower()}"]
    print(("resume   " if resume else "run      ") + " ".join(cmd[3:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"paper_gpu: {name} stopped (exit {proc.returncode}); rerun the same command to continue")
    return json.loads((out / "summary.json").read_text())


def table(summaries: dict) -> str:
    teacher, sokd = summaries["teacher"], summaries["sokd"]
    nets = sokd["networks"]
    rows = [(f"teacher {teacher['networks']['model']['arch']} (vanilla)", teacher["networks"]["model"]["top1_final"],
             teacher["wall_time_s"]),
            (f"SOKD student {nets['student']['arch']}", nets["student"]["top1_final"], sokd["wall_time_s"]),
            ("SOKD teacher branch (frozen trunk + KBM)", nets["kbm"]["top1_final"], None)]
    lines = ["| run | test top-1 (final epoch) | wall time |", "|---|---:|---:|"]
    for label, top1, wall in rows:
        lines.append(f"| {label} | {top1:.2f} | {'' if wall is None else f'{wall:.0f} s'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar100.npz")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "paper_gpu")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="toy data and nets on the CPU: checks the logic")
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    if not args.smoke and not args.data.is_file():
        print(f"paper_gpu: no CIFAR-100 file at {args.data}; pass --data PATH (cifar100.npz or the "
              f"cifar-100-python folder)", file=sys.stderr)
        return 2
    summaries = {name: run(name, cfg, extra, args) for name, cfg, extra in RUNS}
    text = table(summaries)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
