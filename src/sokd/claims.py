"""The paper's three claims, checked against a folder of finished runs.

(a) the SOKD student beats the KD and DML students;
(b) SOKD improves the teacher: frozen trunk + trained KBM beats the original teacher;
(c) under DML the student imitates its (peer) teacher more closely than under KD, while KD's
    teacher gives more trustworthy (more accurate) targets.

Runs of the same seed share a teacher, so two methods are compared seed by seed (paired
differences) and a one-sided paired t-test decides whether a claim "holds"; each difference is
also put next to the seed spread of the accuracies, so a reader sees how large it is against noise.
"""
from __future__ import annotations

import math
import statistics

from .report import find_runs, group, load, mean_std

#: one-sided significance level of every paired test
ALPHA = 0.05

ABLATIONS = {  # run name -> what it changes against the default `sokd` run of the same seed
    "sokd_bn_eval": "teacher BN in eval mode (default: train)",
    "sokd_init_teacher": "KBM initialised from the teacher (default: random)",
    "sokd_kbm2": "KBM = last 2 stages (default: 1)",
    "sokd_fp32": "fp32 instead of bf16 autocast",
    "sokd_kbm_finetune": "KBM initialised from the teacher and trained at lr 0.01 (default: random, 0.1)",
}

Values = dict[int, float]  # seed -> value


def _fmt(values: Values) -> str:
    return f"{mean_std(list(values.values()))} (n={len(values)})" if values else "—"


def _std(values: Values) -> float:
    return statistics.stdev(values.values()) if len(values) > 1 else 0.0


def _paired_mean(a: Values, b: Values) -> str:
    diffs = [a[s] - b[s] for s in a if s in b]
    return f"{statistics.mean(diffs):+.2f}" if diffs else "—"


def paired_test(diffs: list[float]) -> tuple[float, float, tuple[float, float], float]:
    """One-sided paired t-test of "mean difference > 0" (scipy.stats), with the two-sided 95%
    confidence interval of the mean difference and the t the test needs at ALPHA.

    Returns (t, p, (low, high), critical t). Identical differences (zero spread) give t = ±inf
    and p 0 or 1, and the interval shrinks to the mean.
    """
    from scipy import stats
    n, mean = len(diffs), statistics.mean(diffs)
    sd = statistics.stdev(diffs)
    crit = float(stats.t.ppf(1 - ALPHA, n - 1))
    if sd == 0:
        t = math.copysign(math.inf, mean) if mean else 0.0
        return t, (0.0 if mean > 0 else 1.0), (mean, mean), crit
    res = stats.ttest_1samp(diffs, 0.0, alternative="greater")
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return float(res.statistic), float(res.pvalue), (mean - half, mean + half), crit


