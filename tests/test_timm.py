"""timm models as SOKD teachers and students, stages from timm's feature_info, and `sokd models`.

Every test that builds a timm model skips when timm is not installed (`pip install sokd[timm]`).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import sokd
from sokd.cli import main
from sokd.models import torchvision_adapter as tva

from .test_methods import assert_kbm_init_teacher_copies_the_teacher

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]

# (timm name, family): one model per family, the smallest timm has
TIMM_FAMILIES = [
    ("resnet10t", "ResNet"),
    ("resnet18d", "ResNet-D"),
    ("efficientnet_b0", "EfficientNet"),
    ("mobilenetv3_small_050", "MobileNetV3"),
    ("convnext_atto", "ConvNeXt"),
    ("regnetx_002", "RegNet"),
]


def run_cli(*args):
    return main([str(a) for a in args])


def timm_or_skip():
    return pytest.importorskip("timm")


def batch(n=2, size=32):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("name", [n for n, _ in TIMM_FAMILIES])
def test_timm_model_is_a_sokd_teacher_and_student(name):
    timm_or_skip()
    torch.manual_seed(0)
    teacher = sokd.models.create(f"timm.{name}", num_classes=10)
    student = sokd.models.create(f"timm.{name}", num_classes=10)
    assert teacher.cut_source == "feature_info" and teacher.num_stages >= 2
    method = sokd.methods.create("sokd", teacher=teacher, student=student)
    frozen = {k: v.detach().clone() for k, v in teacher.named_parameters()}
    method.train()
    images, labels = batch()
    out = method(images, labels)
    assert torch.isfinite(out["loss"]) and all(torch.isfinite(t) for t in out["terms"].values())
    assert {r: v.shape for r, v in out["logits"].items()} == {r: (2, 10) for r in ("student", "teacher", "kbm")}
    out["loss"].backward()
    for role in ("student", "kbm"):
        grads = [p.grad for p in method.nets[role].parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), role
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    torch.optim.SGD(method.param_groups(lr=0.01)).step()
    assert all(torch.equal(p, frozen[k]) for k, p in teacher.named_parameters())
    # stage outputs are NCHW feature maps, never growing spatially
    _, feats = student.eval().forward_features(images)
    assert all(f.dim() == 4 for f in feats)
    assert all(a.shape[-1] >= b.shape[-1] for a, b in zip(feats, feats[1:]))


@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050"])
def test_kbm_init_teacher_reproduces_timm_teacher_logits_at_step_0(name):
    timm_or_skip()
    teacher = sokd.models.create(f"timm.{name}", num_classes=10)
    student = sokd.models.create("resnet8", num_classes=10)
    assert_kbm_init_teacher_copies_the_teacher(teacher, student, batch()[0])


def test_local_timm_weights_are_loaded(tmp_path):
    timm = timm_or_skip()
    torch.manual_seed(1)
    original = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    with torch.no_grad():  # running statistics that differ from a fresh model's
        for m in original.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet10t.pth"
    torch.save(original.state_dict(), path)
    x, _ = batch()
    net = sokd.models.create("timm.resnet10t", num_classes=10, weights=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(net(x), original(x))
    with pytest.raises(sokd.SokdError, match="does not fit this network .*a classifier mismatch means another number of classes"):
        sokd.models.create("timm.resnet10t", num_classes=4, weights=str(path))


def test_feature_info_maps_onto_stages():
    timm = timm_or_skip()
    resnet = timm.create_model("resnet10t", num_classes=10)
    assert tva.feature_info_stages(resnet) == (
        ["conv1", "bn1", "act1"], [["maxpool", "layer1"], ["layer2"], ["layer3"], ["layer4"]], ["global_pool", "fc"])
    effnet = timm.create_model("efficientnet_b0", num_classes=10)
    stem, stages, head = tva.feature_info_stages(effnet)
    assert stem == ["conv_stem", "bn1"] and stages[0] == ["blocks.0"] and stages[-1] == ["blocks.5", "blocks.6"]
    assert head == ["conv_head", "bn2", "global_pool", "classifier"]  # the 1x1 expand conv is in the head
    regnet = timm.create_model("regnetx_002", num_classes=10)
    assert tva.feature_info_stages(regnet)[0] == ["stem"]  # first feature level with nothing before it


def test_feature_info_that_does_not_fit_falls_back_to_the_heuristics():
    import torchvision
    model = torchvision.models.resnet18(num_classes=10)
    assert tva.from_torchvision(model).cut_source == "resnet"  # no feature_info
    model.feature_info = [{"module": "layer1.0.conv1", "reduction": 4}, {"module": "layer4", "reduction": 32}]
    assert tva.from_torchvision(model).cut_source == "resnet"  # a name inside a custom block
    model.feature_info = [{"module": "layer4"}, {"module": "layer2"}]
    assert tva.from_torchvision(model).cut_source == "resnet"  # out of forward order
    assert tva.from_torchvision(torchvision.models.mobilenet_v3_small(num_classes=10)).cut_source == "chain of children"


def test_timm_drop_rate_is_kept_in_the_head():
    timm_or_skip()
    net = sokd.models.create("timm.resnet10t", num_classes=10, drop_rate=0.5)
    assert [type(m) for m in net.head] == [type(net.head[0]), nn.Dropout, nn.Linear]
    assert net.head[1].p == 0.5


def test_transformers_are_staged_and_reproduce_their_model():
    """ViT and DeiT by block groups (token stage outputs), Swin by its layers (NCHW views); the
    cut net computes the model's logits (checked at construction, and here)."""
    timm = timm_or_skip()
    vit = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 4, "num_heads": 2}
    net = sokd.models.create("timm.vit_tiny_patch16_224", num_classes=10, **vit)
    assert net.cut_source == "tokens" and net.num_stages == 4 and net.prefix_tokens == 1
    deit = sokd.models.create("timm.deit_tiny_distilled_patch16_224", num_classes=10, stages=[1, 3], **vit)
    assert deit.num_stages == 2 and deit.prefix_tokens == 2
    swin = sokd.models.create("timm.swin_tiny_patch4_window7_224", num_classes=10, img_size=16, window_size=2,
                              depths=(1, 1), embed_dim=16, num_heads=(1, 2))
    x = torch.randn(2, 3, 16, 16)
    logits, feats = swin.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 4, 4), (2, 32, 2, 2)]
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **vit).eval()
    torch.manual_seed(0)
    net = sokd.models.create("timm.vit_tiny_patch16_224", num_classes=10, **vit).eval()
    assert torch.allclose(net(x), model(x), atol=1e-6)
    assert [tuple(f.shape) for f in net.forward_features(x)[1]] == [(2, 17, 16)] * 4


