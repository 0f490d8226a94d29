"""benchmarks/study.py: the order runs are taken in and how workers share them (no training here)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "study.py"


@pytest.fixture
def study(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("study_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", tmp_path)  # run directories go under tmp_path/runs/study
    return module


def finish(study, name, seed):
    rd = study.run_dir("fmnist", name, seed)
    rd.mkdir(parents=True, exist_ok=True)
    (rd / "summary.json").write_text("{}")


def hold(study, name, seed, pid, which="fmnist"):
    rd = study.run_dir(which, name, seed)
    rd.mkdir(parents=True, exist_ok=True)
    (rd / study.LOCK).write_text(str(pid))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_plan_puts_teachers_then_core_methods_on_every_seed_first(study):
    order = study.plan("fmnist", [0, 1, 2])
    assert order[:3] == [("teacher", 0), ("teacher", 1), ("teacher", 2)]
    core = order[3:3 + 12]
    assert {n for n, _ in core} == {"vanilla", "kd", "sokd", "dml"} and {s for _, s in core} == {0, 1, 2}
    seed0_rest = order[15:15 + 3 + 4]
    assert {s for _, s in seed0_rest} == {0} and ("sokd_fp32", 0) in seed0_rest
    assert order[-4] == ("sokd_at", 2) and len(order) == len(set(order)) == 3 + 12 + 7 + 6 + 3
    assert order[-3:] == [("sokd_kbm_finetune", 0), ("sokd_kbm_finetune", 1), ("sokd_kbm_finetune", 2)]


def test_students_wait_for_their_teacher_and_held_runs_are_left_to_their_worker(study):
    todo = [("teacher", 0), ("kd", 0), ("vanilla", 0)]
    hold(study, "teacher", 0, os.getppid())  # a live process trains the teacher
    assert study.next_runnable("fmnist", todo, dry_run=False) == ("vanilla", 0)
    assert todo == [("kd", 0), ("vanilla", 0)]  # the held teacher is dropped, kd still waits
    assert study.teacher_in_training("fmnist", todo)
    todo.remove(("vanilla", 0))
    assert study.next_runnable("fmnist", todo, dry_run=False) is None and todo == [("kd", 0)]
    finish(study, "teacher", 0)
    assert study.next_runnable("fmnist", todo, dry_run=False) == ("kd", 0)


def test_a_stale_lock_does_not_block_a_run_and_a_lost_teacher_is_reported(study):
    hold(study, "teacher", 0, dead_pid())
    todo = [("teacher", 0), ("sokd", 0)]
    assert study.next_runnable("fmnist", todo, dry_run=False) == ("teacher", 0)
    # nobody trains the teacher any more: waiting for it would never end
    assert not study.teacher_in_training("fmnist", [("sokd", 0)])


def test_a_worker_ends_when_every_run_left_is_held_by_another(study, monkeypatch, capsys):
    for name in ("teacher", "vanilla", "kd", "sokd"):
        hold(study, name, 0, os.getppid(), which="cifar100")
    monkeypatch.setattr(sys, "argv", ["study.py", "cifar100"])
    monkeypatch.setattr(study.time, "sleep", lambda s: pytest.fail("the worker waited instead of ending"))
    assert study.main() == 0
    assert "run " not in capsys.readouterr().out


def test_a_run_gets_its_seeds_teacher_when_its_configs_method_needs_a_trained_one(study, monkeypatch, capsys):
    names = {n for n, _ in study.plan("fmnist", [0])}
    assert {n for n in names if not study.needs_teacher("fmnist", n)} == {"teacher", "vanilla", "dml"}
    monkeypatch.setattr(sys, "argv", ["study.py", "fmnist", "--seeds", "0", "--dry-run"])
    assert study.main() == 0
    lines = {Path(next(w for w in ln.split() if w.endswith(".yaml"))).stem: ln
             for ln in capsys.readouterr().out.splitlines() if ln.startswith("would run")}
    assert set(lines) == names
    for name, line in lines.items():
        assert ("teacher.checkpoint=" in line) == study.needs_teacher("fmnist", name), line


def test_a_retrained_teacher_must_reproduce_its_published_run(study):
    import json

    def write(path, tops):
        path.mkdir(parents=True, exist_ok=True)
        (path / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": e, "wall_time_s": 10.0 * e, "test": {"model": {"top1": t}}}) + "\n"
            for e, t in enumerate(tops)))

    ours, theirs = study.run_dir("fmnist", "teacher", 0), study.published_dir("fmnist", "teacher", 0)
    write(ours, [10.0, 65.46, 70.1])
    assert study.differs_from_published("fmnist", "teacher", 0) is None      # nothing published
    write(theirs, [10.0, 65.46, 70.1])
    assert study.differs_from_published("fmnist", "teacher", 0) is None      # wall times may differ
    write(theirs, [10.0, 65.47, 70.1])
    assert study.differs_from_published("fmnist", "teacher", 0).startswith("epoch 1: test")
