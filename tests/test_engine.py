"""The engine: learning happens, resume is bit-identical, failures leave checkpoints intact."""
from __future__ import annotations

import json

import pytest
import torch

from sokd import config, runner
from sokd.engine import Interrupted, NonFiniteLoss, safe_load
from sokd.engine import loop as loop_mod
from sokd.errors import SokdError

from .conftest import stop_after_checks


def metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def strip_timing(rows):
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k != "wall_time_s"}
        if "train" in r:
            r["train"] = {k: v for k, v in r["train"].items() if k not in ("images_per_s", "seconds")}
        out.append(r)
    return out


def test_loss_falls_and_accuracy_beats_chance(make_config, tmp_path):
    cfg = config.build(make_config("vanilla", train={"epochs": 4, "seed": 0}))
    summary = runner.train(cfg)
    rows = metrics(cfg.run_dir)
    assert rows[-1]["train"]["loss"] < rows[1]["train"]["loss"]
    assert summary["networks"]["model"]["top1_final"] > 40.0  # 4 classes: chance is 25 %
    for key in ("method", "dataset", "epochs", "wall_time_s", "train_images_per_s", "networks"):
        assert key in summary
    assert summary["term_weights"] == {"model_ce": 1.0}  # logged terms are unweighted
    net = summary["networks"]["model"]
    assert set(net) >= {"arch", "params", "top1_final", "top1_best", "top5_final"}
    for f in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "summary.json", "model.pt"):
        assert (cfg.run_dir / f).exists(), f


def test_stop_after_epoch_k_then_resume_is_bit_identical(make_config):
    base = make_config("vanilla", train={"epochs": 3, "seed": 3})
    full = config.build({**base, "output": {**base["output"], "dir": base["output"]["dir"] + "_full"}})
    runner.train(full)
    part = config.build({**base, "train": {**base["train"], "epochs": 2}})
    runner.train(part)
    resumed = config.build({**base, "output": {**base["output"], "resume": True}})
    runner.train(resumed)
    assert strip_timing(metrics(full.run_dir)) == strip_timing(metrics(resumed.run_dir))
    a = safe_load(full.run_dir / "last.pt")["method"]
    b = safe_load(resumed.run_dir / "last.pt")["method"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupt_mid_epoch_saves_and_resume_matches(make_config, monkeypatch):
    base = make_config("vanilla", train={"epochs": 2, "seed": 5})
    full = config.build({**base, "output": {**base["output"], "dir": base["output"]["dir"] + "_full"}})
    runner.train(full)

    real = loop_mod.StopRequest
    stop_after_checks(monkeypatch, 12)
    cut = config.build(base)
    with pytest.raises(Interrupted, match="resume"):
        runner.train(cut)
    ckpt = safe_load(cut.run_dir / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 3)  # 8 steps + 1 epoch-end check in epoch 1, then epoch 2 step 3
    monkeypatch.setattr(loop_mod, "StopRequest", real)
    runner.train(config.build({**base, "output": {**base["output"], "resume": True}}))
    assert strip_timing(metrics(full.run_dir)) == strip_timing(metrics(cut.run_dir))


def test_non_finite_loss_names_term_and_keeps_last_checkpoint(make_config, monkeypatch):
    cfg = config.build(make_config("vanilla", train={"epochs": 1}))
    runner.train(cfg)
    before = (cfg.run_dir / "last.pt").read_bytes()
    from sokd.methods import losses
    real, calls = losses.cross_entropy, {"n": 0}

    def poisoned(logits, labels):  # the 4th step of the resumed epoch produces NaN
        calls["n"] += 1
        out = real(logits, labels)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(losses, "cross_entropy", poisoned)
    resumed = config.build(make_config("vanilla", train={"epochs": 2},
                                       output={**make_config()["output"], "resume": True}))
    with pytest.raises(NonFiniteLoss, match=r"term 'model_ce' at epoch 2 step 3"):
        runner.train(resumed)
    assert (cfg.run_dir / "last.pt").read_bytes() == before


def test_run_dir_with_another_run_is_refused_then_overwritten_on_request(make_config):
    cfg = config.build(make_config("vanilla", train={"epochs": 1}))
    runner.train(cfg)
    before = (cfg.run_dir / "last.pt").read_bytes()
    with pytest.raises(SokdError, match="already holds a run.*output.resume=true"):
        runner.train(cfg)
    assert (cfg.run_dir / "last.pt").read_bytes() == before
    other = make_config("vanilla", train={"epochs": 1}, optim={"lr": 0.05, "weight_decay": 1e-3},
                        output={**make_config()["output"], "resume": True})
    with pytest.raises(SokdError, match="config differs at 'optim.weight_decay'"):
        runner.train(config.build(other))
    over = make_config("vanilla", train={"epochs": 1}, output={**make_config()["output"], "overwrite": True})
    runner.train(config.build(over))


def test_resume_may_extend_epochs_and_change_the_eval_batch(make_config):
    """Neither changes what the network learns, so a run may continue under them."""
    base = make_config("vanilla", train={"epochs": 1})
    runner.train(config.build(base))
    more = make_config("vanilla", train={"epochs": 2}, output={**base["output"], "resume": True})
    more["data"] = {**more["data"], "eval_batch_size": 7}
    runner.train(config.build(more))
    assert [row["epoch"] for row in metrics(config.build(more).run_dir)] == [0, 1, 2]


def test_same_seed_same_numbers(make_config, tmp_path):
    a = make_config("vanilla", train={"epochs": 1, "seed": 7})
    b = {**a, "output": {**a["output"], "dir": a["output"]["dir"] + "_b"}}
    runner.train(config.build(a))
    runner.train(config.build(b))
    ra, rb = (strip_timing(metrics(config.build(x).run_dir)) for x in (a, b))
    assert ra == rb


@pytest.mark.parametrize("precision,channels_last", [("bf16", True), ("fp32", True)])
def test_precision_and_memory_format_train(make_config, precision, channels_last):
    cfg = config.build(make_config("vanilla", train={"epochs": 1, "precision": precision,
                                                     "channels_last": channels_last}))
    summary = runner.train(cfg)
    assert summary["precision"] == precision
    assert 0 <= summary["networks"]["model"]["top1_final"] <= 100


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(make_config, monkeypatch):
    from sokd.engine import precision
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.resolve_precision("auto", cpu) == "fp32"
    assert "bf16 is emulated here" in precision.emulation_note("bf16", cpu)
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.resolve_precision("auto", cpu) == "bf16"
    assert precision.resolve_precision("fp16", cpu) == "fp16"
    assert precision.emulation_note("bf16", cpu) is None and precision.emulation_note("auto", cpu) is None
    monkeypatch.undo()
    summary = runner.train(config.build(make_config("vanilla", train={"epochs": 1, "precision": "auto"})))
    assert summary["precision"] == ("bf16" if precision.native_bf16(cpu) else "fp32")
