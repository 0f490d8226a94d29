"""The comparison table of a grid: every variant's accuracy over seeds, and its paired difference
to the baseline with a t-test and a 95% interval — computed only over pairs that are honest.

Runs of one seed are paired (same teacher, same data order and initialisation seed). A pair is
refused, with its reason, when the two runs did not share the teacher (the file's sha256 as
recorded when the run started), the data (the data fingerprint), the precision (resolved, e.g.
`auto` → bf16 on one machine and fp32 on another) or the software (sokd and torch versions).
Seeds are counted by run identity: only the grid's own run folders are read, one per variant
and seed, so a copied folder is never an extra seed.

The headline column is the test accuracy at the epoch selected on the validation split when the
runs have one (honest), else the final epoch's; the best epoch on the test set is shown as the
optimistic figure it is.
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path

from .. import report
from ..errors import SokdError
from .spec import TEACHER_RUN, Grid
from .workers import finished

RECORDS = ".records"


def file_digest(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except OSError:
        return None


def record_start(grid: Grid, name: str, seed: int, tree: dict) -> None:
    """What a run starts from that a pairing must check: the teacher file's digest."""
    from ..files import atomic_write_text
    teacher = None
    for section in tree.values():
        for spec in (section if isinstance(section, list) else [section]):
            if isinstance(spec, dict) and spec.get("checkpoint"):
                teacher = file_digest(Path(spec["checkpoint"]))
    path = grid.out / RECORDS / f"{name}-s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or not (grid.run_dir(name, seed) / "last.pt").exists():
        atomic_write_text(path, json.dumps({"teacher_sha256": teacher}))


def _record(grid: Grid, name: str, seed: int) -> dict:
    try:
        return json.loads((grid.out / RECORDS / f"{name}-s{seed}.json").read_text())
    except (OSError, ValueError):
        return {}


def collect(grid: Grid) -> dict[str, dict[int, dict]]:
    """{variant: {seed: run}} of the grid's finished runs (report.load plus the start record)."""
    runs: dict[str, dict[int, dict]] = {}
    for name in grid.spec.variants:
        for seed in grid.spec.seeds:
            if finished(grid, name, seed):
                run = report.load(grid.run_dir(name, seed))
                run["record"] = _record(grid, name, seed)
                runs.setdefault(name, {})[seed] = run
    return runs


def pair_problem(a: dict, b: dict) -> str | None:
    """Why runs `a` and `b` (same seed) may not be paired, or None."""
    sa, sb = a["summary"], b["summary"]
    ta, tb = a["record"].get("teacher_sha256"), b["record"].get("teacher_sha256")
    if ta and tb and ta != tb:
        return "their teachers differ"
    fa, fb = sa.get("data_fingerprint"), sb.get("data_fingerprint")
    if fa and fb and fa != fb:
        return "they were trained on different data"
    if sa.get("precision") != sb.get("precision"):
        return f"precision {sa.get('precision')} vs {sb.get('precision')}"
    va, vb = sa.get("versions"), sb.get("versions")
    if va and vb and va != vb:
        return f"software {_versions(va)} vs {_versions(vb)}"
    return None


def _versions(v: dict) -> str:
    return "/".join(f"{k} {v[k]}" for k in sorted(v))


def headline(runs: dict[str, dict[int, dict]]) -> str:
    """`selected` when every run has a validation split, else `final`."""
    all_runs = [r for by_seed in runs.values() for r in by_seed.values()]
    if all_runs and all(r["summary"].get("val_size") for r in all_runs):
        return "selected"
    return "final"


def _value(run: dict, column: str) -> float | None:
    s = run["summary"]
    net = s["networks"][s["primary_role"]]
    return {"final": net.get("top1_final"), "best": net.get("top1_best"),
            "selected": net.get("top1_selected")}[column]


def paired(diffs: list[float]) -> dict:
    """Mean paired difference, two-sided t-test and 95% interval (scipy)."""
    from scipy import stats
    n = len(diffs)
    mean = statistics.mean(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "t": None, "p": None, "ci95": None}
    sd = statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    if sd == 0:
        t, p = (math.copysign(math.inf, mean), 0.0) if mean else (0.0, 1.0)
    else:
        res = stats.ttest_1samp(diffs, 0.0)
        t, p = float(res.statistic), float(res.pvalue)
    return {"n": n, "mean": mean, "t": t, "p": p, "ci95": [mean - half, mean + half]}


