"""What sokd writes and reads around a run: export targets, reports over copied runs, exported
files given back to eval / export, compile without a compiler, an unreachable MLflow server, and
partial networks named as a teacher. Each mistake is one `sokd: error:` line, exit 2, nothing
written."""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from sokd import artifacts, config, export, report, runner
from sokd.cli import main
from sokd.engine import compiled
from sokd.errors import SokdError

from .conftest import tiny_config, write_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*torch.jit.*is deprecated:FutureWarning")]


def refused(capsys, *args) -> str:
    """`sokd ARGS` in this process: exit 2 and exactly one `sokd: error:` line; that line."""
    assert main([str(a) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sokd: error: ") and "internal error" not in lines[0], lines
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, teacher_file) -> dict[str, Path]:
    """The teacher exported once to each format."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("exports")
    return {fmt: export.export(teacher_file, fmt, out=out / f"teacher{export.EXTENSIONS[fmt]}", images=8).path
            for fmt in export.FORMATS}


# ------------------------------------------------------------------ sokd export: its target
def test_export_refuses_an_existing_target_unless_overwrite(tmp_path, teacher_file, capsys):
    target = tmp_path / "model.torchscript.pt"
    assert main(["export", str(teacher_file), "--format", "torchscript", "--out", str(target), "--images", "8"]) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    line = refused(capsys, "export", teacher_file, "--format", "torchscript", "--out", target, "--images", 8)
    assert line == (f"sokd: error: '{target}' already holds a TorchScript model written by sokd export (role "
                    f"model, resnet14, 4 classes); pass --overwrite to replace it, or --out another file")
    assert snapshot(tmp_path) == before
    # a folder as --out: its <role><ext> is the target, checked once the role is known
    line = refused(capsys, "export", teacher_file, "--format", "torchscript", "--out", tmp_path, "--images", 8)
    assert line.startswith(f"sokd: error: '{target}' already holds a TorchScript model written by sokd export")
    assert snapshot(tmp_path) == before
    assert main(["export", str(teacher_file), "--format", "torchscript", "--out", str(target), "--images", "8",
                 "--overwrite"]) == 0
    assert export.read_metadata(target)["role"] == "model"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary file left


def test_export_never_replaces_run_files_or_other_files_even_with_overwrite(tmp_path, teacher_file, exports,
                                                                            capsys):
    run = tmp_path / "run"
    shutil.copytree(teacher_file.parent, run)
    mine = tmp_path / "student.onnx"
    mine.write_text("the user's own model")
    ts_named_onnx = tmp_path / "other.onnx"
    shutil.copyfile(exports["torchscript"], ts_named_onnx)
    before = snapshot(tmp_path)
    lines = {}
    for name, target, fmt in [("last.pt", run / "last.pt", "torchscript"), ("config.yaml", run / "config.yaml", "onnx"),
                              ("model.pt", run / "model.pt", "torchscript"), ("mine", mine, "onnx"),
                              ("other format", ts_named_onnx, "onnx")]:
        lines[name] = refused(capsys, "export", teacher_file, "--format", fmt, "--out", target, "--overwrite")
    assert lines["last.pt"] == (f"sokd: error: '{run / 'last.pt'}' is a run file name (last.pt); sokd export never "
                                f"writes over a run's files, even with --overwrite, so pass --out another file "
                                f"(e.g. '{run / 'last-1.torchscript.pt'}')")
    assert "is a run file name (config.yaml)" in lines["config.yaml"]
    assert lines["model.pt"] == (f"sokd: error: '{run / 'model.pt'}' exists and is a sokd checkpoint or model file; "
                                 f"sokd export replaces only its own torchscript exports (even with --overwrite), "
                                 f"so pass --out another file (e.g. '{run / 'model-1.torchscript.pt'}')")
    assert f"'{mine}' exists and is not a sokd export; sokd export replaces only its own onnx exports" in lines["mine"]
    assert "exists and is a TorchScript model written by sokd export" in lines["other format"]
    assert snapshot(tmp_path) == before


def test_export_never_writes_through_a_symlink(tmp_path, teacher_file, exports, capsys):
    real = tmp_path / "real.onnx"
    shutil.copyfile(exports["onnx"], real)
    link = tmp_path / "link.onnx"
    link.symlink_to(real)
    dangling = tmp_path / "dangling.onnx"
    dangling.symlink_to(tmp_path / "nowhere.onnx")
    before = snapshot(tmp_path)
    line = refused(capsys, "export", teacher_file, "--format", "onnx", "--out", link, "--overwrite")
    assert line.startswith(f"sokd: error: --out '{link}' is a symbolic link; sokd export never writes through a link")
    assert "is a symbolic link" in refused(capsys, "export", teacher_file, "--format", "onnx", "--out", dangling)
    assert snapshot(tmp_path) == before and link.is_symlink() and not (tmp_path / "nowhere.onnx").exists()


def test_a_target_that_appears_during_the_export_is_not_replaced(tmp_path, teacher_file, monkeypatch):
    target = tmp_path / "late.torchscript.pt"
    real = export._test_images

    def images_then_a_file_appears(*args):
        target.write_text("written meanwhile by someone else")
        return real(*args)
    monkeypatch.setattr(export, "_test_images", images_then_a_file_appears)
    with pytest.raises(SokdError, match="exists and is not a sokd export"):
        export.export(teacher_file, "torchscript", out=target, images=8)
    assert target.read_text() == "written meanwhile by someone else"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


# ------------------------------------------------------------------ sokd eval / export of an export
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_eval_and_export_of_an_exported_file_say_what_it_is_and_how_to_run_it(tmp_path, exports, teacher_file,
                                                                              capsys, fmt):
    path = exports[fmt]
    run_it = {"torchscript": f"torch.jit.load('{path}')(x)",
              "onnx": f"onnxruntime.InferenceSession('{path}').run(['logits'], {{'images': x}})"}[fmt]
    kind = {"torchscript": "a TorchScript", "onnx": "an ONNX"}[fmt]
    line = refused(capsys, "eval", path)
    assert line == (f"sokd: error: '{path}' is {kind} model written by sokd export (role model, resnet14, "
                    f"4 classes), not a checkpoint sokd eval reads; run it with {run_it} on float32 Nx3x16x16 "
                    f"images, x = (uint8 / 255 - mean) / std with mean [0.5, 0.5, 0.5] std [0.25, 0.25, 0.25]; "
                    f"or eval the checkpoint it came from: sokd eval {teacher_file}")
    line = refused(capsys, "export", path, "--format", "onnx", "--out", tmp_path)
    assert f"'{path}' is {kind} model written by sokd export" in line and "not a checkpoint sokd export reads" in line
    assert line.endswith(f"; or export the checkpoint it came from: sokd export {teacher_file}")
    assert list(tmp_path.iterdir()) == []
    assert export.sniff(teacher_file) is None and export.sniff(teacher_file.parent / "last.pt") is None


# ------------------------------------------------------------------ sokd report: copies and leftovers
def _second_seed(src: Path, dst: Path) -> None:
    """A run of the same name with another seed (its own numbers)."""
    dst.mkdir(parents=True)
    summary = json.loads((src / "summary.json").read_text())
    summary["seed"] = 1
    summary["networks"]["model"]["top1_final"] -= 5.0
    (dst / "summary.json").write_text(json.dumps(summary))
    rows = [json.loads(line) for line in (src / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["wall_time_s"] = rows[-1].get("wall_time_s", 0.0) + 1.0
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_counts_each_run_once_and_never_reads_set_aside_folders(tmp_path, teacher_file, capsys):
    runs = tmp_path / "runs"
    a = runs / "vanilla"
    shutil.copytree(teacher_file.parent, a)
    shutil.copytree(a, runs / "vanilla-copy")                       # a copied run folder
    shutil.copytree(a, runs / "backup" / "vanilla")                 # and a backup of it
    _second_seed(a, runs / "vanilla-s1")                            # a genuine second seed
    aside = a / ".sokd-replaced"                                    # an overwrite's set-aside run
    aside.mkdir()
    (aside / "summary.json").write_text("{truncated")              # read, it would stop the report
    shutil.copyfile(a / "metrics.jsonl", aside / "metrics.jsonl")
    shutil.copytree(a, runs / ".trash" / "vanilla")                # any dot folder is skipped too
    (runs / "vanilla-copy" / "summary.json").write_text(           # re-saved with other whitespace
        json.dumps(json.loads((a / "summary.json").read_text()), indent=4))
    (runs / "x").mkdir()
    shutil.copytree(a, runs / "x" / ".sokd-replaced")              # a run dir mid-overwrite

    assert main(["report", str(runs)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| vanilla"))
    assert "| 2 " in row, row                                       # two seeds, not five
    note = out.strip().splitlines()[-1]
    kept = runs / "backup" / "vanilla"  # the first in path order stands for the run
    assert note == (f"note: 2 copies of runs already counted were ignored (same name, seed, summary and metrics): "
                    f"{a} (same run as {kept}), {runs / 'vanilla-copy'} (same run as {kept})")
    assert report.build([str(runs)])["copies_ignored"] == 2
    assert report.build([str(runs), str(a)])["copies_ignored"] == 2  # a folder named twice is one folder
    with pytest.raises(SokdError, match="no finished runs"):  # only a set-aside run in it
        report.find_runs([str(runs / "x")])
    line = refused(capsys, "report", aside)
    assert "set aside" in line and "report its parent run directory instead" in line


def test_report_identity_is_what_the_run_recorded():
    def run(seed, wall):
        return {"dir": Path(f"r{seed}-{wall}"), "summary": {"name": "kd", "method": "kd", "seed": seed},
                "metrics": [{"epoch": 1, "wall_time_s": wall}]}
    kept, copies = report.unique([run(0, 1.0), run(0, 1.0), run(1, 1.0), run(0, 2.0)])
    assert [r["dir"].name for r in kept] == ["r0-1.0", "r1-1.0", "r0-2.0"]  # a re-run is its own run
    assert len(copies) == 1 and report.copies_note(copies) == (
        "note: 1 copy of a run already counted was ignored (same name, seed, summary and metrics): "
        "r0-1.0 (same run as r0-1.0)")
    assert report.copies_note([]) == ""


# ------------------------------------------------------------------ train.compile without a compiler
def test_compile_without_a_cpp_compiler_is_one_line_before_anything_is_written(tmp_path, teacher_file, capsys,
                                                                               monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "inductor")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    tried = ", ".join(compiled.cpp_compilers())
    cfg = tiny_config(tmp_path, "vanilla", train={"epochs": 1, "steps_per_epoch": 2, "compile": True})
    line = refused(capsys, "train", write_config(tmp_path, cfg))
    assert line == (f"sokd: error: train.compile compiles the training step with a C++ compiler on the CPU, but "
                    f"none was found (tried: {tried}); install a C++ compiler (e.g. apt-get install g++) or set "
                    f"train.compile=false")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SokdError, match=r"or drop --compile$"):
        compiled.check_setting(True, torch.device("cpu"), "--compile")
    compiled.check_setting(False, torch.device("cpu"))  # off: nothing to check


def test_compile_with_cxx_naming_a_missing_program_is_refused(monkeypatch):
    from torch._inductor import config as inductor_config
    monkeypatch.setattr(compiled, "BACKEND", "inductor")
    monkeypatch.delenv("TORCH_INDUCTOR_INSTALL_GXX", raising=False)
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/bin/g++"))
    with pytest.raises(SokdError, match=r"\(tried: /nonexistent/bin/g\+\+\); install a C\+\+ compiler"):
        compiled.check_setting("max-autotune", torch.device("cpu"))
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")  # a backend that generates no code needs none
    compiled.check_setting(True, torch.device("cpu"))
    if shutil.which("g++"):
        monkeypatch.setattr(compiled, "BACKEND", "inductor")
        monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "g++"))
        compiled.check_setting(True, torch.device("cpu"))


# ------------------------------------------------------------------ an unreachable MLflow server
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mlflow_server_is_one_line_at_once_and_nothing_written(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = tiny_config(tmp_path, "vanilla", train={"epochs": 1, "steps_per_epoch": 2})
    cfg["output"]["mlflow"] = {"uri": uri}
    # "at once": one probe (one TCP connection, bounded by its timeout), no MLflow request and no
    # waiting (MLflow's retries back off with time.sleep). The probe waits for its connection here,
    # so the line does not depend on how soon its thread runs on a busy machine.
    from sokd.engine.tracking import mlflow_tracker as mt
    probes, sleeps, real_probe, real_sleep = [], [], mt.probe, time.sleep

    def probe(host, port, timeout=mt.PROBE_TIMEOUT):
        probes.append((host, port, timeout))
        return real_probe(host, port, timeout=None)

    def sleep(seconds):
        if threading.current_thread() is threading.main_thread():
            sleeps.append(seconds)
        real_sleep(seconds)
    monkeypatch.setattr(mt, "probe", probe)
    monkeypatch.setattr(time, "sleep", sleep)
    line = refused(capsys, "train", write_config(tmp_path, cfg))
    monkeypatch.undo()
    assert probes == [("127.0.0.1", int(uri.rsplit(":", 1)[1]), mt.PROBE_TIMEOUT)] and sleeps == []
    assert line == (f"sokd: error: cannot reach MLflow at {uri} (connection refused); start the server, fix "
                    f"output.mlflow.uri, or drop it for a local store")
    assert not (tmp_path / "runs").exists()


def test_mlflow_probe_gives_up_within_its_timeout(monkeypatch):
    """The probe's only wait is one join of its connection thread, bounded by its timeout, and it
    answers while a connection attempt that ignores the timeout is still hanging (asserted on
    what the probe waits for, not on the clock)."""
    from sokd.engine.tracking import mlflow_tracker as mt
    joins = []

    class Thread(threading.Thread):
        def join(self, timeout=None):
            joins.append(timeout)
            assert timeout is not None, "the probe waits for its connection without a bound"
            super().join(timeout)
    monkeypatch.setattr(mt, "threading", types.SimpleNamespace(Thread=Thread))
    reason = mt.probe("10.255.255.1", 9, timeout=0.5)  # a non-routable address (a proxy may answer for it)
    assert joins == [0.5] and (reason is None or isinstance(reason, str))

    # a name lookup or SYN that gets no answer (the thread of the probe above may still be
    # connecting to its own address: only attempts on mlflow.example count here)
    hang, started, ended, connects = threading.Event(), threading.Event(), threading.Event(), []

    def hanging(address, timeout=None, *args, **kwargs):
        if address[0] == "mlflow.example":
            connects.append((address, timeout))
            started.set()
        hang.wait()
        ended.set()
        raise socket.timeout("timed out")
    monkeypatch.setattr(mt.socket, "create_connection", hanging)
    try:
        joins.clear()
        assert mt.probe("mlflow.example", 5000, timeout=0.3) == "no answer within 0.3 s"
        assert not ended.is_set()   # it answered without waiting for the attempt to end
        started.wait()              # the attempt itself was bounded by the same timeout
        assert joins == [0.3] and connects == [(("mlflow.example", 5000), 0.3)]
        with pytest.raises(SokdError, match=r"^cannot reach MLflow at http://me:\*\*\*@mlflow.example:5000 "
                                            r"\(no answer within 0\.3 s\); start the server"):
            mt.check_reachable("http://me:secret@mlflow.example:5000", timeout=0.3)
        assert not ended.is_set() and joins == [0.3, 0.3]
    finally:
        hang.set()   # the abandoned attempts end
    assert mt.server_address("https://mlflow.example/x") == ("mlflow.example", 443)
    assert mt.server_address("postgresql+psycopg2://u:p@db:6543/m") == ("db", 6543)
    assert mt.server_address("sqlite:///x.db") is None and mt.server_address("file:///tmp/m") is None


# ------------------------------------------------------------------ a part of a network as teacher
@pytest.fixture(scope="module")
def online_runs(tmp_path_factory, teacher_file) -> dict[str, Path]:
    """One-epoch SOKD and ONE runs (two steps each); their run dirs."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("parts")
    dirs = {}
    for method in ("sokd", "one"):
        cfg = tiny_config(tmp, method, train={"epochs": 1, "steps_per_epoch": 2})
        if "teacher" in cfg:
            cfg["teacher"]["checkpoint"] = str(teacher_file)
        runner.train(config.build(cfg))
        dirs[method] = Path(cfg["output"]["dir"])
    return dirs


def test_a_partial_role_as_teacher_names_the_whole_networks(tmp_path, online_runs, capsys):
    sokd_last, one_last = online_runs["sokd"] / "last.pt", online_runs["one"] / "last.pt"
    cfg = tiny_config(tmp_path, "kd", train={"epochs": 1, "steps_per_epoch": 2})
    cfg["teacher"] = {"arch": "resnet14", "checkpoint": str(sokd_last), "checkpoint_role": "kbm"}
    line = refused(capsys, "train", write_config(tmp_path, cfg))
    assert line == (f"sokd: error: role 'kbm' of checkpoint '{sokd_last}' is not a whole network (SOKD's knowledge "
                    f"bridge: the teacher's last stage(s) and head); whole networks in it: student, teacher (set "
                    f"checkpoint_role to one of them); for it as a classifier use its model file "
                    f"{online_runs['sokd'] / 'teacher_branch.pt'}")
    cfg["teacher"] = {"arch": "resnet8", "checkpoint": str(one_last), "checkpoint_role": "branch2"}
    line = refused(capsys, "train", write_config(tmp_path, cfg))
    assert line == (f"sokd: error: role 'branch2' of checkpoint '{one_last}' is not a whole network (ONE's branch: "
                    f"the student's last stage(s) and head); whole networks in it: student (set checkpoint_role "
                    f"to one of them); for it as a classifier use its model file "
                    f"{online_runs['one'] / 'branch2.pt'}")
    cfg["teacher"]["checkpoint_role"] = "gate"
    assert "role 'gate' of checkpoint" in refused(capsys, "train", write_config(tmp_path, cfg))
    assert not (tmp_path / "runs").exists()
    # the whole networks still load, and so do the standalone files the messages point to
    ckpt = torch.load(sokd_last, weights_only=True)
    from sokd import models
    from sokd.files import load_state_strict
    for role, arch in (("teacher", "resnet14"), ("student", "resnet8")):
        load_state_strict(models.create(arch, num_classes=4), artifacts.network_state(ckpt, str(sokd_last), role), role)
    assert (online_runs["sokd"] / "teacher_branch.pt").is_file() and (online_runs["one"] / "branch2.pt").is_file()
