"""ReviewKD feature kind: ABF shapes, HCL against a hand computation, gradient flow (ABF and
student yes, target no), bf16 autocast, and one CLI epoch each of kd and sokd with the term."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sokd
from sokd.cli import main
from sokd.errors import SokdError
from sokd.methods.features import KINDS, FeatureSpec, FeatureTerms
from sokd.methods.features.reviewkd import ReviewKDTerm, hcl_level

from .conftest import tiny_config, write_config


def _wrn_term(**options):
    student = sokd.models.create("wrn_16_1", num_classes=10)
    target = sokd.models.create("wrn_16_2", num_classes=10)
    terms = FeatureTerms([FeatureSpec(kind="reviewkd", options=options)], student, target, (3, 32, 32))
    return student, target, terms, terms.modules_by_term["student_reviewkd"]


def test_kind_is_registered_with_its_source_and_all_stages_and_the_embedding_by_default():
    kind = KINDS["reviewkd"]
    assert kind.default_weight == 5.0 and "ReviewKD" in kind.source and kind.build is not None
    assert kind.default_stages(3) == [0, 1, 2, "embedding"]


def test_fused_outputs_match_the_target_shapes_wrn16_1_to_wrn16_2_embedding_first():
    student, target, terms, term = _wrn_term()
    # the released code's four levels for WRNs: the pooled feature (a 1 x 1 map), then the stages
    assert term.pairs == [(3, 3), (2, 2), (1, 1), (0, 0)]
    assert term.mid_channels == 64  # min(512, channels of the deepest student level)
    x = torch.randn(2, 3, 32, 32)
    _, s_feats, s_emb = student.forward_features(x, embedding=True)
    _, t_feats, t_emb = target.forward_features(x, embedding=True)
    assert [f.shape[1] for f in s_feats] != [f.shape[1] for f in t_feats]  # channels differ
    outs = term.fused(s_feats + [s_emb], t_feats + [t_emb])
    assert outs[0].shape == (2, t_emb.shape[1], 1, 1)
    assert [o.shape for o in outs[1:]] == [t_feats[j].shape for _, j in term.pairs[1:]]
    loss = terms(s_feats, t_feats, student_embedding=s_emb, target_embedding=t_emb)["student_reviewkd"]
    assert torch.isfinite(loss).item() and loss.item() > 0


def test_spatial_mismatch_and_cross_level_pairs_resize_to_the_target():
    # student stage maps 8x8 and 4x4 paired with target maps 16x16 and 8x8 of other channel counts
    term = ReviewKDTerm([(0, 1), (1, 0)], [6, 10], [7, 5], mid_channels=4)
    s = [torch.randn(2, 6, 8, 8), torch.randn(2, 10, 4, 4)]
    t = [torch.randn(2, 7, 16, 16), torch.randn(2, 5, 8, 8)]
    outs = term.fused(s, t)
    assert term.pairs == [(1, 0), (0, 1)]
    assert [o.shape for o in outs] == [t[0].shape, t[1].shape]
    assert torch.isfinite(term(s, t, {})).item()
    with pytest.raises(SokdError, match="student stage twice"):
        ReviewKDTerm([(0, 0), (0, 1)], [6], [7, 5])


def test_hcl_is_zero_for_identical_maps_and_matches_a_hand_computation():
    a = torch.randn(3, 5, 8, 8)
    assert hcl_level(a, a.clone()).item() == 0.0
    # 1x1x4x4 maps: target 0, student = one 2x2 block of ones (top-left), rest 0
    s = torch.zeros(1, 1, 4, 4)
    s[..., :2, :2] = 1.0
    t = torch.zeros_like(s)
    full = 4 / 16            # four squared errors of 1 among 16 elements
    pool2 = (1.0 ** 2) / 4   # 2x2 pooling: block means [1, 0; 0, 0]
    pool1 = (4 / 16) ** 2    # 1x1 pooling: mean 1/4
    # level 4 does not shrink a 4x4 map and is skipped; levels 2 and 1 weigh 1/2 and 1/4
    expected = (full + 0.5 * pool2 + 0.25 * pool1) / (1 + 0.5 + 0.25)
    assert hcl_level(s, t, (4, 2, 1)).item() == pytest.approx(expected, rel=1e-6)
    # with an 8x8 map every level shrinks it: weights 1, 1/2, 1/4, 1/8
    s8 = torch.zeros(1, 1, 8, 8)
    s8[..., 0, 0] = 8.0
    t8 = torch.zeros_like(s8)
    e = [64 / 64, (8 / 4) ** 2 / 16, (8 / 16) ** 2 / 4, (8 / 64) ** 2]
    assert hcl_level(s8, t8).item() == pytest.approx(
        (e[0] + e[1] / 2 + e[2] / 4 + e[3] / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8), rel=1e-6)
    # no pooling levels: plain MSE
    assert hcl_level(s, t, ()).item() == pytest.approx(full)


def test_gradients_reach_the_abf_blocks_and_student_features_not_the_target():
    term = ReviewKDTerm([(0, 0), (1, 1)], [4, 8], [6, 12], mid_channels=8)
    s = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)]
    t = [torch.randn(2, 6, 8, 8, requires_grad=True), torch.randn(2, 12, 4, 4, requires_grad=True)]
    loss = term(s, t, {"labels": None, "index": None})
    loss.backward()
    for name, p in term.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert term.abfs[0].attention is None and term.abfs[1].attention is not None  # deepest: no fusion
    assert term.abfs[1].attention[0].weight.grad.abs().sum() > 0
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s)
    assert all(f.grad is None for f in t)


def test_abf_parameters_learn_in_the_student_param_group():
    teacher = sokd.models.create("wrn_16_2", num_classes=10)
    student = sokd.models.create("wrn_16_1", num_classes=10)
    m = sokd.methods.create("kd", teacher=teacher, student=student, features=[{"kind": "reviewkd"}])
    groups = {g["role"]: g for g in m.param_groups(lr=0.1)}
    abf = {id(p) for p in m.features.modules_by_term["student_reviewkd"].parameters()}
    assert abf and abf <= {id(p) for p in groups[FeatureTerms.group]["params"]}
    assert m.term_weights["student_reviewkd"] == 5.0


def test_bf16_autocast_gives_a_finite_fp32_loss():
    student, target, terms, _ = _wrn_term(pool_levels=[2, 1])
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, s_feats, s_emb = student.forward_features(x, embedding=True)
        with torch.no_grad():
            _, t_feats, t_emb = target.forward_features(x, embedding=True)
        loss = terms(s_feats, t_feats, student_embedding=s_emb, target_embedding=t_emb)["student_reviewkd"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss).item()
    loss.backward()


def test_options_are_validated():
    with pytest.raises(SokdError, match="pool_levels"):
        _wrn_term(pool_levels=[0])
    with pytest.raises(SokdError, match="mid_chanels"):
        _wrn_term(mid_chanels=8)
    assert _wrn_term(mid_channels=16)[3].mid_channels == 16


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
    """A resnet14 teacher after one step: the CLI runs need a trained-teacher file, not accuracy."""
    from sokd import config, runner
    tmp = tmp_path_factory.mktemp("rkd_teacher")
    cfg = tiny_config(tmp, "vanilla", model={"arch": "resnet14"},
                      data={"synthetic_size": 64, "test_limit": 64},
                      train={"epochs": 1, "steps_per_epoch": 1, "seed": 0})
    runner.train(config.build(cfg))
    return Path(cfg["output"]["dir"]) / "model.pt"


@pytest.mark.parametrize("method", ["kd", "sokd"])
def test_one_cli_epoch_with_reviewkd(method, tmp_path, small_teacher, one_thread):
    cfg = tiny_config(tmp_path, method, train={"epochs": 1, "seed": 0})
    cfg["teacher"]["checkpoint"] = str(small_teacher)
    cfg["method"]["features"] = [{"kind": "reviewkd"}]
    cfg["data"]["synthetic_size"] = 64
    assert main(["train", str(write_config(tmp_path, cfg))]) == 0
    run_dir = tmp_path / "runs" / method
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["term_weights"]["student_reviewkd"] == 5.0
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["epoch"] == 1 and "student_regressors" in last["lr"]  # the ABF blocks' group
    assert 0.0 < last["train"]["terms"]["student_reviewkd"] < float("inf")
