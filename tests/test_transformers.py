"""Vision transformers as teachers and students: SOKD's bridge made of transformer blocks, every
feature term across token sequences and maps, and whole runs through `sokd train`."""
from __future__ import annotations

import pytest
import torch

import sokd
from sokd import cli, methods
from sokd.models.tokens import stage_map

from .conftest import tiny_config, write_config

timm = pytest.importorskip("timm")

VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 4, "num_heads": 2}
VIT_ARCH = "timm.vit_tiny_patch16_224"
FEATURE_KINDS = ["at", "fitnet", "sp", "pkt", "rkd", "crd", "nd", "ofa"]


def vit(**extra):
    return sokd.models.create(VIT_ARCH, num_classes=4, **{**VIT, **extra})


def cnn():
    return sokd.models.create("resnet8", num_classes=4)


def test_a_stage_map_drops_the_prefix_tokens_and_lays_patches_on_their_grid():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)   # 2 prefix + 2x2 patches
    grid = stage_map(tokens, 2)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[0, :, 0, 1], tokens[0, 3])   # patch 1 (row 0, column 1)
    maps = torch.randn(2, 3, 4, 4)
    assert stage_map(maps, 0) is maps
    with pytest.raises(sokd.SokdError, match="square grid"):
        stage_map(torch.randn(2, 7, 3), 1)


def test_the_bridge_over_transformer_blocks_reproduces_the_teacher_at_init():
    teacher = vit()
    sokd_method = methods.create("sokd", teacher=teacher, student=cnn(), kbm_init="teacher", kbm_stages=2,
                                 input_shape=(3, 16, 16))
    sokd_method.eval()
    x = torch.randn(3, 3, 16, 16)
    out = sokd_method.predict(x)
    assert torch.allclose(out["kbm"], out["teacher"], atol=1e-6)
    assert len(sokd_method.nets["kbm"].stages) == 2           # a copy of the last two block groups
    assert not any(p is q for p in sokd_method.nets["kbm"].parameters() for q in teacher.parameters())


@pytest.mark.parametrize("pair", ["vit->cnn", "cnn->vit", "deit->vit"])
def test_every_feature_term_compares_tokens_with_maps_and_trains(pair):
    make = {"vit": vit, "cnn": cnn, "deit": lambda: sokd.models.create(
        "timm.deit_tiny_distilled_patch16_224", num_classes=4, **VIT)}
    teacher_name, student_name = pair.split("->")
    teacher, student = make[teacher_name](), make[student_name]()
    for name in ("kd", "sokd", "shake"):
        method = methods.create(name, teacher=teacher, student=student, input_shape=(3, 16, 16), num_samples=32,
                                features=[{"kind": k, **({"options": {"nce_k": 8}} if k == "crd" else {})}
                                          for k in FEATURE_KINDS])
        method.train()
        out = method(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), index=torch.arange(4))
        for kind in FEATURE_KINDS:
            term = out["terms"][f"student_{kind}"]
            assert term.shape == () and torch.isfinite(term), (name, kind)
        student.zero_grad()
        out["loss"].backward()
        assert all(p.grad is not None for p in student.parameters() if p.requires_grad), name
        assert all(p.grad is None for p in teacher.parameters())


def _data():
    return {"name": "synthetic", "synthetic_size": 64, "synthetic_shape": [3, 16, 16], "synthetic_classes": 4,
            "batch_size": 16, "eval_batch_size": 64}


