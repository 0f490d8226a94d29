"""Frozen networks as inference networks (engine/frozen.py) and the speed settings' `auto`
(engine/settings.py): what is folded, what is only cast, what is left alone, that the saved state
never changes, and what a run says about its choices."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from sokd import config, methods, models, runner
from sokd.engine import frozen, settings
from sokd.engine import precision as precision_mod

from .conftest import tiny_config


def _trained_like(net: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine weights far from their initial values, as a trained net has."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return net


def _kd(teacher_arch: str, **options):
    teacher = _trained_like(models.create(teacher_arch, num_classes=10))
    student = models.create("resnet8", num_classes=10)
    return methods.create("kd", teacher=teacher, student=student, **options).train()


@pytest.mark.parametrize("arch,layout", [("resnet14", torch.contiguous_format), ("wrn_16_1", torch.channels_last),
                                         ("mobilenetv2", torch.channels_last)])
def test_folding_keeps_every_stage_output_and_the_saved_state(arch, layout):
    torch.manual_seed(0)
    method = _kd(arch).to(memory_format=layout)
    teacher = method.nets["teacher"]
    x = torch.randn(6, 3, 32, 32).contiguous(memory_format=layout)
    with torch.no_grad():
        before_logits, before_feats = teacher.forward_features(x)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    prepared = frozen.prepare(method, x[:4], "fp32")
    folded = sum(isinstance(m, frozen.FoldedBatchNorm2d) for m in teacher.modules())
    assert folded > 0 and prepared.notes[0].startswith(f"frozen teacher: {folded} BatchNorm folded")
    with torch.no_grad():
        logits, feats = teacher.forward_features(x)
    scale = before_logits.abs().max()
    assert torch.allclose(logits, before_logits, atol=1e-4 * scale, rtol=0)
    for a, b in zip(feats, before_feats):
        assert torch.allclose(a, b, atol=1e-4 * b.abs().max(), rtol=0)
    after = method.state_dict()   # same keys, same tensors: checkpoints and model files unchanged
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert not any(isinstance(m, frozen.FoldedBatchNorm2d) for m in method.nets["student"].modules())
    prepared.release()
    assert not any(isinstance(m, (frozen.PreparedConv2d, frozen.FoldedBatchNorm2d)) for m in teacher.modules())
    assert not any("folded" in name or "cast" in name for name, _ in teacher.named_buffers())
    with torch.no_grad():
        assert torch.equal(teacher.forward_features(x)[0], before_logits)


def test_a_teacher_on_batch_statistics_is_cast_never_folded_and_keeps_its_numbers():
    """SOKD's reference teacher_bn=train: BatchNorm uses batch statistics while training, so
    nothing is folded; the weights cast once round exactly as autocast rounds them each step."""
    torch.manual_seed(0)
    teacher = _trained_like(models.create("resnet14", num_classes=10))
    reference = copy.deepcopy(teacher)
    method = methods.create("sokd", teacher=teacher, student=models.create("resnet8", num_classes=10)).train()
    assert method.inference_roles == ()
    x = torch.randn(8, 3, 32, 32)
    prepared = frozen.prepare(method, x[:4], "bf16")
    assert prepared.notes == ["frozen teacher: weights cast once to bf16"]
    assert not any(isinstance(m, frozen.FoldedBatchNorm2d) for m in teacher.modules())
    reference.train()
    methods.base.hold_running_statistics(reference)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(x)
        got = method.nets["teacher"](x)
    assert torch.equal(got, want)
    ours, theirs = dict(teacher.named_buffers()), dict(reference.named_buffers())
    assert set(ours) == set(theirs) | {n for n in ours if n.endswith(("cast_weight", "cast_bias"))}
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)   # running statistics held alike
    prepared.release()


def test_sokd_with_running_statistics_folds_its_trunk():
    method = methods.create("sokd", teacher=_trained_like(models.create("resnet14", num_classes=10)),
                            student=models.create("resnet8", num_classes=10), teacher_bn="eval").train()
    assert method.inference_roles == ("teacher",)
    prepared = frozen.prepare(method, torch.randn(4, 3, 32, 32), "fp32")
    assert "BatchNorm folded" in prepared.line
    assert not any(isinstance(m, frozen.FoldedBatchNorm2d) for m in method.nets["kbm"].modules())
    prepared.release()


class Holder(nn.Module):
    frozen = ("teacher",)
    inference_roles = ("teacher",)

    def __init__(self, net):
        super().__init__()
        self.nets = nn.ModuleDict({"teacher": net})


class TwoPairsOneShared(nn.Module):
    """Two conv -> bn pairs; the second convolution's raw output is also added to the result."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        c = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.head((self.bn2(c) + c).mean((2, 3)))


