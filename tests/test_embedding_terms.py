"""The embedding (what a network's classifier reads) as the features PKT, RKD, CRD and ND compare.

On a pre-activation network (WideResNet) the classifier reads the last stage after a final
BN + ReLU, so the pooled raw stage output is a different vector: these tests pin down which one
each term compares, for every head shape sokd builds.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sokd
from sokd import cli, methods
from sokd.errors import SokdError
from sokd.methods import losses
from sokd.models.staged import StagedNet, embedding_cut, has_embedding, head_with_embedding

from .conftest import tiny_config, write_config

SHAPE = (3, 16, 16)


def _wrn():
    torch.manual_seed(0)
    return sokd.models.create("wrn_16_1", num_classes=4)


def test_a_wrn_embedding_is_its_final_bn_relu_pooled_not_its_raw_last_stage():
    net = _wrn().train()
    # a BN with non-trivial statistics, so the two vectors differ in more than a sign clip
    net.head[0].weight.data.uniform_(0.5, 2.0)
    net.head[0].bias.data.uniform_(-1.0, 1.0)
    x = torch.randn(6, *SHAPE)
    logits, feats, emb = net.forward_features(x, embedding=True)
    by_hand = torch.relu(net.head[0](feats[-1])).mean(dim=(2, 3))
    assert torch.allclose(emb, by_hand, atol=1e-5)
    assert not torch.allclose(emb, losses.embedding(feats[-1]), atol=1e-2)
    assert (emb >= 0).all()
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), net.forward_features(x, embedding=True)[0], atol=1e-6)
        assert torch.allclose(net.head[-1](net.forward_features(x, embedding=True)[2]), net(x), atol=1e-5)


def test_a_post_activation_resnets_embedding_is_its_pooled_last_stage():
    net = sokd.models.create("resnet8", num_classes=4).eval()
    with torch.no_grad():
        _, feats, emb = net.forward_features(torch.randn(3, *SHAPE), embedding=True)
    assert torch.allclose(emb, losses.embedding(feats[-1]), atol=1e-6)


def test_the_embedding_is_taken_before_the_dropout_that_precedes_the_classifier():
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(0.5), nn.Linear(8, 3))
    assert embedding_cut(head) == 2
    x = torch.randn(4, 8, 2, 2)
    head.train()
    logits, emb = head_with_embedding(head, x)
    assert torch.allclose(emb, x.mean(dim=(2, 3)), atol=1e-6)   # no dropout mask in it
    assert logits.shape == (4, 3)
    assert embedding_cut(nn.Sequential(nn.ReLU())) is None and not has_embedding(nn.Identity())


@pytest.mark.parametrize("kind", ["pkt", "rkd", "crd", "nd"])
def test_embedding_terms_compare_the_embeddings_by_default(kind):
    teacher, student = sokd.models.create("wrn_16_2", num_classes=4), _wrn()
    kd = methods.create("kd", teacher=teacher, student=student, features=[{"kind": kind}], input_shape=SHAPE,
                        num_samples=16)
    assert kd.features.uses_embedding and kd.features_embedding
    n_s, n_t = student.num_stages, teacher.num_stages
    assert kd.features.pairs[f"student_{kind}"] == [(n_s, n_t)]
    staged = methods.create("kd", teacher=teacher, student=student, features=[{"kind": kind, "stages": [-1]}],
                            input_shape=SHAPE, num_samples=16)
    assert not staged.features.uses_embedding and staged.features.pairs[f"student_{kind}"] == [(n_s - 1, n_t - 1)]


def test_the_pkt_term_of_a_kd_step_is_pkt_of_the_two_embeddings():
    teacher, student = sokd.models.create("wrn_16_2", num_classes=4), _wrn()
    kd = methods.create("kd", teacher=teacher, student=student, features=[{"kind": "pkt"}], input_shape=SHAPE)
    kd.train()
    teacher.eval()
    x, y = torch.randn(8, *SHAPE), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out = kd(x, y)
    with torch.no_grad():
        t_emb = teacher.forward_features(x, embedding=True)[2]
        s_emb = student.forward_features(x, embedding=True)[2]
        s_stage = student.forward_features(x)[1][-1]
        t_stage = teacher.forward_features(x)[1][-1]
    term = out["terms"]["student_pkt"]
    assert term.item() == pytest.approx(losses.pkt(s_emb, t_emb).item(), rel=1e-4)
    assert term.item() != pytest.approx(losses.pkt(s_stage, t_stage).item(), rel=1e-2)


def test_sokd_compares_the_student_with_the_bridges_embedding():
    teacher, student = sokd.models.create("wrn_16_2", num_classes=4), _wrn()
    m = methods.create("sokd", teacher=teacher, student=student, features=[{"kind": "rkd"}], input_shape=SHAPE)
    m.train()
    x, y = torch.randn(8, *SHAPE), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out = m(x, y)
    parts = out["terms"]
    parts["student_rkd"].backward()
    # the term reaches the student, never the bridge (its target side is detached)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.nets["kbm"].parameters())


def test_a_map_term_refuses_the_embedding_and_a_head_without_one_is_named():
    teacher, student = sokd.models.create("wrn_16_2", num_classes=4), _wrn()
    with pytest.raises(SokdError, match="compares feature maps"):
        methods.create("kd", teacher=teacher, student=student, features=[{"kind": "at", "stages": ["embedding"]}],
                       input_shape=SHAPE)

    class OpaqueHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 4)

        def forward(self, x):
            return self.fc(x.mean(dim=(2, 3)))

    odd = sokd.models.create("wrn_16_1", num_classes=4)
    odd = StagedNet(odd.stem, list(odd.stages), OpaqueHead())
    with pytest.raises(SokdError, match=r"student's head \(OpaqueHead\) gives none.*stages"):
        methods.create("kd", teacher=teacher, student=odd, features=[{"kind": "pkt"}], input_shape=SHAPE)
    # with stages given, the same student compares pooled stage outputs
    methods.create("kd", teacher=teacher, student=odd, features=[{"kind": "pkt", "stages": [-1]}],
                   input_shape=SHAPE)


def test_a_vits_embedding_is_the_normalised_pooled_token_its_classifier_reads():
    pytest.importorskip("timm")
    vit = sokd.models.create("timm.vit_tiny_patch16_224", num_classes=4, img_size=16, patch_size=4,
                             embed_dim=16, depth=2, num_heads=2).eval()
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        logits, _, emb = vit.forward_features(x, embedding=True)
        assert emb.shape == (2, 16)
        assert torch.allclose(logits, vit(x), atol=1e-5)
        assert torch.allclose(vit.head.head(emb), logits, atol=1e-5)


def test_a_kd_pkt_run_on_wrns_trains_through_sokd_train(tmp_path, one_thread):
    teacher = tiny_config(tmp_path, "vanilla", model={"arch": "wrn_16_1"}, train={"epochs": 1, "seed": 0,
                                                                                    "precision": "fp32"})
    teacher["output"]["dir"] = str(tmp_path / "t")
    assert cli.main(["train", str(write_config(tmp_path, teacher, "t.yaml"))]) == 0
    cfg = tiny_config(tmp_path, "kd", teacher={"arch": "wrn_16_1", "checkpoint": str(tmp_path / "t" / "model.pt")},
                      student={"arch": "wrn_16_1"}, train={"epochs": 1, "seed": 0, "precision": "fp32"})
    cfg["method"] = {"name": "kd", "features": [{"kind": "pkt"}, {"kind": "crd"}]}
    assert cli.main(["train", str(write_config(tmp_path, cfg))]) == 0
