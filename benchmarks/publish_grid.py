#!/usr/bin/env python3
"""Commit the finished runs of a comparison grid kept under docs/results, so the next session (a
fresh checkout) continues the grid instead of starting it again.

For every run with a summary.json: its summary.json, metrics.jsonl and config.yaml, its start
record (.records/<run>.json), and for the seeds' teachers their model.pt (the other runs of the
seed distil from exactly that file); then the grid's compare.md / compare.json and plots. Runs
still training are left out: their files in a checkout would stop `sokd train` from resuming them.

    .venv/bin/python benchmarks/publish_grid.py docs/results/cifar100_cpu/grid [--message TEXT]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def finished_files(grid: Path) -> list[Path]:
    files = []
    for summary in sorted(grid.glob("*/summary.json")):
        run = summary.parent
        files += [run / n for n in ("summary.json", "metrics.jsonl", "config.yaml") if (run / n).is_file()]
        if run.name.startswith("teacher-s") and (run / "model.pt").is_file():
            files.append(run / "model.pt")
        record = grid / ".records" / f"{run.name}.json"
        if record.is_file():
            files.append(record)
    files += [p for p in (grid / "compare.md", grid / "compare.json") if p.is_file()]
    files += sorted((grid / "plots").glob("*.png")) if (grid / "plots").is_dir() else []
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("grid", type=Path)
    ap.add_argument("--message", default=None)
    args = ap.parse_args(argv)
    files = finished_files(args.grid)
    if not files:
        print(f"nothing finished in {args.grid}")
        return 0
    rel = [str(p.resolve().relative_to(ROOT)) for p in files]
    subprocess.run(["git", "add", "-f", "--", *rel], cwd=ROOT, check=True)
    message = args.message or f"{args.grid.parent.name}: {sum(1 for p in files if p.name == 'summary.json')} finished runs"
    done = subprocess.run(["git", "commit", "-q", "-m", message, "--", *rel], cwd=ROOT, capture_output=True, text=True)
    print(done.stdout + done.stderr or f"committed {len(rel)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
