"""The user's files are never lost, a broken model is never saved, mistakes are named.

Runs are paused or failed at exact steps by the `gated_resnet8` plugin (tests/plugins), so no
test here depends on how fast the machine trains.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sokd.engine import safe_load
from sokd.files import atomic_save, make_temp
from sokd.engine.rundir import RunLock

from .conftest import tiny_config, write_config

PY = [sys.executable, "-m", "sokd"]
GATE_PLUGIN = str(Path(__file__).parent / "plugins" / "gated_net.py")


def sokd_cli(*args, env=None, timeout=300):
    return subprocess.run(PY + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def gated_config(tmp_path, name, epochs=3, **sections):
    cfg = tiny_config(tmp_path, "vanilla", name=name, model={"arch": "gated_resnet8"},
                      train={"epochs": epochs, "seed": 3, "threads": 1}, imports=[GATE_PLUGIN], **sections)
    cfg["data"]["synthetic_size"] = 256          # 8 steps an epoch
    if "output" not in sections:
        cfg["output"]["dir"] = str(tmp_path / "runs" / name)
    return write_config(tmp_path, cfg, f"{name}.yaml"), Path(cfg["output"]["dir"])


class GatedRun:
    """A `sokd train` subprocess paused at an exact step until `release()`.

    Every wait is on something the child does (a file the gate touches, the process ending),
    never on time: the timeouts only turn a hang into a failure."""

    def __init__(self, tmp_path, cfg_path, gate, *args):
        self.dir = tmp_path / f"gate_{gate.replace(':', '_')}_{time.monotonic_ns()}"
        self.dir.mkdir()
        env = {**os.environ, "SOKD_TEST_GATE": gate, "SOKD_TEST_GATE_DIR": str(self.dir)}
        self.proc = subprocess.Popen(PY + ["train", str(cfg_path), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)

    def _wait_for(self, name, what, timeout):
        deadline = time.monotonic() + timeout
        while not (self.dir / name).exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended before {what}: {self.proc.stderr.read()}")
            assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
            time.sleep(0.02)

    def wait_reached(self, timeout=240):
        self._wait_for("reached", "the gate", timeout)

    def wait_signalled(self, timeout=240):
        """Until the paused run has taken in the SIGINT/SIGTERM sent to it: its handler has run
        and recorded the signal (the gate then touches `signalled`, see tests/plugins/gated_net.py)."""
        self._wait_for("signalled", "acknowledging the signal", timeout)

    def release(self):
        (self.dir / "go").touch()

    def finish(self, timeout=240):
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()   # a hung run fails the test and leaves no process behind
            self.proc.communicate()
            raise
        return self.proc.returncode, out, err.strip()


def metric_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"epoch": r["epoch"], "test": r["test"], "loss": r.get("train", {}).get("loss")} for r in rows]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (directories as markers)."""
    out = {}
    for p in sorted(path.rglob("*")):
        out[str(p.relative_to(path))] = p.read_bytes() if p.is_file() else b"<dir>"
    return out


def all_finite(path: Path) -> bool:
    obj = safe_load(path)
    states = obj.get("method") or obj.get("state_dict")
    return all(torch.isfinite(t).all() for t in states.values() if torch.is_floating_point(t))


# -- overwrite removes only what sokd wrote -------------------------------------------------------
def test_overwrite_refuses_a_directory_holding_user_files_and_keeps_them(tmp_path):
    proj = tmp_path / "myproj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("print('mine')\n")
    subprocess.run(["git", "init", "-q", str(proj)], check=True)
    cfg, _ = gated_config(tmp_path, "proj", epochs=1, output={"dir": str(proj), "tensorboard": False, "progress": False})
    before = tree(proj)
    proc = sokd_cli("train", cfg, "output.overwrite=true")
    assert proc.returncode == 2, proc.stderr
    msg = proc.stderr.strip()
    assert len(msg.splitlines()) == 1 and "'.git'" in msg and "'src'" in msg and "removes only files sokd wrote" in msg
    assert tree(proj) == before