def test_only_the_pairs_whose_folding_keeps_the_outputs_are_folded():
    net = _trained_like(TwoPairsOneShared()).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = net(x)
    prepared = frozen.prepare(Holder(net), x, "fp32")
    assert prepared.notes == ["frozen teacher: 1 BatchNorm folded (1 left: folding would change the outputs)"]
    assert type(net.bn1) is frozen.FoldedBatchNorm2d
    assert type(net.conv2) is nn.Conv2d and type(net.bn2) is nn.BatchNorm2d
    with torch.no_grad():
        assert torch.allclose(net(x), want, atol=1e-5)
    prepared.release()
    with torch.no_grad():
        assert torch.equal(net(x), want)


def test_disabled_preparation_changes_nothing():
    method = _kd("resnet14")
    prepared = frozen.prepare(method, torch.randn(2, 3, 32, 32), "bf16", enabled=False)
    assert prepared.notes == [] and not any(isinstance(m, frozen.PreparedConv2d) for m in method.modules())


# ------------------------------------------------------------------------------ settings

class Train:
    def __init__(self, precision="auto", channels_last="auto", compile="auto"):
        self.precision, self.channels_last, self.compile = precision, channels_last, compile


def test_auto_resolves_per_device_and_run_length(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(settings, "native_bf16", lambda device: False)
    short = settings.resolve(Train(), cpu, steps=100)
    assert (short.precision, short.channels_last, short.compile) == ("fp32", True, False)
    line = short.line(cpu)
    assert line.startswith("run on cpu") and "fp32 (auto: this CPU has no AMX or AVX-512 BF16)" in line
    assert "eager (auto: 100 steps < 20000 on cpu" in line
    monkeypatch.setattr(settings, "native_bf16", lambda device: True)
    monkeypatch.setattr(settings, "check_setting", lambda setting, device: None)
    long = settings.resolve(Train(), cpu, steps=settings.COMPILE_AFTER_STEPS["cpu"])
    assert (long.precision, long.compile) == ("bf16", True)
    assert "compiled (auto: 20000 steps >= 20000 on cpu)" in long.line(cpu)
    explicit = settings.resolve(Train("fp32", False, False), cpu, steps=10 ** 6)
    assert (explicit.precision, explicit.channels_last, explicit.compile) == ("fp32", False, False)


def test_auto_compile_without_a_cpp_compiler_runs_eager_with_the_reason(monkeypatch):
    from sokd.errors import SokdError

    def no_compiler(setting, device):
        raise SokdError("no compiler")
    monkeypatch.setattr(settings, "check_setting", no_compiler)
    chosen = settings.resolve(Train(), torch.device("cpu"), steps=10 ** 6)
    assert chosen.compile is False and "no C++ compiler" in chosen.line(torch.device("cpu"))


def test_a_resumed_run_keeps_the_settings_it_began_with(monkeypatch):
    monkeypatch.setattr(settings, "native_bf16", lambda device: True)
    resumed = settings.resolve(Train(), torch.device("cpu"), steps=10,
                               recorded={"precision": "fp32", "channels_last": False})
    assert (resumed.precision, resumed.channels_last) == ("fp32", False)
    assert "as when the run began" in resumed.line(torch.device("cpu"))


def test_a_default_kd_run_says_what_it_chose_first_and_records_it(tmp_path, teacher_file, capsys):
    shutil.copy(teacher_file, tmp_path / "teacher.pt")
    cfg = tiny_config(tmp_path, "kd", train={"epochs": 1, "seed": 0})
    del cfg["train"]["precision"]   # every speed setting at its default
    summary = runner.train(config.build(cfg))
    out = capsys.readouterr().out.splitlines()
    first = next(line for line in out if line.startswith("run on"))
    assert out.index(first) < min(i for i, line in enumerate(out) if line.startswith("epoch"))
    want = precision_mod.resolve_precision("auto", torch.device("cpu"))
    assert f"{want} (auto:" in first and "channels_last (auto" in first and "eager (auto:" in first
    assert "frozen teacher:" in first and "BatchNorm folded" in first
    assert summary["precision"] == want and summary["channels_last"] is True and summary["compiled"] is False
    last = torch.load(Path(cfg["output"]["dir"]) / "last.pt", weights_only=False)
    assert last["settings"] == {"precision": want, "channels_last": True}
    saved = json.loads((Path(cfg["output"]["dir"]) / "summary.json").read_text())
    assert saved["channels_last"] is True


def test_frozen_inference_off_runs_the_teacher_as_a_plain_module(tmp_path, teacher_file, capsys):
    shutil.copy(teacher_file, tmp_path / "teacher.pt")
    cfg = tiny_config(tmp_path, "kd", train={"epochs": 1, "seed": 0, "frozen_inference": False})
    runner.train(config.build(cfg))
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("run on"))
    assert "frozen teacher" not in first