def compare(a: Values, b: Values) -> str:
    """Verdict on "a > b": paired over the seeds both have, against the seed spread."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "not measured yet"
    diffs = [a[s] - b[s] for s in seeds]
    n, mean = len(diffs), statistics.mean(diffs)
    if n == 1:
        return f"{'holds' if mean > 0 else 'does not hold'} on one seed (difference {mean:+.2f}; no spread yet)"
    spread = max(_std({s: a[s] for s in seeds}), _std({s: b[s] for s in seeds}))
    t, p, (lo, hi), crit = paired_test(diffs)
    positive = sum(d > 0 for d in diffs)
    detail = (f"mean difference {mean:+.2f} = {abs(mean) / spread if spread else math.inf:.1f}× the seed std "
              f"{spread:.2f}; per seed {', '.join(f'{d:+.2f}' for d in diffs)} ({positive}/{n} positive); "
              f"paired t {t:.2f}, one-sided p {p:.3f} (5% needs t > {crit:.2f}); "
              f"95% CI of the difference [{lo:+.2f}, {hi:+.2f}]")
    if mean > 0 and t > crit:
        return f"holds ({detail})"
    if mean > 0:
        return f"direction holds but not significant ({detail})"
    if -t > crit:
        return f"does not hold: the reverse is significant ({detail})"
    return f"does not hold ({detail})"


def check(paths: list[str]) -> str:
    groups = group([load(r) for r in find_runs(paths)])

    def net(name: str, role: str, key: str = "top1_final") -> Values:
        out = {}
        for r in groups.get(name, []):
            v = r["summary"]["networks"].get(role, {}).get(key)
            if v is not None:
                out[r["summary"]["seed"]] = v
        return out

    def comp(name: str, pair: str, key: str) -> Values:
        return {r["summary"]["seed"]: r["summary"]["compare"][pair][key] for r in groups.get(name, [])
                if pair in r["summary"].get("compare", {})}

    lines = ["# The paper's claims on these runs", "",
             "Test top-1 (%) at the final epoch, mean ± std over seeds. Runs of one seed share a "
             "teacher, so methods are compared seed by seed: a claim *holds* when the paired "
             "differences pass a one-sided paired t-test at 5%.", ""]
    sokd, kd, dml, van = net("sokd", "student"), net("kd", "student"), net("dml", "student"), net("vanilla", "model")
    lines += ["## (a) SOKD student vs KD and DML students", "",
              f"- vanilla student: {_fmt(van)}", f"- KD student: {_fmt(kd)}",
              f"- DML student: {_fmt(dml)}", f"- KD+DML student: {_fmt(net('kd_dml', 'student'))}",
              f"- SOKD student: {_fmt(sokd)}",
              f"- SOKD vs KD: {compare(sokd, kd)}", f"- SOKD vs DML: {compare(sokd, dml)}",
              f"- SOKD vs KD+DML: {compare(sokd, net('kd_dml', 'student'))}",
              f"- SOKD vs vanilla: {compare(sokd, van)}"]
    kd_at, sokd_at = net("kd_at", "student"), net("sokd_at", "student")
    if kd_at or sokd_at:
        lines += [f"- with attention transfer: KD+AT {_fmt(kd_at)}, SOKD+AT {_fmt(sokd_at)}; "
                  f"SOKD+AT vs KD+AT: {compare(sokd_at, kd_at)}"]
    kbm, teacher0 = net("sokd", "kbm"), net("sokd", "teacher", "top1_initial")
    lines += ["", "## (b) SOKD teacher branch (frozen trunk + KBM) vs the original teacher", "",
              f"- original teacher: {_fmt(teacher0)}", f"- teacher branch after SOKD: {_fmt(kbm)}",
              f"- {compare(kbm, teacher0)}"]
    ft_kbm, ft_teacher0 = net("sokd_kbm_finetune", "kbm"), net("sokd_kbm_finetune", "teacher", "top1_initial")
    if ft_kbm:
        lines += [f"- with the KBM fine-tuned from the teacher (kbm_init=teacher, KBM lr 0.01): teacher "
                  f"branch {_fmt(ft_kbm)}; vs the original teacher: {compare(ft_kbm, ft_teacher0)}"]
    kd_agree, dml_agree = comp("kd", "teacher->student", "agreement"), comp("dml", "peer->student", "agreement")
    kd_kl, dml_kl = comp("kd", "teacher->student", "kl"), comp("dml", "peer->student", "kl")
    kd_t, dml_t = net("kd", "teacher"), net("dml", "peer")
    lines += ["", "## (c) imitation under DML vs KD, and how trustworthy each teacher is", "",
              f"- student↔teacher top-1 agreement: KD {_fmt(kd_agree)}, DML (peer) {_fmt(dml_agree)}",
              f"- KL(teacher ‖ student) on the test set: KD {_fmt(kd_kl)}, DML {_fmt(dml_kl)}",
              f"- DML imitates more closely (agreement): {compare(dml_agree, kd_agree)}",
              f"- teacher accuracy: KD's pretrained teacher {_fmt(kd_t)}, DML's peer {_fmt(dml_t)}",
              f"- KD's teacher more trustworthy: {compare(kd_t, dml_t)}"]
    present = [a for a in ABLATIONS if a in groups]
    if present:
        lines += ["", "## Ablations (against the default SOKD run of the same seed)", "",
                  "| run | change | student | teacher branch | student − default | branch − default "
                  "| branch − original teacher |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        base_s, base_k = net("sokd", "student"), net("sokd", "kbm")
        for a in present:
            s, k, t0 = net(a, "student"), net(a, "kbm"), net(a, "teacher", "top1_initial")
            lines.append(f"| {a} | {ABLATIONS[a]} | {_fmt(s)} | {_fmt(k)} | "
                         f"{_paired_mean(s, base_s)} | {_paired_mean(k, base_k)} | {_paired_mean(k, t0)} |")
        lines += ["", "With one seed, differences below the seed std of the default run are noise; "
                  "with several, cells are mean ± std and differences are means over the shared seeds."]
    return "\n".join(lines) + "\n"
