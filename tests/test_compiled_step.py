"""train.compile: the method's forward and losses compiled once, never again in steady state, and
a compiled run resumes bit-identically. The default suite compiles with the aot_eager backend
(dynamo's graph capture and guards, AOTAutograd's backward, no code generation), which is what
decides recompiles; the inductor runs are behind the slow marker (minutes of C++ compilation)."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from sokd import cli, config, runner
from sokd.engine import compiled, safe_load
from sokd.engine import loop as loop_mod
from sokd.errors import SokdError

from .conftest import stop_after_checks, tiny_config, write_config
from .test_engine import metrics, strip_timing


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _kd(tmp_path, teacher_file, **train):
    shutil.copy(teacher_file, tmp_path / "teacher.pt")
    # a warm-up changes the distillation weight every epoch: the case that would recompile if the
    # weight were a Python number
    cfg = tiny_config(tmp_path, "kd", data={"synthetic_size": 128, "batch_size": 16},
                      train={"epochs": 3, "seed": 1, "precision": "fp32", "compile": True, **train})
    cfg["method"] = {"name": "kd", "warmup_epochs": 3}
    return cfg


def test_bad_compile_values_are_one_line_and_exit_2(tmp_path, capsys):
    path = write_config(tmp_path, tiny_config(tmp_path))
    for value, expected in (("fast", "use auto, false, true, max-autotune or reduce-overhead (got 'fast')"),
                            ("1", "(got 1)")):
        assert cli.main(["train", str(path), f"train.compile={value}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "train.compile" in err and expected in err, err
    assert not (tmp_path / "runs").exists()
    for value in (False, True, "auto", "max-autotune", "reduce-overhead"):
        assert config.build(tiny_config(tmp_path, train={"compile": value})).train.compile == value
    with pytest.raises(SokdError, match="train.compile"):
        config.build(tiny_config(tmp_path, train={"compile": None}))


def _graphs_per_epoch(tmp_path, teacher_file, monkeypatch) -> list[int]:
    """Graphs dynamo compiled during each epoch of a compiled kd fit, after those compiled before
    the first epoch (the frozen teacher's inference graph, compiled by epoch 0's evaluation)."""
    per_epoch = []
    run_epoch = loop_mod._run_epoch

    def watched(*a, **k):
        before = _graphs()
        if not per_epoch:
            per_epoch.append(before)
        out = run_epoch(*a, **k)
        per_epoch.append(_graphs() - before)
        return out
    monkeypatch.setattr(loop_mod, "_run_epoch", watched)
    runner.train(config.build(_kd(tmp_path, teacher_file)))
    return per_epoch


def test_a_compiled_fit_compiles_in_its_first_steps_only(tmp_path, teacher_file, one_thread, monkeypatch,
                                                         fresh_dynamo):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    before, *per_epoch = _graphs_per_epoch(tmp_path, teacher_file, monkeypatch)
    assert before == 1   # the frozen teacher's forward, compiled on its own for evaluation
    assert per_epoch[0] >= 1 and per_epoch[1:] == [0, 0], per_epoch   # 8 steps an epoch, 3 epochs
    assert counters["stats"]["unique_graphs"] == before + per_epoch[0]
    assert not counters["recompiles"], dict(counters["recompiles"])


def _cut_and_resume(tmp_path, teacher_file, monkeypatch):
    """A compiled kd run stopped in epoch 2 step 3 and resumed equals the same run uninterrupted."""
    base = _kd(tmp_path, teacher_file, epochs=2)
    full = config.build({**base, "output": {**base["output"], "dir": base["output"]["dir"] + "_full"}})
    runner.train(full)
    real = loop_mod.StopRequest
    stop_after_checks(monkeypatch, 8 + 1 + 3)
    cut = config.build(base)
    with pytest.raises(loop_mod.Interrupted):
        runner.train(cut)
    assert (safe_load(cut.run_dir / "last.pt")["epoch"], safe_load(cut.run_dir / "last.pt")["step"]) == (1, 3)
    monkeypatch.setattr(loop_mod, "StopRequest", real)
    torch._dynamo.reset()   # the resumed process compiles afresh
    runner.train(config.build({**base, "output": {**base["output"], "resume": True}}))
    assert strip_timing(metrics(full.run_dir)) == strip_timing(metrics(cut.run_dir))
    a, b = (safe_load(d / "last.pt")["method"] for d in (full.run_dir, cut.run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_compiled_run_resumes_bit_identically(tmp_path, teacher_file, one_thread, monkeypatch, fresh_dynamo):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    _cut_and_resume(tmp_path, teacher_file, monkeypatch)


@pytest.mark.slow
def test_an_inductor_compiled_run_resumes_bit_identically(tmp_path, teacher_file, one_thread, monkeypatch,
                                                          fresh_dynamo):
    _cut_and_resume(tmp_path, teacher_file, monkeypatch)


@pytest.mark.slow
def test_an_inductor_compiled_fit_compiles_in_its_first_steps_only(tmp_path, teacher_file, one_thread,
                                                                   monkeypatch, fresh_dynamo):
    before, *per_epoch = _graphs_per_epoch(tmp_path, teacher_file, monkeypatch)
    assert before == 1 and per_epoch[0] >= 1 and per_epoch[1:] == [0, 0], (before, per_epoch)
    assert not counters["recompiles"], dict(counters["recompiles"])
