"""Distillation methods: loss algebra, gradient isolation, frozen teachers, KBM construction."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import sokd
from sokd.errors import SokdError
from sokd.methods import losses

torch.set_num_threads(2)


def nets(teacher="wrn_16_2", student="wrn_16_1", classes=10, ch=3):
    torch.manual_seed(0)
    return (sokd.models.create(teacher, num_classes=classes, in_channels=ch),
            sokd.models.create(student, num_classes=classes, in_channels=ch))


def batch(n=8, ch=3, size=32, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, ch, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def sgd_steps(method, steps=3, lr=0.1):
    opt = torch.optim.SGD(method.param_groups(lr=lr), momentum=0.9)
    method.train()
    for i in range(steps):
        x, y = batch(seed=i)
        out = method(x, y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return out


# -- 3. KL terms equal their closed form -------------------------------------------------------
def test_soft_target_matches_hand_computed_value():
    t = torch.tensor([[2.0, 0.0, -2.0]])
    s = torch.tensor([[0.0, 1.0, 0.0]])
    T = 2.0
    pt = [math.exp(v / T) for v in (2.0, 0.0, -2.0)]
    pt = [p / sum(pt) for p in pt]
    ps = [math.exp(v / T) for v in (0.0, 1.0, 0.0)]
    ps = [p / sum(ps) for p in ps]
    expected = sum(a * math.log(a / b) for a, b in zip(pt, ps)) * T * T
    assert losses.soft_target(t, s, T).item() == pytest.approx(expected, rel=1e-6)


def test_soft_target_is_batch_mean_and_zero_for_equal_logits():
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    per = torch.stack([losses.soft_target(a[i:i + 1], b[i:i + 1], 4.0) for i in range(4)])
    assert losses.soft_target(a, b, 4.0).item() == pytest.approx(per.mean().item(), rel=1e-5)
    assert losses.soft_target(a, a, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    ref = F.kl_div(F.log_softmax(b / 4, 1), F.softmax(a / 4, 1), reduction="batchmean") * 16
    assert losses.soft_target(a, b, 4.0).item() == pytest.approx(ref.item(), rel=1e-5)


def test_soft_target_detaches_target():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True)
    losses.soft_target(a, b).backward()
    assert a.grad is None and b.grad is not None


def test_attention_transfer_zero_for_same_features_and_handles_spatial_mismatch():
    f = torch.randn(2, 8, 8, 8)
    assert losses.attention_transfer(f, f).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.attention_transfer(torch.randn(2, 4, 8, 8), torch.randn(2, 16, 4, 4)).item() > 0


# -- SOKD ------------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher_bn", ["train", "eval"])
def test_sokd_frozen_teacher_is_bitwise_unchanged(teacher_bn):
    """Weights and running statistics alike: under teacher_bn=train the teacher normalises by
    batch statistics while training, but its running statistics are held, not updated."""
    teacher, student = nets()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = sokd.methods.create("sokd", teacher=teacher, student=student, teacher_bn=teacher_bn)
    sgd_steps(method)
    after = teacher.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_sokd_teacher_bn_train_normalises_by_batch_statistics_while_training():
    teacher, student = nets()
    method = sokd.methods.create("sokd", teacher=teacher, student=student, teacher_bn="train")
    x, _ = batch()
    as_trained = copy.deepcopy(teacher).eval()
    on_batches = copy.deepcopy(teacher).train()
    method.train()
    with torch.no_grad():
        in_training = method.nets["teacher"](x)
        assert torch.equal(in_training, on_batches(x))      # batch statistics
        assert not torch.allclose(in_training, as_trained(x))
        method.eval()
        assert torch.equal(method.nets["teacher"](x), as_trained(x))   # running ones, as trained


def test_holding_the_teachers_running_statistics_changes_nothing_the_student_learns(monkeypatch):
    """The held statistics are never read while training, so the student's and the bridge's
    trajectories are those of a run whose teacher updates them (SOKD's released code)."""
    def trained():
        teacher, student = nets()
        method = sokd.methods.create("sokd", teacher=teacher, student=student, teacher_bn="train")
        torch.manual_seed(3)
        sgd_steps(method)
        return method, teacher
    held, held_teacher = trained()
    with monkeypatch.context() as mp:   # the released code's behaviour: running statistics move
        mp.setattr(sokd.methods.base, "hold_running_statistics", lambda net, hold=True: None)
        moved, moved_teacher = trained()
    for role in ("student", "kbm"):
        a, b = held.nets[role].state_dict(), moved.nets[role].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), role
    key = next(k for k in held_teacher.state_dict() if k.endswith("running_mean"))
    assert not torch.equal(held_teacher.state_dict()[key], moved_teacher.state_dict()[key])


