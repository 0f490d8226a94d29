"""The logit distances (DKD, DIST, logit standardisation) and the relational terms (SP, PKT, RKD)
against their papers' formulas, computed here the long way on small hand-built tensors."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sokd.methods import losses


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same tensors whichever tests ran before it."""
    torch.manual_seed(0)


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_dkd_parts_decompose_kl_as_the_paper_states():
    """Zhao et al., eq. 4: KL(p_t || p_s) = TCKD + (1 - p_t[target]) * NCKD, per sample."""
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.tensor([0, 3, 6, 2, 2])
    tckd, nckd = losses.dkd_parts(t, s, y, T=3.0)
    p_t = F.softmax(t / 3, 1)
    for i in range(5):
        kl = losses.soft_target(t[i:i + 1], s[i:i + 1], T=3.0) / 9
        assert math.isclose(kl.item(), (tckd[i] + (1 - p_t[i, y[i]]) * nckd[i]).item(), rel_tol=1e-5)


def test_dkd_tckd_and_nckd_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    t, s, y, T = torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g), torch.tensor([1]), 2.0
    # the reference in float64: the float32 loss is compared with exact arithmetic, not with itself
    pt, ps = F.softmax(t.double() / T, 1)[0].tolist(), F.softmax(s.double() / T, 1)[0].tolist()
    b_t, b_s = [pt[1], 1 - pt[1]], [ps[1], 1 - ps[1]]
    rest_t = [p / (1 - pt[1]) for k, p in enumerate(pt) if k != 1]
    rest_s = [p / (1 - ps[1]) for k, p in enumerate(ps) if k != 1]
    want = (0.5 * _kl(b_t, b_s) + 3.0 * _kl(rest_t, rest_s)) * T * T
    got = losses.dkd(t, s, y, alpha=0.5, beta=3.0, T=T).item()
    assert math.isclose(got, want, rel_tol=1e-4)   # float32 loss: ~1e-6 typical, 1e-4 with margin


def test_dkd_with_unit_weights_bounds_kl_and_is_zero_for_equal_logits():
    t, s, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert losses.dkd(t, s, y, 1.0, 1.0) >= losses.soft_target(t, s) - 1e-5  # (1 - p) <= 1
    assert losses.dkd(t, t, y).abs() < 1e-5


def test_dist_matches_pearson_definition_and_is_zero_for_identical_logits():
    t, s, T = torch.randn(6, 5), torch.randn(6, 5), 4.0
    pt, ps = F.softmax(t / T, 1), F.softmax(s / T, 1)
    inter = sum(1 - torch.corrcoef(torch.stack([ps[i], pt[i]]))[0, 1] for i in range(6)) / 6
    intra = sum(1 - torch.corrcoef(torch.stack([ps[:, j], pt[:, j]]))[0, 1] for j in range(5)) / 5
    want = (2.0 * inter + 0.5 * intra) * T * T
    assert math.isclose(losses.dist(t, s, beta=2.0, gamma=0.5, T=T).item(), want.item(), rel_tol=1e-4)
    assert losses.dist(t, t).abs() < 1e-5


def test_standardize_is_zero_mean_unit_std_and_removes_shift_and_scale():
    z = torch.randn(4, 9)
    zs = losses.standardize(z)
    assert torch.allclose(zs.mean(1), torch.zeros(4), atol=1e-6)
    assert torch.allclose(zs.std(1), torch.ones(4), atol=1e-5)
    assert torch.allclose(losses.standardize(3.0 * z + 7.0), zs, atol=1e-5)


def test_similarity_preserving_matches_its_formula_and_ignores_a_common_feature_scale():
    fs, ft = torch.randn(4, 3, 2, 2), torch.randn(4, 5, 1, 1)
    def gram(f):
        f = f.flatten(1)
        g = f @ f.t()
        return g / g.norm(dim=1, keepdim=True)
    want = ((gram(fs) - gram(ft)) ** 2).sum() / 16
    assert math.isclose(losses.similarity_preserving(fs, ft).item(), want.item(), rel_tol=1e-5)
    assert losses.similarity_preserving(fs, fs) < 1e-10
    base = losses.similarity_preserving(fs, ft)
    assert torch.allclose(losses.similarity_preserving(fs * 7.0, ft / 3.0), base, atol=1e-6)


