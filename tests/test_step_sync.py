"""The training step reads nothing back from the device: host reads happen once every
`train.sync_every` steps, and a non-finite loss is still stopped, named and never saved."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sokd import config, methods, runner
from sokd.engine import NonFiniteLoss, safe_load
from sokd.engine import loop as loop_mod
from sokd.engine.stepstats import SYNC_EVERY, SYNC_EVERY_OTHER, default_sync_every
from sokd.errors import SokdError

from .conftest import stop_after_checks, tiny_config
from .test_engine import metrics, strip_timing

#: the Python-level ways to read a tensor's value on the host
HOST_READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
aten = torch.ops.aten
#: operators that read device memory on the host inside C++ (`.item()` in a kernel, outputs
#: whose shape depends on the data)
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
            aten.repeat_interleave.Tensor, aten.is_nonzero.default, aten.equal.default}


class _SyncOps(TorchDispatchMode):
    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS or (func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def count_host_reads_in_steps(monkeypatch) -> dict:
    """Count host reads made inside the loop's step loop (`_run_epoch`), by name."""
    seen = {"python": [], "ops": []}
    active = {"on": False}
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if active["on"]:
                seen["python"].append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    run_epoch = loop_mod._run_epoch

    def counted_epoch(*a, **k):
        active["on"] = True
        try:
            with _SyncOps(seen["ops"]):
                return run_epoch(*a, **k)
        finally:
            active["on"] = False
    monkeypatch.setattr(loop_mod, "_run_epoch", counted_epoch)
    return seen


CASES = {  # method options for every method family and the feature terms with per-sample state
    "vanilla": ("vanilla", {}),
    "kd": ("kd", {}),
    "kd+dkd+warmup": ("kd", {"logit_loss": "dkd", "warmup_epochs": 2}),
    "kd+crd": ("kd", {"features": [{"kind": "crd"}]}),
    "sokd": ("sokd", {}),
    "sokd+reviewkd": ("sokd", {"features": [{"kind": "reviewkd"}]}),
    "dml": ("dml", {}),
    "kd_dml": ("kd_dml", {}),
    "one": ("one", {}),
    "kdcl": ("kdcl", {}),
}


def _long_epoch(tmp_path, teacher_file, method, options, steps=32, **train):
    if methods.needs_trained_teacher(method):
        shutil.copy(teacher_file, tmp_path / "teacher.pt")
    cfg = tiny_config(tmp_path, method, data={"synthetic_size": 16 * steps, "batch_size": 16},
                      train={"epochs": 1, "seed": 0, "precision": "fp32", **train})
    cfg["method"] = {"name": method, **options}
    return cfg