def test_a_folded_teacher_trains_the_student_like_the_plain_one(tmp_path, teacher_file):
    """Same seed, fp32: the student's loss curve with the teacher folded matches the plain
    teacher's (folding changes the teacher's logits by ~1e-6 relative). A small learning rate
    keeps the toy run from amplifying that difference chaotically, and one thread keeps the
    arithmetic the same whichever tests ran before."""
    shutil.copy(teacher_file, tmp_path / "teacher.pt")
    losses = {}
    for on in (True, False):
        cfg = tiny_config(tmp_path, "kd", train={"epochs": 2, "seed": 3, "frozen_inference": on, "threads": 1},
                          optim={"lr": 0.005}, output={"dir": str(tmp_path / f"runs/{on}")})
        summary = runner.train(config.build(cfg))
        rows = [json.loads(line) for line in (Path(cfg["output"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
        losses[on] = [r["train"]["loss"] for r in rows if "train" in r]
        assert summary["networks"]["teacher"]["top1_final"] is not None
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-5)
    assert losses[True][1] == pytest.approx(losses[False][1], rel=1e-4)


def test_evaluation_keeps_the_frozen_teachers_logits_and_scores_the_same():
    from sokd.engine.evaluate import FrozenLogits, evaluate
    torch.manual_seed(0)
    method = _kd("resnet14")
    calls = {"n": 0}
    teacher = method.nets["teacher"]
    teacher.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    batches = [(torch.randn(5, 3, 32, 32), torch.randint(0, 10, (5,))) for _ in range(3)]
    batches.append((torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))))   # a smaller last batch
    plain = evaluate(method, batches, torch.device("cpu"))
    kept = FrozenLogits(method.inference_roles)
    first = evaluate(method, batches, torch.device("cpu"), cache=kept)
    with torch.no_grad():   # the student changes, the teacher does not
        for p in method.nets["student"].parameters():
            p.mul_(1.5)
    n = calls["n"]
    again = evaluate(method, batches, torch.device("cpu"), cache=kept)
    assert calls["n"] == n   # the kept pass never ran the teacher
    fresh = evaluate(method, batches, torch.device("cpu"))
    assert first == plain and again == fresh and again != first
    full = FrozenLogits(method.inference_roles, limit=10)   # too large to keep: evaluated in full
    assert evaluate(method, batches, torch.device("cpu"), cache=full) == fresh and full.batches == []


def test_resuming_a_run_begun_with_other_speed_settings_names_the_setting_and_both_values(tmp_path):
    from sokd.errors import SokdError
    cfg = tiny_config(tmp_path, "vanilla", train={"epochs": 1, "seed": 0, "channels_last": False})
    runner.train(config.build(cfg))
    del cfg["train"]["channels_last"]   # as a config written before `auto` was the default
    cfg["output"] = {**cfg["output"], "resume": True}
    with pytest.raises(SokdError, match=r"config differs at 'train.channels_last' \(train.channels_last=false "
                                        r"when the run began, auto now\)"):
        runner.train(config.build(cfg))


def test_a_sokd_teacher_on_batch_statistics_scores_the_same_every_epoch_and_is_evaluated_once(
        tmp_path, teacher_file, monkeypatch):
    """teacher_bn=train: the teacher trains on batch statistics but holds its running ones, so
    its evaluation is that of the file it was loaded from, every epoch, and is computed once."""
    import importlib
    evaluate_mod = importlib.import_module("sokd.engine.evaluate")
    shutil.copy(teacher_file, tmp_path / "teacher.pt")
    cfg = tiny_config(tmp_path, "sokd", train={"epochs": 3, "seed": 0})
    keep = evaluate_mod.FrozenLogits.keep
    kept_roles = []
    monkeypatch.setattr(evaluate_mod.FrozenLogits, "keep",
                        lambda self, i, logits: (kept_roles.append(self.roles), keep(self, i, logits))[1])
    runner.train(config.build(cfg))
    rows = [json.loads(line) for line in (Path(cfg["output"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
    scores = {json.dumps(r["test"]["teacher"], sort_keys=True) for r in rows}
    assert len(rows) == 4 and len(scores) == 1   # epoch 0 (as loaded) and the three trained
    assert kept_roles and all(roles == ("teacher",) for roles in kept_roles)
