"""Faults at the edges of sokd's file I/O: full disks, unusable checkpoints, damaged run files and
bad bench arguments are each one `sokd: error:` line (exit 2) that leaves the disk as it was."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sokd import export
from sokd.cli import main
from sokd import files
from sokd.errors import SokdError

from .conftest import tiny_config, write_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*torch.jit.*is deprecated:FutureWarning")]

NO_SPACE = r"no space left on device writing '.+' \(needed ~[\d.]+ MB(, [\d.]+ MB free)?\); free space or "


def sokd(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m sokd ARGS` in a child process (one thread), as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sokd", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def assert_refused(result: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit 2 with exactly one stderr line, a user error matching `pattern`; that line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith("sokd: error: ") and "internal error" not in lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def refused_in_process(capsys, *args) -> str:
    """`sokd ARGS` through the CLI entry point in this process: exit 2, one error line; that line."""
    assert main([str(a) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sokd: error: "), lines
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- a real, nearly full file system
@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A 1 MiB tmpfs holding a filler file and a note, with ~130 KB left: small files (a config,
    metrics lines) still fit, a checkpoint or an exported model does not."""
    mount = tmp_path / "full"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err})")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        (mount / "note.txt").write_text("written before sokd ran\n")
        (mount / "filler").write_bytes(b"\0" * (shutil.disk_usage(mount).free - 130 * 1024))
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_train_onto_a_full_disk_names_it_and_leaves_the_disk_as_it_was(tmp_path, full_disk):
    cfg = tiny_config(tmp_path, "vanilla", train={"epochs": 1, "steps_per_epoch": 2, "seed": 0},
                      output={"dir": str(full_disk / "run"), "tensorboard": False, "progress": False})
    before = snapshot(full_disk)
    line = assert_refused(sokd("train", write_config(tmp_path, cfg), cwd=tmp_path), NO_SPACE)
    assert "last.pt" in line and line.endswith("free space or set output.dir elsewhere")
    assert temp_files(full_disk) == []
    after = snapshot(full_disk)
    assert {k: after.get(k) for k in before} == before


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_onto_a_full_disk_names_it_and_keeps_the_old_file(tmp_path, full_disk, teacher_file, fmt):
    target = full_disk / f"model{export.EXTENSIONS[fmt]}"
    earlier = export.export(teacher_file, fmt, out=tmp_path, images=8).path  # an earlier export, in the
    (full_disk / "filler").unlink()                                         # place of part of the filler
    shutil.copyfile(earlier, target)
    (full_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(full_disk).free - 130 * 1024))
    before = snapshot(full_disk)
    result = sokd("export", teacher_file, "--format", fmt, "--out", full_disk, "--images", 8, "--overwrite",
                  cwd=tmp_path)
    line = assert_refused(result, NO_SPACE)
    assert str(target) in line and line.endswith("free space or pass --out elsewhere")
    assert temp_files(full_disk) == [] and snapshot(full_disk) == before


def test_a_write_that_meets_the_full_disk_itself_removes_its_temporary_file(full_disk, monkeypatch):
    """With the free-space check blinded, the kernel's own ENOSPC is what sokd reports."""
    monkeypatch.setattr(files, "free_bytes", lambda path: None)
    before = snapshot(full_disk)
    with pytest.raises(SokdError, match=NO_SPACE):
        files.atomic_save({"w": torch.zeros(2 ** 19)}, full_disk / "last.pt")  # 2 MiB
    assert temp_files(full_disk) == [] and snapshot(full_disk) == before


# ---------------------------------------------------------------- injected ENOSPC / EDQUOT
def _failing_write(code: int, after: int):
    """os.write that writes `after` bytes, then fails with errno `code` (a disk filling up)."""
    real, written = os.write, [0]

    def write(fd, data):
        if written[0] >= after:
            raise OSError(code, os.strerror(code))
        n = real(fd, bytes(data[: after - written[0]]))
        written[0] += n
        return n
    return write


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("writer", ["atomic_save", "atomic_write_text"])
def test_injected_full_disk_keeps_the_old_file(tmp_path, monkeypatch, code, writer):
    target = tmp_path / "last.pt"
    target.write_bytes(b"the previous checkpoint")
    write = (lambda: files.atomic_save({"w": torch.ones(1000)}, target)) if writer == "atomic_save" \
        else (lambda: files.atomic_write_text(target, "x" * 10000))
    monkeypatch.setattr(os, "write", _failing_write(code, after=4096))
    with pytest.raises(SokdError, match=NO_SPACE + "set output.dir elsewhere$"):
        write()
    monkeypatch.undo()
    assert target.read_bytes() == b"the previous checkpoint" and temp_files(tmp_path) == []