@pytest.mark.parametrize("case", list(CASES))
def test_the_step_makes_no_host_read_between_polls(tmp_path, teacher_file, one_thread, monkeypatch, case):
    method, options = CASES[case]
    steps, every = 32, 8
    seen = count_host_reads_in_steps(monkeypatch)
    runner.train(config.build(_long_epoch(tmp_path, teacher_file, method, options, steps, sync_every=every)))
    # one read per poll: after steps 8, 16, 24 and 32 (the last step is a poll too)
    assert seen["python"] == ["tolist"] * (steps // every), seen["python"]
    assert seen["ops"] == [], seen["ops"]


def test_the_counter_sees_a_read_per_step_when_asked_to_poll_every_step(tmp_path, teacher_file, one_thread,
                                                                        monkeypatch):
    seen = count_host_reads_in_steps(monkeypatch)
    runner.train(config.build(_long_epoch(tmp_path, teacher_file, "vanilla", {}, 12, sync_every=1)))
    assert len(seen["python"]) == 12


def test_sync_every_defaults_per_device_and_is_validated(tmp_path):
    assert default_sync_every(torch.device("cuda", 0)) == SYNC_EVERY["cuda"] == 50
    assert default_sync_every(torch.device("cpu")) == SYNC_EVERY_OTHER > 1
    with pytest.raises(SokdError, match=r"^bad value for 'train.sync_every': .*greater than or equal to 1"):
        config.build(tiny_config(tmp_path, train={"sync_every": 0}))


def _poisoned_ce(monkeypatch, at_call: int) -> dict:
    """cross_entropy returns NaN from its `at_call`-th call on (a diverged run stays diverged);
    `calls` counts every call, so the steps run past the NaN can be told."""
    from sokd.methods import losses
    real, calls = losses.cross_entropy, {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        out = real(logits, labels)
        return out * float("nan") if calls["n"] >= at_call else out

    monkeypatch.setattr(losses, "cross_entropy", poisoned)
    return calls


@pytest.mark.parametrize("every", [8, 5])
def test_a_nan_is_named_at_its_step_and_stops_the_run_at_the_next_poll(make_config, one_thread, monkeypatch, every):
    base = make_config("vanilla", data={"synthetic_size": 512, "batch_size": 16},
                       train={"epochs": 1, "sync_every": every})
    cfg = config.build(base)
    runner.train(cfg)                                      # epoch 1 is on disk
    before = (cfg.run_dir / "last.pt").read_bytes()
    calls = _poisoned_ce(monkeypatch, 10)                  # step 9 of epoch 2 (steps count from 0)
    resumed = config.build({**base, "train": {**base["train"], "epochs": 2},
                            "output": {**base["output"], "resume": True}})
    with pytest.raises(NonFiniteLoss, match=r"term 'model_ce' at epoch 2 step 9; last.pt holds the run at epoch 1"):
        runner.train(resumed)
    noticed = -(-10 // every) * every                      # the first poll after step 9
    assert calls["n"] == noticed and calls["n"] - 10 <= every - 1   # steps run past the NaN
    assert (cfg.run_dir / "last.pt").read_bytes() == before        # ... and none of them was saved


def test_a_stop_between_polls_still_checks_the_loss_before_it_saves(make_config, one_thread, monkeypatch):
    base = make_config("vanilla", data={"synthetic_size": 512, "batch_size": 16},
                       train={"epochs": 1, "sync_every": 50})
    cfg = config.build(base)
    runner.train(cfg)
    before = (cfg.run_dir / "last.pt").read_bytes()
    _poisoned_ce(monkeypatch, 4)                           # NaN at step 3 of epoch 2
    stop_after_checks(monkeypatch, 6)                      # SIGTERM after step 5: no poll is due
    resumed = config.build({**base, "train": {**base["train"], "epochs": 2},
                            "output": {**base["output"], "resume": True}})
    with pytest.raises(NonFiniteLoss, match=r"term 'model_ce' at epoch 2 step 3"):
        runner.train(resumed)
    assert (cfg.run_dir / "last.pt").read_bytes() == before


def test_a_stop_between_polls_saves_the_exact_sums_and_resumes_bit_identically(tmp_path, teacher_file, make_config,
                                                                              one_thread, monkeypatch):
    shutil.copy(teacher_file, tmp_path / "teacher.pt")
    base = make_config("kd", data={"synthetic_size": 320, "batch_size": 16}, train={"epochs": 2, "sync_every": 7})
    full = config.build({**base, "output": {**base["output"], "dir": base["output"]["dir"] + "_full"}})
    runner.train(full)
    real = loop_mod.StopRequest
    stop_after_checks(monkeypatch, 20 + 1 + 4)             # epoch 1, its end, then epoch 2 step 4
    cut = config.build(base)
    with pytest.raises(loop_mod.Interrupted):
        runner.train(cut)
    ckpt = safe_load(cut.run_dir / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 4) and ckpt["accum"]["samples"] == 4 * 16
    monkeypatch.setattr(loop_mod, "StopRequest", real)
    runner.train(config.build({**base, "output": {**base["output"], "resume": True}}))
    assert strip_timing(metrics(full.run_dir)) == strip_timing(metrics(cut.run_dir))
    a, b = (safe_load(d / "last.pt")["method"] for d in (full.run_dir, cut.run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
