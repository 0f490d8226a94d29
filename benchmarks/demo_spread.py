"""Measure the seed spread of `sokd demo`'s comparisons and write presets/fmnist/spread.json.

    .venv/bin/python benchmarks/demo_spread.py [--seeds 0 1 2] [--out runs/demo-spread]

Runs the demo once per training seed (same packaged teacher, same data), then records each run's
final student top-1 and, per comparison the demo prints (KD − vanilla, SOKD − vanilla,
SOKD − KD), the paired differences with their mean and standard deviation. The demo reads this
file to say whether a one-seed difference is larger than the seed spread. Re-running reuses the
finished seeds (each demo run resumes), so it can be stopped and continued.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sokd.commands.demo import COMPARISONS, DEFAULT_RUNS, SPREAD_FILE  # noqa: E402


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.machine())
    except OSError:
        return platform.machine()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo-spread")
    args = ap.parse_args()
    finals: dict[str, list[float]] = {name: [] for name in DEFAULT_RUNS}
    precision = None
    for seed in args.seeds:
        out = args.out / f"s{seed}"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sokd", "demo", "--out", str(out), f"train.seed={seed}",
                        "output.progress=false"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        for name in DEFAULT_RUNS:
            s = json.loads((out / name / "summary.json").read_text())
            finals[name].append(s["networks"][s["primary_role"]]["top1_final"])
            precision = s["precision"]
        print(f"seed {seed}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in finals.items())
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)

    def stats(values: list[float]) -> dict:
        return {"values": [round(v, 2) for v in values], "mean": round(statistics.mean(values), 3),
                "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0}

    diffs = {f"{a}-{b}": stats([x - y for x, y in zip(finals[a], finals[b])]) for a, b in COMPARISONS}
    spread = {
        "what": "final-epoch student test top-1 of `sokd demo` (the packaged recipe, no overrides) per training "
                "seed; diffs are paired by seed. Written by benchmarks/demo_spread.py.",
        "seeds": args.seeds, "precision": precision, "machine": _cpu(),
        "runs": {name: stats(v) for name, v in finals.items()}, "diffs": diffs,
    }
    SPREAD_FILE.write_text(json.dumps(spread, indent=2) + "\n")
    for key, d in diffs.items():
        print(f"{key}: {d['mean']:+.2f} ± {d['std']:.2f} (seeds {d['values']})")
    print(f"-> {SPREAD_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
