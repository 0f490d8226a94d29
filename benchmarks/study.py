#!/usr/bin/env python3
"""Regenerate a study of docs/results through `sokd compare`, then publish it. Resumable.

    .venv/bin/python benchmarks/study.py fmnist            # Fashion-MNIST: 3 seeds + ablations
    .venv/bin/python benchmarks/study.py cifar100          # WRN-40-2 -> WRN-40-1, 20 epochs
    .venv/bin/python benchmarks/study.py fmnist --workers 2 --commit
    .venv/bin/python benchmarks/study.py fmnist --plan

A study is a folder of run configs (configs/study/<name>/: teacher.yaml and one file per
method). This script turns it into a compare spec, one variant per config with the teacher
recipe of teacher.yaml, written to runs/study/<name>/compare.yaml, and hands it to `sokd
compare`. That command trains one teacher per seed, every variant x seed, resumes what was
started, never reruns a finished run and lets any number of workers share the folder; this
script adds only the study's order (its phases, each a `--variants`/`--seeds` selection:
the core methods on every seed first) and the publishing: each finished run's summary, metrics
and config are copied to docs/results/<name>/by_run/ as it lands (a published teacher's
model.pt too, where the study publishes it, so later sessions distil from exactly that teacher),
the report and claims are rebuilt, and with --commit committed.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOKD = [sys.executable, "-m", "sokd"]
POLL_S = 30.0

CORE_FMNIST = ["vanilla", "kd", "sokd", "dml"]
MORE_FMNIST = ["kd_dml", "kd_at", "sokd_at"]
ABLATIONS_FMNIST = ["sokd_bn_eval", "sokd_init_teacher", "sokd_kbm2", "sokd_fp32"]
# SOKD's closest relative (SHAKE) and the logit distillers cited since 2023; they run before the
# slower feature distillers so a study cut short has them on every seed.
RELATIVES = ["shake", "kd_mlkd", "sokd_mlkd", "kd_nkd", "kd_ctkd", "kd_nd", "kd_dot"]
METHODS_REST = ["kd_dkd", "sokd_dkd", "kd_dist", "kd_crd", "sokd_crd"] + RELATIVES + [
    "kd_reviewkd", "sokd_reviewkd", "one", "kdcl", "kd_rkd", "kd_pkt", "kd_sp", "kd_ls"]

STUDIES = {
    # phases: (variants, seeds or None for all) in the order they run; a study cut short has the
    # earlier phases whole.
    "fmnist": {
        "configs": "configs/study/fmnist",
        "seeds": [0, 1, 2],
        "phases": [(CORE_FMNIST, None), (MORE_FMNIST + ABLATIONS_FMNIST, [0]), (MORE_FMNIST, [1, 2]),
                   (["sokd_kbm_finetune"], None)],
    },
    # The distillers' comparison: the same protocol on a fresh set of published teachers, kd and
    # sokd rerun on them so every comparison is paired; a cut-short study has whole methods.
    "fmnist_methods": {
        "configs": "configs/study/fmnist",
        "seeds": [0, 1, 2],
        "phases": [(["kd", "sokd"], None)] + [([m], None) for m in METHODS_REST],
        "publish_models": ["teacher"],
    },
    "cifar100": {
        "configs": "configs/study/cifar100",
        "seeds": [0],
        "phases": [(["vanilla", "kd", "sokd"], None)],
    },
}
PUBLISHED_FILES = ("summary.json", "metrics.jsonl", "config.yaml")


def variants_of(study: str) -> list[str]:
    seen: list[str] = []
    for names, _ in STUDIES[study]["phases"]:
        seen += [n for n in names if n not in seen]
    return seen


def compare_spec(study: str) -> dict:
    """The study as a compare spec: every config a variant (its whole run config, less what the
    grid sets: name, output, and the trained teacher, which is the seed's), teacher.yaml the
    teacher recipe, the first distilling variant's student the base config's student."""
    from sokd import methods
    from sokd.config import read_yaml
    folder = ROOT / STUDIES[study]["configs"]
    teacher = read_yaml(folder / "teacher.yaml")
    variants = {}
    for name in variants_of(study):
        tree = read_yaml(folder / f"{name}.yaml")
        for key in ("name", "output"):
            tree.pop(key, None)
        if methods.needs_trained_teacher(tree["method"]["name"]):
            tree.pop("teacher", None)
        variants[name] = tree
    base = {k: copy.deepcopy(v) for k, v in teacher.items() if k not in ("name", "output", "method", "model")}
    base["student"] = next(v["student"] for v in variants.values() if "student" in v)
    return {"name": study, "config": base, "seeds": list(STUDIES[study]["seeds"]),
            "teacher": {"arch": teacher["model"]["arch"]}, "baseline": "kd", "variants": variants}


def out_dir(study: str) -> Path:
    return ROOT / "runs/study" / study


def results_dir(study: str) -> Path:
    return ROOT / "docs/results" / study


def published_dir(study: str, run: str) -> Path:
    return results_dir(study) / "by_run" / run


def write_spec(study: str) -> Path:
    path = out_dir(study) / "compare.yaml"
    text = yaml.safe_dump(compare_spec(study), sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def restore_published(study: str) -> None:
    """Published runs stand for run folders this checkout lacks, so a study continued in another
    checkout trains only what is missing: a student from its summary, metrics and config; a
    teacher only where its model.pt is published (the students of a later session then distil from
    exactly that teacher; an unpublished one is retrained and must reproduce its published curve).
    Only a missing folder is filled: one that exists, even half-trained, is the grid's to finish."""
    published = results_dir(study) / "by_run"
    if not published.exists():
        return
    restored = []
    for src in sorted(published.glob("*-s*")):
        dst = out_dir(study) / src.name
        teacher = src.name.rsplit("-s", 1)[0] == "teacher"
        if dst.exists() or not (src / "summary.json").exists() or (teacher and not (src / "model.pt").exists()):
            continue
        dst.mkdir(parents=True)
        for f in PUBLISHED_FILES + (("model.pt",) if teacher else ()):
            if (src / f).exists():
                shutil.copy2(src / f, dst / f)
        restored.append(src.name)
    if restored:
        print(f"restored {', '.join(restored)} from {published.relative_to(ROOT)}", flush=True)


def finished_runs(study: str) -> list[str]:
    out = out_dir(study)
    return sorted(p.parent.name for p in out.glob("*-s*/summary.json")) if out.exists() else []


def differs_from_published(study: str, run: str) -> str | None:
    """How a run trained here differs from the published run of the same name (its per-epoch
    test top-1), or None when it matches or nothing is published. A retrained teacher must
    match: the published students learned from the published one."""
    theirs, ours = published_dir(study, run) / "metrics.jsonl", out_dir(study) / run / "metrics.jsonl"
    if not theirs.exists():
        return None

    def curve(path: Path) -> list:
        return [(r["epoch"], r["test"]) for r in map(json.loads, path.read_text().splitlines())]
    a, b = curve(ours), curve(theirs)
    for (epoch, mine), (_, published_test) in zip(a, b):
        if mine != published_test:
            return f"epoch {epoch}: test {mine} here, {published_test} published"
    return None if len(a) == len(b) else f"{len(a)} epochs here, {len(b)} published"


def publish_new(study: str, commit: bool) -> list[str]:
    """Publish every finished run not yet published; returns the runs that differ from their
    published copy (left unpublished: runs paired with the published one are not paired with it)."""
    models = STUDIES[study].get("publish_models", [])
    fresh, refused = [], []
    for run in finished_runs(study):
        src, dst = out_dir(study) / run, published_dir(study, run)
        if (dst / "summary.json").exists():
            why = differs_from_published(study, run)
            if why:
                refused.append(f"{run} ({why})")
            continue
        dst.mkdir(parents=True, exist_ok=True)
        files = list(PUBLISHED_FILES) + (["model.pt"] if run.rsplit("-s", 1)[0] in models else [])
        for f in files:
            shutil.copy2(src / f, dst / f)
        fresh.append(run)
    if fresh:
        out = results_dir(study)
        subprocess.run(SOKD + ["report", str(out / "by_run"), "--out", str(out), "--claims"], cwd=ROOT,
                       stdout=subprocess.DEVNULL, check=False)
        print(f"published {', '.join(fresh)}", flush=True)
        if commit:
            git_commit([published_dir(study, r) for r in fresh]
                       + [out / n for n in ("report.md", "claims.md", "test_top1.png", "loss_terms.png",
                                            "final_top1.png")],
                       f"study {study}: {', '.join(fresh)} finished")
    return refused


def git_commit(paths: list[Path], message: str) -> None:
    rel = [str(p.relative_to(ROOT)) for p in paths if p.exists()]
    for _ in range(5):
        # -f: a published teacher's model.pt matches the *.pt ignore rule but is published on purpose
        add = subprocess.run(["git", "add", "-f", "--", *rel], cwd=ROOT, capture_output=True, text=True)
        if add.returncode == 0:
            done = subprocess.run(["git", "commit", "-q", "-m", message, "--", *rel], cwd=ROOT,
                                  capture_output=True, text=True)
            if done.returncode == 0 or "nothing" in done.stdout + done.stderr:
                return
        time.sleep(3)   # index.lock held by another git command: retry
    print(f"warning: could not commit {rel}", flush=True)


def compare_command(study: str, spec: Path, variants: list[str], seeds: list[int] | None, args) -> list[str]:
    cmd = SOKD + ["compare", str(spec), *args.overrides, "--out", str(out_dir(study)),
                  "--variants", ",".join(variants)]
    if seeds is not None:
        cmd += ["--seeds", ",".join(map(str, seeds))]
    if args.plan:
        return cmd + ["--plan"]
    cmd += ["--workers", str(args.workers), "--worker"]
    return cmd + (["--threads", str(args.threads)] if args.threads else [])


def run_phase(study: str, cmd: list[str], commit: bool) -> int:
    """`sokd compare` for one phase, publishing runs as they finish.

    compare runs in its own session and hears SIGINT/SIGTERM only from here, each signal once:
    a Ctrl-C or a `kill` of this script stops the runs in progress, which save a resumable
    last.pt (a second signal stops them at once); the next call resumes them."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    received: list[int] = []

    def pass_on(signum, frame) -> None:
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                if not received:
                    publish_new(study, commit)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    refused = publish_new(study, commit)
    if received:
        return 128 + received[0]
    if refused:
        print(f"STOP     not published, they do not reproduce their published runs: {'; '.join(refused)}. "
              f"Runs paired with the published ones would not be paired with these: compare the machines "
              f"and the recipe's precision, or start the study afresh", flush=True)
        return 3
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("--workers", type=int, default=1, help="runs at once on this machine")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run")
    ap.add_argument("--commit", action="store_true", help="git-commit each published run")
    ap.add_argument("--plan", action="store_true", help="list every phase's runs and their state; run nothing")
    ap.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = ap.parse_intermixed_args(argv)
    spec = write_spec(args.study)
    restore_published(args.study)
    for variants, seeds in STUDIES[args.study]["phases"]:
        cmd = compare_command(args.study, spec, variants, seeds, args)
        print("phase    " + " ".join(cmd[2:]), flush=True)
        if args.plan:
            subprocess.run(cmd, cwd=ROOT, check=False)
            continue
        status = run_phase(args.study, cmd, args.commit)
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
