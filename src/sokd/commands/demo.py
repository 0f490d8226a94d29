"""sokd demo: the embedded default job — a good teacher, then vanilla / KD / SOKD students, a
table, and what one seed can and cannot say.

The teacher is the packaged presets/fmnist/teacher.pt (trained with presets/fmnist/teacher.yaml),
so the demo spends its minutes on the students; `--train-teacher` trains it again. Re-running
resumes/reuses finished runs, so an interrupted demo continues where it stopped; --fresh starts
over. Under the table, each comparison is set against the seed spread measured for this very
recipe (presets/fmnist/spread.json, written by benchmarks/demo_spread.py): a one-seed difference
smaller than that spread is said to be one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .. import artifacts

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "fmnist"
PACKAGED_TEACHER = PRESET_DIR / "teacher.pt"
SPREAD_FILE = PRESET_DIR / "spread.json"
#: the student runs `sokd demo` trains by default (after the teacher): the comparison it shows
DEFAULT_RUNS = ("vanilla", "kd", "sokd")
#: comparisons printed under the table, (a, b) meaning "a − b"
COMPARISONS = (("kd", "vanilla"), ("sokd", "vanilla"), ("sokd", "kd"))
EVIDENCE = "docs/results/README.md (3-seed studies, paired tests)"


def preset_methods() -> list[str]:
    """Methods with a demo preset (presets/fmnist/<method>.yaml trains that method), the default
    runs first."""
    from .. import methods
    others = [m for m in methods.list_methods() if m not in DEFAULT_RUNS]
    return [m for m in (*DEFAULT_RUNS, *others) if (PRESET_DIR / f"{m}.yaml").is_file()]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="a good teacher -> vanilla/KD/SOKD students on Fashion-MNIST, a table and "
                                    "what one seed can say")
    p.add_argument("--out", default="runs/demo", help="directory for the demo's runs")
    p.add_argument("--fresh", action="store_true", help="discard earlier demo runs in --out")
    p.add_argument("--train-teacher", action="store_true",
                   help="train the teacher from presets/fmnist/teacher.yaml instead of using the packaged one")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_RUNS), choices=preset_methods())
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run, e.g. train.epochs=2")
    p.set_defaults(run=run)


def _mode(run_dir: Path, fresh: bool) -> str:
    if fresh:
        return "output.overwrite=true"
    return "output.resume=true" if (run_dir / artifacts.LAST).exists() else "output.resume=false"


def _teacher(args, out: Path) -> tuple[Path, dict]:
    """The teacher file the students learn from, and its row for the table."""
    from .. import config, runner
    from .summary import print_summary
    if not args.train_teacher and PACKAGED_TEACHER.is_file():
        # scored on the students' test images (the demo's data settings, overrides applied)
        students = config.load(PRESET_DIR / "vanilla.yaml", list(args.overrides)).data.model_dump()
        result = runner.evaluate_checkpoint(str(PACKAGED_TEACHER), students)
        top1 = result["roles"]["model"]["top1"]
        print(f"\n== teacher: the packaged wrn_16_1 ({PACKAGED_TEACHER.name}, trained with presets/fmnist/"
              f"teacher.yaml; --train-teacher trains it again): test top-1 {top1:.2f}", flush=True)
        return PACKAGED_TEACHER, {"arch": "wrn_16_1", "top1_final": top1, "top1_best": None}
    run_dir = out / "teacher"
    cfg = config.load(PRESET_DIR / "teacher.yaml", [f"output.dir={run_dir}", _mode(run_dir, args.fresh),
                                                    *args.overrides])
    print(f"\n== teacher: {cfg.method.name} ({run_dir})", flush=True)
    summary = runner.train(cfg)
    print_summary(summary, run_dir)
    return run_dir / "model.pt", summary["networks"]["model"]


def run(args) -> int:
    from .. import config, methods, runner
    from .summary import print_summary
    from ..table import pct, render
    out = Path(args.out)
    t0 = time.perf_counter()
    teacher_file, teacher_row = _teacher(args, out)
    summaries = {}
    for name in args.methods:
        run_dir = out / name
        overrides = [f"output.dir={run_dir}", _mode(run_dir, args.fresh), *args.overrides]
        overrides += [f"{section}.checkpoint={teacher_file}" for section in methods.get(name).trained_roles]
        cfg = config.load(PRESET_DIR / f"{name}.yaml", overrides)
        print(f"\n== {name}: {cfg.method.name} ({run_dir})", flush=True)
        summaries[name] = runner.train(cfg)
        print_summary(summaries[name], run_dir)
    rows = [["teacher", "model", teacher_row["arch"], pct(teacher_row["top1_final"]),
             pct(teacher_row["top1_best"]) if teacher_row["top1_best"] is not None else "—"]]
    for name, s in summaries.items():
        for role, n in s["networks"].items():
            if role in methods.get(s["method"]).frozen:
                continue  # the frozen teacher: its row is the teacher's
            rows.append([name, role, n["arch"], pct(n["top1_final"]), pct(n["top1_best"])])
    print(f"\nFashion-MNIST demo, test top-1 (%), final epoch and best epoch (best is selected on the "
          f"test set: optimistic). Total {time.perf_counter() - t0:.0f} s.")
    print(render(["run", "role", "arch", "top-1 final", "top-1 best"], rows, align="lllrr"))
    finals = {name: s["networks"][s["primary_role"]]["top1_final"] for name, s in summaries.items()}
    for line in comparison_lines(finals, load_spread(), _changes_results(args)):
        print(line)
    print(f"Where the evidence is: {EVIDENCE}.")
    return 0


def _changes_results(args) -> list[str]:
    """Overrides that make this run another recipe than the one the spread was measured for."""
    return [o for o in args.overrides if not o.startswith("output.")] + (["--train-teacher"] if args.train_teacher
                                                                        else [])


def load_spread() -> dict | None:
    try:
        return json.loads(SPREAD_FILE.read_text())
    except (OSError, ValueError):
        return None


def comparison_lines(finals: dict[str, float], spread: dict | None, changed: list[str]) -> list[str]:
    """One plain line per comparison: the one-seed difference against the seed spread of that
    difference measured for this recipe, and what may be concluded from it."""
    lines = []
    for a, b in COMPARISONS:
        if a not in finals or b not in finals:
            continue
        d = finals[a] - finals[b]
        head = f"{a.upper() if a != 'vanilla' else a} − {b.upper() if b != 'vanilla' else b} = {d:+.2f} points"
        known = (spread or {}).get("diffs", {}).get(f"{a}-{b}")
        if changed or known is None:
            why = f"this run changes the recipe ({', '.join(changed)})" if changed else "no spread measured"
            lines.append(f"{head}; {why}, so the seed spread is unknown: one seed orders nothing.")
            continue
        std, mean, n = known["std"], known["mean"], len(known["values"])
        context = f"over {n} seeds of this recipe the difference is {mean:+.2f} ± {std:.2f}"
        if abs(d) <= 2 * std:
            verdict = "within the seed spread, so not a conclusion from one seed"
        elif (d > 0) == (mean > 0) and abs(mean) > 2 * std / n ** 0.5:
            verdict = "larger than the seed spread, and the seeds agree on its sign"
        else:
            verdict = "larger than the seed spread, but the seeds do not agree on it: not a conclusion"
        lines.append(f"{head}; {context}: {verdict}.")
    return lines