@pytest.mark.parametrize("stages", [[0, 2], [3, 1, 3], [0, 5], "1,3"])
def test_bad_block_groups_are_refused_naming_the_default(stages):
    timm_or_skip()
    with pytest.raises(sokd.SokdError, match=r"stages must be increasing block indices ending at the last block \(3\)"):
        sokd.models.create("timm.vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, embed_dim=16,
                           depth=4, num_heads=2, stages=stages)
    with pytest.raises(sokd.SokdError, match="applies to vision transformers"):
        sokd.models.create("timm.resnet10t", num_classes=10, stages=[1, 2])


def test_unknown_timm_model_suggests_close_names():
    timm_or_skip()
    with pytest.raises(sokd.SokdError, match=r"unknown timm model 'timm.resnet10x' \(close: .*timm.resnet10t"):
        sokd.models.create("timm.resnet10x", num_classes=10)


# ---------------------------------------------------------------- sokd models
def test_models_zoo_listing_says_how_to_list_tv_and_timm(capsys):
    assert run_cli("models", "resnet8", "--input", "1x28x28") == 0  # an exact name: that model only
    out = capsys.readouterr().out
    assert "| resnet8 " in out and "resnet8x4" not in out and "MACs" in out and "wrn_40_2" not in out
    assert run_cli("models", "resnet8*") == 0
    assert "| resnet8x4 " in capsys.readouterr().out
    assert "sokd models --tv [PATTERN]" in out and "sokd models --timm [PATTERN]" in out


def test_models_tv_exact_name_has_params_and_macs(capsys):
    assert run_cli("models", "--tv", "resnet18", "--classes", "10") == 0
    out = capsys.readouterr().out
    info = sokd.models.model_info("tv.resnet18", (3, 32, 32), num_classes=10)
    row = next(line for line in out.splitlines() if line.startswith("| tv.resnet18 "))
    assert f"{info['params'] / 1e6:.2f}M" in row and f"{info['macs'] / 1e6:.2f}M" in row and "resnet" in row


def test_models_timm_exact_name_has_params_and_macs_at_the_input(capsys):
    timm_or_skip()
    assert run_cli("models", "--timm", "resnet18", "--input", "1x28x28", "--classes", "10") == 0
    out = capsys.readouterr().out
    info = sokd.models.model_info("timm.resnet18", (1, 28, 28), num_classes=10)
    rows = [line for line in out.splitlines() if line.startswith("| timm.")]
    assert len(rows) == 1 and rows[0].startswith("| timm.resnet18 ")  # exact: not resnet18d
    assert f"{info['params'] / 1e6:.2f}M" in rows[0] and f"{info['macs'] / 1e6:.2f}M" in rows[0]
    assert "feature_info" in rows[0] and "input 1x28x28, 10 classes" in out


def test_models_timm_pattern_lists_names_only_beyond_max(capsys):
    timm = timm_or_skip()
    assert run_cli("models", "--timm", "resnet*") == 0
    out = capsys.readouterr().out
    expected = timm.list_models("resnet*")
    assert "names only" in out and "| model" not in out
    assert [line for line in out.splitlines() if line.startswith("timm.")] == [f"timm.{n}" for n in expected]


def test_models_timm_lists_a_transformer_that_needs_its_image_size(capsys):
    timm_or_skip()
    assert run_cli("models", "--timm", "vit_tiny_patch16_224", "--max", "1") == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| timm.vit_tiny_patch16_224 "))
    assert "5.5" in row and "tokens" in row  # params; no MACs at 32x32 (it is built for 224)
    assert "does not run on 3x32x32 images" in out and "img_size" in out


@pytest.mark.parametrize("argv, message", [
    (["--timm", "nosuchnet"], "no timm model matches 'nosuchnet'"),
    (["--tv", "resnet9"], "no torchvision model matches 'resnet9' (close: tv."),
    (["--input", "3x32"], "--input '3x32' is not CxHxW"),
    (["--max", "-1"], "--max must be 0 or more"),
    (["--classes", "0"], "--classes must be a positive integer"),
])
def test_models_bad_arguments_are_one_line_exit_2(argv, message, capsys):
    if "--timm" in argv:
        timm_or_skip()
    assert run_cli("models", *argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and message in captured.err and captured.out == ""


def test_models_timm_missing_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # behaves as not installed
    assert run_cli("models", "--timm") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install sokd[timm]" in err and ".venv/bin/pip install timm" in err
    assert run_cli("models", "resnet8") == 0
    assert "timm not installed: pip install sokd[timm]" in capsys.readouterr().out


def test_models_cli_subprocess_error_exit_code():
    proc = subprocess.run([sys.executable, "-m", "sokd", "models", "--tv", "no_such_model"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
