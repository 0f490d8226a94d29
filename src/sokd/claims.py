"""The paper's three claims, checked against a folder of finished runs (mean ± std over seeds).

(a) the SOKD student beats the KD and DML students;
(b) SOKD improves the teacher: frozen trunk + trained KBM beats the original teacher;
(c) under DML the student imitates its (peer) teacher more closely than under KD, while KD's
    teacher gives more trustworthy (more accurate) targets.
Each difference is reported next to the seed spread, so "held" means more than noise.
"""
from __future__ import annotations

import statistics

from .report import find_runs, group, load


def _stats(values: list[float]) -> tuple[float, float, int]:
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def _fmt(m: float, s: float, n: int) -> str:
    return f"{m:.2f} ± {s:.2f} (n={n})" if n > 1 else (f"{m:.2f} (n=1)" if n else "—")


def _verdict(diff: float, spread: float, n: int) -> str:
    if n == 0 or diff != diff:
        return "not measured yet"
    if n < 2:
        return f"{'holds' if diff > 0 else 'does not hold'} on one seed (difference {diff:+.2f}; no spread yet)"
    if diff > 2 * spread:
        return f"holds (difference {diff:+.2f} > 2× seed std {spread:.2f})"
    if diff > 0:
        return f"direction holds but within noise (difference {diff:+.2f}, seed std {spread:.2f})"
    return f"does not hold (difference {diff:+.2f}, seed std {spread:.2f})"


def check(paths: list[str]) -> str:
    groups = group([load(r) for r in find_runs(paths)])

    def net(name, role, key="top1_final"):
        return [r["summary"]["networks"][role][key] for r in groups.get(name, [])
                if role in r["summary"]["networks"] and r["summary"]["networks"][role].get(key) is not None]

    def comp(name, pair, key):
        return [r["summary"]["compare"][pair][key] for r in groups.get(name, [])
                if pair in r["summary"].get("compare", {})]

    lines = ["# The paper's claims on these runs", "",
             "All accuracies are test top-1 (%) at the final epoch, mean ± std over seeds.", ""]
    sokd, kd, dml, van = (_stats(net("sokd", "student")), _stats(net("kd", "student")),
                          _stats(net("dml", "student")), _stats(net("vanilla", "model")))
    lines += ["## (a) SOKD student vs KD and DML students", "",
              f"- vanilla student: {_fmt(*van)}", f"- KD student: {_fmt(*kd)}",
              f"- DML student: {_fmt(*dml)}", f"- SOKD student: {_fmt(*sokd)}"]
    for label, other in (("KD", kd), ("DML", dml)):
        spread = max(sokd[1], other[1])
        lines.append(f"- SOKD vs {label}: {_verdict(sokd[0] - other[0], spread, min(sokd[2], other[2]))}")
    kbm = _stats(net("sokd", "kbm"))
    teacher0 = _stats(net("sokd", "teacher", "top1_initial"))
    lines += ["", "## (b) SOKD teacher branch (frozen trunk + KBM) vs the original teacher", "",
              f"- original teacher: {_fmt(*teacher0)}", f"- teacher branch after SOKD: {_fmt(*kbm)}",
              f"- {_verdict(kbm[0] - teacher0[0], max(kbm[1], teacher0[1]), min(kbm[2], teacher0[2]))}"]
    kd_agree, dml_agree = _stats(comp("kd", "teacher->student", "agreement")), _stats(comp("dml", "peer->student", "agreement"))
    kd_kl, dml_kl = _stats(comp("kd", "teacher->student", "kl")), _stats(comp("dml", "peer->student", "kl"))
    kd_t, dml_t = _stats(net("kd", "teacher")), _stats(net("dml", "peer"))
    lines += ["", "## (c) imitation under DML vs KD, and how trustworthy each teacher is", "",
              f"- student↔teacher top-1 agreement: KD {_fmt(*kd_agree)}, DML (peer) {_fmt(*dml_agree)}",
              f"- KL(teacher ‖ student) on the test set: KD {_fmt(*kd_kl)}, DML {_fmt(*dml_kl)}",
              f"- DML imitates more closely (agreement): "
              f"{_verdict(dml_agree[0] - kd_agree[0], max(dml_agree[1], kd_agree[1]), min(dml_agree[2], kd_agree[2]))}",
              f"- teacher accuracy: KD's pretrained teacher {_fmt(*kd_t)}, DML's peer {_fmt(*dml_t)}",
              f"- KD's teacher more trustworthy: "
              f"{_verdict(kd_t[0] - dml_t[0], max(kd_t[1], dml_t[1]), min(kd_t[2], dml_t[2]))}"]
    return "\n".join(lines) + "\n"
