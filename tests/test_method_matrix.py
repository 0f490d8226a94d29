"""Every registered method with every logit distance and every feature kind it composes with,
one training step through `sokd train`; and how the logit-distance option reaches each term."""
from __future__ import annotations

import shutil

import pytest
import torch

import sokd
from sokd import cli, methods
from sokd.errors import SokdError
from sokd.methods import losses
from sokd.methods.features import KINDS

from .conftest import tiny_config, write_config

LOGIT_CHOICES = [{"logit_loss": "dkd"}, {"logit_loss": "dist"}, {"logit_standardize": True},
                 {"logit_loss": "dkd", "logit_standardize": True, "warmup_epochs": 2}, {"logit_loss": "nkd"},
                 {"logit_loss": "mlkd"}, {"logit_loss": "mlkd", "logit_standardize": True, "temperature": "ctkd"},
                 {"temperature": "ctkd"}, {"logit_loss": "ofa", "T": 1.0}]


def _distilling_methods():
    return [m for m in methods.list_methods() if methods.get(m).distills_logits]


def _feature_methods():
    return [m for m in methods.list_methods() if methods.get(m).accepts_features]


def _one_step(tmp_path, teacher_file, method, options):
    if methods.needs_trained_teacher(method):
        shutil.copy(teacher_file, tmp_path / "teacher.pt")
    cfg = tiny_config(tmp_path, method, data={"name": "synthetic", "synthetic_size": 64, "synthetic_shape": [3, 16, 16],
                            "synthetic_classes": 4, "batch_size": 16, "eval_batch_size": 64},
                      train={"epochs": 1, "steps_per_epoch": 1, "seed": 0, "precision": "fp32"})
    cfg["method"] = {"name": method, **options}
    assert cli.main(["train", str(write_config(tmp_path, cfg))]) == 0




@pytest.mark.parametrize("method", _distilling_methods())
@pytest.mark.parametrize("choice", LOGIT_CHOICES, ids=lambda c: "+".join(f"{k}={v}" for k, v in c.items()))
def test_every_distilling_method_trains_with_every_logit_distance(tmp_path, teacher_file, one_thread, method, choice):
    _one_step(tmp_path, teacher_file, method, choice)
    assert (tmp_path / "runs" / method / "summary.json").exists()


@pytest.mark.parametrize("method", _feature_methods())
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_feature_method_trains_with_every_feature_kind(tmp_path, teacher_file, one_thread, method, kind):
    _one_step(tmp_path, teacher_file, method, {"features": [{"kind": kind}]})
    text = (tmp_path / "runs" / method / "metrics.jsonl").read_text()
    assert f'"student_{kind}"' in text


def _nets():
    torch.manual_seed(0)
    return (sokd.models.create("resnet14", num_classes=4), sokd.models.create("resnet8", num_classes=4))


def test_logit_loss_reaches_every_distillation_term_of_sokd():
    teacher, student = _nets()
    m = methods.create("sokd", teacher=teacher, student=student, logit_loss="dist", input_shape=(3, 16, 16))
    m.train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    torch.manual_seed(1)
    out = m(x, y)
    lg = out["logits"]
    d = lambda t, s: losses.dist(t, s, 2.0, 2.0, 4.0)
    assert torch.allclose(out["terms"]["kbm_kl_teacher"], d(lg["teacher"], lg["kbm"]))
    assert torch.allclose(out["terms"]["kbm_kl_student"], d(lg["student"], lg["kbm"]))
    assert torch.allclose(out["terms"]["student_kl_kbm"], d(lg["kbm"], lg["student"]))
    assert torch.allclose(out["terms"]["student_ce"], losses.cross_entropy(lg["student"], y))


def test_dkd_with_standardized_logits_is_what_kd_computes():
    teacher, student = _nets()
    m = methods.create("kd", teacher=teacher, student=student, logit_loss="dkd", logit_standardize=True,
                       dkd={"alpha": 0.5, "beta": 2.0}, T=2.0, input_shape=(3, 16, 16))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    out = m(x, y)
    lg = out["logits"]
    want = losses.dkd(losses.standardize(lg["teacher"]), losses.standardize(lg["student"]), y, 0.5, 2.0, 2.0)
    assert torch.allclose(out["terms"]["student_kl_teacher"], want)


def test_warmup_ramps_distillation_terms_only():
    teacher, student = _nets()
    m = methods.create("kd", teacher=teacher, student=student, warmup_epochs=4,
                       weights={"student_kl_teacher": 2.0}, input_shape=(3, 16, 16))
    seen = []
    for epoch in range(6):
        m.set_epoch(epoch)
        seen.append((m.weight("student_ce"), m.weight("student_kl_teacher")))
    assert seen == [(1.0, 0.5), (1.0, 1.0), (1.0, 1.5), (1.0, 2.0), (1.0, 2.0), (1.0, 2.0)]
    assert m.term_weights["student_kl_teacher"] == 2.0  # the configured weight, for reports


def test_options_that_do_not_compose_are_refused():
    teacher, student = _nets()
    with pytest.raises(SokdError, match="logit_standardize composes with logit_loss kl or dkd"):
        methods.create("kd", teacher=teacher, student=student, logit_loss="dist", logit_standardize=True)
    with pytest.raises(SokdError, match="has no distillation term"):
        methods.create("vanilla", model=student, logit_loss="dkd")
    with pytest.raises(SokdError, match="unknown feature kind 'spp'.*did you mean 'sp'"):
        methods.create("kd", teacher=teacher, student=student, features=[{"kind": "spp"}])
    with pytest.raises(SokdError, match="w_angle"):
        methods.create("kd", teacher=teacher, student=student,
                       features=[{"kind": "rkd", "options": {"w_angle": -1}}])
    with pytest.raises(SokdError, match="takes no options"):
        methods.create("kd", teacher=teacher, student=student, features=[{"kind": "sp", "options": {"x": 1}}])
