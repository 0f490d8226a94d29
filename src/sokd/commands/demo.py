"""sokd demo: the embedded default job — teacher, then student baselines and SOKD, then a table.

Runs the packaged Fashion-MNIST presets in order. Re-running resumes/reuses finished runs, so an
interrupted demo continues where it stopped; --fresh starts over.
"""
from __future__ import annotations

import time
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "fmnist"
#: the student runs `sokd demo` trains by default (after the teacher): the comparison it shows
DEFAULT_RUNS = ("vanilla", "kd", "sokd")


def preset_methods() -> list[str]:
    """Methods with a demo preset (presets/fmnist/<method>.yaml trains that method), the default
    runs first."""
    from .. import methods
    others = [m for m in methods.list_methods() if m not in DEFAULT_RUNS]
    return [m for m in (*DEFAULT_RUNS, *others) if (PRESET_DIR / f"{m}.yaml").is_file()]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train teacher -> vanilla/KD/SOKD students on Fashion-MNIST, print a table")
    p.add_argument("--out", default="runs/demo", help="directory for the demo's runs")
    p.add_argument("--fresh", action="store_true", help="discard earlier demo runs in --out")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_RUNS), choices=preset_methods())
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run, e.g. train.epochs=2")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import config, methods, runner
    from .summary import print_summary
    from .table import pct, render
    out = Path(args.out)
    teacher_file = out / "teacher" / "model.pt"
    summaries = {}
    t0 = time.perf_counter()
    for name in ("teacher", *args.methods):
        run_dir = out / name
        mode = "output.overwrite=true" if args.fresh else (
            "output.resume=true" if (run_dir / "last.pt").exists() else "output.resume=false")
        overrides = [f"output.dir={run_dir}", mode, *args.overrides]
        if name != "teacher" and methods.needs_trained_teacher(name):
            overrides.append(f"teacher.checkpoint={teacher_file}")
        cfg = config.load(PRESET_DIR / f"{name}.yaml", overrides)
        print(f"\n== {name}: {cfg.method.name} ({run_dir})", flush=True)
        summaries[name] = runner.train(cfg)
        print_summary(summaries[name], run_dir)
    rows = []
    for name, s in summaries.items():
        for role, n in s["networks"].items():
            if name != "teacher" and role in methods.get(s["method"]).frozen:
                continue  # a frozen teacher: the teacher run's row already shows it
            rows.append([name, role, n["arch"], pct(n["top1_final"]), pct(n["top1_best"])])
    print(f"\nFashion-MNIST demo, test top-1 (%), final epoch and best epoch "
          f"(best is selected on the test set: optimistic). Total {time.perf_counter() - t0:.0f} s.")
    print(render(["run", "role", "arch", "top-1 final", "top-1 best"], rows, align="lllrr"))
    return 0
