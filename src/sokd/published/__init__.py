"""Published CIFAR-100 numbers of the CRD benchmark pairs, and a run placed next to them.

`cifar100.yaml` beside this file is the one home of the numbers (with the source of each column);
`markdown()` renders the table of docs/published-results.md and `compare(runs)` the rows that
`sokd report --published` prints. Runs are matched by the teacher and student architectures in
their own `config.yaml` (a vanilla run by its model, against the table's teacher or student
column), and only CIFAR-100 runs are matched: the numbers are for that data set.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

from .. import artifacts
from ..errors import SokdError
from ..report import mean_std

TABLE = Path(__file__).with_name("cifar100.yaml")
METHOD_COLUMNS = ("kd", "fitnet", "at", "crd", "dkd", "reviewkd")
HEADINGS = {"teacher": "teacher", "student": "student", "kd": "KD", "fitnet": "FitNet", "at": "AT",
            "crd": "CRD", "dkd": "DKD", "reviewkd": "ReviewKD"}


@lru_cache(maxsize=1)
def table() -> dict:
    """{"sources": {key: text}, "columns": {column: source key}, "pairs": [row, ...]}."""
    return yaml.safe_load(TABLE.read_text(encoding="utf-8"))


def pair(teacher: str, student: str) -> dict | None:
    return next((p for p in table()["pairs"] if p["teacher"] == teacher and p["student"] == student), None)


def _cell(value) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown() -> str:
    """The published table (blank = no readable source), its notes and its sources."""
    from ..table import render
    rows, notes = [], []
    for p in table()["pairs"]:
        name = f"{p['teacher']} → {p['student']}"
        rows.append([name, p["table"], _cell(p.get("teacher_top1")), _cell(p.get("student_top1")),
                     *[_cell(p.get(c)) for c in METHOD_COLUMNS]])
        if p.get("note"):
            notes.append(f"- {name}: {' '.join(p['note'].split())}")
    headings = ["teacher → student", "CRD table", *[HEADINGS[c] for c in ("teacher", "student", *METHOD_COLUMNS)]]
    sources = table()["sources"]
    by_source: dict[str, list[str]] = {}
    for column, key in table()["columns"].items():
        by_source.setdefault(key, []).append(HEADINGS[column])
    lines = [render(headings, rows, align="ll" + "r" * (len(headings) - 2)), "", "Sources:"]
    lines += [f"- {', '.join(cols)}: {' '.join(sources[key].split())}" for key, cols in by_source.items()]
    lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def _config_archs(run_dir: Path) -> dict | None:
    """{"data", "teacher", "student", "model"} from a run's resolved config.yaml, None if unreadable."""
    try:
        cfg = yaml.safe_load((run_dir / artifacts.CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(cfg, dict):
        return None

    def arch(role):
        spec = cfg.get(role)
        return spec.get("arch") if isinstance(spec, dict) else None
    data = cfg.get("data")
    return {"data": data.get("name") if isinstance(data, dict) else None,
            "teacher": arch("teacher"), "student": arch("student"), "model": arch("model")}


def compare(groups: dict[str, list[dict]]) -> str:
    """Markdown: each run group's student (or vanilla model) top-1 beside the published numbers of
    its pair. `groups` is `report.group(...)`'s {name: [loaded run, ...]}."""
    from ..table import render
    rows, unmatched = [], []
    for name, runs in groups.items():
        archs = _config_archs(runs[0]["dir"])
        summary = runs[0]["summary"]
        if archs is None:
            unmatched.append(f"{name} (no readable config.yaml)")
            continue
        if archs["data"] != "cifar100":
            unmatched.append(f"{name} (data set {archs['data']}, the published numbers are CIFAR-100)")
            continue
        role = summary["primary_role"]
        nets = [r["summary"]["networks"][role] for r in runs if role in r["summary"]["networks"]]
        final = mean_std([n["top1_final"] for n in nets])
        epochs = ", ".join(sorted({str(r["summary"].get("epochs")) for r in runs}))
        matches = []
        if archs["teacher"] and archs["student"]:
            p = pair(archs["teacher"], archs["student"])
            matches = [(p, f"{archs['teacher']} → {archs['student']}")] if p else []
        elif archs["model"]:  # a vanilla run: the published teacher / student accuracy of that network
            for p in table()["pairs"]:
                for side in ("teacher", "student"):
                    if p[side] == archs["model"] and all(m[1] != f"vanilla {side}" for m in matches):
                        matches.append(({f"{side}_top1": p[f"{side}_top1"]}, f"vanilla {side}"))
        if not matches:
            what = (f"{archs['teacher']} → {archs['student']}" if archs["teacher"] else archs["model"])
            unmatched.append(f"{name} ({what} is not a CRD-benchmark pair)")
            continue
        for p, label in matches:
            rows.append([name, summary["method"], label, len(nets), epochs, final,
                         _cell(p.get("teacher_top1")), _cell(p.get("student_top1")),
                         *[_cell(p.get(c)) for c in METHOD_COLUMNS]])
    out = []
    if rows:
        out.append(render(["run", "method", "pair", "seeds", "epochs", "our top-1 final",
                           *[f"published {HEADINGS[c]}" for c in ("teacher", "student", *METHOD_COLUMNS)]],
                          rows, align="lllrrr" + "r" * 8))
        out.append("Published: CIFAR-100 top-1 with CRD's recipe (240 epochs; configs/cifar100-crd/), "
                   "sources in docs/published-results.md; ours is the last epoch's top-1 (mean ± std "
                   "over seeds).")
    if unmatched:
        out.append("No published numbers for: " + "; ".join(unmatched))
    if not out:
        raise SokdError("no runs to compare with the published numbers")
    return "\n\n".join(out)