def test_overwrite_replaces_only_the_previous_runs_files(tmp_path):
    cfg, run_dir = gated_config(tmp_path, "again", epochs=1)
    assert sokd_cli("train", cfg).returncode == 0
    old_last = (run_dir / "last.pt").read_bytes()
    proc = sokd_cli("train", cfg, "output.overwrite=true", "train.seed=4")
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "last.pt").read_bytes() != old_last
    assert not (run_dir / ".sokd-replaced").exists() and not (run_dir / ".sokd.lock").exists()
    # a stray user file in the run directory blocks overwrite, and survives
    (run_dir / "notes.txt").write_text("keep me")
    proc = sokd_cli("train", cfg, "output.overwrite=true")
    assert proc.returncode == 2 and "'notes.txt'" in proc.stderr
    assert (run_dir / "notes.txt").read_text() == "keep me"


# -- one process per run directory ----------------------------------------------------------------
def test_second_process_on_a_run_directory_is_refused_naming_the_holder(tmp_path):
    cfg, run_dir = gated_config(tmp_path, "locked", epochs=2)
    first = GatedRun(tmp_path, cfg, "train:3")
    first.wait_reached()
    second = sokd_cli("train", cfg, "output.overwrite=true")
    third = sokd_cli("train", cfg, "output.resume=true")
    first.release()
    code, _, err = first.finish()
    assert code == 0, err
    for proc in (second, third):
        msg = proc.stderr.strip()
        assert proc.returncode == 2 and len(msg.splitlines()) == 1, msg
        assert f"in use by pid {first.proc.pid} on host {socket.gethostname()}" in msg
    assert [r["epoch"] for r in metric_rows(run_dir)] == [0, 1, 2]
    assert not (run_dir / ".sokd.lock").exists()  # released on exit


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    cfg, run_dir = gated_config(tmp_path, "stale", epochs=1)
    run_dir.mkdir(parents=True)
    # the file a SIGKILLed holder leaves: its flock died with it
    (run_dir / ".sokd.lock").write_text(json.dumps({"pid": 999999, "host": socket.gethostname()}))
    proc = sokd_cli("train", cfg)
    assert proc.returncode == 0, proc.stderr
    # a lock held right now (this process) is refused
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        proc = sokd_cli("train", cfg, "output.resume=true", "train.epochs=2")
        assert proc.returncode == 2 and f"pid {os.getpid()}" in proc.stderr
    finally:
        lock.release()


# -- never save a non-finite state; say what is on disk --------------------------------------------
def test_a_blow_up_never_writes_non_finite_weights_and_says_what_is_on_disk(tmp_path):
    cfg, run_dir = gated_config(tmp_path, "boom", epochs=8)
    proc = sokd_cli("train", cfg, "train.steps_per_epoch=1", env={"SOKD_TEST_GATE": "nan:3"})
    msg = proc.stderr.strip()
    assert proc.returncode == 2 and len(msg.splitlines()) == 1, msg
    assert "non-finite" in msg and "optim.lr=" in msg
    for pt in run_dir.glob("*.pt") if run_dir.exists() else []:
        assert all_finite(pt), pt
    if "last.pt holds" in msg:  # the message names the checkpoint it promises, and it is finite
        assert all_finite(run_dir / "last.pt")
    else:
        assert "no checkpoint had been written" in msg
        assert not run_dir.exists()


def test_resume_with_a_lower_lr_continues_the_run(tmp_path):
    """The advice after a blow-up (resume with a lower optim.lr) can be followed."""
    cfg, run_dir = gated_config(tmp_path, "lower", epochs=1)
    assert sokd_cli("train", cfg).returncode == 0
    proc = sokd_cli("train", cfg, "output.resume=true", "train.epochs=2", "optim.lr=0.005")
    assert proc.returncode == 0, proc.stderr
    assert "learning rate re-based on resume" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["lr"]["model"] == pytest.approx(0.05) and rows[2]["lr"]["model"] == pytest.approx(0.005)


