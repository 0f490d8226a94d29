"""SHAKE, NKD, MLKD (and its strong view), CTKD, KD++'s ND term and the DOT optimizer: closed
forms on hand-built tensors, where gradients go, and what each changes in a training step."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sokd
from sokd import cli, methods
from sokd.data import strong
from sokd.data.sources import TensorBatches
from sokd.engine.dot import DOT, backward
from sokd.errors import SokdError
from sokd.methods import losses
from sokd.methods.temperature import CTKDOptions, CurriculumTemperature

from .conftest import tiny_config, write_config


def _logits(b=6, c=5, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * scale


# -- NKD ---------------------------------------------------------------------------------------

def _nkd_by_hand(t, s, y, gamma, T):
    total_target = total_non = 0.0
    for i in range(len(y)):
        p, logq = torch.softmax(t[i], 0), torch.log_softmax(s[i], 0)
        total_target += -(p[y[i]] * logq[y[i]]).item()
        keep = [j for j in range(t.shape[1]) if j != y[i]]
        p_hat = torch.softmax(t[i, keep] / T, 0)
        logq_hat = torch.log_softmax(s[i, keep] / T, 0)
        total_non += -(p_hat * logq_hat).sum().item()
    n = len(y)
    return total_target / n + gamma * T * T * total_non / n


@pytest.mark.parametrize("gamma,T", [(1.5, 1.0), (3.5, 3.0)])
def test_nkd_is_its_closed_form(gamma, T):
    t, s, y = _logits(seed=1), _logits(seed=2), torch.tensor([0, 1, 2, 3, 4, 0])
    assert losses.nkd(t, s, y, gamma, T).item() == pytest.approx(_nkd_by_hand(t, s, y, gamma, T), rel=1e-5)


def test_nkd_at_identity_only_its_target_part_pulls():
    """At s = t the non-target part is at its minimum (zero gradient); the target part's gradient
    is p_y (q - onehot) / B, as for a CE weighted by the teacher's confidence."""
    t, y = _logits(seed=3), torch.tensor([1, 0, 4, 2, 3, 1])
    s = t.clone().requires_grad_(True)
    losses.nkd(t, s, y, gamma=3.5, T=3.0).backward()
    p = torch.softmax(t, 1)
    onehot = F.one_hot(y, 5).float()
    expected = p.gather(1, y[:, None]) * (p - onehot) / len(y)
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_nkd_gradients_reach_the_student_only_and_are_fp32_from_bf16():
    t = _logits(seed=4).bfloat16().requires_grad_(True)
    s = _logits(seed=5).bfloat16().requires_grad_(True)
    out = losses.nkd(t, s, torch.tensor([0, 1, 2, 3, 4, 0]))
    assert out.dtype == torch.float32
    out.backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


# -- MLKD --------------------------------------------------------------------------------------

@pytest.mark.parametrize("views", [1, 2])
def test_mlkd_is_zero_at_identity_and_positive_elsewhere(views):
    t = _logits(b=8 * views, c=5, seed=6)
    assert losses.mlkd(t, t.clone(), 4.0, views).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.mlkd(t, _logits(b=8 * views, c=5, seed=7), 4.0, views).item() > 0


