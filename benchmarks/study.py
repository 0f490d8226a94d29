#!/usr/bin/env python3
"""Regenerate the reproduction study: every run, then the report. Resumable.

    .venv/bin/python benchmarks/study.py fmnist            # Fashion-MNIST: 3 seeds + ablations
    .venv/bin/python benchmarks/study.py cifar100          # WRN-40-2 -> WRN-40-1, 20 epochs
    .venv/bin/python benchmarks/study.py fmnist --seeds 0 --dry-run

Each run is `sokd train` in a subprocess. Several copies may run at once (e.g. one per core with
--threads 1): a lock file in each run directory keeps them on different runs. A finished run (summary.json) is skipped, a started one
(last.pt) is resumed, so the script can be killed and restarted at any point. A worker leaves the
runs another live worker holds to that worker and ends when nothing is left for it, so
`study.py fmnist ...; study.py cifar100 ...` hands its core to the next study. Finished summaries
and metrics are copied to docs/results/<study>/by_run/ and the report is rebuilt after every run;
with --commit they are committed right away (only those paths).
"""
from __future__ import annotations

import argparse
import json
import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOKD = [sys.executable, "-m", "sokd"]

STUDIES = {
    "fmnist": {
        "configs": ROOT / "configs/study/fmnist",
        "main": ["vanilla", "kd", "sokd", "dml", "kd_dml", "kd_at", "sokd_at"],
        "core": ["vanilla", "kd", "sokd", "dml"],
        "ablations": ["sokd_bn_eval", "sokd_init_teacher", "sokd_kbm2", "sokd_fp32"],
        "followups": ["sokd_kbm_finetune"],
        "seeds": [0, 1, 2],
    },
    # The distillers issue's comparison: the same protocol and configs, a fresh set of teachers
    # (their model.pt is published, so later runs distil from exactly these), KD and SOKD rerun on
    # them so that every comparison is paired on a shared teacher.
    "fmnist_methods": {
        "configs": ROOT / "configs/study/fmnist",
        "main": ["kd", "sokd", "kd_dkd", "sokd_dkd", "kd_dist", "kd_crd", "sokd_crd", "kd_reviewkd",
                 "sokd_reviewkd", "one", "kdcl", "kd_rkd", "kd_pkt", "kd_sp", "kd_ls"],
        "core": ["kd", "sokd"],
        "ablations": [],
        "seeds": [0, 1, 2],
        "all_seeds_first": True,
        "publish_models": ["teacher"],
    },
    "cifar100": {
        "configs": ROOT / "configs/study/cifar100",
        "main": ["vanilla", "kd", "sokd"],
        "core": ["vanilla", "kd", "sokd"],
        "ablations": [],
        "seeds": [0],
    },
}


@functools.lru_cache(maxsize=None)
def needs_teacher(study: str, name: str) -> bool:
    """Whether run `name` distils from its seed's teacher: its config's method needs a trained one."""
    from sokd import config, methods
    cfg = config.load(STUDIES[study]["configs"] / f"{name}.yaml")
    return methods.needs_trained_teacher(cfg.method.name)


def plan(study: str, seeds: list[int]) -> list[tuple[str, int]]:
    """Runs in priority order: every seed's teacher; the core methods on every seed (the claims
    need their spread); the other methods and the ablations on the first seed; the other methods
    on the remaining seeds; last, follow-up runs (questions the first results raised) on every
    seed. Workers take the first runnable entry, so the order decides what a study cut short has."""
    s = STUDIES[study]
    core = [m for m in s["main"] if m in s["core"]]
    rest = [m for m in s["main"] if m not in s["core"]]
    order = [("teacher", seed) for seed in seeds]
    order += [(m, seed) for seed in seeds for m in core]
    if s.get("all_seeds_first"):  # a study cut short has whole methods (every seed) rather than seed 0 of all
        order += [(m, seed) for m in rest for seed in seeds]
    else:
        order += [(m, seeds[0]) for m in rest] + [(a, seeds[0]) for a in s["ablations"]]
        order += [(m, seed) for seed in seeds[1:] for m in rest]
    order += [(f, seed) for seed in seeds for f in s.get("followups", [])]
    return order