def test_weights_are_checked_before_every_save(make_config, monkeypatch):
    from sokd import config, runner
    from sokd.engine import checkpointing, loop
    real = checkpointing.non_finite_tensors
    calls = {"n": 0}

    def poisoned(state):  # the state turns non-finite in epoch 2
        calls["n"] += 1
        return ["nets.model.stem.0.weight"] if calls["n"] >= 2 else real(state)

    monkeypatch.setattr(checkpointing, "non_finite_tensors", poisoned)
    cfg = config.build(make_config("vanilla", train={"epochs": 3}))
    with pytest.raises(loop.NonFiniteState, match=r"by epoch 2 .*last.pt holds the run at epoch 1"):
        runner.train(cfg)
    assert safe_load(cfg.run_dir / "last.pt")["epoch"] == 1


# -- a run that fails before its first checkpoint leaves the directory as it was -------------------
@pytest.mark.parametrize("name,overrides,expected", [
    ("bad lr_per_role role", ["optim.lr_per_role={kbm: 0.01}"], "optim.lr_per_role names role 'kbm'"),
    ("empty feature-stage list", ["method.name=kd", "student.arch=resnet8", "model=null",
                                  "teacher.arch=resnet8", "method.features=[{kind: at, stages: []}]"],
     "method.features.0.stages"),
    ("images too small", ["model.arch=vgg8", "data.synthetic_shape=[3, 2, 2]", "data.crop_padding=0"], "cannot take this data"),
])
def test_errors_found_late_leave_nothing_behind(tmp_path, name, overrides, expected):
    cfg, run_dir = gated_config(tmp_path, "late", epochs=1)
    proc = sokd_cli("train", cfg, *overrides)
    msg = proc.stderr.strip()
    assert proc.returncode == 2 and len(msg.splitlines()) == 1 and expected in msg, msg
    assert not run_dir.exists()
    assert sokd_cli("train", cfg).returncode == 0  # the corrected command just runs


def test_a_crash_before_the_first_checkpoint_restores_the_overwritten_run(tmp_path):
    cfg, run_dir = gated_config(tmp_path, "restore", epochs=1)
    assert sokd_cli("train", cfg).returncode == 0
    before = tree(run_dir)
    proc = sokd_cli("train", cfg, "output.overwrite=true", env={"SOKD_TEST_GATE": "fail:3"})
    assert proc.returncode == 1 and "injected failure" in proc.stderr
    assert tree(run_dir) == before
    # a fresh directory is removed again
    fresh = tmp_path / "runs" / "fresh"
    proc = sokd_cli("train", cfg, f"output.dir={fresh}", env={"SOKD_TEST_GATE": "fail:3"})
    assert proc.returncode == 1 and not fresh.exists()


def test_a_kill_before_the_first_checkpoint_is_undone_by_the_next_run(tmp_path):
    cfg, run_dir = gated_config(tmp_path, "killed_overwrite", epochs=1)
    assert sokd_cli("train", cfg).returncode == 0
    before = tree(run_dir)
    run = GatedRun(tmp_path, cfg, "train:2", "output.overwrite=true")
    run.wait_reached()
    run.proc.kill()
    run.finish()
    assert (run_dir / ".sokd-replaced").is_dir()
    proc = sokd_cli("train", cfg, "output.resume=true")  # the old run is back, finished
    assert proc.returncode == 0, proc.stderr
    after = tree(run_dir)
    assert set(after) == set(before)
    assert all(after[k] == before[k] for k in ("last.pt", "best.pt", "metrics.jsonl"))


