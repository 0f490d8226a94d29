"""Online distillation without a pretrained teacher: ONE (gated branch ensemble) and KDCL
(label-aware ensembles of peers). Ensembles against hand computation, detached targets, the
student ONE saves, and one CLI step of each method through train, eval and export."""
from __future__ import annotations

import json

import pytest
import torch

import sokd
from sokd.cli import main
from sokd.errors import SokdError
from sokd.methods import losses
from sokd.methods.kdcl import minlogit_ensemble, naive_ensemble

from .conftest import tiny_config, write_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]


def batch(n=6, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def one_method(**options):
    torch.manual_seed(0)
    return sokd.methods.create("one", student=sokd.models.create("wrn_16_1", num_classes=10), **options)


def by_hand(method, x):
    """Branch logits, gate weights and their gated sum, computed from the method's parts."""
    student, split = method.nets["student"], method.split
    trunk, _ = student.forward_trunk(x, split)
    zs = [student.forward_tail(trunk, split)[0]] + [method.nets[r](trunk)[0] for r in ("branch2", "branch3")]
    g = method.nets["gate"](trunk)
    ensemble = sum(g[:, i:i + 1] * z for i, z in enumerate(zs))
    return zs, g, ensemble


# -- ONE -------------------------------------------------------------------------------------
def test_one_gate_weights_are_a_distribution_per_sample():
    method = one_method()
    x, _ = batch()
    for train in (True, False):
        method.train(train)
        with torch.no_grad():
            _, g, _ = by_hand(method, x)
        assert g.shape == (6, 3) and g.dtype == torch.float32
        assert (g >= 0).all()
        assert torch.allclose(g.sum(dim=1), torch.ones(6), atol=1e-6)
    method.train()
    with torch.no_grad():  # a one-image training batch (drop_last=false tails) still gives weights
        assert torch.allclose(method.nets["gate"](method.nets["student"].forward_trunk(x[:1], method.split)[0]).sum(),
                              torch.tensor(1.0))


def test_one_ensemble_is_the_gated_sum_and_the_loss_is_the_papers():
    method = one_method()
    x, y = batch()
    method.eval()
    with torch.no_grad():
        zs, g, ensemble = by_hand(method, x)
        pred = method.predict(x)
    assert set(pred) == {"student", "branch2", "branch3", "ensemble"}
    assert torch.allclose(pred["ensemble"], ensemble, atol=1e-5)
    assert torch.allclose(pred["student"], method.nets["student"](x), atol=1e-6)  # trunk + branch 1 = student

    method.train()  # batch statistics: the same input gives the same outputs
    out = method(x, y)
    with torch.no_grad():
        zs, g, ensemble = by_hand(method, x)
    assert torch.allclose(out["logits"]["ensemble"], ensemble, atol=1e-5)
    T = method.options.T
    assert T == 3.0
    terms = out["terms"]
    for role, z in zip(("student", "branch2", "branch3"), zs):
        assert terms[f"{role}_ce"].item() == pytest.approx(losses.cross_entropy(z, y).item(), rel=1e-5)
        assert terms[f"{role}_kl_ensemble"].item() == pytest.approx(
            losses.soft_target(ensemble, z, T).item(), rel=1e-4, abs=1e-7)
    assert terms["ensemble_ce"].item() == pytest.approx(losses.cross_entropy(ensemble, y).item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(sum(t.item() for t in terms.values()), rel=1e-5)


def test_one_kl_target_is_detached_and_the_gate_learns_from_the_ensemble_ce():
    method = one_method()
    x, y = batch()
    method.train()
    method(x, y)["terms"]["branch2_kl_ensemble"].backward()
    student = method.nets["student"]
    assert all(p.grad is None for p in method.nets["gate"].parameters())
    assert all(p.grad is None for p in method.nets["branch3"].parameters())
    assert all(p.grad is None for p in [*student.stages[-1].parameters(), *student.head.parameters()])
    assert all(p.grad is not None for p in method.nets["branch2"].parameters())
    assert all(p.grad is not None for p in student.stem.parameters())  # the trunk is shared

    method.zero_grad(set_to_none=True)
    method(x, y)["terms"]["ensemble_ce"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.nets["gate"].fc.parameters())
    roles = [g["role"] for g in method.param_groups(lr=0.1)]
    assert roles == ["student", "branch2", "branch3", "gate"]


def test_one_branches_start_fresh_and_every_branch_saves_as_a_student():
    method = one_method(branches=3)
    student = method.nets["student"]
    own = student.stages[-1][0].conv1.weight
    assert not torch.equal(own, method.nets["branch2"].stages[0][0].conv1.weight)
    assert not torch.equal(method.nets["branch2"].stages[0][0].conv1.weight,
                           method.nets["branch3"].stages[0][0].conv1.weight)
    files = method.standalone()
    assert list(files) == ["student", "branch2", "branch3"] and files["student"][1] is student
    x, _ = batch()
    method.eval()
    pred = method.predict(x)
    for name, (arch_role, net) in files.items():
        assert arch_role == "student" and type(net) is type(student)
        assert net.state_dict().keys() == student.state_dict().keys()
        assert torch.allclose(net.eval()(x), pred[name], atol=1e-5)


def test_one_options_are_checked():
    with pytest.raises(SokdError, match="branch_stages=3 but the student has 3 stages"):
        one_method(branch_stages=3)
    with pytest.raises(SokdError, match="branches"):
        one_method(branches=1)
    with pytest.raises(SokdError, match="unknown loss-term weight 'branch1_ce'"):
        one_method(weights={"branch1_ce": 0.5})
    method = one_method(branches=2, branch_stages=2, weights={"ensemble_ce": 0.5})
    assert method.split == 1 and method.term_weights["ensemble_ce"] == 0.5
    assert set(method.nets) == {"student", "branch2", "gate"}


# -- KDCL ------------------------------------------------------------------------------------
#: two networks, two images, three classes; labels 0 and 2
Z = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]],
                  [[1.0, 2.0, -1.0], [1.0, 0.0, 2.0]]])