def summarise(grid: Grid) -> dict:
    runs = collect(grid)
    column = headline(runs)
    base = runs.get(grid.spec.baseline, {})
    rows, refused = [], []
    for name in grid.spec.variants:
        by_seed = runs.get(name, {})
        cols = {c: [v for v in (_value(r, c) for r in by_seed.values()) if v is not None]
                for c in ("final", "selected", "best")}
        diffs = []
        if name != grid.spec.baseline:
            for seed, run in sorted(by_seed.items()):
                partner = base.get(seed)
                if partner is None:
                    continue
                problem = pair_problem(run, partner)
                if problem:
                    refused.append(f"{name} seed {seed} is not paired with {grid.spec.baseline} seed {seed}: {problem}")
                    continue
                a, b = _value(run, column), _value(partner, column)
                if a is not None and b is not None:
                    diffs.append(a - b)
        rows.append({"variant": name, "seeds": sorted(by_seed), "precision": sorted({r["summary"].get("precision")
                                                                                      for r in by_seed.values()}),
                     **{c: (statistics.mean(v) if v else None) for c, v in cols.items()},
                     **{f"{c}_std": (statistics.stdev(v) if len(v) > 1 else None) for c, v in cols.items()},
                     "vs_baseline": paired(diffs) if diffs else None})
    expected = len(grid.spec.variants) * len(grid.spec.seeds)
    done = sum(len(v) for v in runs.values())
    return {"name": grid.spec.name, "baseline": grid.spec.baseline, "headline": column, "rows": rows,
            "teacher": teachers(grid, column), "refused_pairs": refused, "runs_finished": done,
            "runs_expected": expected}


def teachers(grid: Grid, column: str) -> dict | None:
    """The seeds' teachers on the headline column (what the students distil from, and how far
    above them it is), or None when the grid has no finished teacher."""
    values = {}
    for seed in grid.spec.seeds:
        if finished(grid, TEACHER_RUN, seed):
            value = _value(report.load(grid.run_dir(TEACHER_RUN, seed)), column)
            if value is not None:
                values[seed] = value
    if not values:
        return None
    v = list(values.values())
    return {"arch": grid.spec.teacher.arch if grid.spec.teacher else None, "seeds": sorted(values),
            "mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else None}


def _ms(mean, std) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def markdown(result: dict) -> str:
    col = result["headline"]
    other = "final" if col == "selected" else None
    head = {"selected": "test top-1 at the validation-selected epoch", "final": "test top-1, final epoch"}[col]
    lines = [f"# {result['name']}: {result['runs_finished']} of {result['runs_expected']} runs finished",
             "",
             f"Headline: {head} (mean ± std over seeds). Δ: paired difference to `{result['baseline']}` on the "
             f"headline column, seed by seed, with a two-sided paired t-test and its 95% interval. "
             f"Best epoch on the test set is optimistic (selected on the test set itself).",
             ""]
    header = ["variant", "seeds", head.split(",")[0] if col == "final" else "selected (headline)"]
    if other:
        header.append("final epoch")
    header += ["best epoch (optimistic)", f"Δ vs {result['baseline']}", "95% interval", "t", "p", "precision"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in result["rows"]:
        vs = r["vs_baseline"]
        cells = [r["variant"], str(len(r["seeds"])), _ms(r[col], r[f"{col}_std"])]
        if other:
            cells.append(_ms(r["final"], r["final_std"]))
        cells.append(_ms(r["best"], r["best_std"]))
        if r["variant"] == result["baseline"]:
            cells += ["(baseline)", "", "", ""]
        elif vs is None:
            cells += ["—", "", "", ""]
        else:
            ci = f"[{vs['ci95'][0]:+.2f}, {vs['ci95'][1]:+.2f}]" if vs["ci95"] else "(one pair)"
            t = "—" if vs["t"] is None else (f"{vs['t']:+.2f}" if math.isfinite(vs["t"]) else f"{vs['t']}")
            p = "—" if vs["p"] is None else f"{vs['p']:.3f}"
            cells += [f"{vs['mean']:+.2f} (n={vs['n']})", ci, t, p]
        cells.append(", ".join(p for p in r["precision"] if p) or "—")
        lines.append("| " + " | ".join(cells) + " |")
    teacher = result.get("teacher")
    if teacher:
        lines += ["", f"Teacher ({teacher['arch']}, one per seed, trained alone): {_ms(teacher['mean'], teacher['std'])} "
                      f"(n={len(teacher['seeds'])}) on the headline column."]
    if result["refused_pairs"]:
        lines += ["", "Not paired:"] + [f"- {line}" for line in result["refused_pairs"]]
    return "\n".join(lines)


def write(grid: Grid, log=print) -> dict:
    """compare.md, compare.json and the report's plots (curves, dot plot) into the grid's folder."""
    from ..files import atomic_write_text
    result = summarise(grid)
    text = markdown(result)
    atomic_write_text(grid.out / "compare.md", text + "\n")
    atomic_write_text(grid.out / "compare.json", json.dumps(result, indent=1, default=str) + "\n")
    dirs = [str(grid.run_dir(n, s)) for n in grid.spec.variants for s in grid.spec.seeds if finished(grid, n, s)]
    plots = []
    if dirs:
        try:
            plots = report.build(dirs, str(grid.out / "plots"))["plots"]
        except SokdError as err:
            log(f"note: no plots ({err})")
    log(text)
    log(f"wrote {grid.out / 'compare.md'}, {grid.out / 'compare.json'}" + (f" and {len(plots)} plots in "
                                                                              f"{grid.out / 'plots'}" if plots else ""))
    return result


__all__ = ["summarise", "markdown", "write", "record_start", "pair_problem", "TEACHER_RUN"]