def test_mlkd_is_its_closed_form():
    """Instance KL at T, 3, 5, 2, 6 on both views (the usual one weighted by the share of samples at
    or below the median confidence), class and batch Gram distances on the usual view."""
    t, s = _logits(b=8, c=4, seed=8), _logits(b=8, c=4, seed=9)
    weak_t, weak_s, strong_t, strong_s = t[:4], s[:4], t[4:], s[4:]
    p1 = torch.softmax(weak_t, 1)
    conf = p1.max(1).values
    m = (conf <= torch.quantile(conf, 0.5)).float().mean()
    csum = p1.sum(0)
    c = (csum <= torch.quantile(csum, 0.5)).float().mean()
    expected = 0.0
    for tau in (4.0, 3.0, 5.0, 2.0, 6.0):
        def kl(a, b):
            pa = torch.softmax(a / tau, 1)
            return (pa * (torch.log_softmax(a / tau, 1) - torch.log_softmax(b / tau, 1))).sum(1).mean() * tau ** 2
        pt, ps = torch.softmax(weak_t / tau, 1), torch.softmax(weak_s / tau, 1)
        cc = ((pt.T @ pt - ps.T @ ps) ** 2).sum() / 4
        bc = ((pt @ pt.T - ps @ ps.T) ** 2).sum() / 4
        expected += m * kl(weak_t, weak_s) + kl(strong_t, strong_s) + c * cc + m * bc
    assert losses.mlkd(t, s, 4.0, views=2).item() == pytest.approx(float(expected), rel=1e-5)
    assert m.item() == 0.5 and c.item() == 0.5   # distinct values: the shares are one half


def test_mlkds_class_level_is_not_normalised_for_the_number_of_classes():
    """As released, ||P_t^T P_t - P_s^T P_s||^2_F / C: the Gram matrices of a batch sum to B
    whatever C is, so the class level grows as C falls. A one-hot-like teacher against a uniform
    student: below the instance level on a hundred classes, far above it on ten (docs/methods.md)."""
    b, ratio = 128, {}
    for c in (10, 100):
        t, s = F.one_hot(torch.arange(b) % c, c).float() * 50.0, torch.zeros(b, c)
        class_level = losses._class_gram_distance(F.softmax(t / 4.0, 1), F.softmax(s / 4.0, 1))
        ratio[c] = (class_level / losses.soft_target(t, s, 4.0)).item()
    assert ratio[100] < 1 < ratio[10] and ratio[10] > 50 * ratio[100]


def test_mlkd_with_standardisation_changes_the_instance_level_only():
    t = _logits(b=8, c=4, seed=10)
    s = t * 3.0 + 1.0   # the same shape of logits, another scale and shift
    plain, standardised = losses.mlkd(t, s, 4.0, 1, False), losses.mlkd(t, s, 4.0, 1, True)
    assert standardised < plain
    # what remains is the class and batch levels, which never standardise
    rest = losses.mlkd(t, s, 4.0, 1, True) - sum(
        0.5 * losses.soft_target(losses.standardize(t), losses.standardize(s), tau) for tau in (4.0, 3, 5, 2, 6))
    assert rest.item() > 0


# -- the strong view ---------------------------------------------------------------------------

def _batches(**kw):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8, generator=g)
    labels = torch.arange(40) % 4
    return TensorBatches(images, labels, 8, [0.5] * 3, [0.25] * 3, mode="train", crop_padding=2, hflip=True,
                         seed=3, **kw)


def test_the_strong_view_is_a_pure_function_of_seed_epoch_and_batch():
    a, b = _batches(), _batches()
    a.strong_view = b.strong_view = True
    a.set_epoch(2)
    b.set_epoch(2)
    full = list(a)
    tail = list(b.iter_from(3))
    assert len(full[0]) == 3 and full[0][2].shape == full[0][0].shape
    for x, y in zip(full[3:], tail):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert not torch.equal(full[0][0], full[0][2])            # another view of the same images
    plain = _batches()
    plain.set_epoch(2)
    assert torch.equal(next(iter(plain))[0], full[0][0])      # the usual view is unchanged


def test_every_strong_operation_keeps_shape_and_range_and_cutout_fills_a_square():
    x = torch.randint(0, 256, (16, 3, 10, 10), dtype=torch.uint8)
    u = torch.linspace(0, 1, 16)
    for op in strong.OPS:
        out = op(x.float(), u)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255, op.__name__
    g = torch.Generator().manual_seed(1)
    holes = strong.cutout(torch.zeros(64, 3, 10, 10), g)
    filled = holes[:, 0] == strong.CUTOUT_FILL[0]
    assert filled.any()
    for mask, image in zip(filled, holes):
        if mask.any():   # one axis-aligned rectangle (a square, clipped at the border), every channel filled
            assert mask.any(1).sum() * mask.any(0).sum() == mask.sum()
            assert image[:, mask].T.tolist() == [list(map(float, strong.CUTOUT_FILL))] * int(mask.sum())


