"""Run directories, configs and checkpoints under hostile conditions: kills at every step of an
overwrite, files of the user's where a run writes, symlinks, checkpoints that name code, numbers
that pass a type check but mean nothing.

Kills are injected at named points (the n-th rename of the set-aside protocol, a gate at an exact
training step), never at random moments, so every test is deterministic.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from sokd import config, runner
from sokd.engine import rundir, safe_load
from sokd.errors import SokdError
from sokd.files import atomic_save

from .test_reliability_files import GatedRun, gated_config, metric_rows, sokd_cli, tree


def train(cfg: dict) -> dict:
    return runner.train(config.build(cfg))


def out(cfg: dict) -> Path:
    return Path(cfg["output"]["dir"])


# -- 1. overwrite: a kill at any step of setting the old run aside loses nothing -------------------
class Killed(BaseException):
    """Stands for SIGKILL inside the process: nothing after it runs, no clean-up, no rollback."""


def _open_and_begin_killed_at(run_dir: Path, cfg: dict, kill_at: int, monkeypatch) -> None:
    """Open `run_dir` for an overwrite and die at the `kill_at`-th rename or journal write."""
    calls = {"n": 0}
    real_replace, real_journal = os.replace, rundir.RunDirectory._write_journal

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise Killed
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(rundir.os, "replace", counted(real_replace))
    monkeypatch.setattr(rundir.RunDirectory, "_write_journal", counted(real_journal))
    rd = rundir.RunDirectory(run_dir)
    try:
        rd.open(cfg, resume=False, overwrite=True)
        rd.begin(cfg)
        atomic_save({"format": "sokd-run"}, run_dir / "partial-new-file.pt")
        raise Killed  # killed after begin, before the first checkpoint
    except Killed:
        os.close(rd.lock.fd)  # the kernel drops the flock of a dead process; its file stays
    finally:
        monkeypatch.setattr(rundir.os, "replace", real_replace)
        monkeypatch.setattr(rundir.RunDirectory, "_write_journal", real_journal)


def test_a_kill_at_every_step_of_an_overwrite_loses_nothing(make_config, monkeypatch, one_thread):
    cfg = make_config("vanilla", train={"epochs": 1}, output={"tensorboard": True})
    train(cfg)
    run_dir = out(cfg)
    before = tree(run_dir)
    entries = len(list(run_dir.iterdir()))
    # each journal write and each rename of the protocol (config.yaml's own write is atomic_write)
    for kill_at in range(1, entries + 4):
        _open_and_begin_killed_at(run_dir, config.build(cfg).to_dict(), kill_at, monkeypatch)
        # whatever the moment, every file of the old run is in place or set aside, whole
        held = {**{k: v for k, v in tree(run_dir).items() if not k.startswith(rundir.ASIDE_NAME)},
                **{k.split("/", 1)[1]: v for k, v in tree(run_dir).items()
                   if k.startswith(rundir.ASIDE_NAME + "/")}}
        assert all(held.get(k) == v for k, v in before.items()), kill_at
        # the next open puts the old run back exactly
        rd = rundir.RunDirectory(run_dir)
        with pytest.raises(SokdError, match="already holds a run"):
            rd.open(config.build(cfg).to_dict(), resume=False, overwrite=False)
        assert tree(run_dir) == before, kill_at


def test_the_set_aside_run_is_deleted_only_after_the_new_runs_first_checkpoint(make_config, one_thread):
    cfg = make_config("vanilla", train={"epochs": 1})
    train(cfg)
    run_dir = out(cfg)
    rd = rundir.RunDirectory(run_dir)
    rd.open(config.build(cfg).to_dict(), resume=False, overwrite=True)
    rd.begin(config.build(cfg).to_dict())
    assert (run_dir / rundir.ASIDE_NAME / "last.pt").is_file()
    atomic_save({"format": "sokd-run"}, run_dir / "last.pt")   # the new run's first checkpoint ...
    os.close(rd.lock.fd)                                         # ... and a kill before commit()
    rundir.RunDirectory(run_dir).open({}, resume=False, overwrite=True)  # the next open finishes it
    assert not (run_dir / rundir.ASIDE_NAME).exists() and not (run_dir / rundir.JOURNAL_NAME).exists()


def test_a_set_aside_folder_without_a_journal_is_never_deleted(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / rundir.ASIDE_NAME).mkdir(parents=True)
    (run_dir / rundir.ASIDE_NAME / "last.pt").write_bytes(b"an old run")
    with pytest.raises(SokdError, match="no journal"):
        rundir.RunDirectory(run_dir).open({}, resume=False, overwrite=True)
    assert (run_dir / rundir.ASIDE_NAME / "last.pt").read_bytes() == b"an old run"


# -- 2. a new run never replaces a file it did not write --------------------------------------------
@pytest.mark.parametrize("name", ["model.pt", "tb"])
def test_a_new_run_refuses_a_directory_holding_a_file_it_would_write(make_config, name, one_thread):
    cfg = make_config("vanilla", train={"epochs": 1}, output={"tensorboard": True})
    run_dir = out(cfg)
    run_dir.mkdir(parents=True)
    mine = run_dir / name
    if name == "tb":
        mine.mkdir()
        (mine / "notes.txt").write_text("mine")
    else:
        mine.write_bytes(b"my own model")
    before = tree(run_dir)
    with pytest.raises(SokdError, match=rf"already holds '{name}', which this run would write"):
        train(cfg)
    assert tree(run_dir) == before


def test_files_merely_named_like_temp_files_survive(make_config, one_thread):
    cfg = make_config("vanilla", train={"epochs": 1})
    run_dir = out(cfg)
    run_dir.mkdir(parents=True)
    look_alikes = [".last.pt.abcdef.tmp", ".model.pt.0123456789ab01234567.sokd.tmp", ".summary.json.x1.tmp"]
    for name in look_alikes:
        (run_dir / name).write_text("the user's")
    train(cfg)
    assert all((run_dir / n).read_text() == "the user's" for n in look_alikes)


# -- 3. an override's value is the whole text after '=' ---------------------------------------------
def test_a_hash_in_an_override_is_part_of_the_value(tmp_path):
    assert config.parse_override("output.dir=runs/exp #2") == (["output", "dir"], "runs/exp #2")
    assert config.parse_override("train.epochs=5") == (["train", "epochs"], 5)
    assert config.parse_override("method.features=[{kind: at}]")[1] == [{"kind": "at"}]
    cfg = config.load(None, ["data.name=synthetic", f"output.dir={tmp_path}/exp #2"])
    assert cfg.run_dir == tmp_path / "exp #2"


# -- 4. never through a symlink ----------------------------------------------------------------------
@pytest.mark.parametrize("name", [".sokd.lock", "metrics.jsonl", "last.pt"])
def test_a_symlink_at_a_run_file_is_refused_and_its_target_untouched(make_config, tmp_path, name, one_thread):
    cfg = make_config("vanilla", train={"epochs": 1})
    run_dir = out(cfg)
    run_dir.mkdir(parents=True)
    target = tmp_path / "precious.txt"
    target.write_text("do not truncate me")
    (run_dir / name).symlink_to(target)
    with pytest.raises(SokdError, match="is a symbolic link; sokd never writes through"):
        train(cfg)
    assert target.read_text() == "do not truncate me" and (run_dir / name).is_symlink()


# -- 6. overwrite never deletes the files the run reads -----------------------------------------------
def test_overwrite_refuses_to_delete_the_teacher_it_reads(make_config, one_thread):
    teacher_cfg = make_config("vanilla", model={"arch": "resnet14"}, train={"epochs": 1})
    train(teacher_cfg)
    run_dir = out(teacher_cfg)
    before = tree(run_dir)
    kd = make_config("kd", teacher={"arch": "resnet14", "checkpoint": str(run_dir / "model.pt")},
                     train={"epochs": 1}, output={"dir": str(run_dir), "overwrite": True})
    with pytest.raises(SokdError, match=r"output.overwrite=true would delete '.*model.pt', which this run "
                                        r"reads as teacher.checkpoint"):
        train(kd)
    assert tree(run_dir) == before


# -- 7. nothing read from a checkpoint imports code -------------------------------------------------
def test_a_checkpoint_naming_a_plugin_never_imports_it(make_config, tmp_path, one_thread):
    cfg = make_config("vanilla", train={"epochs": 1})
    train(cfg)
    marker = tmp_path / "ran.txt"
    evil = tmp_path / "evil_plugin.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('code ran')\n")
    ckpt = safe_load(out(cfg) / "model.pt")
    ckpt["config"]["imports"] = [str(evil)]
    atomic_save(ckpt, tmp_path / "model.pt")
    for command in (["eval", tmp_path / "model.pt"], ["export", tmp_path / "model.pt", "--format", "torchscript"]):
        proc = sokd_cli(*command)
        msg = proc.stderr.strip()
        assert proc.returncode == 2 and len(msg.splitlines()) == 1, msg
        assert "never imports code named inside a file it reads" in msg and f"--import {evil}" in msg
        assert not marker.exists()
    proc = sokd_cli("eval", tmp_path / "model.pt", "--import", evil)   # the user's own choice
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "code ran"


# -- 11. best.pt always agrees with the summary, even after a kill and a resume ----------------------
def test_best_pt_agrees_with_the_summary_after_a_kill_with_save_every(tmp_path):
    cfg, run_dir = gated_config(tmp_path, "every3", epochs=4, output={"save_every": 3, "tensorboard": False,
                                                                      "progress": False})
    run = GatedRun(tmp_path, cfg, "train:20")   # killed in epoch 3, after epochs 1 and 2 ended
    run.wait_reached()
    run.proc.kill()
    run.finish()
    # the invariant a resume relies on: best.pt never runs ahead of last.pt's timeline
    assert safe_load(run_dir / "best.pt")["epoch"] <= safe_load(run_dir / "last.pt")["epoch"]
    proc = sokd_cli("train", cfg, "output.resume=true", "optim.lr=0.01")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    best = safe_load(run_dir / "best.pt")
    assert best["epoch"] == summary["networks"]["model"]["best_epoch"]
    row = next(r for r in metric_rows(run_dir) if r["epoch"] == best["epoch"])
    assert row["test"] == next(r for r in best["history"] if r["epoch"] == best["epoch"])["test"]


# -- 12. a teacher trained on other preprocessing is refused, with both records ---------------------
def test_a_teacher_trained_with_another_normalisation_gets_its_own_images(make_config, teacher_file, one_thread,
                                                                           capsys):
    """Data normalised otherwise than the teacher was trained on reaches the teacher renormalised
    (and resized) to what it was trained on: its accuracy is what it is on its own images."""
    def teacher_top1(cfg):
        summary = train(cfg)
        return summary["networks"]["teacher"]["top1_initial"]

    def kd(name, **teacher):
        cfg = make_config("kd", teacher={"arch": "resnet14", "checkpoint": str(teacher_file), **teacher},
                          train={"epochs": 1})
        cfg["output"]["dir"] = str(Path(cfg["output"]["dir"]).with_name(name))
        return cfg

    same = kd("same")
    reference = teacher_top1(same)
    assert "teacher: its images" not in capsys.readouterr().out
    other = kd("other")
    other["data"]["mean"], other["data"]["std"] = [0.4, 0.4, 0.4], [0.2, 0.2, 0.2]
    assert abs(teacher_top1(other) - reference) <= 2.0   # rounding may move an image or two
    assert "teacher: its images renormalised to its own mean [0.5, 0.5, 0.5] std [0.25, 0.25, 0.25]" in \
        capsys.readouterr().out
    saved = safe_load(out(other) / "student.pt")
    assert saved["preprocess"]["mean"] == pytest.approx([0.4] * 3)   # the student takes the run's images
    seen_raw = kd("raw", preprocess="data")
    seen_raw["data"]["mean"], seen_raw["data"]["std"] = [0.4, 0.4, 0.4], [0.2, 0.2, 0.2]
    train(seen_raw)
    assert "renormalised" not in capsys.readouterr().out
    bigger = kd("bigger")
    bigger["data"]["synthetic_shape"] = [3, 20, 20]
    train(bigger)
    assert "resized to 16x16" in capsys.readouterr().out
    gray = kd("gray")
    gray["data"]["synthetic_shape"] = [1, 16, 16]
    with pytest.raises(SokdError, match="was trained on 3-channel images, but this data has 1"):
        train(gray)
    assert not out(gray).exists()


# -- 15. a kill anywhere before the first last.pt: the same command just runs -------------------------
@pytest.mark.parametrize("extra", [[], ["output.resume=true"]])
def test_a_kill_in_the_first_epoch_does_not_block_the_next_command(tmp_path, extra):
    cfg, run_dir = gated_config(tmp_path, "first_epoch", epochs=1)
    run = GatedRun(tmp_path, cfg, "train:3")
    run.wait_reached()
    run.proc.kill()
    run.finish()
    assert (run_dir / "metrics.jsonl").exists() and not (run_dir / "last.pt").exists()
    proc = sokd_cli("train", cfg, *extra)
    assert proc.returncode == 0, proc.stderr
    assert "killed before its first checkpoint" in proc.stdout
    assert [r["epoch"] for r in metric_rows(run_dir)] == [0, 1]


# -- 19. numbers bounded by what they can mean --------------------------------------------------------
@pytest.mark.parametrize("override,expected", [
    ("optim.lr=1e308", "bad value for 'optim.lr': Input should be less than or equal to 10"),
    ("optim.weight_decay=1e300", "bad value for 'optim.weight_decay': Input should be less than 1"),
    ("optim.betas=[2, -1]", "bad value for 'optim.betas': each beta must be in [0, 1)"),
    ("optim.momentum=1.5", "bad value for 'optim.momentum': Input should be less than 1"),
    ("train.seed=100000000000000000000", "bad value for 'train.seed': Input should be less than or equal to 4294967295"),
    ("train.seed=-100000000000", "bad value for 'train.seed': Input should be greater than or equal to -4294967295"),
    ("train.threads=100000", "so 100000 threads cannot run"),
    ("train.epochs=10000000", "bad value for 'train.epochs'"),
])
def test_numbers_that_cannot_mean_anything_are_refused(override, expected):
    with pytest.raises(SokdError) as err:
        config.load(None, ["data.name=synthetic", override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_running_out_of_memory_is_one_line_and_writes_nothing(make_config, monkeypatch, one_thread):
    from sokd.engine import loop
    cfg = make_config("vanilla", train={"epochs": 1})

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1099511627776 bytes")

    monkeypatch.setattr(loop, "_run_epoch", oom)
    with pytest.raises(SokdError, match=r"ran out of memory .*lower data.batch_size \(now 32\)"):
        train(cfg)
    assert not out(cfg).exists()


# -- 20. a second signal at any moment: one line naming the checkpoint on disk ----------------------
@pytest.mark.parametrize("gap", ["back-to-back", "after-ack"])
def test_a_second_signal_always_ends_in_one_line(tmp_path, gap):
    cfg, run_dir = gated_config(tmp_path, f"twice_{gap}", epochs=2)
    run = GatedRun(tmp_path, cfg, "train:11")
    run.wait_reached()
    run.proc.send_signal(signal.SIGINT)
    if gap == "after-ack":
        run.wait_signalled()   # the first signal is taken in; then the run heads for its checkpoint
        run.release()
    run.proc.send_signal(signal.SIGINT)
    run.release()
    code, _, err = run.finish()
    assert code in (128 + signal.SIGINT, 0), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "Exception ignored" not in err, err
    if "second SIGINT" in err:
        assert "last.pt holds the run at epoch 1" in err and "output.resume=true" in err
    else:  # the first signal's checkpoint was already written
        assert "stopped at epoch 2 step 3" in err and "output.resume=true" in err
    assert sokd_cli("train", cfg, "output.resume=true").returncode == 0


# -- 21. an unsafe pickle as weights: one line; '~' is the home directory -------------------------
def test_weights_that_would_run_code_are_refused_in_one_line(make_config, tmp_path, one_thread):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pth"
    torch.save({"stem.0.weight": Evil()}, path)
    cfg = make_config("vanilla", model={"arch": "resnet8", "weights": str(path)}, train={"epochs": 1})
    with pytest.raises(SokdError) as err:
        train(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "was refused: it would import code on load" in msg and "weights_only=False" not in msg


def test_a_tilde_in_a_path_is_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config.load(None, ["data.name=synthetic", "output.dir=~/runs/x", "imports=[]", "data.root=~/data",
                             "data.cache_dir=~/cache", "teacher.arch=resnet8", "teacher.checkpoint=~/t.pt"])
    assert cfg.run_dir == tmp_path / "runs" / "x" and cfg.teacher.checkpoint == str(tmp_path / "t.pt")
    assert cfg.data.root == str(tmp_path / "data") and cfg.data.cache_dir == str(tmp_path / "cache")


# -- 26. resume needs no teacher file: last.pt holds the teacher ------------------------------------
def test_resume_works_when_the_teacher_file_is_gone(make_config, tmp_path, teacher_file, one_thread):
    copy = tmp_path / "teacher_copy.pt"
    copy.write_bytes(teacher_file.read_bytes())
    kd = make_config("kd", teacher={"arch": "resnet14", "checkpoint": str(copy)}, train={"epochs": 1})
    train(kd)
    copy.unlink()
    resumed = yaml.safe_load(yaml.safe_dump(kd))
    resumed["train"]["epochs"], resumed["output"]["resume"] = 2, True
    summary = train(resumed)
    assert summary["epochs"] == 2


# -- 17. a resume on changed data is refused (or explicitly allowed) --------------------------------
def test_resume_on_changed_data_is_refused_unless_allowed(make_config, tmp_path, one_thread):
    from .test_data import write_npz
    npz = write_npz(tmp_path / "data.npz", n_train=64, n_test=16, classes=4, hw=16)
    cfg = make_config("vanilla", train={"epochs": 1})
    cfg["data"] = {"name": "cifar10", "root": str(npz), "batch_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    train(cfg)
    arrays = dict(__import__("numpy").load(npz))
    arrays["x_train"][5, 3, 3, 1] ^= 0xFF                  # one pixel changes
    __import__("numpy").savez(npz, **arrays)
    resumed = {**cfg, "train": {**cfg["train"], "epochs": 2}, "output": {**cfg["output"], "resume": True}}
    before = tree(out(cfg))
    with pytest.raises(SokdError, match=r"the training data changed since '.*last.pt' was written; put the data "
                                        r"back .* or continue on the new data with output.allow_data_change=true"):
        train(resumed)
    assert tree(out(cfg)) == before
    resumed["output"]["allow_data_change"] = True
    assert train(resumed)["epochs"] == 2
    # per-sample state (CRD's memory) cannot follow a data set of another size: one line, not a traceback
    crd = make_config("kd", teacher={"arch": "resnet8", "checkpoint": str(out(cfg) / "model.pt")}, train={"epochs": 1})
    crd["method"]["features"] = [{"kind": "crd", "options": {"nce_k": 16, "feat_dim": 8}}]
    crd["data"] = {**cfg["data"]}
    crd["output"]["dir"] = str(tmp_path / "runs" / "crd")
    train(crd)
    write_npz(npz, n_train=96, n_test=16, classes=4, hw=16)
    grown = {**crd, "train": {**crd["train"], "epochs": 2},
             "output": {**crd["output"], "resume": True, "allow_data_change": True}}
    with pytest.raises(SokdError, match=r"last.pt' \(for 64 training images; the data now have 96\) does not fit"):
        train(grown)


# -- signs of life when stdout is not a terminal ------------------------------------------------------
def test_a_run_off_a_terminal_prints_a_progress_line_at_a_bounded_cadence(monkeypatch, capsys):
    from sokd.engine import progress
    clock = {"now": 1000.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock["now"])
    bar = progress.epoch_progress(total=100, initial=0, desc="epoch 1/3", show=True)  # captured: no TTY
    assert isinstance(bar, progress.PlainProgress)
    for step in range(100):
        clock["now"] += 1.0          # one step a second: a line every 30 steps
        bar.set_postfix(loss="0.123")
        bar.update(1)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"epoch 1/3: step {n}/100 ({n}%), loss 0.123" for n in (30, 60, 90)]
    assert not isinstance(progress.epoch_progress(10, 0, "x", show=False), progress.PlainProgress)