def test_a_vit_teacher_and_a_vit_student_train_through_sokd_train(tmp_path):
    """A ViT teacher trained by sokd (one epoch), then kd and sokd into a CNN, and a CNN teacher
    into a ViT student: each run writes its summary and the ViT student's model file reloads."""
    kwargs = dict(VIT)
    cfg = tiny_config(tmp_path, "vanilla", data=_data(), train={"epochs": 1, "precision": "fp32"})
    cfg["model"] = {"arch": VIT_ARCH, "kwargs": kwargs}
    cfg["output"]["dir"] = str(tmp_path / "vit_teacher")
    assert cli.main(["train", str(write_config(tmp_path, cfg))]) == 0
    for name, teacher, student in [("kd", VIT_ARCH, "resnet8"), ("sokd", VIT_ARCH, "resnet8"),
                                   ("sokd", "resnet8", VIT_ARCH)]:
        if teacher != VIT_ARCH:   # a CNN teacher for the ViT student
            t = tiny_config(tmp_path, "vanilla", data=_data(), train={"epochs": 1, "precision": "fp32"})
            t["model"] = {"arch": teacher}
            t["output"]["dir"] = str(tmp_path / "cnn_teacher")
            assert cli.main(["train", str(write_config(tmp_path, t))]) == 0
        run = tiny_config(tmp_path, name, data=_data(), train={"epochs": 1, "precision": "fp32"})
        run["teacher"] = {"arch": teacher, "checkpoint": str(tmp_path / ("vit_teacher" if teacher == VIT_ARCH
                                                                         else "cnn_teacher") / "model.pt")}
        run["student"] = {"arch": student}
        for role in ("teacher", "student"):
            if run[role]["arch"] == VIT_ARCH:
                run[role]["kwargs"] = kwargs
        out = tmp_path / f"{name}-{teacher.split('.')[0]}-{student.split('.')[0]}"
        run["output"]["dir"] = str(out)
        assert cli.main(["train", str(write_config(tmp_path, run))]) == 0, (name, teacher, student)
        assert (out / "summary.json").exists() and (out / "student.pt").exists()


def deit_student():
    return sokd.models.create("timm.deit_tiny_distilled_patch16_224", num_classes=4, **VIT)


def test_deit_distils_through_its_token_hard_or_soft_and_predicts_with_both_heads():
    import torch.nn.functional as F
    teacher, student = cnn(), deit_student()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    teacher.eval()
    with torch.no_grad():
        t_logits = teacher(x)
    for target in ("hard", "soft"):
        method = methods.create("deit", teacher=teacher, student=student, deit_target=target, T=2.0,
                                input_shape=(3, 16, 16))
        method.train()
        out = method(x, y)
        tokens, _ = student.forward_trunk(x, student.num_stages)
        z_cls, z_dist = student.head.both_heads(tokens)
        assert out["terms"]["student_ce"].item() == pytest.approx(F.cross_entropy(z_cls, y).item(), rel=1e-5)
        if target == "hard":
            expected = F.cross_entropy(z_dist, t_logits.argmax(1))
        else:
            expected = F.kl_div(F.log_softmax(z_dist / 2, 1), F.log_softmax(t_logits / 2, 1), reduction="sum",
                                log_target=True) * 4 / z_dist.numel()
        assert out["terms"]["student_dist_teacher"].item() == pytest.approx(expected.item(), rel=1e-4)
        assert method.term_weights == {"student_ce": 0.5, "student_dist_teacher": 0.5}
    student.eval()
    tokens, _ = student.forward_trunk(x, student.num_stages)
    z_cls, z_dist = student.head.both_heads(tokens)
    assert torch.allclose(student(x), (z_cls + z_dist) / 2)
    with pytest.raises(sokd.SokdError, match="distillation token and head"):
        methods.create("deit", teacher=teacher, student=vit(), input_shape=(3, 16, 16))
    with pytest.raises(sokd.SokdError, match="deit_target"):
        methods.create("deit", teacher=teacher, student=student, logit_loss="dkd", input_shape=(3, 16, 16))


def test_a_deit_student_trains_through_sokd_train(tmp_path):
    t = tiny_config(tmp_path, "vanilla", data=_data(), train={"epochs": 1, "precision": "fp32"})
    t["output"]["dir"] = str(tmp_path / "cnn_teacher")
    assert cli.main(["train", str(write_config(tmp_path, t))]) == 0
    run = tiny_config(tmp_path, "deit", data=_data(), train={"epochs": 1, "precision": "fp32"})
    run["method"] = {"name": "deit", "deit_target": "soft"}
    run["teacher"] = {"arch": "resnet8", "checkpoint": str(tmp_path / "cnn_teacher" / "model.pt")}
    run["student"] = {"arch": "timm.deit_tiny_distilled_patch16_224", "kwargs": dict(VIT)}
    run["output"]["dir"] = str(tmp_path / "deit")
    assert cli.main(["train", str(write_config(tmp_path, run))]) == 0
    assert (tmp_path / "deit" / "student.pt").exists()