def test_a_method_asking_for_a_strong_view_gets_both_views_stacked():
    teacher = sokd.models.create("resnet14", num_classes=4)
    student = sokd.models.create("resnet8", num_classes=4)
    kd = methods.create("kd", teacher=teacher, student=student, logit_loss="mlkd", input_shape=(3, 16, 16))
    assert kd.views == 2
    assert methods.create("kd", teacher=teacher, student=student, logit_loss="mlkd", mlkd={"strong_view": False},
                          input_shape=(3, 16, 16)).views == 1
    with pytest.raises(SokdError, match="crd"):
        methods.create("kd", teacher=teacher, student=student, logit_loss="mlkd", num_samples=64,
                       features=[{"kind": "crd"}], input_shape=(3, 16, 16))


def test_an_mlkd_run_resumes_exactly(tmp_path, teacher_file, one_thread):
    """The strong view is drawn per batch from the run's seed: a run stopped after one epoch and
    resumed ends where the uninterrupted run ends."""
    import shutil
    shutil.copy(teacher_file, tmp_path / "teacher.pt")

    def run(out, epochs, resume=False):
        cfg = tiny_config(tmp_path, "kd", data={"name": "synthetic", "synthetic_size": 64,
                                               "synthetic_shape": [3, 16, 16], "synthetic_classes": 4,
                                               "batch_size": 16, "eval_batch_size": 64},
                          train={"epochs": epochs, "seed": 1, "precision": "fp32"})
        cfg["method"] = {"name": "kd", "logit_loss": "mlkd", "temperature": "ctkd"}
        cfg["output"] = {**cfg.get("output", {}), "dir": str(tmp_path / out), "resume": resume}
        assert cli.main(["train", str(write_config(tmp_path, cfg))]) == 0
        return torch.load(tmp_path / out / "last.pt", weights_only=False)["method"]

    whole = run("whole", 2)
    run("halves", 1)
    halves = run("halves", 2, resume=True)
    assert whole.keys() == halves.keys()
    for key in whole:
        assert torch.equal(whole[key], halves[key]), key


# -- CTKD --------------------------------------------------------------------------------------

def test_the_curriculum_temperature_starts_at_its_formula_and_its_reversal_follows_the_cosine():
    temp = CurriculumTemperature(CTKDOptions())
    assert temp().item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)
    for epoch, lam in [(0, (1 - math.cos(math.pi / 10)) / 2), (4, 0.5), (9, 1.0), (30, 1.0)]:
        temp.set_epoch(epoch)
        assert temp.strength.item() == pytest.approx(lam, abs=1e-6)


def test_the_temperature_ascends_the_distillation_loss_that_the_student_descends():
    temp = CurriculumTemperature(CTKDOptions())
    temp.set_epoch(9)   # full strength: the gradient is reversed exactly
    t, s = _logits(seed=11), _logits(seed=12)
    losses.soft_target(t, s, temp()).backward()
    reversed_grad = temp.theta.grad.clone()
    theta = temp.theta.detach().clone().requires_grad_(True)
    losses.soft_target(t, s, 1 + 20 * torch.sigmoid(theta)).backward()
    assert reversed_grad.item() == pytest.approx(-theta.grad.item(), rel=1e-5)
    temp.theta.grad = None
    temp.set_epoch(4)
    losses.soft_target(t, s, temp()).backward()
    assert temp.theta.grad.item() == pytest.approx(-0.5 * theta.grad.item(), rel=1e-5)


