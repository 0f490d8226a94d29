"""The command line end to end: every method for one epoch, eval of its checkpoints, errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sokd.cli import main

from .conftest import tiny_config, write_config


def run_cli(*args):
    return main([str(a) for a in args])


@pytest.mark.parametrize("method", ["vanilla", "kd", "dml", "kd_dml", "sokd"])
def test_each_method_trains_one_epoch_and_writes_a_valid_summary(method, tmp_path, teacher_file, capsys):
    cfg = tiny_config(tmp_path, method, train={"epochs": 1})
    if "teacher" in cfg:
        cfg["teacher"]["checkpoint"] = str(teacher_file)
    path = write_config(tmp_path, cfg)
    assert run_cli("train", path) == 0
    run_dir = tmp_path / "runs" / method
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == method and summary["epochs"] == 1
    expected_roles = {"vanilla": {"model"}, "kd": {"student", "teacher"}, "dml": {"student", "peer"},
                      "kd_dml": {"student", "teacher"}, "sokd": {"student", "teacher", "kbm"}}[method]
    assert set(summary["networks"]) == expected_roles
    for net in summary["networks"].values():
        assert 0.0 <= net["top1_final"] <= 100.0 and net["params"] > 0
    if method != "vanilla":
        pair = next(iter(summary["compare"].values()))
        assert 0.0 <= pair["agreement"] <= 100.0 and pair["kl"] >= 0.0
    if method in ("kd", "sokd"):
        teacher = summary["networks"]["teacher"]
        assert teacher["top1_initial"] is not None
    out = capsys.readouterr().out
    assert "top-1 final" in out

    # eval the run checkpoint (every role) and the standalone student/teacher-branch files
    assert run_cli("eval", run_dir / "last.pt", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["roles"]) == expected_roles
    assert result["roles"][summary["primary_role"]]["top1"] == pytest.approx(
        summary["networks"][summary["primary_role"]]["top1_final"], abs=1e-6)
    if method == "sokd":
        assert run_cli("eval", run_dir / "teacher_branch.pt", "--json") == 0
        branch = json.loads(capsys.readouterr().out)
        # a model file is scored under its own name
        assert branch["roles"]["teacher_branch"]["top1"] == pytest.approx(summary["networks"]["kbm"]["top1_final"],
                                                                  abs=1e-6)


def test_overrides_and_models_listing(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path, "vanilla"))
    assert run_cli("train", path, "train.epochs=1", "name=over", f"output.dir={tmp_path}/o") == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["epochs"] == 1
    assert run_cli("models", "--filter", "wrn", "--input", "1x28x28") == 0
    out = capsys.readouterr().out
    assert "wrn_40_2" in out and "MACs" in out


def test_cli_error_is_one_line_with_nonzero_exit(tmp_path):
    path = write_config(tmp_path, tiny_config(tmp_path, "vanilla"))
    proc = subprocess.run([sys.executable, "-m", "sokd", "train", str(path), "train.epoch=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown config key 'train.epoch'" in lines[0] and "epochs" in lines[0]


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").exists(),
                    reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_demo_uses_the_packaged_teacher_then_students_and_says_what_one_seed_means(tmp_path, capsys):
    from sokd.commands import demo
    assert demo.PACKAGED_TEACHER.is_file()      # package data: the demo's teacher is not trained on the spot
    overrides = ["train.epochs=1", "data.train_per_class=16", "data.test_limit=64", "data.batch_size=32",
                 "output.progress=false", "output.tensorboard=false"]
    assert run_cli("demo", "--out", tmp_path / "demo", *overrides) == 0
    out = capsys.readouterr().out
    table = out[out.index("Fashion-MNIST demo"):].splitlines()
    assert table[3].startswith("| teacher") and any(line.startswith("| sokd") for line in table)
    assert not (tmp_path / "demo" / "teacher").exists()
    for name in ("vanilla", "kd", "sokd"):
        assert (tmp_path / "demo" / name / "summary.json").exists()
    verdicts = [line for line in table if " = " in line and "points" in line]
    assert len(verdicts) == 3 and all("one seed orders nothing" in line for line in verdicts)  # recipe changed
    assert "Where the evidence is: docs/results/README.md" in out
    assert run_cli("demo", "--out", tmp_path / "demo", *overrides) == 0  # re-run reuses finished runs


def test_demo_comparison_lines_follow_the_measured_spread():
    from sokd.commands.demo import comparison_lines
    spread = {"diffs": {"kd-vanilla": {"values": [1.0, 1.2, 0.8], "mean": 1.0, "std": 0.2},
                        "sokd-vanilla": {"values": [0.1, -0.3, 0.2], "mean": 0.0, "std": 0.26},
                        "sokd-kd": {"values": [0.2, -0.1, 0.3], "mean": 0.13, "std": 0.21}}}
    lines = comparison_lines({"vanilla": 80.0, "kd": 81.1, "sokd": 80.3}, spread, [])
    assert lines[0] == ("KD − vanilla = +1.10 points; over 3 seeds of this recipe the difference is +1.00 ± 0.20: "
                        "larger than the seed spread, and the seeds agree on its sign.")
    assert lines[1].endswith("within the seed spread, so not a conclusion from one seed.")
    assert lines[2].startswith("SOKD − KD = -0.80 points") and "do not agree on it: not a conclusion" in lines[2]
    assert all("seed spread is unknown" in line for line in comparison_lines({"kd": 1, "vanilla": 0}, None, []))
    changed = comparison_lines({"kd": 1.0, "vanilla": 0.0}, spread, ["train.epochs=1"])
    assert changed == ["KD − vanilla = +1.00 points; this run changes the recipe (train.epochs=1), so the seed "
                       "spread is unknown: one seed orders nothing."]


def test_starting_the_command_line_leaves_the_heavy_optional_imports_for_later():
    """torchvision (which pulls in torch._dynamo) and triton cost seconds at every start of `sokd`
    and of every run `sokd compare` launches; the commands that need them import them on use."""
    code = ("import sys, sokd.cli, sokd.runner, sokd.engine; "
            "print(sorted(m for m in ('torchvision', 'triton', 'timm', 'transformers', 'matplotlib', 'scipy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
