"""Options that matter most on a GPU, checked on the CPU: evaluation and checkpoint cadence,
best.pt as a byte copy, the CUDA switches, optimizer kernels, the evaluation batch by device,
and CUDA graphs refused where there is no GPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sokd import config, report, runner
from sokd.cli import main
from sokd.data.config import CPU_EVAL_BATCH, GPU_EVAL_BATCH_FACTOR, DataConfig, eval_batch_for
from sokd import files
from sokd.engine import checkpointing, loop
from sokd.engine.optim import build_optimizer, kernel_options
from sokd.engine.precision import configure_cuda

from .conftest import tiny_config, write_config

pytestmark = pytest.mark.usefixtures("one_thread")



def primary_curves(groups: dict) -> dict:
    """Plot label -> (epochs, mean, std) of every curve the report draws."""
    return {label: data for _, _, label, data in report._curves(groups)}

def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def checkpoint_writes(monkeypatch):
    """(epoch of the state, file name) of every checkpoint the loop writes, and whether best.pt
    was a byte copy ("copy") or a serialisation."""
    writes = []
    save, write_bytes = files.atomic_save, files.atomic_write_bytes

    def recording_save(obj, path):
        writes.append((obj.get("epoch"), Path(path).name, "serialised"))
        save(obj, path)

    def recording_bytes(path, data, *args, **kwargs):
        if Path(path).name.endswith(".pt"):
            writes.append((None, Path(path).name, "copy"))
        write_bytes(path, data, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "atomic_save", recording_save)
    monkeypatch.setattr(checkpointing, "atomic_write_bytes", recording_bytes)
    return writes


def test_eval_every_evaluates_every_nth_and_the_last_epoch_and_reports_read_it(tmp_path, capsys):
    cfg = tiny_config(tmp_path, train={"epochs": 5, "seed": 0, "eval_every": 2})
    summary = runner.train(config.build(cfg))
    run_dir = Path(cfg["output"]["dir"])
    history = rows(run_dir)
    assert [r["epoch"] for r in history] == [0, 1, 2, 3, 4, 5]
    assert [r["epoch"] for r in history if "test" in r] == [0, 2, 4, 5]
    assert all("train" in r for r in history[1:]), "every trained epoch keeps its training statistics"
    assert "not evaluated" in capsys.readouterr().out
    best = summary["networks"]["model"]["best_epoch"]
    assert best in (2, 4, 5)
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == best
    assert summary["networks"]["model"]["top1_final"] == history[-1]["test"]["model"]["top1"]
    loaded = report.load(run_dir)  # the report reads such a run, and plots evaluated epochs only
    curves = primary_curves({"vanilla": [loaded]})
    assert [list(c[0]) for c in curves.values()] == [[2, 4, 5]]


def test_save_every_writes_last_pt_at_first_nth_and_last_epoch_and_best_pt_by_copy(tmp_path, checkpoint_writes):
    cfg = tiny_config(tmp_path, train={"epochs": 5, "seed": 0}, output={"save_every": 3})
    runner.train(config.build(cfg))
    run_dir = Path(cfg["output"]["dir"])
    last = [e for e, name, _ in checkpoint_writes if name == "last.pt"]
    history = rows(run_dir)
    best_epochs = [r["epoch"] for r in history[1:]
                   if r["test"]["model"]["top1"] >= max(x["test"]["model"]["top1"] for x in history[1:r["epoch"] + 1])]
    # every 3rd epoch, the first and the last, and every epoch that becomes the best (so best.pt
    # never holds a state that a resume from last.pt would not pass through)
    assert last == sorted({1, 3, 5} | set(best_epochs))
    best_writes = [(e, how) for e, name, how in checkpoint_writes if name == "best.pt"]
    assert len(best_writes) == len(best_epochs)
    for epoch, (state_epoch, how) in zip(best_epochs, best_writes):
        assert how == "copy"   # a byte copy of the last.pt just written
        assert state_epoch in (None, epoch)
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == best_epochs[-1]
    if best_epochs[-1] == 5:
        assert (run_dir / "best.pt").read_bytes() == (run_dir / "last.pt").read_bytes()


def test_a_crash_between_checkpoints_resumes_from_the_last_one_without_repeated_rows(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, train={"epochs": 4, "seed": 0}, output={"save_every": 2})
    path = write_config(tmp_path, cfg)
    calls, evaluate = [], loop.evaluate

    def crash_at_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the initial evaluation, then epochs 1, 2, 3
            raise RuntimeError("power cut")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", crash_at_epoch_3)
    assert main(["train", str(path)]) == 1
    run_dir = Path(cfg["output"]["dir"])
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(loop, "evaluate", evaluate)
    assert main(["train", str(path), "output.resume=true"]) == 0
    assert [r["epoch"] for r in rows(run_dir)] == [0, 1, 2, 3, 4]
    fresh = tiny_config(tmp_path / "fresh", train={"epochs": 4, "seed": 0})
    runner.train(config.build(fresh))
    assert [r["test"] for r in rows(run_dir)] == [r["test"] for r in rows(Path(fresh["output"]["dir"]))], \
        "the resumed run is the uninterrupted one"


def test_cuda_graphs_are_refused_on_cpu_in_one_line_before_anything_is_written(tmp_path, capsys):
    cfg = tiny_config(tmp_path, train={"epochs": 1, "seed": 0, "device": "cpu", "compile": "reduce-overhead"})
    assert main(["train", str(write_config(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("sokd: error: train.compile=reduce-overhead captures CUDA graphs, which need a GPU; "
                   "on cpu use train.compile=true (or max-autotune)")
    assert not (tmp_path / "runs").exists()
    assert main(["bench", "--compile", "reduce-overhead", "--device", "cpu"]) == 2
    assert "--compile=reduce-overhead captures CUDA graphs" in capsys.readouterr().err


def test_cuda_switches_are_set_for_a_cuda_device_and_left_alone_otherwise():
    names = ("matmul", "cudnn_tf32", "benchmark")

    def flags():
        return dict(zip(names, (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                                torch.backends.cudnn.benchmark)))
    before = flags()
    try:
        configure_cuda(torch.device("cpu"), tf32=not before["matmul"], cudnn_benchmark=not before["benchmark"])
        assert flags() == before
        configure_cuda(torch.device("cuda"), tf32=True, cudnn_benchmark=True)  # flags only: no GPU needed
        assert flags() == {"matmul": True, "cudnn_tf32": True, "benchmark": True}
        configure_cuda(torch.device("cuda"), tf32=False, cudnn_benchmark=False)
        assert flags() == {"matmul": False, "cudnn_tf32": False, "benchmark": False}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before["matmul"]
        torch.backends.cudnn.allow_tf32 = before["cudnn_tf32"]
        torch.backends.cudnn.benchmark = before["benchmark"]


def test_optimizer_kernels_by_setting_and_device_and_fused_sgd_matches_the_loop():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kernel_options("auto", cuda) == {"fused": True}
    assert kernel_options("auto", cpu) == {"foreach": False}, "CPU keeps PyTorch's default loop"
    assert kernel_options("foreach", cpu) == {"foreach": True}

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(8, 4)

        def param_groups(self, lr, per_role=None):
            return [{"params": list(self.parameters()), "lr": lr, "role": "model"}]

    results = {}
    for impl in ("loop", "fused"):
        torch.manual_seed(0)
        holder = Holder()
        spec = config.OptimSpec(impl=impl)
        opt = build_optimizer(holder, spec, cpu)
        for _ in range(3):
            opt.zero_grad()
            holder.net(torch.ones(2, 8)).square().sum().backward()
            opt.step()
        results[impl] = holder.net.weight.detach().clone()
    torch.testing.assert_close(results["fused"], results["loop"], rtol=1e-6, atol=1e-7)


def test_eval_batch_default_depends_on_the_device_and_a_set_value_wins():
    cfg = DataConfig.from_dict({"name": "synthetic", "batch_size": 64})
    assert eval_batch_for(cfg, torch.device("cpu")) == CPU_EVAL_BATCH
    assert eval_batch_for(cfg, torch.device("cuda")) == GPU_EVAL_BATCH_FACTOR * 64
    set_ = DataConfig.from_dict({"name": "synthetic", "batch_size": 64, "eval_batch_size": 7})
    assert eval_batch_for(set_, torch.device("cuda")) == 7


def test_a_run_saved_before_new_settings_existed_resumes_when_they_are_at_their_defaults(tmp_path, capsys):
    """A run started by an older sokd has no entry for a setting added since; resuming it is the
    same run when the setting is at its default, and a refused config change when it is not."""
    cfg = tiny_config(tmp_path, train={"epochs": 1, "seed": 0})
    path = write_config(tmp_path, cfg)
    assert main(["train", str(path)]) == 0
    last = Path(cfg["output"]["dir"]) / "last.pt"
    state = torch.load(last, weights_only=True)
    for section, key in (("train", "eval_every"), ("optim", "impl"), ("distributed", "static_graph")):
        del state["config"][section][key]
    torch.save(state, last)
    assert main(["train", str(path), "train.eval_every=2", "output.resume=true", "train.epochs=2"]) == 2
    assert "config differs at 'train.eval_every'" in capsys.readouterr().err
    assert main(["train", str(path), "output.resume=true", "train.epochs=2"]) == 0
    assert [r["epoch"] for r in rows(Path(cfg["output"]["dir"]))] == [0, 1, 2]


def test_train_threads_hold_for_the_run_and_the_caller_gets_its_thread_count_back(tmp_path, capsys):
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    try:
        cfg = tiny_config(tmp_path, "vanilla", train={"epochs": 1, "threads": wanted, "steps_per_epoch": 1})
        runner.train(config.build(cfg))
        assert f"({wanted} threads)" in capsys.readouterr().out   # the run itself ran on them
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