def test_ctkd_puts_its_temperature_in_the_optimizer_and_the_checkpoint():
    teacher = sokd.models.create("resnet14", num_classes=4)
    student = sokd.models.create("resnet8", num_classes=4)
    kd = methods.create("kd", teacher=teacher, student=student, temperature="ctkd", input_shape=(3, 16, 16))
    groups = {g["role"]: g for g in kd.param_groups(0.1, {"temperature": 0.01})}
    assert groups["temperature"]["params"] == [kd.temperature.theta] and groups["temperature"]["lr"] == 0.01
    assert "temperature.theta" in kd.state_dict()
    with pytest.raises(SokdError, match="no distillation term"):
        methods.create("vanilla", model=student, temperature="ctkd")


# -- KD++'s ND term ----------------------------------------------------------------------------

def test_norm_direction_is_its_closed_form():
    centres = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    loss = losses.norm_direction(s, t, centres, labels)
    # sample 0: shorter than the target, aligned: 1 - 1/2; sample 1: longer, aligned: 0;
    # sample 2: its class has no centre yet: 1, with no gradient
    assert loss.item() == pytest.approx((0.5 + 0.0 + 1.0) / 3, abs=1e-6)
    loss.backward()
    assert torch.equal(s.grad[2], torch.zeros(2))
    assert s.grad[0, 0] < 0   # lengthen the short student embedding


def test_nd_centres_are_the_running_class_means_of_the_target_embeddings():
    teacher = sokd.models.create("resnet14", num_classes=4)
    student = sokd.models.create("resnet8", num_classes=4)
    kd = methods.create("kd", teacher=teacher, student=student, features=[{"kind": "nd"}], input_shape=(3, 16, 16))
    term = kd.features.modules_by_term["student_nd"]
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 0, 1, 2, 2, 0, 3])
    kd.train()
    kd(x, y)
    with torch.no_grad():
        emb = losses.embedding(teacher.forward_features(x)[1][-1])
    for c in range(4):
        assert torch.allclose(term.centres()[c], emb[y == c].mean(0), atol=1e-5)
    with pytest.raises(SokdError, match="centres: mean"):
        methods.create("kd", teacher=sokd.models.create("wrn_16_1", num_classes=4), student=student,
                       features=[{"kind": "nd", "stages": [0], "options": {"centres": "classifier"}}],
                       input_shape=(3, 16, 16))


# -- DOT ---------------------------------------------------------------------------------------

def _tiny_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(3, 4, generator=g))
    b = torch.nn.Parameter(torch.randn(3, generator=g))
    x, y = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    return w, b, x, y


def _parts(w, b, x, y):
    out = x @ w.t() + b
    return {"task": (out - y).pow(2).mean(), "distill": out.abs().mean() + w.pow(2).sum() * 0.1}


