"""sokd export: TorchScript / ONNX files that match PyTorch, record their preprocessing, fail cleanly."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from sokd import config, export, runner
from sokd.commands import export as export_cmd
from sokd.errors import SokdError

from .conftest import tiny_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*torch.jit.*is deprecated:FutureWarning")]


@pytest.fixture(scope="module")
def sokd_run(tmp_path_factory, teacher_file) -> Path:
    """A one-epoch SOKD run (resnet14 teacher -> resnet8 student) on the synthetic set; its run dir."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("sokd_export")
    cfg = tiny_config(tmp, "sokd", train={"epochs": 1, "steps_per_epoch": 3})
    cfg["teacher"]["checkpoint"] = str(teacher_file)
    runner.train(config.build(cfg))
    return Path(cfg["output"]["dir"])


def cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="sokd")
    sub = parser.add_subparsers(dest="command", required=True)
    export_cmd.add_parser(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.run(args)


def ort_logits(path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def test_zoo_model_file_to_onnx_and_torchscript_match_pytorch(teacher_file, tmp_path, capsys):
    item = export.load_exportable(teacher_file)
    assert item.role == "model" and item.arch["arch"] == "resnet14"
    x = torch.randn(5, 3, 16, 16)  # another batch size than the parity check's: the batch axis is free
    with torch.no_grad():
        ref = item.net(x)

    assert cli("export", teacher_file, "--format", "onnx", "--out", tmp_path) == 0
    line = capsys.readouterr().out.splitlines()[0]
    onnx_path = tmp_path / "model.onnx"
    assert line.startswith(f"wrote {onnx_path} (onnx, opset 17): max |logit diff| vs PyTorch on 64 test images = ")
    assert float(line.rsplit("= ", 1)[1]) <= 1e-4
    assert (ort_logits(onnx_path, x) - ref).abs().max().item() < 1e-4

    result = export.export(teacher_file, "torchscript", out=tmp_path / "teacher.ts")
    assert result.max_abs_diff <= 1e-4 and result.images == 64 and result.opset is None
    scripted = torch.jit.load(str(result.path))
    with torch.no_grad():
        assert (scripted(x) - ref).abs().max().item() < 1e-4
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind

    # the recorded preprocessing reads back, from both formats, with the plain libraries
    import onnx
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    from_onnx = json.loads(props["sokd.json"])
    extra = {"sokd.json": ""}
    torch.jit.load(str(result.path), _extra_files=extra)
    from_ts = json.loads(extra["sokd.json"])
    for meta in (from_onnx, from_ts, export.read_metadata(onnx_path), export.read_metadata(result.path)):
        assert meta["arch"] == "resnet14" and meta["role"] == "model" and meta["num_classes"] == 4
        assert meta["input"]["shape"] == [3, 16, 16] and meta["input"]["layout"] == "NCHW"
        assert meta["input"]["mean"] == [0.5] * 3 and meta["input"]["std"] == [0.25] * 3
        assert meta["class_names"] == [f"class_{i}" for i in range(4)]
        assert meta["data"] == "synthetic" and meta["source"]["format"] == "sokd-model"
    assert zipfile.is_zipfile(result.path)


def test_sokd_teacher_branch_from_model_file_and_run_checkpoint(sokd_run, tmp_path, capsys):
    from sokd.data import DataConfig
    from sokd.data import create as create_data
    test_images = next(iter(create_data(DataConfig(
        name="synthetic", synthetic_size=256, synthetic_shape=[3, 16, 16], synthetic_classes=4,
        eval_batch_size=64)).test))[0]

    from_file = export.export(sokd_run / "teacher_branch.pt", "onnx", out=tmp_path / "branch_file.onnx")
    assert cli("export", sokd_run / "last.pt", "--format", "onnx", "--role", "teacher_branch",
               "--out", tmp_path / "branch_run.onnx") == 0
    assert "(onnx, opset 17)" in capsys.readouterr().out
    a = ort_logits(from_file.path, test_images)
    b = ort_logits(tmp_path / "branch_run.onnx", test_images)
    assert (a - b).abs().max().item() < 1e-5  # same weights, whichever file they came from

    # the teacher branch is the run's trunk + KBM: its logits are the run's "kbm" predictions
    item = export.load_exportable(sokd_run / "last.pt", "teacher_branch")
    assert item.arch["arch"] == "resnet14" and item.source["method"] == "sokd"
    whole = export.load_exportable(sokd_run / "last.pt", "student")  # rebuilds the whole method
    assert whole.role == "student"
    method = runner.build_method(
        config.build({**tiny_config(tmp_path, "sokd"), "teacher": {"arch": "resnet14"}}), 4, (3, 16, 16),
        require_trained=False)
    method.load_state_dict(torch.load(sokd_run / "last.pt", weights_only=True)["method"])
    method.eval()
    assert (a - method.predict(test_images)["kbm"]).abs().max().item() < 1e-4

    meta = export.read_metadata(tmp_path / "branch_run.onnx")
    assert meta["role"] == "teacher_branch" and meta["source"] == {
        "checkpoint": str(sokd_run / "last.pt"), "format": "sokd-run", "method": "sokd", "epoch": 1}
    assert from_file.metadata["role"] == "teacher_branch" and from_file.max_abs_diff <= 1e-4


def test_run_checkpoint_default_role_and_torchscript(sokd_run, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(sokd_run, work)
    result = export.export(work / "last.pt", "torchscript")  # default: the primary network, next to it
    assert result.path == work / "student.torchscript.pt" and result.path.is_file()
    assert result.metadata["role"] == "student" and result.metadata["arch"] == "resnet8"
    assert result.max_abs_diff <= 1e-4
    # opsets above 20 go through the torch.export-based ONNX exporter
    teacher = export.export(work / "best.pt", "onnx", role="teacher", opset=21, images=8)
    assert teacher.path == work / "teacher.onnx" and teacher.opset == 21 and teacher.images == 8
    assert teacher.max_abs_diff <= 1e-4
    assert export.read_metadata(teacher.path)["role"] == "teacher"


def test_errors_are_one_line_sokd_errors(sokd_run, teacher_file, tmp_path, monkeypatch):
    last = sokd_run / "last.pt"

    def fails(match, *args, **kwargs):
        with pytest.raises(SokdError, match=match) as info:
            export.export(*args, **kwargs)
        assert "\n" not in str(info.value)

    fails(r"no network 'stud' \(did you mean 'student'\?\); --role must be one of: student, "
          r"teacher_branch, teacher", last, "onnx", role="stud")
    fails("role 'kbm' .* not a classifier of images on its own .* --role teacher_branch", last, "onnx", role="kbm")
    fails(r"unknown export format 'onx' \(did you mean 'onnx'\?\); valid: torchscript, onnx", last, "onx")
    fails("holding only the 'model' network", teacher_file, "onnx", role="student")
    fails("--opset applies to --format onnx only", last, "torchscript", opset=17)
    fails(r"--opset 3 is not supported .* use 7\.\.", last, "onnx", opset=3)
    fails("directory '/nonexistent' does not exist", last, "onnx", out="/nonexistent/x.onnx")
    fails("does not exist", last, "onnx", out=last / "x.onnx")  # parent is a file
    fails("is the checkpoint being exported", last, "torchscript", out=last)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    fails("corrupt or truncated", tmp_path / "junk.pt", "onnx")
    torch.save({"w": torch.zeros(1)}, tmp_path / "bare.pt")
    fails("not a sokd run checkpoint or model file", tmp_path / "bare.pt", "onnx")
    with pytest.raises(SokdError, match="only data.KEY=VALUE overrides"):
        cli("export", last, "train.epochs=3", "--format", "onnx")

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    fails(r"pip install sokd\[export\]", last, "onnx")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_model_that_disagrees_is_not_written(sokd_run, tmp_path, monkeypatch, fmt):
    out = tmp_path / f"student{export.EXTENSIONS[fmt]}"
    export.export(sokd_run / "student.pt", fmt, out=out, images=16)  # the previous good export
    previous = out.read_bytes()
    real = export.run_exported
    monkeypatch.setattr(export, "run_exported", lambda *a: real(*a) + 1e-3)  # a broken exporter
    with pytest.raises(SokdError, match=r"disagrees with PyTorch: max \|logit diff\| 1\.00e-03 > 1e-04 on "
                                        r"16 test images; nothing was written"):
        export.export(sokd_run / "student.pt", fmt, out=out, images=16, overwrite=True)
    assert out.read_bytes() == previous  # the old file is untouched...
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # ...and no temporary file is left
