"""Aggregate finished runs: mean ± std over seeds per run name and role, and plots.

Final-epoch and best-epoch accuracies are separate, labelled columns: best-epoch numbers are
selected on the test set and therefore optimistic.

A run is counted once, by what it recorded, not by the folder it sits in: copies of a run
(`cp -r`, a backup beside it) are recognised by their identity (`identity`) and left out, and the
report says how many were. Folders whose name starts with "." are never read: `.sokd-replaced`
holds the previous run while an `output.overwrite=true` run starts, and is no run of its own.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path

from . import artifacts
from .errors import SokdError


#: the folder an overwrite sets the previous run aside in (engine.rundir.ASIDE_NAME)
ASIDE_NAME = ".sokd-replaced"


def _hidden(path: Path, root: Path) -> bool:
    """Whether `path` lies in a folder below `root` whose name starts with "." (never read)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts[:-1])


def find_runs(paths: list[str]) -> list[Path]:
    """Run directories (holding summary.json) under the given paths; folders named ".*" below
    a given path (`.sokd-replaced`, `.git`, ...) are skipped."""
    runs = []
    for p in map(Path, paths):
        if p.name == ASIDE_NAME or ASIDE_NAME in p.parts:
            raise SokdError(f"'{p}' is the previous run an output.overwrite=true run set aside while starting, "
                            f"not a run to report; report its parent run directory instead")
        if (p / artifacts.SUMMARY).is_file():
            runs.append(p)
        elif p.is_dir():
            runs.extend(sorted(q.parent for q in p.rglob(artifacts.SUMMARY) if not _hidden(q, p)))
        else:
            raise SokdError(f"'{p}' is not a run directory or a folder of runs")
    if not runs:
        raise SokdError(f"no finished runs (summary.json) under {', '.join(paths)}")
    seen: set[Path] = set()  # a folder named twice (`sokd report runs runs/a`) is one folder
    return [r for r in runs if not (r.resolve() in seen or seen.add(r.resolve()))]


def mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


_LEAVE_OUT = "restore it from a copy or leave this run out of the report"


