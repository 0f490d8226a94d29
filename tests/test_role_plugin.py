"""A method with a new role is one file: `tests/plugins/takd.py` declares a teaching assistant, and
the config, runner, `sokd bench`, checkpoints and reports take the role from that declaration."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sokd import bench, config, methods, runner
from sokd.errors import SokdError

from .conftest import tiny_config, write_config
from .test_reliability_files import sokd_cli

PLUGIN = str(Path(__file__).parent / "plugins" / "takd.py")


def takd_config(tmp_path: Path, teacher_file: Path, **assistant) -> dict:
    cfg = tiny_config(tmp_path, "vanilla", name="takd", train={"epochs": 1}, imports=[PLUGIN])
    cfg.pop("model")
    cfg["method"] = {"name": "takd"}
    cfg["assistant"] = {"arch": "resnet14", "checkpoint": str(teacher_file), **assistant}
    cfg["student"] = {"arch": "resnet8"}
    return cfg


def test_a_plugin_role_is_a_config_section_and_trains(tmp_path, teacher_file, one_thread):
    cfg = takd_config(tmp_path, teacher_file)
    summary = runner.train(config.build(cfg))
    assert set(summary["networks"]) == {"assistant", "student"} and summary["primary_role"] == "student"
    assert summary["networks"]["assistant"]["top1_final"] == summary["networks"]["assistant"]["top1_initial"]
    cls = methods.get("takd")
    assert cls.config_roles == ("assistant", "student") and cls.frozen == ("assistant",)
    assert cls.trained_roles == ("assistant",)
    # resume needs no file but last.pt, for the new role too
    resumed = {**cfg, "train": {**cfg["train"], "epochs": 2}, "output": {**cfg["output"], "resume": True}}
    assert runner.train(config.build(resumed))["epochs"] == 2
    # a checkpoint of the plugin's method is read back with the plugin allowed on the command line
    run_dir = Path(cfg["output"]["dir"])
    proc = sokd_cli("eval", run_dir / "last.pt", "--json", "--import", PLUGIN)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["roles"]) == {"assistant", "student"}


def test_a_plugin_roles_section_is_checked_like_any_other(tmp_path, teacher_file):
    cfg = takd_config(tmp_path, teacher_file)
    cfg["asistant"] = cfg.pop("assistant")
    with pytest.raises(SokdError, match=r"unknown config key 'asistant' \(did you mean 'assistant'\?\)"):
        config.build(cfg)
    cfg = takd_config(tmp_path, teacher_file)
    cfg["assistant"].pop("checkpoint")
    with pytest.raises(SokdError, match=r"method 'takd' needs a trained assistant: set assistant.checkpoint=PATH"):
        runner.train(config.build(cfg))
    cfg = takd_config(tmp_path, teacher_file, weigths="x.pt")
    with pytest.raises(SokdError, match=r"unknown config key 'assistant.weigths' \(did you mean 'weights'\?\)"):
        config.build(cfg)
    # a section only another method declares is not a key of this one
    with pytest.raises(SokdError, match="unknown config key 'assistant'"):
        config.build({**tiny_config(tmp_path, "kd"), "assistant": {"arch": "resnet8"}})


def test_bench_builds_the_plugin_roles_from_the_declaration(tmp_path):
    config.import_plugins([PLUGIN])
    import torch
    from sokd import models
    teacher, student = models.create("resnet14", num_classes=4), models.create("resnet8", num_classes=4)
    nets = bench.pair_networks("takd", teacher, student)
    assert nets == {"assistant": teacher, "student": student}
    method = methods.create("takd", **nets)
    out = method(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    assert set(out["terms"]) == {"student_ce", "student_kl_assistant"}


def test_roles_declared_once_answer_everything_the_layers_ask():
    for name in methods.list_methods():
        cls = methods.get(name)
        declared = {r: d for r, d in cls.roles.items() if d.config}
        assert cls.config_roles == tuple(declared)
        assert cls.frozen == tuple(r for r, d in cls.roles.items() if d.frozen)
        assert set(cls.accepts) == set(declared) | set(cls.aliases)
        assert cls.needs_trained_teacher == any(d.trained for d in declared.values())
    assert methods.role("sokd", "kbm").plotted and methods.role("sokd", "kbm").file == "teacher_branch"
    assert methods.role("one", "branch3").file == "branch3" and not methods.role("dml", "peer2").config
    assert methods.role("not-a-method", "x") == methods.base.UNDECLARED