def test_the_saved_teacher_branch_is_an_ordinary_network_whatever_the_runs_mode():
    teacher, student = nets()
    method = sokd.methods.create("sokd", teacher=teacher, student=student, teacher_bn="train").train()
    branch = method.standalone()["teacher_branch"][1]
    norms = [m for m in branch.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.track_running_stats for m in norms)


def _grads(method, terms):
    method.zero_grad(set_to_none=True)
    x, y = batch()
    out = method(x, y)
    sum(out["terms"][t] for t in terms).backward()
    def has(role):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.nets[role].parameters())
    return {r: has(r) for r in method.nets}


def test_sokd_gradient_isolation():
    teacher, student = nets()
    method = sokd.methods.create("sokd", teacher=teacher, student=student)
    method.train()
    g = _grads(method, ["student_ce", "student_kl_kbm"])
    assert g == {"teacher": False, "student": True, "kbm": False}
    g = _grads(method, ["kbm_ce", "kbm_kl_teacher", "kbm_kl_student"])
    assert g == {"teacher": False, "student": False, "kbm": True}
    assert all(not p.requires_grad for p in teacher.parameters())


def test_sokd_param_groups_hold_only_learners():
    teacher, student = nets()
    method = sokd.methods.create("sokd", teacher=teacher, student=student)
    groups = method.param_groups(lr=0.1, lr_per_role={"kbm": 0.05})
    roles = {g["role"]: g for g in groups}
    assert set(roles) == {"student", "kbm"}
    assert roles["kbm"]["lr"] == 0.05 and roles["student"]["lr"] == 0.1
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for g in groups for p in g["params"]}


def assert_kbm_init_teacher_copies_the_teacher(teacher, student, x):
    """With kbm_init=teacher, the teacher branch (frozen trunk + KBM) is the teacher at step 0."""
    method = sokd.methods.create("sokd", teacher=teacher, student=student, kbm_init="teacher")
    method.eval()
    out = method.predict(x)
    assert torch.equal(out["kbm"], out["teacher"])
    assert torch.equal(out["teacher"], teacher(x))


def test_kbm_init_teacher_reproduces_teacher_logits_at_step_0():
    teacher, student = nets()
    assert_kbm_init_teacher_copies_the_teacher(teacher, student, batch()[0])


def test_kbm_init_random_differs_from_teacher():
    teacher, student = nets()
    method = sokd.methods.create("sokd", teacher=teacher, student=student, kbm_init="random")
    kbm_w = dict(method.nets["kbm"].named_parameters())
    t_w = dict(teacher.stages[-1].named_parameters())
    k, v = next((k, v) for k, v in t_w.items() if v.dim() == 4)
    assert not torch.equal(kbm_w[f"stages.0.{k}"], v)


def test_teacher_branch_is_a_standalone_classifier_equal_to_trunk_plus_kbm():
    teacher, student = nets()
    method = sokd.methods.create("sokd", teacher=teacher, student=student, kbm_stages=2)
    sgd_steps(method, steps=2)
    method.eval()
    x, _ = batch()
    branch = method.standalone()["teacher_branch"][1].eval()
    assert torch.allclose(branch(x), method.predict(x)["kbm"], atol=1e-5)
    fresh = sokd.models.create("wrn_16_2", num_classes=10)
    fresh.load_state_dict(branch.state_dict())  # same architecture, same keys


def test_sokd_rejects_too_many_kbm_stages_and_unknown_options():
    teacher, student = nets()
    with pytest.raises(SokdError, match="kbm_stages=3 but the teacher has 3 stages"):
        sokd.methods.create("sokd", teacher=teacher, student=student, kbm_stages=3)
    with pytest.raises(SokdError, match="unknown config key 'method.kbm_stage'.*kbm_stages"):
        sokd.methods.create("sokd", teacher=teacher, student=student, kbm_stage=1)
    with pytest.raises(SokdError, match="unknown loss-term weight 'student_kl'"):
        sokd.methods.create("sokd", teacher=teacher, student=student, weights={"student_kl": 2})
    with pytest.raises(SokdError, match="unknown method"):
        sokd.methods.create("sokdd", teacher=teacher, student=student)


