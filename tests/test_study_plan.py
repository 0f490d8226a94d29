"""benchmarks/study.py, a thin user of `sokd compare`: each study's compare spec reproduces its run
configs exactly, its phases run in order, and it publishes what finishes (no training here)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from sokd import compare
from sokd.config import build, read_yaml

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "study.py"
REPO = SCRIPT.parent.parent


@pytest.fixture
def study(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("study_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shutil.copytree(REPO / "configs" / "study", tmp_path / "configs" / "study")
    shutil.copytree(REPO / "configs" / "cifar100", tmp_path / "configs" / "cifar100")
    monkeypatch.setattr(module, "ROOT", tmp_path)   # runs/ and docs/results/ go under tmp_path
    return module


def _trained_setup(tree: dict) -> dict:
    """What a run trains: its validated config less where it writes and what it is called."""
    dumped = build(tree).model_dump()
    for key in ("output", "name"):
        dumped.pop(key, None)
    return dumped


@pytest.mark.parametrize("name", ["fmnist", "fmnist_methods", "cifar100"])
def test_each_studys_compare_spec_trains_exactly_its_run_configs(study, name):
    spec = study.write_spec(name)
    grid = compare.load(str(spec), out=str(study.out_dir(name)))
    folder = study.ROOT / study.STUDIES[name]["configs"]
    runs = grid.runs()
    assert {n for n, _ in runs} == set(study.variants_of(name)) | {"teacher"}
    for run, seed in runs:
        ours = grid.config(run, seed)
        theirs = read_yaml(folder / f"{run}.yaml")
        theirs["train"] = {**theirs.get("train", {}), "seed": seed}
        if "teacher" in ours and ours["teacher"].get("checkpoint"):   # the study passed it on the command line
            theirs["teacher"] = {**theirs["teacher"], "checkpoint": ours["teacher"]["checkpoint"]}
            assert ours["teacher"]["checkpoint"] == str(grid.teacher_model(seed))
        assert _trained_setup(ours) == _trained_setup(theirs), (name, run)


def test_phases_run_the_core_methods_on_every_seed_first(study, monkeypatch):
    calls = []

    def fake_phase(name, cmd, commit):
        calls.append(cmd)
        return 0
    monkeypatch.setattr(study, "run_phase", fake_phase)
    assert study.main(["fmnist", "--workers", "2", "--threads", "1", "data.root=X"]) == 0
    selections = [(c[c.index("--variants") + 1], c[c.index("--seeds") + 1] if "--seeds" in c else "all")
                  for c in calls]
    assert selections[0] == ("vanilla,kd,sokd,dml", "all")
    assert selections[1][1] == "0" and "sokd_fp32" in selections[1][0]
    assert selections[-1] == ("sokd_kbm_finetune", "all")
    first = calls[0]
    assert first[first.index("compare") + 2] == "data.root=X"   # overrides follow the spec
    assert first[-5:] == ["--workers", "2", "--worker", "--threads", "1"]
    assert Path(first[first.index("compare") + 1]) == study.out_dir("fmnist") / "compare.yaml"


def _finish(study, name, run, tops):
    rd = study.out_dir(name) / run
    rd.mkdir(parents=True, exist_ok=True)
    (rd / "summary.json").write_text("{}")
    (rd / "config.yaml").write_text("name: x\n")
    (rd / "model.pt").write_bytes(b"teacher weights")
    (rd / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "wall_time_s": 10.0 * e, "test": {"model": {"top1": t}}}) + "\n"
        for e, t in enumerate(tops)))


def test_finished_runs_are_published_once_with_the_teachers_model_where_the_study_publishes_it(study):
    _finish(study, "fmnist_methods", "teacher-s0", [10.0, 65.46])
    _finish(study, "fmnist_methods", "kd-s0", [10.0, 50.0])
    assert study.publish_new("fmnist_methods", commit=False) == []
    published = study.results_dir("fmnist_methods") / "by_run"
    assert (published / "teacher-s0" / "model.pt").read_bytes() == b"teacher weights"
    assert not (published / "kd-s0" / "model.pt").exists() and (published / "kd-s0" / "summary.json").exists()
    # published runs stand for missing run folders only; a teacher only with its model.pt
    shutil.rmtree(study.out_dir("fmnist_methods"))
    half = study.out_dir("fmnist_methods") / "teacher-s1"
    half.mkdir(parents=True)
    for run, files in (("teacher-s1", ("summary.json", "model.pt")), ("teacher-s2", ("summary.json",))):
        (published / run).mkdir()
        for f in files:
            (published / run / f).write_text("{}")
    study.restore_published("fmnist_methods")
    out = study.out_dir("fmnist_methods")
    assert (out / "teacher-s0" / "model.pt").read_bytes() == b"teacher weights"
    assert (out / "kd-s0" / "summary.json").exists() and not (out / "kd-s0" / "model.pt").exists()
    assert list(half.iterdir()) == [] and not (out / "teacher-s2").exists()


def test_a_retrained_run_must_reproduce_its_published_run(study):
    _finish(study, "fmnist", "teacher-s0", [10.0, 65.46, 70.1])
    assert study.differs_from_published("fmnist", "teacher-s0") is None      # nothing published
    assert study.publish_new("fmnist", commit=False) == []
    assert study.differs_from_published("fmnist", "teacher-s0") is None      # the same curve
    _finish(study, "fmnist", "teacher-s0", [10.0, 65.47, 70.1])               # wall times may differ, tops not
    assert study.differs_from_published("fmnist", "teacher-s0").startswith("epoch 1: test")
    assert study.publish_new("fmnist", commit=False)[0].startswith("teacher-s0 (epoch 1")


def test_a_signal_to_the_study_reaches_its_compare_once_and_stops_it(study, monkeypatch, tmp_path):
    """compare runs in its own session: a signal to the script alone (a `kill`) still stops it,
    and a Ctrl-C to the whole group does not reach it twice (which would stop its runs unsaved)."""
    monkeypatch.setattr(study, "POLL_S", 0.05)
    monkeypatch.setattr(study, "publish_new", lambda name, commit: [])
    count, ready = tmp_path / "signals", tmp_path / "ready"
    slow = [sys.executable, str(REPO / "tests" / "slow_to_stop.py"), str(count), str(ready)]

    def interrupt():
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=interrupt, daemon=True).start()
    assert study.run_phase("fmnist", slow, False) == 128 + signal.SIGINT
    assert count.read_text() == "1"   # asked once, and it stopped in its own time