Y = torch.tensor([0, 2])


def test_kdcl_minlogit_is_the_elementwise_min_of_target_shifted_logits():
    # image 0: z1 - 2 = [0, -1, -2], z2 - 1 = [0, 1, -2]; image 1: z1 - 1 = [-1, 2, 0], z2 - 2 = [-1, -2, 0]
    expected = torch.tensor([[0.0, -1.0, -2.0], [-1.0, -2.0, 0.0]])
    assert torch.equal(minlogit_ensemble(Z, Y), expected)
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(3, 16, 7, generator=g) * 3, torch.randint(0, 7, (16,), generator=g)
    ce = lambda logits: torch.nn.functional.cross_entropy(logits, y, reduction="none")  # noqa: E731
    assert (ce(minlogit_ensemble(z, y)) <= torch.stack([ce(zi) for zi in z]).min(0).values + 1e-6).all()


def test_kdcl_naive_takes_each_images_lowest_ce_network():
    # image 0: network 1 puts its largest logit on the label; image 1: network 2 does
    assert torch.equal(naive_ensemble(Z, Y), torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 2.0]]))


@pytest.mark.parametrize("kind", ["minlogit", "naive"])
def test_kdcl_every_network_learns_from_the_detached_ensemble(kind):
    torch.manual_seed(0)
    student = sokd.models.create("wrn_16_1", num_classes=10)
    peers = [sokd.models.create("wrn_16_1", num_classes=10) for _ in range(2)]
    method = sokd.methods.create("kdcl", student=student, peers=peers, ensemble=kind)
    assert method.options.T == 2.0 and list(method.nets) == ["student", "peer1", "peer2"]
    x, y = batch()
    method.train()
    out = method(x, y)
    zs = torch.stack([out["logits"][r].detach() for r in ("student", "peer1", "peer2")])
    teacher = {"minlogit": minlogit_ensemble, "naive": naive_ensemble}[kind](zs, y)
    for i, role in enumerate(("student", "peer1", "peer2")):
        assert out["terms"][f"{role}_kl_ensemble"].item() == pytest.approx(
            losses.soft_target(teacher, zs[i], 2.0).item(), rel=1e-4, abs=1e-7)
        assert out["terms"][f"{role}_ce"].item() == pytest.approx(losses.cross_entropy(zs[i], y).item(), rel=1e-5)
    out["terms"]["student_kl_ensemble"].backward()
    assert all(p.grad is None for peer in peers for p in peer.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    with pytest.raises(SokdError, match="needs a peer network"):
        sokd.methods.create("kdcl", student=student)
    with pytest.raises(SokdError, match="ensemble"):
        sokd.methods.create("kdcl", student=student, peers=peers, ensemble="mean")


# -- through the command line ------------------------------------------------------------------
def run_cli(*args):
    return main([str(a) for a in args])


def test_one_trains_a_step_and_its_student_evaluates_and_exports_on_its_own(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "one", train={"epochs": 1, "steps_per_epoch": 1})
    assert run_cli("train", write_config(tmp_path, cfg)) == 0
    run_dir = tmp_path / "runs" / "one"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["primary_role"] == "student"
    assert set(summary["networks"]) == {"student", "branch2", "branch3", "ensemble"}
    assert set(summary["compare"]) == {"ensemble->student"}
    assert {f"{r}.pt" for r in ("student", "branch2", "branch3")} <= {p.name for p in run_dir.iterdir()}
    capsys.readouterr()

    assert run_cli("eval", run_dir / "student.pt", "--json") == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["roles"]["student"]["top1"] == pytest.approx(summary["networks"]["student"]["top1_final"], abs=1e-6)
    assert run_cli("eval", run_dir / "last.pt", "--json") == 0
    every = json.loads(capsys.readouterr().out)
    assert every["roles"]["ensemble"]["top1"] == pytest.approx(summary["networks"]["ensemble"]["top1_final"], abs=1e-6)

    out = tmp_path / "student.onnx"
    assert run_cli("export", run_dir / "student.pt", "--format", "onnx", "--out", out, "--images", 16) == 0
    assert out.is_file() and "max |logit diff|" in capsys.readouterr().out


def test_kdcl_trains_a_step_through_the_cli(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "kdcl", train={"epochs": 1, "steps_per_epoch": 1})
    cfg["method"]["ensemble"] = "naive"
    assert run_cli("train", write_config(tmp_path, cfg)) == 0
    summary = json.loads((tmp_path / "runs" / "kdcl" / "summary.json").read_text())
    assert set(summary["networks"]) == {"student", "peer"} and set(summary["compare"]) == {"peer->student"}
    assert set(summary["term_weights"]) == {"student_ce", "student_kl_ensemble", "peer_ce", "peer_kl_ensemble"}