# -- best.pt repaired, stale temporary files removed -----------------------------------------------
def test_resume_repairs_a_stale_best_and_removes_temp_files(tmp_path):
    cfg, run_dir = gated_config(tmp_path, "best", epochs=1)
    assert sokd_cli("train", cfg).returncode == 0
    stale_best = (run_dir / "best.pt").read_bytes()
    assert sokd_cli("train", cfg, "output.resume=true", "train.epochs=2").returncode == 0
    # a kill between the last.pt and best.pt writes of epoch 2, where epoch 2 was the best
    last = safe_load(run_dir / "last.pt")
    for row in last["history"]:
        if row["epoch"] == 2:
            row["test"]["model"]["top1"] = 100.0
    atomic_save(last, run_dir / "last.pt")
    (run_dir / "best.pt").write_bytes(stale_best)
    fd, killed_write = make_temp(run_dir / "last.pt")   # a write killed before its rename
    os.write(fd, b"half a checkpoint")
    os.close(fd)
    killed_write = Path(killed_write)
    look_alike = run_dir / ".last.pt.0123456789ab01234567.sokd.tmp"   # named like one, not sokd's
    look_alike.write_text("not sokd's")
    (run_dir / ".mine.tmp").write_text("not sokd's")
    proc = sokd_cli("train", cfg, "output.resume=true", "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert "best.pt repaired: it now holds epoch 2 (was epoch 1)" in proc.stdout
    assert safe_load(run_dir / "best.pt")["epoch"] == 2
    assert not killed_write.exists() and (run_dir / ".mine.tmp").exists() and look_alike.exists()


# -- every signal path: a true line and its exit code ----------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_at_an_exact_step_checkpoints_and_resumes_identically(tmp_path, sig):
    ref_cfg, ref_dir = gated_config(tmp_path, "reference", epochs=2)
    cut_cfg, cut_dir = gated_config(tmp_path, "signalled", epochs=2)
    assert sokd_cli("train", ref_cfg).returncode == 0
    run = GatedRun(tmp_path, cut_cfg, "train:11")   # epoch 2, step 3
    run.wait_reached()
    run.proc.send_signal(sig)
    run.wait_signalled()   # the stop request is set while the step is still paused
    run.release()
    code, _, err = run.finish()
    assert code == 128 + sig and len(err.splitlines()) == 1, err
    assert "stopped at epoch 2 step 3" in err and "output.resume=true" in err
    assert safe_load(cut_dir / "last.pt")["step"] == 3
    assert sokd_cli("train", cut_cfg, "output.resume=true").returncode == 0
    assert metric_rows(cut_dir) == metric_rows(ref_dir)


def test_second_signal_stops_at_once_and_names_the_last_checkpoint(tmp_path):
    cfg, run_dir = gated_config(tmp_path, "twice", epochs=2)
    run = GatedRun(tmp_path, cfg, "train:11")
    run.wait_reached()
    run.proc.send_signal(signal.SIGTERM)
    run.wait_signalled()   # the first signal is recorded: the next one is a second signal
    run.proc.send_signal(signal.SIGTERM)
    code, _, err = run.finish()
    assert code == 128 + signal.SIGTERM and len(err.splitlines()) == 1, err
    assert "second SIGTERM" in err and "last.pt holds the run at epoch 1" in err
    assert safe_load(run_dir / "last.pt")["epoch"] == 1
    assert sokd_cli("train", cfg, "output.resume=true").returncode == 0


def test_signal_after_the_last_epoch_lets_the_run_complete(tmp_path):
    cfg, run_dir = gated_config(tmp_path, "late_signal", epochs=1)
    run = GatedRun(tmp_path, cfg, "aftertrain:8")   # the evaluation after the last epoch
    run.wait_reached()
    run.proc.send_signal(signal.SIGTERM)
    run.wait_signalled()   # recorded during the last epoch's evaluation, before the run finishes
    run.release()
    code, _, err = run.finish()
    assert code == 0, err
    assert err.splitlines()[-1] == ("sokd: SIGTERM received after the last epoch; the run completed and "
                                    "all its files are written")
    assert (run_dir / "summary.json").exists() and (run_dir / "model.pt").exists()


def test_signal_before_training_starts_writes_nothing(tmp_path):
    cfg, run_dir = gated_config(tmp_path, "early", epochs=1)
    run = GatedRun(tmp_path, cfg, "eval:1")   # the forward check, before the directory is made
    run.wait_reached()
    run.proc.send_signal(signal.SIGTERM)
    code, _, err = run.finish()   # it ends in the signal handler, still paused: nothing to release
    assert code == 128 + signal.SIGTERM and err == "sokd: stopped by SIGTERM", err
    assert not run_dir.exists()


def test_resume_rewrites_metrics_from_the_checkpoint_history(make_config):
    """A metrics line lost or cut short (a crash, a full disk) comes back from last.pt's history."""
    from sokd import config, runner
    base = make_config("vanilla", train={"epochs": 2})
    runner.train(config.build(base))
    run_dir = config.build(base).run_dir
    whole = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(whole[: len(whole) // 2])
    runner.train(config.build({**base, "output": {**base["output"], "resume": True}}))
    assert (run_dir / "metrics.jsonl").read_text() == whole
