"""Saved files describe themselves; files of the earlier layout still load."""
from __future__ import annotations

import torch

from sokd import artifacts, config, models, runner
from sokd.engine import safe_load
from sokd.files import atomic_save


def test_networks_carry_the_spec_that_rebuilds_them():
    net = models.create("wrn_16_1", num_classes=7, in_channels=1, dropout=0.1)
    assert models.spec_of(net) == {"arch": "wrn_16_1", "num_classes": 7, "in_channels": 1,
                                   "kwargs": {"dropout": 0.1}}
    spec = models.spec_of(net)
    again = models.create(spec["arch"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                          **spec["kwargs"])
    assert again.state_dict().keys() == net.state_dict().keys()


def test_saved_files_describe_their_networks(make_config, teacher_file):
    cfg = make_config("sokd", train={"epochs": 1})
    cfg["teacher"]["checkpoint"] = str(teacher_file)
    built = config.build(cfg)
    runner.train(built)
    last = safe_load(built.run_dir / "last.pt")
    assert last["version"] == artifacts.VERSION
    assert last["networks"]["kbm"]["arch"] == "resnet14" and last["networks"]["student"]["arch"] == "resnet8"
    branch = safe_load(built.run_dir / "teacher_branch.pt")
    assert (branch["arch"], branch["num_classes"]) == ("resnet14", 4)
    net = artifacts.rebuild_model(branch, "teacher_branch.pt")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), branch["state_dict"].values()))
    assert artifacts.run_roles(last) == ["kbm", "student", "teacher"]


def test_files_of_the_version_1_layout_evaluate_and_resume(make_config):
    base = make_config("vanilla", train={"epochs": 1})
    built = config.build(base)
    runner.train(built)
    for name in ("last.pt", "model.pt"):  # rewrite both as version 1 wrote them
        ckpt = safe_load(built.run_dir / name)
        ckpt["version"] = 1
        if "networks" in ckpt:
            ckpt["arch_of"] = ckpt.pop("networks")
        atomic_save(ckpt, built.run_dir / name)
    for name in ("last.pt", "model.pt"):
        assert runner.evaluate_checkpoint(str(built.run_dir / name), device="cpu")["roles"]["model"]["top1"] >= 0
    more = make_config("vanilla", train={"epochs": 2}, output={**base["output"], "resume": True})
    assert runner.train(config.build(more))["epochs"] == 2
