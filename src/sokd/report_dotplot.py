"""final_top1.png: the final-epoch test top-1 of every run name, one dot per seed.

One panel per network role the summaries hold ("student", "teacher", "kbm", "model", ...); in each,
a row per run name, sorted by the mean over seeds (best on top), with the mean ± std (sample std
over seeds) as an error bar and each seed as a dot. The plain KD and SOKD runs — the reference
baselines every other method is read against — are drawn in their own colours, and their means as
faint vertical lines across the panel.

A run is a plain baseline when its method is the registry's "kd" or "sokd" and its config.yaml
gives that method nothing but default options (no feature terms, no term weights, the default KBM);
when several run names qualify for one method, the one named exactly like the method is taken.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from . import artifacts

def _references() -> dict[str, str]:
    """Registry name -> label of the methods that declare themselves reference baselines
    (`Method.reference_label`: KD and SOKD), in name order."""
    from . import methods
    return {n: methods.get(n).reference_label for n in methods.list_methods() if methods.get(n).reference_label}


#: the methods whose plain runs the plot marks as baselines, and how it labels them
REFERENCE_METHODS = _references()
#: colours of those reference rows, in the same order; every other row is grey-blue
REFERENCE_COLOURS = dict(zip(REFERENCE_METHODS, ("tab:orange", "tab:red", "tab:green", "tab:purple")))
OTHER_COLOUR = "tab:blue"
FILE_NAME = "final_top1.png"


@dataclass(frozen=True)
class DotRow:
    """One row of a panel: a run name's final test top-1 over its seeds, for one role."""

    name: str
    method: str
    arch: str | None
    #: (seed, final top-1) per run, by seed
    seeds: tuple[tuple[int, float], ...]
    mean: float
    #: sample standard deviation over seeds; 0 with one seed
    std: float
    #: "kd" / "sokd" when this is that method's plain reference run, else None
    baseline: str | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)