def test_any_vit_gets_a_distillation_token_and_head_for_deit():
    torch.manual_seed(0)
    plain = vit()
    torch.manual_seed(0)
    student = vit(distillation_token=True)
    assert student.stem.prefix_names == ["cls_token", "dist_token"] and student.head.prefix_tokens == 2
    # a slot for the new token right after the class token; every other position kept
    assert student.stem.pos_embed.shape[1] == plain.stem.pos_embed.shape[1] + 1
    assert torch.equal(student.stem.pos_embed[:, 0], plain.stem.pos_embed[:, 0])
    assert torch.equal(student.stem.pos_embed[:, 2:], plain.stem.pos_embed[:, 1:])
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    tokens, _ = student.forward_trunk(x, student.num_stages)
    assert tokens.shape[1] == plain.forward_trunk(x, plain.num_stages)[0].shape[1] + 1
    z_cls, z_dist = student.head.both_heads(tokens)
    student.eval()
    assert torch.allclose(student(x), (z_cls + z_dist) / 2)
    student.train()
    method = methods.create("deit", teacher=cnn(), student=student, input_shape=(3, 16, 16))
    method.train()
    method(x, y)["loss"].backward()
    assert student.stem.dist_token.grad is not None and student.head.head_dist.weight.grad is not None
    for bad, match in [(lambda: vit(distillation_token=True, global_pool="avg"), "class token read by the head"),
                       (lambda: deit_student_with(distillation_token=True), "already has a distillation token"),
                       (lambda: sokd.models.create("timm.resnet18", num_classes=4, distillation_token=True),
                        "applies to vision transformers"),
                       (lambda: vit(distillation_token="yes"), "true or false")]:
        with pytest.raises(sokd.SokdError, match=match):
            bad()


def deit_student_with(**extra):
    return sokd.models.create("timm.deit_tiny_distilled_patch16_224", num_classes=4, **{**VIT, **extra})


def test_a_vit_given_a_distillation_token_trains_by_deit_and_reloads_from_its_model_file(tmp_path):
    t = tiny_config(tmp_path, "vanilla", data=_data(), train={"epochs": 1, "precision": "fp32"})
    t["output"]["dir"] = str(tmp_path / "cnn_teacher")
    assert cli.main(["train", str(write_config(tmp_path, t))]) == 0
    run = tiny_config(tmp_path, "deit", data=_data(), train={"epochs": 1, "precision": "fp32"})
    run["method"] = {"name": "deit"}
    run["teacher"] = {"arch": "resnet8", "checkpoint": str(tmp_path / "cnn_teacher" / "model.pt")}
    run["student"] = {"arch": VIT_ARCH, "kwargs": {**VIT, "distillation_token": True}}
    run["output"]["dir"] = str(tmp_path / "deit")
    assert cli.main(["train", str(write_config(tmp_path, run))]) == 0
    path = tmp_path / "deit" / "student.pt"
    ckpt = sokd.artifacts.load(path)
    rebuilt = sokd.artifacts.rebuild_model(ckpt, str(path)).eval()
    assert rebuilt.head.head_dist is not None
    x = torch.randn(2, 3, 16, 16)
    fresh = vit(distillation_token=True)
    fresh.load_state_dict(rebuilt.state_dict())
    assert torch.equal(rebuilt(x), fresh.eval()(x))


@pytest.mark.parametrize("arch, kwargs", [("timm.pvt_v2_b0", {}),
                                          ("timm.swin_tiny_patch4_window7_224",
                                           {"img_size": 32, "window_size": 2, "depths": (1, 1, 1),
                                            "embed_dim": 16, "num_heads": (1, 2, 4)})])
def test_hierarchical_transformers_are_sokd_teachers(arch, kwargs):
    teacher = sokd.models.create(arch, num_classes=4, **kwargs)
    method = methods.create("sokd", teacher=teacher, student=cnn(), kbm_init="teacher", input_shape=(3, 32, 32))
    method.eval()
    out = method.predict(torch.randn(2, 3, 32, 32))
    assert torch.allclose(out["kbm"], out["teacher"], atol=1e-5)