def run_dir(study: str, name: str, seed: int) -> Path:
    return ROOT / "runs/study" / study / f"{name}-s{seed}"


def git_commit(paths: list[Path], message: str) -> None:
    rel = [str(p.relative_to(ROOT)) for p in paths if p.exists()]
    for _ in range(5):
        # -f: a published teacher's model.pt matches the *.pt ignore rule but is published on purpose
        add = subprocess.run(["git", "add", "-f", "--", *rel], cwd=ROOT, capture_output=True, text=True)
        if add.returncode == 0:
            done = subprocess.run(["git", "commit", "-q", "-m", message, "--", *rel], cwd=ROOT,
                                  capture_output=True, text=True)
            if done.returncode == 0 or "nothing" in done.stdout + done.stderr:
                untracked = [p for p in rel if subprocess.run(["git", "ls-files", "--error-unmatch", p], cwd=ROOT,
                                                               capture_output=True).returncode != 0]
                if untracked:
                    print(f"warning: not committed: {untracked}", flush=True)
                return
        time.sleep(3)  # index.lock held by another git command: retry
    print(f"warning: could not commit {rel}", flush=True)


LOCK = ".study.lock"


def holder(rd: Path) -> int | None:
    """pid of the live process working on run `rd`, if any (stale locks are ignored)."""
    try:
        pid = int((rd / LOCK).read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def acquire(rd: Path) -> bool:
    """Claim run `rd` for this worker, so several study processes can share the plan."""
    rd.mkdir(parents=True, exist_ok=True)
    if holder(rd) not in (None, os.getpid()):
        return False
    (rd / LOCK).write_text(str(os.getpid()))
    return holder(rd) == os.getpid()


def results_dir(study: str) -> Path:
    return ROOT / "docs/results" / study


def published_dir(study: str, name: str, seed: int) -> Path:
    return results_dir(study) / "by_run" / f"{name}-s{seed}"


def published(study: str, name: str, seed: int) -> bool:
    return (published_dir(study, name, seed) / "summary.json").exists()


def finished(study: str, name: str, seed: int) -> bool:
    """Whether run `name` needs no more work: trained here, or published with everything later runs
    need from it (a teacher's model.pt where the study publishes it)."""
    if (run_dir(study, name, seed) / "summary.json").exists():
        return True
    if name in STUDIES[study].get("publish_models", []):
        return (published_dir(study, name, seed) / "model.pt").exists()
    return published(study, name, seed)


def teacher_model(study: str, seed: int) -> Path:
    """The seed's teacher: the local run's model.pt, else the published copy."""
    local = run_dir(study, "teacher", seed) / "model.pt"
    return local if local.exists() else published_dir(study, "teacher", seed) / "model.pt"


def publish(study: str, name: str, seed: int, commit: bool) -> None:
    src = run_dir(study, name, seed)
    out = results_dir(study)
    dst = published_dir(study, name, seed)
    dst.mkdir(parents=True, exist_ok=True)
    files = ["summary.json", "metrics.jsonl", "config.yaml"]
    if name in STUDIES[study].get("publish_models", []):
        files.append("model.pt")  # later runs (and later sessions) distil from exactly this teacher
    for f in files:
        shutil.copy2(src / f, dst / f)
    subprocess.run(SOKD + ["report", str(out / "by_run"), "--out", str(out), "--claims"], cwd=ROOT,
                   stdout=subprocess.DEVNULL, check=False)
    if commit:
        git_commit([dst, out / "report.md", out / "claims.md", out / "test_top1.png", out / "loss_terms.png",
                    out / "final_top1.png"],
                   f"study {study}: {name} seed {seed} finished")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--only", nargs="+", default=None, help="run names to include (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run")
    ap.add_argument("--commit", action="store_true", help="git-commit each finished summary")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = ap.parse_args()
    todo = [(n, sd) for n, sd in plan(args.study, args.seeds or STUDIES[args.study]["seeds"])
            if not args.only or n in args.only or n == "teacher"]
    while todo:
        pick = next_runnable(args.study, todo, args.dry_run)
        if pick is None and not todo:
            break  # what is left belongs to other workers
        if pick is None:
            if not teacher_in_training(args.study, todo):
                print(f"stuck    {', '.join(f'{n} seed {s}' for n, s in todo)} need a teacher that no "
                      f"worker is training; rerun this script to train it", flush=True)
                return 1
            time.sleep(30)  # another worker is training the teacher these runs need
            continue
        todo.remove(pick)
        status = run_one(args, *pick)
        if status != 0:
            return status
    return 0


def next_runnable(study: str, todo: list[tuple[str, int]], dry_run: bool) -> tuple[str, int] | None:
    """First entry of `todo` that is finished (to publish), or free with its teacher trained.
    Entries another live worker holds are dropped from `todo`: that worker trains and publishes them."""
    for name, seed in list(todo):
        rd = run_dir(study, name, seed)
        if finished(study, name, seed) or dry_run:
            return name, seed
        if holder(rd) not in (None, os.getpid()):
            todo.remove((name, seed))
            continue
        if needs_teacher(study, name) and not finished(study, "teacher", seed):
            continue
        return name, seed
    return None


def teacher_in_training(study: str, todo: list[tuple[str, int]]) -> bool:
    """Whether a live worker is training the teacher of some run in `todo` (worth waiting for)."""
    return any(holder(run_dir(study, "teacher", seed)) is not None for name, seed in todo
               if needs_teacher(study, name))


def run_one(args, name: str, seed: int) -> int:
    """Train (or resume) one run in a subprocess and publish its summary; 0 when done or skipped."""
    rd = run_dir(args.study, name, seed)
    if finished(args.study, name, seed):
        if (rd / "summary.json").exists() and not published(args.study, name, seed):
            publish(args.study, name, seed, args.commit)
        print(f"done     {name} seed {seed}", flush=True)
        return 0
    if not args.dry_run and not acquire(rd):
        print(f"skip     {name} seed {seed} (another worker has it)", flush=True)
        return 0
    cmd = SOKD + ["train", str(STUDIES[args.study]["configs"] / f"{name}.yaml"), f"train.seed={seed}",
                  f"output.dir={rd}", f"output.resume={str((rd / 'last.pt').exists()).lower()}"]
    if needs_teacher(args.study, name):
        cmd.append(f"teacher.checkpoint={teacher_model(args.study, seed)}")
    if args.threads:
        cmd.append(f"train.threads={args.threads}")
    cmd += args.overrides
    print(("would run " if args.dry_run else "run      ") + " ".join(cmd[2:]), flush=True)
    if args.dry_run:
        return 0
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT)
    (rd / LOCK).unlink(missing_ok=True)
    if proc.returncode != 0:
        print(f"FAILED   {name} seed {seed} (exit {proc.returncode}); rerun to resume", flush=True)
        return proc.returncode
    print(f"finished {name} seed {seed} in {time.time() - t0:.0f} s", flush=True)
    differs = differs_from_published(args.study, name, seed)
    if differs:
        print(f"STOP     {name} seed {seed} does not reproduce its published run ({differs}); runs paired with "
              f"the published one would not be paired with this one. Not published: compare the machines "
              f"and the recipe's precision, or start the study afresh", flush=True)
        return 3
    publish(args.study, name, seed, args.commit)
    return 0


def differs_from_published(study: str, name: str, seed: int) -> str | None:
    """How a run retrained here differs from the published run of the same name and seed (its
    per-epoch test top-1), or None when it matches or nothing is published. A retrained teacher
    must match: the published students learned from the published one."""
    theirs = published_dir(study, name, seed) / "metrics.jsonl"
    ours = run_dir(study, name, seed) / "metrics.jsonl"
    if not theirs.exists():
        return None

    def curve(path: Path) -> list:
        return [(r["epoch"], r["test"]) for r in map(json.loads, path.read_text().splitlines())]
    a, b = curve(ours), curve(theirs)
    for (epoch, mine), (_, published_test) in zip(a, b):
        if mine != published_test:
            return f"epoch {epoch}: test {mine} here, {published_test} published"
    return None if len(a) == len(b) else f"{len(a)} epochs here, {len(b)} published"


if __name__ == "__main__":
    sys.exit(main())
