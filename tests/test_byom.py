"""Bring your own model: torchvision teachers, local weights, your own network, the Python-API loop."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

import sokd
from sokd import config, export, runner

from .conftest import tiny_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]


TV_TEACHERS = ["tv.resnet18", "tv.mobilenet_v3_small", "tv.efficientnet_b0", "tv.convnext_tiny",
               "tv.regnet_y_400mf", "tv.mobilenet_v2"]


@pytest.mark.parametrize("arch", TV_TEACHERS)
def test_torchvision_teacher_trains_with_sokd(arch):
    torch.manual_seed(0)
    teacher = sokd.models.create(arch, num_classes=10)
    student = sokd.models.create("resnet8", num_classes=10)
    method = sokd.methods.create("sokd", teacher=teacher, student=student, kbm_stages=1)
    frozen = {k: v.detach().clone() for k, v in teacher.named_parameters()}
    kbm_before = [p.detach().clone() for p in method.nets["kbm"].parameters()]
    optimizer = torch.optim.SGD(method.param_groups(lr=0.01), lr=0.01, momentum=0.9)
    assert [g["role"] for g in optimizer.param_groups] == ["student", "kbm"]

    method.train()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])  # convnext needs >= 32 px
    out = method(images, labels)
    assert torch.isfinite(out["loss"]) and all(torch.isfinite(t) for t in out["terms"].values())
    assert out["logits"]["kbm"].shape == (2, 10) and out["logits"]["teacher"].shape == (2, 10)
    optimizer.zero_grad()
    out["loss"].backward()
    kbm_grads = [p.grad for p in method.nets["kbm"].parameters()]
    assert all(g is not None for g in kbm_grads) and any(g.abs().sum() > 0 for g in kbm_grads)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    optimizer.step()

    assert all(torch.equal(p, frozen[k]) for k, p in teacher.named_parameters())  # teacher unchanged
    assert any(not torch.equal(p, b) for p, b in zip(method.nets["kbm"].parameters(), kbm_before))
    branch = method.standalone()["teacher_branch"][1].eval()  # frozen trunk + KBM as one classifier
    assert branch(images).shape == (2, 10)


def test_teacher_bn_eval_leaves_the_whole_teacher_state_unchanged():
    teacher = sokd.models.create("tv.resnet18", num_classes=10)
    method = sokd.methods.create("sokd", teacher=teacher, student=sokd.models.create("resnet8", num_classes=10),
                                 teacher_bn="eval")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(method.param_groups(lr=0.01))
    method.train()
    out = method(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_local_torchvision_weights_are_loaded(tmp_path):
    import torchvision
    torch.manual_seed(1)
    original = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # running statistics that differ from a fresh model's
        for m in original.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pth"
    torch.save(original.state_dict(), path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = original(x)

    net = sokd.models.create("tv.resnet18", num_classes=10, weights=str(path)).eval()
    with torch.no_grad():
        assert torch.allclose(net(x), expected, atol=1e-5)

    # the same through a config: teacher.weights=PATH satisfies SOKD's trained-teacher requirement
    tree = tiny_config(tmp_path, "sokd", data={"synthetic_classes": 10, "synthetic_shape": [3, 32, 32]})
    tree["teacher"] = {"arch": "tv.resnet18", "weights": str(path)}
    cfg = config.build(tree)
    method = runner.build_method(cfg, 10, (3, 32, 32))
    assert sokd.models.spec_of(method.nets["teacher"])["arch"] == "tv.resnet18"
    with torch.no_grad():
        assert torch.allclose(method.nets["teacher"].eval()(x), expected, atol=1e-5)

    with pytest.raises(sokd.SokdError, match="does not fit this network .*a classifier mismatch means another number of classes"):
        sokd.models.create("tv.resnet18", num_classes=4, weights=str(path))
    with pytest.raises(sokd.SokdError, match="does not exist .*never downloads"):
        sokd.models.create("tv.resnet18", num_classes=10, weights=str(tmp_path / "missing.pth"))


def run_example(name: str, monkeypatch, *argv) -> dict:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_own_model_example_runs(monkeypatch, capsys):
    run_example("own_model.py", monkeypatch, "--steps", "2", "--batch", "4")
    out = capsys.readouterr().out
    assert "teacher trained: loss" in out and "sokd step 2: loss" in out and "kbm_ce" in out
    assert "teacher_branch -> logits (4, 10)" in out
    net = sokd.models.create("my_net", num_classes=3, width=4)
    assert isinstance(net, sokd.models.StagedNet) and net.num_stages == 3


def test_train_loop_example_runs(monkeypatch, capsys):
    ns = run_example("train_loop.py", monkeypatch, "--steps", "2")
    out = capsys.readouterr().out
    assert "step   2  loss" in out and "test top-1: student" in out
    result = ns["main"](["--steps", "1"])
    assert len(result["losses"]) == 1 and set(result["top1"]) == {"student", "teacher", "kbm"}


def test_own_model_by_name_in_a_config_trains_distils_and_exports(tmp_path):
    imports = [str(EXAMPLES / "own_model.py")]
    small = {"epochs": 1, "steps_per_epoch": 2}
    teacher_cfg = tiny_config(tmp_path, "vanilla", imports=imports, model={"arch": "my_net", "kwargs": {"width": 8}},
                              train=small)
    runner.train(config.build(teacher_cfg))
    teacher_file = Path(teacher_cfg["output"]["dir"]) / "model.pt"

    cfg = tiny_config(tmp_path, "sokd", imports=imports, train=small,
                      teacher={"arch": "my_net", "kwargs": {"width": 8}, "checkpoint": str(teacher_file)},
                      student={"arch": "my_net", "kwargs": {"width": 4}})
    summary = runner.train(config.build(cfg))
    assert set(summary["networks"]) == {"student", "teacher", "kbm"}
    assert summary["networks"]["teacher"]["arch"] == "my_net"

    result = export.export(Path(cfg["output"]["dir"]) / "last.pt", "onnx", role="teacher_branch", images=16)
    assert result.max_abs_diff <= 1e-4
    assert result.metadata["arch"] == "my_net" and result.metadata["kwargs"] == {"width": 8}