def test_term_weights_scale_the_loss():
    teacher, student = nets()
    x, y = batch()
    m1 = sokd.methods.create("sokd", teacher=teacher, student=student, kbm_init="teacher").eval()
    m2 = sokd.methods.create("sokd", teacher=teacher, student=student, kbm_init="teacher",
                             weights={"student_ce": 3.0, "kbm_kl_teacher": 0.0}).eval()
    o1, o2 = m1(x, y), m2(x, y)
    t = o1["terms"]
    expected = o1["loss"] + 2 * t["student_ce"] - t["kbm_kl_teacher"]
    assert torch.allclose(o2["loss"], expected, rtol=1e-5)
    assert m2.term_weights == {**{k: 1.0 for k in t}, "student_ce": 3.0, "kbm_kl_teacher": 0.0}


# -- 5. every zoo model can be the SOKD teacher --------------------------------------------------
ZOO = [n for n in sokd.models.list_models() if not n.startswith("wrn_") or n in ("wrn_16_2",)]


@pytest.mark.parametrize("arch", ZOO + ["tv.resnet18"])
@pytest.mark.parametrize("stages", [1, 2])
def test_every_zoo_model_can_be_sokd_teacher(arch, stages):
    torch.manual_seed(0)
    size = 32
    teacher = sokd.models.create(arch, num_classes=5)
    student = sokd.models.create("resnet8", num_classes=5)
    if stages >= teacher.num_stages:
        pytest.skip(f"{arch} has {teacher.num_stages} stages")
    method = sokd.methods.create("sokd", teacher=teacher, student=student, kbm_stages=stages).train()
    x, y = batch(n=4, size=size, classes=5)
    out = method(x, y)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert out["logits"]["kbm"].shape == (4, 5)
    assert any(p.grad is not None for p in method.nets["kbm"].parameters())


# -- feature terms -------------------------------------------------------------------------------
@pytest.mark.parametrize("method_name", ["kd", "sokd"])
def test_feature_terms_add_named_terms_and_train_regressors(method_name):
    teacher, student = nets()
    method = sokd.methods.create(method_name, teacher=teacher, student=student,
                                 features=[{"kind": "at", "stages": [0, 1, 2]},
                                           {"kind": "fitnet", "stages": [-1], "weight": 0.5}])
    out = sgd_steps(method, steps=1)
    assert {"student_at", "student_fitnet"} <= set(out["terms"])
    groups = {g["role"] for g in method.param_groups(lr=0.1)}
    assert "student_regressors" in groups
    with pytest.raises(SokdError, match="student stage 5"):
        sokd.methods.create(method_name, teacher=teacher, student=student,
                            features=[{"kind": "at", "stages": [5]}])


# -- 6. DML / KD / KD+DML -------------------------------------------------------------------------
def test_dml_terms_are_symmetric():
    a, b = nets("wrn_16_1", "wrn_16_1")
    method = sokd.methods.create("dml", student=a, peers=[b]).eval()
    x, y = batch()
    t = method(x, y)["terms"]
    za, zb = a(x), b(x)
    assert torch.allclose(t["student_kl_peers"], losses.soft_target(zb, za, 4.0))
    assert torch.allclose(t["peer_kl_peers"], losses.soft_target(za, zb, 4.0))
    method.nets["peer"].load_state_dict(a.state_dict())
    t = method(x, y)["terms"]
    assert torch.allclose(t["student_kl_peers"], t["peer_kl_peers"])
    assert torch.allclose(t["student_ce"], t["peer_ce"])


def test_dml_with_three_networks_averages_over_others():
    a, b = nets("wrn_16_1", "wrn_16_1")
    c = sokd.models.create("resnet8", num_classes=10)
    method = sokd.methods.create("dml", student=a, peers=[b, c]).eval()
    x, y = batch()
    t = method(x, y)["terms"]
    expected = (losses.soft_target(b(x), a(x)) + losses.soft_target(c(x), a(x))) / 2
    assert torch.allclose(t["student_kl_peers"], expected, rtol=1e-5)
    assert set(method.nets) == {"student", "peer1", "peer2"}