def test_full_disk_at_fsync_and_too_little_free_space_are_refused(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SokdError, match=NO_SPACE):
        files.atomic_write_text(target, "a: 1\n")
    monkeypatch.undo()
    # too little room is refused before a temporary file is even created
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    with pytest.raises(SokdError, match=r"needed ~0\.38 MB, 0\.10 MB free"):
        files.atomic_write_text(target, "x" * 400_000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_write_failing_with_enospc_keeps_the_old_file(tmp_path, teacher_file, monkeypatch, fmt):
    item = export.load_exportable(teacher_file)
    target = tmp_path / f"model{export.EXTENSIONS[fmt]}"
    target.write_bytes(b"an earlier export")
    monkeypatch.setattr(os, "write", _failing_write(errno.ENOSPC, after=4096))
    with pytest.raises(SokdError, match=NO_SPACE + "pass --out elsewhere$"):
        export.export_network(item, fmt, target, torch.randn(4, 3, 16, 16))
    monkeypatch.undo()
    assert target.read_bytes() == b"an earlier export" and temp_files(tmp_path) == []


# ---------------------------------------------------------------- checkpoints eval / export refuse
@pytest.fixture
def nan_model(tmp_path, teacher_file) -> Path:
    ckpt = torch.load(teacher_file, weights_only=True)
    ckpt["state_dict"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v
                          for k, v in ckpt["state_dict"].items()}
    path = tmp_path / "nan.pt"
    torch.save(ckpt, path)
    return path


NON_FINITE = r"checkpoint '.+' holds non-finite weights \(\d+ tensors?, e\.g\. \S+\); use an earlier checkpoint such as "


def test_eval_and_export_refuse_non_finite_weights(tmp_path, nan_model, teacher_file, capsys):
    assert_refused(sokd("eval", nan_model, cwd=tmp_path), NON_FINITE + "best.pt$")
    line = refused_in_process(capsys, "export", nan_model, "--format", "torchscript", "--out", tmp_path)
    assert re.search(NON_FINITE, line) and "e.g. stem." in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pt"]
    # a run checkpoint with one infinite value: its name includes the role
    run = torch.load(teacher_file.parent / "last.pt", weights_only=True)
    name = next(k for k in run["method"] if k.endswith("weight"))
    tensor = run["method"][name]
    tensor[(0,) * tensor.dim()] = float("inf")
    torch.save(run, tmp_path / "last.pt")
    line = refused_in_process(capsys, "eval", tmp_path / "last.pt")
    assert f"(1 tensor, e.g. {name})" in line


def test_eval_and_export_refuse_data_with_other_classes_or_image_shape(tmp_path, teacher_file, capsys):
    assert_refused(sokd("eval", teacher_file, "data.synthetic_classes=10", cwd=tmp_path),
                   r"'.+model\.pt' was trained for 4 classes but data set synthetic has 10; "
                   r"evaluate it on the data it was trained on$")
    line = refused_in_process(capsys, "eval", teacher_file.parent / "last.pt", "data.synthetic_shape=[1,16,16]")
    assert "was trained on 3x16x16 images but data set synthetic has 1x16x16" in line
    line = refused_in_process(capsys, "export", teacher_file, "data.synthetic_classes=10", "--format",
                              "torchscript", "--out", tmp_path)
    assert "was trained for 4 classes but data set synthetic has 10" in line
    assert list(tmp_path.iterdir()) == []


def test_eval_and_export_refuse_damaged_checkpoints(tmp_path, teacher_file, capsys):
    good = torch.load(teacher_file, weights_only=True)
    run = torch.load(teacher_file.parent / "last.pt", weights_only=True)
    cases = {
        "no_config.pt": {"format": "sokd-run"},
        "no_arch.pt": {"format": "sokd-model"},
        "bad_state.pt": {**good, "state_dict": [1]},
        "no_preprocess.pt": {k: v for k, v in good.items() if k != "preprocess"},
        "bad_config.pt": {**run, "config": {**run["config"], "train": {"epochs": "many"}}},
    }
    for name, ckpt in cases.items():
        torch.save(ckpt, tmp_path / name)
        for command in (["eval"], ["export", "--format", "onnx", "--out", tmp_path / "x.onnx"]):
            line = refused_in_process(capsys, command[0], tmp_path / name, *command[1:])
            assert f"checkpoint '{tmp_path / name}' is damaged or was not written by this sokd (" in line, line
    (tmp_path / "empty_dir").mkdir()
    assert "not found" in refused_in_process(capsys, "eval", tmp_path / "empty_dir")
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------- sokd report on damaged runs
def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("summary.json", "metrics.jsonl"):
        shutil.copyfile(src / name, dst / name)
    return dst


def test_report_names_a_truncated_summary(tmp_path, teacher_file):
    run = _copy_run(teacher_file.parent, tmp_path / "runs" / "a")
    (run / "summary.json").write_text((run / "summary.json").read_text()[:100])
    assert_refused(sokd("report", tmp_path / "runs", cwd=tmp_path),
                   r"'.+summary\.json' is truncated or not valid JSON \(.+\); restore it from a copy or "
                   r"leave this run out of the report$")


def _truncate_last_line(run):
    path = run / "metrics.jsonl"
    path.write_text(path.read_text()[:-40])


def _metrics_directory(run):
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()


def _summary_list(run):
    (run / "summary.json").write_text("[1, 2]\n")


def _summary_wrong_type(run):
    summary = json.loads((run / "summary.json").read_text())
    summary["networks"]["model"]["top1_final"] = "high"
    (run / "summary.json").write_text(json.dumps(summary))


def _no_metrics(run):
    (run / "metrics.jsonl").unlink()


@pytest.mark.parametrize("damage, expected", [
    (_truncate_last_line, r"metrics\.jsonl' line 3 is truncated or not valid JSON"),
    (_metrics_directory, r"metrics\.jsonl' is a directory, not a file sokd wrote"),
    (_summary_list, r"summary\.json' is not a sokd run summary \(a JSON list, not an object\)"),
    (_summary_wrong_type, r"summary\.json' is not a sokd run summary \(networks\.model lacks numeric"),
    (_no_metrics, r"metrics\.jsonl' is missing"),
])
def test_report_names_the_damaged_file(tmp_path, teacher_file, capsys, damage, expected):
    run = _copy_run(teacher_file.parent, tmp_path / "runs" / "a")
    damage(run)
    before = snapshot(tmp_path)
    line = refused_in_process(capsys, "report", tmp_path / "runs", "--out", tmp_path / "out")
    assert re.search(expected, line) and line.endswith("leave this run out of the report"), line
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_report_out_that_is_a_file_is_refused(tmp_path, teacher_file, capsys):
    _copy_run(teacher_file.parent, tmp_path / "runs" / "a")
    (tmp_path / "out").write_text("mine")
    line = refused_in_process(capsys, "report", tmp_path / "runs", "--out", tmp_path / "out")
    assert "--out" in line and "is a file, not a folder" in line
    assert (tmp_path / "out").read_text() == "mine"


# ---------------------------------------------------------------- sokd bench arguments
def test_bench_batch_zero_is_refused(tmp_path):
    assert_refused(sokd("bench", "--batch", 0, cwd=tmp_path), r"--batch must be an integer >= 1, got 0$")


@pytest.mark.parametrize("args, expected", [
    (["--batch", "-3"], "--batch must be an integer >= 1"),
    (["--reps", "0"], "--reps must be an integer >= 1"),
    (["--steps-per-rep", "0"], "--steps-per-rep must be an integer >= 1"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0"),
    (["--classes", "0"], "--classes must be an integer >= 1"),
    (["--input", "3x32"], "--input must be three positive sizes CxHxW"),
    (["--input", "3xax32"], "--input must be CxHxW with integer sizes"),
    (["--input", "3x0x32"], "--input must be three positive sizes CxHxW"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--teacher", "nope"], "unknown model 'nope'"),
    (["--methods", "sokdd"], "unknown bench variant 'sokdd' (did you mean 'sokd'?)"),
])
def test_bench_refuses_unusable_arguments_before_timing(capsys, args, expected):
    assert expected in refused_in_process(capsys, "bench", *args)


def test_bench_json_that_is_a_directory_is_refused_before_timing(tmp_path, capsys):
    line = refused_in_process(capsys, "bench", "--json", tmp_path)
    assert f"--json '{tmp_path}' is a directory" in line