def test_dot_with_no_delta_is_sgd_on_the_summed_loss():
    w1, b1, x, y = _tiny_problem()
    w2, b2 = (torch.nn.Parameter(p.detach().clone()) for p in (w1, b1))
    dot = DOT([w1, b1], lr=0.1, momentum=0.9, delta=0.0, weight_decay=5e-4)
    sgd = torch.optim.SGD([w2, b2], lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(4):
        parts = _parts(w1, b1, x, y)
        backward({"loss_parts": parts, "loss": parts["task"] + parts["distill"]}, dot, scaler)
        dot.step()
        sgd.zero_grad()
        p2 = _parts(w2, b2, x, y)
        (p2["task"] + p2["distill"]).backward()
        sgd.step()
    assert torch.allclose(w1, w2, atol=1e-6) and torch.allclose(b1, b2, atol=1e-6)


def test_dot_keeps_a_momentum_per_gradient_and_decays_the_task_buffer_only():
    w, b, x, y = _tiny_problem(1)
    m, delta, lr, wd = 0.9, 0.075, 0.1, 5e-4
    dot = DOT([w], lr=lr, momentum=m, delta=delta, weight_decay=wd)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    b.requires_grad_(False)
    buf_t = buf_d = None
    for _ in range(3):
        theta = w.detach().clone()
        g_t = torch.autograd.grad(_parts(w, b, x, y)["task"], w)[0]
        g_d = torch.autograd.grad(_parts(w, b, x, y)["distill"], w)[0]
        parts = _parts(w, b, x, y)
        backward({"loss_parts": parts}, dot, scaler)
        dot.step()
        d_t = g_t + wd * theta
        buf_t = d_t if buf_t is None else (m - delta) * buf_t + d_t
        buf_d = g_d if buf_d is None else (m + delta) * buf_d + g_d
        assert torch.allclose(w, theta - lr * (buf_t + buf_d), atol=1e-6)
    state = dot.state[w]
    assert set(state) == {"momentum_buffer", "distill_momentum_buffer"}


def test_dot_trains_every_method_through_sokd_train(tmp_path, teacher_file, one_thread):
    import shutil
    for name in ("kd", "sokd", "shake", "dml"):
        if methods.needs_trained_teacher(name):
            shutil.copy(teacher_file, tmp_path / "teacher.pt")
        cfg = tiny_config(tmp_path, name, data={"name": "synthetic", "synthetic_size": 64,
                                                "synthetic_shape": [3, 16, 16], "synthetic_classes": 4,
                                                "batch_size": 16, "eval_batch_size": 64},
                          train={"epochs": 1, "steps_per_epoch": 2, "precision": "fp32"})
        cfg["optim"] = {**cfg.get("optim", {}), "name": "dot"}
        assert cli.main(["train", str(write_config(tmp_path, cfg))]) == 0, name


def test_dot_refuses_what_it_cannot_do(tmp_path, teacher_file, capsys):
    import shutil
    shutil.copy(teacher_file, tmp_path / "teacher.pt")
    cfg = tiny_config(tmp_path, "kd", train={"epochs": 1, "precision": "fp32"})
    cfg["optim"] = {**cfg.get("optim", {}), "name": "dot", "nesterov": True}
    assert cli.main(["train", str(write_config(tmp_path, cfg))]) == 2
    assert "no Nesterov variant" in capsys.readouterr().err
    cfg["optim"] = {**cfg["optim"], "nesterov": False, "momentum": 0.95, "dot_delta": 0.075}
    assert cli.main(["train", str(write_config(tmp_path, cfg))]) == 2
    assert "lower optim.dot_delta" in capsys.readouterr().err


# -- SHAKE -------------------------------------------------------------------------------------

def _shake(**options):
    torch.manual_seed(0)
    teacher = sokd.models.create("resnet14", num_classes=4)
    student = sokd.models.create("resnet8", num_classes=4)
    return methods.create("shake", teacher=teacher, student=student, input_shape=(3, 16, 16), **options)


def test_shake_learns_its_shadow_and_student_from_one_backward_and_never_the_teacher():
    shake = _shake()
    teacher = shake.nets["teacher"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.SGD(shake.param_groups(0.1), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3] * 2)
    shake.train()
    out = shake(x, y)
    assert set(out["terms"]) == set(shake.term_names)
    assert shake.term_weights["student_kl_teacher"] == 0.0   # the released script's -a 0
    opt.zero_grad()
    out["loss"].backward()
    assert all(p.grad is not None for p in shake.nets["shadow"].parameters())
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert {g["role"] for g in shake.param_groups(0.1)} == {"student", "shadow"}
    assert not teacher.training   # frozen teacher on running statistics (SOKD's reference: batch statistics)


def test_shake_shadow_differs_from_sokds_bridge_in_what_it_is_what_it_reads_and_how_it_follows():
    """The shadow head is new fusion layers ending in the teacher's own (frozen, shared) classifier,
    fed the last three stages; SOKD's KBM is a copy of the last stage and the head, fed the stage
    before it; SHAKE follows the teacher by MSE on normalised logits, SOKD by KL."""
    shake = _shake()
    teacher = shake.nets["teacher"]
    shadow = shake.nets["shadow"]
    assert shadow._classifier[0] is teacher.head[-1]
    assert not any(p is q for p in shadow.parameters() for q in teacher.parameters())
    assert shake.fed == 3 and len(shadow.down) == 2
    sokd_method = methods.create("sokd", teacher=teacher, student=sokd.models.create("resnet8", num_classes=4),
                                 kbm_init="teacher", input_shape=(3, 16, 16))
    assert sokd_method.nets["kbm"].head is not teacher.head
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    shake.train()
    out = shake(x, y)
    t = F.layer_norm(out["logits"]["teacher"], (4,), eps=1e-7) * 3.1415
    h = F.layer_norm(out["logits"]["shadow"], (4,), eps=1e-7) * 3.1415
    assert out["terms"]["shadow_mse_teacher"].item() == pytest.approx(F.mse_loss(h, t).item(), rel=1e-5)
    assert "kbm_kl_teacher" in sokd_method.term_names and "shadow_mse_teacher" not in sokd_method.term_names


def test_shake_without_normalisation_uses_raw_logits():
    shake = _shake(logit_norm=0.0)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    shake.train()
    out = shake(x, y)
    assert out["terms"]["student_ce"].item() == pytest.approx(
        F.cross_entropy(out["logits"]["student"], y).item(), rel=1e-6)


def test_only_a_method_that_asks_gets_the_strong_view():
    from sokd.engine.loop import set_views
    source = _batches()
    set_views(source, 2)
    assert source.strong_view and len(next(iter(source))) == 3
    set_views(source, 1)
    assert not source.strong_view and len(next(iter(source))) == 2

    class Streamed:   # a source that cannot make the view
        pass
    other = Streamed()
    set_views(other, 1)
    assert not hasattr(other, "strong_view")
    with pytest.raises(SokdError, match="strong_view=false"):
        set_views(other, 2)


# -- OFA-KD --------------------------------------------------------------------------------------

def test_ofa_is_soft_target_cross_entropy_at_eps_1_and_enhances_the_label_class_beyond():
    t, s, y = _logits(seed=20), _logits(seed=21), torch.tensor([0, 1, 2, 3, 4, 0])
    p, log_q = torch.softmax(t, 1), torch.log_softmax(s, 1)
    assert losses.ofa(t, s, y, eps=1.0).item() == pytest.approx(-(p * log_q).sum(1).mean().item(), rel=1e-6)
    onehot = F.one_hot(y, 5).float()
    w = (p + onehot) ** 2 - onehot      # label: (1 + p_y)^2 - 1, others p_c^2
    assert losses.ofa(t, s, y, eps=2.0).item() == pytest.approx(-(w * log_q).sum(1).mean().item(), rel=1e-6)
    s2 = s.clone().requires_grad_(True)
    losses.ofa(t.requires_grad_(True), s2, y, eps=1.5).backward()
    assert t.grad is None and s2.grad.abs().sum() > 0


def test_ofa_branches_take_every_student_stage_to_the_logits():
    teacher = sokd.models.create("resnet14", num_classes=4)
    student = sokd.models.create("resnet8", num_classes=4)
    kd = methods.create("kd", teacher=teacher, student=student, input_shape=(3, 16, 16),
                        features=[{"kind": "ofa", "options": {"eps": 1.5}}])
    term = kd.features.modules_by_term["student_ofa"]
    assert term.stages == [0, 1, 2]
    feats = student.forward_features(torch.randn(2, 3, 16, 16))[1]
    # stage i of n: n - 1 - i halving blocks (the last stage: a 1x1 conv), then pooling and a classifier
    assert [sum(isinstance(m, torch.nn.BatchNorm2d) for m in b.modules()) for b in term.branches] == [4, 2, 0]
    assert all(b(f).shape == (2, 4) for b, f in zip(term.branches, feats))
    kd.train()
    out = kd(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    out["loss"].backward()
    assert all(p.grad is not None for p in term.parameters())
    with pytest.raises(SokdError, match="not its stages"):
        methods.create("kd", teacher=teacher, student=student, input_shape=(3, 16, 16),
                       features=[{"kind": "ofa", "target_stages": [0]}])