def test_kd_never_updates_teacher_and_kd_dml_does():
    teacher, student = nets()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    sgd_steps(sokd.methods.create("kd", teacher=teacher, student=student))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    sgd_steps(sokd.methods.create("kd_dml", teacher=teacher, student=student))
    changed = [k for k, v in before.items() if not torch.equal(v, teacher.state_dict()[k])]
    assert any(k.endswith("weight") for k in changed)


def test_method_output_contract():
    teacher, student = nets()
    x, y = batch()
    for name, kwargs in [("vanilla", {"model": student}), ("kd", {"teacher": teacher, "student": student}),
                         ("dml", {"student": student, "peers": [teacher]}),
                         ("kd_dml", {"teacher": teacher, "student": student}),
                         ("sokd", {"teacher": teacher, "student": student})]:
        out = sokd.methods.create(name, **kwargs)(x, y)
        assert set(out) == {"loss", "loss_parts", "terms", "logits"}
        assert out["loss"].dim() == 0
        parts = out["loss_parts"]   # the label terms and the rest, for DOT
        assert torch.allclose(out["loss"], parts["task"] + parts["distill"])
        assert all(z.shape == (8, 10) for z in out["logits"].values())


def test_wrong_networks_for_a_method_is_a_clear_error():
    teacher, student = nets()
    with pytest.raises(SokdError, match="needs a teacher"):
        sokd.methods.create("kd", student=student)
    with pytest.raises(SokdError, match="does not use a teacher"):
        sokd.methods.create("vanilla", model=student, teacher=teacher)


# -- what methods declare ------------------------------------------------------------------------
def test_methods_declare_their_needs_and_register_names_them():
    m = sokd.methods
    for name in m.list_methods():
        cls = m.get(name)
        assert cls.name == name  # set by register; no method spells its own name
        assert set(cls.config_roles) <= {"model", "teacher", "student", "peers"}
        assert m.needs_trained_teacher(name) == cls.needs_trained_teacher
        assert m.config_roles(name) == cls.config_roles
        assert not cls.needs_trained_teacher or "teacher" in cls.config_roles
    assert m.with_features() == [n for n in m.list_methods() if m.get(n).accepts_features]
    with pytest.raises(SokdError, match="unknown method 'kdd' \\(did you mean 'kd'\\?\\)"):
        m.get("kdd")

    class Unregistered(m.Method):
        pass
    assert Unregistered.name == "unregistered"


def test_methods_without_feature_terms_refuse_them_in_one_place():
    teacher, student = nets()
    users = sokd.methods.with_features()
    feats = [{"kind": "at"}]
    for name in sokd.methods.list_methods():
        kwargs = {r: student for r in ("model", "teacher", "student") if r in sokd.methods.config_roles(name)}
        if "teacher" in kwargs:
            kwargs["teacher"] = teacher
        if "peers" in sokd.methods.config_roles(name):
            kwargs["peers"] = [teacher]
        if name in users:
            assert sokd.methods.create(name, features=feats, **kwargs).features is not None
            continue
        with pytest.raises(SokdError, match=f"^method '{name}' ") as err:
            sokd.methods.create(name, features=feats, **kwargs)
        assert " or ".join(users) in str(err.value) or "/".join(users) in str(err.value)



def test_each_feature_kind_defaults_to_the_stages_its_paper_compares():
    teacher, student = nets()
    n = student.num_stages

    def pairs(kind):
        m = sokd.methods.create("kd", teacher=teacher, student=student, features=[{"kind": kind}],
                                input_shape=(3, 16, 16), num_samples=32)
        return m.features.pairs[f"student_{kind}"]
    assert pairs("at") == [(i, i) for i in range(n)]          # the end of every group (AT paper)
    assert pairs("sp") == [(n - 1, teacher.num_stages - 1)]   # the last group's map (RepDistiller)
    assert pairs("fitnet") == [((n - 1) // 2, (n - 1) // 2)]   # hint layer 2, the middle group
    assert sokd.methods.features.default_weight("fitnet") == 100.0
    for kind in ("pkt", "rkd", "crd", "nd"):                  # the embedding the classifier reads
        assert pairs(kind) == [(n, teacher.num_stages)]