def test_pkt_matches_its_formula_and_ignores_embedding_scale():
    es, et = torch.randn(5, 3), torch.randn(5, 8)
    def cond(e):
        e = F.normalize(e, dim=1)
        sim = (e @ e.t() + 1) / 2
        return sim / sim.sum(1, keepdim=True)
    ps, pt = cond(es), cond(et)
    want = (pt * torch.log((pt + 1e-7) / (ps + 1e-7))).mean()
    assert math.isclose(losses.pkt(es, et).item(), want.item(), rel_tol=1e-5)
    assert losses.pkt(es, es).abs() < 1e-7
    assert torch.allclose(losses.pkt(es * (torch.rand(5, 1) + 0.5), et), losses.pkt(es, et), atol=1e-6)


def test_rkd_distance_and_angle_terms_match_their_definitions():
    es, et = torch.randn(4, 3), torch.randn(4, 6)
    def dists(e):
        d = torch.tensor([[float((e[i] - e[j]).norm()) for j in range(4)] for i in range(4)])
        return d / d[d > 0].mean()
    def angles(e):
        out = []
        for i, j, k in itertools.product(range(4), repeat=3):
            a, b = e[i] - e[j], e[k] - e[j]
            na, nb = a.norm(), b.norm()
            out.append(0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb)))
        return torch.tensor(out)
    want_d = F.smooth_l1_loss(dists(es), dists(et))
    want_a = F.smooth_l1_loss(angles(es), angles(et))
    assert math.isclose(losses.rkd(es, et, w_dist=1.0, w_angle=0.0).item(), want_d.item(), rel_tol=1e-4)
    assert math.isclose(losses.rkd(es, et, w_dist=0.0, w_angle=1.0).item(), want_a.item(), rel_tol=1e-4)
    assert math.isclose(losses.rkd(es, et).item(), (25 * want_d + 50 * want_a).item(), rel_tol=1e-4)


def test_rkd_is_zero_for_identical_and_invariant_to_a_common_scale():
    e = torch.randn(6, 4, 2, 2)
    assert losses.rkd(e, e) < 1e-6
    assert losses.rkd(5.0 * e, e) < 1e-5


LOGIT = {
    "dkd": lambda t, s, y: losses.dkd(t, s, y),
    "dist": lambda t, s, y: losses.dist(t, s, 2.0, 2.0, 4.0),
    "kl_standardized": lambda t, s, y: losses.soft_target(losses.standardize(t), losses.standardize(s), 2.0),
}
RELATIONAL = {
    "sp": losses.similarity_preserving,
    "pkt": losses.pkt,
    "rkd": losses.rkd,
}


@pytest.mark.parametrize("name", list(LOGIT) + list(RELATIONAL))
def test_targets_get_no_gradient_and_bf16_inputs_give_fp32_losses(name):
    if name in LOGIT:
        t, s = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10, requires_grad=True)
        fn = lambda a, b: LOGIT[name](a, b, torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1)))
    else:
        t, s = torch.randn(8, 6, 2, 2, requires_grad=True), torch.randn(8, 4, 2, 2, requires_grad=True)
        fn = RELATIONAL[name]
    loss = fn(t, s) if name in LOGIT else fn(s, t)
    loss.backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all()
    low = fn(t.detach().bfloat16(), s.detach().bfloat16()) if name in LOGIT else fn(s.detach().bfloat16(), t.detach().bfloat16())
    assert low.dtype == torch.float32
    assert math.isclose(low.item(), loss.item(), rel_tol=0.05, abs_tol=1e-3)


@pytest.mark.parametrize("name", list(RELATIONAL))
def test_relational_losses_ignore_bf16_autocast(name):
    """Their similarity matrices are fp32 even inside a bf16 autocast region."""
    s, t = torch.randn(8, 6, 2, 2), torch.randn(8, 4, 2, 2)
    want = RELATIONAL[name](s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = RELATIONAL[name](s, t)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