def _read(path: Path) -> str:
    if not path.exists():
        raise SokdError(f"'{path}' is missing, so '{path.parent}' is not a complete run; {_LEAVE_OUT}")
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise SokdError(f"'{path}' is {kind}, not a file sokd wrote; {_LEAVE_OUT}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SokdError(f"'{path}' is not text (corrupt?); {_LEAVE_OUT}") from None
    except OSError as err:
        raise SokdError(f"cannot read '{path}' ({err.strerror}); check its permissions or {_LEAVE_OUT}") from None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _summary_problem(summary) -> str | None:
    """What makes `summary` unusable for a report, or None."""
    if not isinstance(summary, dict):
        return f"a JSON {type(summary).__name__}, not an object"
    for key in ("name", "method", "primary_role"):
        if not isinstance(summary.get(key), str):
            return f"'{key}' is missing or not a string"
    if not isinstance(summary.get("seed"), int):
        return "'seed' is missing or not an integer"
    nets = summary.get("networks")
    if not isinstance(nets, dict) or not nets:
        return "'networks' is missing or empty"
    for role, net in nets.items():
        if not isinstance(net, dict) or not all(_number(net.get(k)) for k in ("top1_final", "top1_best")):
            return f"networks.{role} lacks numeric top1_final / top1_best"
    compare = summary.get("compare", {})
    if not isinstance(compare, dict) or not all(
            isinstance(m, dict) and _number(m.get("agreement")) and _number(m.get("kl")) for m in compare.values()):
        return "'compare' is not a mapping of pairs to numeric agreement / kl"
    return None


def _row_problem(row, primary: str) -> str | None:
    """What makes one metrics.jsonl row unusable for a report, or None."""
    if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
        return "not an object with an integer 'epoch'"
    test = row.get("test")
    if test is None and row["epoch"] > 0 and isinstance(row.get("train"), dict):
        test = {}  # an epoch trained but not evaluated (train.eval_every)
    elif not isinstance(test, dict) or not all(isinstance(m, dict) and _number(m.get("top1")) for m in test.values()):
        return "'test' is not a mapping of roles to a numeric top1"
    if row["epoch"] > 0 and "test" in row and primary not in test:
        return f"'test' has no '{primary}' (the run's primary role)"
    train = row.get("train")
    if train is not None and not (isinstance(train, dict) and isinstance(train.get("terms"), dict)
                                  and all(_number(v) for v in train["terms"].values())):
        return "'train.terms' is not a mapping of numbers"
    return None


def load(run: Path) -> dict:
    """A run's summary.json and metrics.jsonl; an unreadable or malformed file is a SokdError naming it."""
    path = run / artifacts.SUMMARY
    try:
        summary = json.loads(_read(path))
    except json.JSONDecodeError as err:
        raise SokdError(f"'{path}' is truncated or not valid JSON ({err.msg} at line {err.lineno}); "
                        f"{_LEAVE_OUT}") from None
    problem = _summary_problem(summary)
    if problem:
        raise SokdError(f"'{path}' is not a sokd run summary ({problem}); {_LEAVE_OUT}")
    path = run / artifacts.METRICS
    rows = []
    for n, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise SokdError(f"'{path}' line {n} is truncated or not valid JSON; {_LEAVE_OUT}") from None
        problem = _row_problem(row, summary["primary_role"])
        if problem:
            raise SokdError(f"'{path}' line {n} is not a sokd metrics row ({problem}); {_LEAVE_OUT}")
        rows.append(row)
    return {"dir": run, "summary": summary, "metrics": rows}


def identity(run: dict) -> tuple:
    """What makes a loaded run this run and no other: the name, method and seed it recorded, and
    a hash of its summary and metrics history (the rows hold per-epoch wall times, so two trainings
    of one config differ, while a copied folder hashes the same). JSON is compared parsed, so
    a copy re-saved with other whitespace is still a copy."""
    summary = run["summary"]
    digest = hashlib.sha256()
    for part in (summary, run["metrics"]):
        digest.update(json.dumps(part, sort_keys=True, separators=(",", ":")).encode())
    return summary["name"], summary["method"], summary["seed"], digest.hexdigest()


def unique(runs: list[dict]) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """(each run once, in order, [(copy left out, the run it copies), ...])."""
    seen: dict[tuple, dict] = {}
    kept, copies = [], []
    for r in runs:
        key = identity(r)
        if key in seen:
            copies.append((r, seen[key]))
        else:
            seen[key] = r
            kept.append(r)
    return kept, copies


def copies_note(copies: list[tuple[dict, dict]]) -> str:
    """One line saying how many copies of runs were left out, and which."""
    if not copies:
        return ""
    shown = ", ".join(f"{c['dir']} (same run as {o['dir']})" for c, o in copies[:3])
    shown += " ..." if len(copies) > 3 else ""
    n = len(copies)
    return (f"note: {n} cop{'y' if n == 1 else 'ies'} of {'a run' if n == 1 else 'runs'} already counted "
            f"{'was' if n == 1 else 'were'} ignored (same name, seed, summary and metrics): {shown}")


def group(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs by name, each run once (`unique`: a copy of a run is no extra seed)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in unique(runs)[0]:
        groups[r["summary"]["name"]].append(r)
    return dict(groups)


def table(groups: dict[str, list[dict]]) -> str:
    from .table import render
    rows = []
    for name, runs in groups.items():
        roles = list(runs[0]["summary"]["networks"])
        for role in roles:
            nets = [r["summary"]["networks"][role] for r in runs if role in r["summary"]["networks"]]
            comp = {}
            for r in runs:
                for pair, m in r["summary"].get("compare", {}).items():
                    if pair.endswith(f"->{role}"):
                        comp.setdefault(pair, []).append(m)
            agree = "; ".join(f"{p.split('->')[0]}: {mean_std([m['agreement'] for m in ms])}" for p, ms in comp.items())
            kl = "; ".join(f"{p.split('->')[0]}: {mean_std([m['kl'] for m in ms])}" for p, ms in comp.items())
            init = [n["top1_initial"] for n in nets if n.get("top1_initial") is not None]
            chosen = [n["top1_selected"] for n in nets if n.get("top1_selected") is not None]
            rows.append([name, runs[0]["summary"]["method"], role, nets[0]["arch"], len(nets),
                         mean_std([n["top1_final"] for n in nets]), mean_std([n["top1_best"] for n in nets]),
                         mean_std(chosen) if chosen else "",
                         mean_std(init) if _declared(runs, role).initial else "", agree, kl])
    head = ["run", "method", "role", "arch", "seeds", "top-1 final (last epoch)", "top-1 best epoch (optimistic)",
            "top-1 selected (validation)", "top-1 at start", "agreement % with", "KL(ref‖role)"]
    align = "lllllrrrrll"
    if not any(row[7] for row in rows):  # no run has a validation split: leave the column out
        head, align = head[:7] + head[8:], align[:7] + align[8:]
        rows = [row[:7] + row[8:] for row in rows]
    return render(head, rows, align=align)


def _declared(runs: list[dict], role: str):
    """What the runs' method declares about `role` (`sokd.methods.Role`): whether it starts
    trained (its accuracy at the start is shown) and whether it is plotted beside the primary."""
    from . import methods
    return methods.role(runs[0]["summary"].get("method", ""), role)


def _curves(groups: dict[str, list[dict]]):
    """(run name, role, label, (epochs, mean, std)) for each run's primary role, then the roles its
    method declares plotted (SOKD's teacher branch): the test top-1 per epoch, mean and std over seeds."""
    for name, runs in groups.items():
        primary = runs[0]["summary"]["primary_role"]
        evaluated = [[r for r in run["metrics"] if r["epoch"] > 0 and "test" in r] for run in runs]
        epochs = [r["epoch"] for r in evaluated[0]]
        seen = evaluated[0][-1]["test"] if evaluated[0] else {}
        plotted = [r for r in seen if r != primary and _declared(runs, r).plotted]
        for role in (primary, *plotted):
            if role != primary and not all(role in r["test"] for rows in evaluated for r in rows):
                continue
            per_seed = [[r["test"][role]["top1"] for r in rows] for rows in evaluated]
            n = min(len(c) for c in per_seed)
            if n == 0:
                continue
            columns = [[c[i] for c in per_seed] for i in range(n)]
            mean = [statistics.mean(col) for col in columns]
            std = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in columns]
            yield name, role, f"{name} ({role}, n={len(runs)})", (epochs[:n], mean, std)


def plot(groups: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    prepare_out(out_dir)
    paths = []
    curves = list(_curves(groups))
    # left: whole run; right: the last third, where methods differ by tenths of a point, with the
    # seed std as a band. tab20 keeps a dozen runs apart (the default cycle repeats after 10).
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.2]})
    # the dark tab20 shades first, then the light ones; a run's teacher branch shares its colour, dashed
    tab20 = plt.get_cmap("tab20").colors
    palette = tab20[0::2] + tab20[1::2]
    # past 20 runs colours repeat, dotted; dashed is kept for the teacher branch
    run_index = {name: k for k, name in enumerate(groups)}
    legend = []  # (final top-1, zoom line)
    for name, role, label, (epochs, mean, std) in curves:
        k = run_index[name]
        style = "--" if role != groups[name][0]["summary"]["primary_role"] else (":" if k >= 20 else "-")
        colour = palette[k % 20]
        ax.plot(epochs, mean, color=colour, linestyle=style)
        tail = slice(len(epochs) - max(2, len(epochs) // 3), None)
        line, = zoom.plot(epochs[tail], mean[tail], color=colour, linestyle=style, label=f"{label}: {mean[-1]:.2f}")
        legend.append((mean[-1], line))
        zoom.fill_between(epochs[tail], [m - s for m, s in zip(mean[tail], std[tail])],
                          [m + s for m, s in zip(mean[tail], std[tail])], color=colour, alpha=0.12)
    for a in (ax, zoom):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlabel("epoch")
        a.set_ylabel("test top-1 (%)")
        a.grid(alpha=0.3)
    ax.set_title("Test top-1 per epoch (mean over seeds)")
    zoom.set_title("Last third (band: ± std over seeds; legend: final epoch; dashed: teacher branch)")
    ranked = [line for _, line in sorted(legend, key=lambda fl: -fl[0])]  # best final top-1 first
    zoom.legend(ranked, [line.get_label() for line in ranked],
                fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    lo = [min(mean) for *_, (_, mean, _) in curves]
    if lo:
        ax.set_ylim(bottom=max(0, min(sorted(lo)[len(lo) // 2] - 10, 100)))
    p = out_dir / "test_top1.png"
    fig.tight_layout()
    _save_figure(fig, p, dpi=120, bbox_inches="tight")  # keep the legend beside the zoom
    plt.close(fig)
    paths.append(p)

    names = list(groups)
    cols = min(3, len(names))
    rows_n = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.2 * rows_n), squeeze=False)
    for ax, name in zip(axes.flat, names):
        run = groups[name][0]
        rows = [r for r in run["metrics"] if "train" in r]
        weights = run["summary"].get("term_weights", {})  # absent in summaries older than the field
        for term in rows[0]["train"]["terms"] if rows else []:
            w = weights.get(term, 1.0)
            ax.plot([r["epoch"] for r in rows], [r["train"]["terms"][term] for r in rows],
                    label=term if w == 1.0 else f"{term} (unweighted; weight {w:g})")
        ax.set_title(f"{name}: train loss terms (seed {run['summary']['seed']})", fontsize=9)
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    p = out_dir / "loss_terms.png"
    fig.tight_layout()
    _save_figure(fig, p, dpi=110)
    plt.close(fig)
    paths.append(p)

    from .report_dotplot import plot_final_top1  # final top-1 per run name: seeds, mean ± std
    p = plot_final_top1(groups, out_dir, _save_figure)
    if p is not None:
        paths.append(p)
    return paths


#: what to do when a report file does not fit
NO_SPACE_FIX = "free space or pass --out elsewhere"


def prepare_out(out_dir: Path) -> None:
    """Create the --out folder (SokdError when it is a file or cannot be made or written)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SokdError(f"--out '{out_dir}' is a file, not a folder; pass a folder for the report")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SokdError(f"cannot create --out folder '{out_dir}' ({err.strerror}); pass a writable folder") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise SokdError(f"--out folder '{out_dir}' is not writable; pass a writable folder")


def write_text(path: Path, text: str) -> None:
    """Write a report file atomically (a full disk is a one-line SokdError)."""
    from .files import atomic_write_text, default_file_mode
    atomic_write_text(path, text, NO_SPACE_FIX, default_file_mode())


def _save_figure(fig, path: Path, **options) -> None:
    from .files import atomic_write_bytes, default_file_mode
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **options)
    atomic_write_bytes(path, buffer.getvalue(), NO_SPACE_FIX, default_file_mode())


def build(paths: list[str], out_dir: str | None = None) -> dict:
    runs = [load(r) for r in find_runs(paths)]
    kept, copies = unique(runs)
    groups = group(kept)
    md = table(groups)
    note = copies_note(copies)
    if note:
        md += "\n\n" + note
    plots = plot(groups, Path(out_dir)) if out_dir else []
    return {"markdown": md, "plots": [str(p) for p in plots], "groups": {k: len(v) for k, v in groups.items()},
            "copies_ignored": len(copies)}