def _method_options(run: dict) -> dict | None:
    """The `method` section of the run's config.yaml without its name; None when unreadable."""
    import yaml
    run_dir = run.get("dir")
    if run_dir is None:
        return None
    try:
        cfg = yaml.safe_load((Path(run_dir) / artifacts.CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    section = cfg.get("method") if isinstance(cfg, dict) else None
    if not isinstance(section, dict):
        return None
    return {k: v for k, v in section.items() if k != "name"}


def _has_default_options(method: str, options: dict) -> bool:
    """Whether `options` are exactly method `method`'s defaults (validated by its options model)."""
    from . import methods
    model = methods.options_model(method)
    try:
        given = model(**options)
    except Exception:  # options of another version of the method: not the plain run
        return False
    return given.model_dump() == model().model_dump()


def _is_plain(name: str, runs: list[dict]) -> bool:
    """Whether every seed of run `name` is its method's plain run (default method options).

    Without a readable config.yaml the options are unknown, and only a run named exactly like its
    method is taken for the plain one.
    """
    for run in runs:
        method = run["summary"]["method"]
        options = _method_options(run)
        if options is None:
            if name != method:
                return False
        elif not _has_default_options(method, options):
            return False
    return True


def reference_baselines(groups: dict[str, list[dict]]) -> dict[str, str]:
    """Run name -> "kd" / "sokd" for the plain KD and SOKD runs among `groups` (see module doc)."""
    candidates: dict[str, list[str]] = {m: [] for m in REFERENCE_METHODS}
    for name, runs in groups.items():
        methods_ = {r["summary"]["method"] for r in runs}
        if len(methods_) != 1:
            continue
        method = methods_.pop()
        if method in REFERENCE_METHODS and _is_plain(name, runs):
            candidates[method].append(name)
    out = {}
    for method, names in candidates.items():
        chosen = [method] if method in names else names  # a run named like the method is the natural one
        out.update({n: method for n in chosen})
    return out


def final_top1_rows(groups: dict[str, list[dict]]) -> dict[str, list[DotRow]]:
    """Role -> rows (one per run name holding that role), best mean first.

    Roles come in the order of how many run names hold them (most first; ties in the order they
    first appear); rows with equal means are ordered by name.
    """
    baselines = reference_baselines(groups)
    by_role: dict[str, list[DotRow]] = {}
    for name, runs in groups.items():
        roles = list(dict.fromkeys(role for r in runs for role in r["summary"]["networks"]))
        for role in roles:
            held = [r["summary"] for r in runs if role in r["summary"]["networks"]]
            seeds = tuple(sorted((s["seed"], float(s["networks"][role]["top1_final"])) for s in held))
            values = [v for _, v in seeds]
            by_role.setdefault(role, []).append(DotRow(
                name=name, method=held[0]["method"], arch=held[0]["networks"][role].get("arch"),
                seeds=seeds, mean=statistics.mean(values),
                std=statistics.stdev(values) if len(values) > 1 else 0.0,
                baseline=baselines.get(name)))
    order = sorted(by_role, key=lambda role: -len(by_role[role]))  # stable: ties keep first appearance
    return {role: sorted(by_role[role], key=lambda row: (-row.mean, row.name)) for role in order}


def plotted_panels(rows: dict[str, list[DotRow]]) -> dict[str, list[DotRow]]:
    """The panels worth drawing: roles that more than one run name holds (a single row compares
    nothing), and always at least the first role (the student's, where there is one)."""
    first = "student" if "student" in rows else next(iter(rows), None)
    return {role: r for role, r in rows.items() if len(r) > 1 or role == first}


def _label(row: DotRow, show_arch: bool) -> str:
    label = f"{row.name} (n={row.n})"
    if show_arch and row.arch:
        label += f" [{row.arch}]"
    if row.baseline:
        label += f" — {REFERENCE_METHODS[row.baseline]} baseline"
    return label


#: vertical layout, in inches: per row, and per panel (title, axis labels, ticks)
ROW_HEIGHT, PANEL_EXTRA = 0.3, 1.0


def plot_final_top1(groups: dict[str, list[dict]], out_dir: Path, save) -> Path | None:
    """Draw final_top1.png into `out_dir` with `save(fig, path, **savefig_options)`; None when no
    run has a network to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = plotted_panels(final_top1_rows(groups))
    if not panels:
        return None
    heights = [len(rows) * ROW_HEIGHT + PANEL_EXTRA for rows in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    jitter = 0.12
    for ax, (role, rows) in zip(axes[:, 0], panels.items()):
        show_arch = len({r.arch for r in rows}) > 1
        ys = list(range(len(rows)))[::-1]  # best mean on top
        for y, row in zip(ys, rows):
            colour = REFERENCE_COLOURS.get(row.baseline, OTHER_COLOUR)
            if row.baseline:
                ax.axhspan(y - 0.45, y + 0.45, color=colour, alpha=0.08, lw=0)
                ax.axvline(row.mean, color=colour, alpha=0.35, lw=1, ls="--", zorder=0)
            ax.errorbar([row.mean], [y], xerr=[row.std], fmt="D", color=colour, ecolor=colour,
                        markerfacecolor="white", markersize=6, markeredgewidth=1.8, elinewidth=2.5,
                        capsize=4, zorder=4)
            offsets = [jitter * (k - (row.n - 1) / 2) / max(1, (row.n - 1) / 2) for k in range(row.n)]
            ax.scatter([v for _, v in row.seeds], [y + o for o in offsets], s=18, color=colour,
                       edgecolor="white", linewidth=0.5, alpha=0.85, zorder=5)  # over the mean marker
        ax.set_yticks(ys)
        ax.set_yticklabels([_label(r, show_arch) for r in rows], fontsize=8)
        for tick, row in zip(ax.get_yticklabels(), rows):
            if row.baseline:
                tick.set_color(REFERENCE_COLOURS[row.baseline])
                tick.set_fontweight("bold")
        ax.set_ylim(-0.6, len(rows) - 0.4)
        values = [v for r in rows for _, v in r.seeds] + [r.mean + s * r.std for r in rows for s in (-1, 1)]
        lo, hi = min(values), max(values)
        pad = max(0.1 * (hi - lo), 0.05)
        ax.set_xlim(lo - pad, hi + pad)
        # the numbers, on the right: mean ± std per row
        right = ax.twinx()
        right.set_ylim(ax.get_ylim())
        right.set_yticks(ys)
        right.set_yticklabels([f"{r.mean:.2f} ± {r.std:.2f}" if r.n > 1 else f"{r.mean:.2f}" for r in rows],
                              fontsize=8)
        right.tick_params(length=0)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("test top-1 (%) at the final epoch", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(f"{role}: final test top-1 per run (mean ± std over seeds; dots: seeds)", fontsize=9)
    def bar(colour, label):
        return Line2D([], [], color=colour, marker="D", markerfacecolor="white", markersize=5,
                      markeredgewidth=1.5, lw=2.5, label=label)
    handles = [bar(REFERENCE_COLOURS[m], f"{REFERENCE_METHODS[m]} baseline (plain '{m}')") for m in REFERENCE_METHODS]
    handles += [bar(OTHER_COLOUR, "other runs (◇ mean, bar ± std)"),
                Line2D([], [], color="grey", marker="o", ls="", markersize=4, label="one seed")]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    path = Path(out_dir) / FILE_NAME
    save(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
