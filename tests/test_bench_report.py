"""`sokd bench` measures and `sokd report` aggregates (figures, not timing assertions)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from sokd import bench, config, report, runner
from sokd.cli import main

from .conftest import tiny_config



def primary_curves(groups: dict) -> dict:
    """Plot label -> (epochs, mean, std) of every curve the report draws."""
    return {label: data for _, _, label, data in report._curves(groups)}

def test_bench_measures_every_requested_variant_and_the_plain_baseline():
    res = bench.run("resnet14", "resnet8", batch=4, precision="bf16", num_classes=10, shape=(3, 8, 8),
                    variants=["vanilla", "kd", "sokd", "sokd+at"], warmup=1, reps=2, steps_per_rep=1,
                    memory=True, fp32_too=["vanilla"], log=lambda *_: None)
    names = [r["name"] for r in res["results"]]
    assert names == ["vanilla", "kd", "sokd", "sokd+at", "vanilla (fp32)", "plain sokd"]
    by = {r["name"]: r for r in res["results"]}
    assert all(r["images_per_s"] > 0 and r["gflop_per_step"] > 0 and r["peak_mem_mb"] >= 0 for r in by.values())
    # SOKD adds the KBM's forward+backward to KD's FLOPs; the reference step computes the same
    assert by["sokd"]["gflop_per_step"] > by["kd"]["gflop_per_step"] > by["vanilla"]["gflop_per_step"]
    assert by["plain sokd"]["gflop_per_step"] == pytest.approx(by["sokd"]["gflop_per_step"], rel=1e-6)
    assert set(res["ratios"]) >= {"sokd_vs_plain_speedup", "sokd_over_kd_time", "sokd_over_kd_flops",
                                  "student_step_peak_fraction", "student_bf16_cl_over_fp32"}
    assert res["matmul_peak_gflops"] > 0


def test_peak_memory_on_cpu_keeps_the_profilers_chatter_off_stderr_but_not_warnings_or_errors(capfd):
    def step():
        os.write(2, b"a real warning\n")
        os.write(2, b"ERROR:2026-12-07 16:55:53 1:1 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n")
        os.write(2, b"[W1207 CPUAllocator.cpp:245] Memory block of unknown size was allocated before the "
                    b"profiling started, profiler results will not include the deallocation event\n")
        os.write(2, b"ERROR: a real error\n")
        torch.ones(256, 256).mul(2).sum()
    mb = bench.peak_memory_mb(step, torch.device("cpu"))
    err = capfd.readouterr().err
    assert mb > 0
    assert "a real warning" in err and "ERROR: a real error" in err
    for chatter in bench.PROFILER_CHATTER:
        assert chatter not in err


def test_report_aggregates_seeds_with_final_and_best_columns_and_plots(tmp_path, capsys):
    for seed in (0, 1):
        cfg = tiny_config(tmp_path, "vanilla", train={"epochs": 2, "seed": seed})
        cfg["output"]["dir"] = str(tmp_path / "runs" / f"vanilla-s{seed}")
        runner.train(config.build(cfg))
    res = report.build([str(tmp_path / "runs")], str(tmp_path / "out"))
    md = res["markdown"]
    assert "top-1 final (last epoch)" in md and "top-1 best epoch (optimistic)" in md
    row = next(l for l in md.splitlines() if l.startswith("| vanilla"))
    assert "±" in row and "| 2 " in row  # two seeds, mean ± std
    assert all((tmp_path / "out" / p).stat().st_size > 1000 for p in ("test_top1.png", "loss_terms.png"))
    assert main(["report", str(tmp_path / "runs")]) == 0
    assert "vanilla" in capsys.readouterr().out


def test_plotted_curves_are_the_mean_and_std_over_seeds_per_epoch_cut_to_the_shortest_run():
    def run(top1s):
        metrics = [{"epoch": 0, "test": {"student": {"top1": 1.0}}}]
        metrics += [{"epoch": e + 1, "test": {"student": {"top1": t}}} for e, t in enumerate(top1s)]
        return {"summary": {"primary_role": "student", "method": "kd"}, "metrics": metrics}
    curves = primary_curves({"kd": [run([50.0, 60.0, 70.0]), run([54.0, 64.0])], "dml": [run([40.0])]})
    epochs, mean, std = curves["kd (student, n=2)"]
    assert epochs == [1, 2] and mean == [52.0, 62.0]  # epoch 0 (before training) is left out
    assert std == pytest.approx([2 ** 0.5 * 2] * 2)
    assert curves["dml (student, n=1)"] == ([1], [40.0], [0.0])
    assert list(curves) == ["kd (student, n=2)", "dml (student, n=1)"]  # no teacher branch, no extra curve


def test_sokds_teacher_branch_is_plotted_next_to_its_student():
    metrics = [{"epoch": e, "test": {"student": {"top1": 50.0 + e}, "kbm": {"top1": 60.0 + e}}} for e in range(3)]
    curves = primary_curves({"sokd": [{"summary": {"primary_role": "student", "method": "sokd"},
                                              "metrics": metrics}]})
    assert curves["sokd (student, n=1)"][1] == [51.0, 52.0]
    assert curves["sokd (kbm, n=1)"] == ([1, 2], [61.0, 62.0], [0.0, 0.0])


def test_report_on_nothing_is_a_clear_error(tmp_path):
    from sokd.errors import SokdError
    with pytest.raises(SokdError, match="no finished runs"):
        report.build([str(tmp_path)])


def test_claims_check_reads_every_claim_from_runs(tmp_path, teacher_file):
    from sokd import claims
    for method in ("vanilla", "kd", "sokd", "dml", "kd_dml"):
        cfg = tiny_config(tmp_path, method, train={"epochs": 1})
        if "teacher" in cfg:
            cfg["teacher"]["checkpoint"] = str(teacher_file)
        runner.train(config.build(cfg))
    text = claims.check([str(tmp_path / "runs")])
    for heading in ("(a) SOKD student", "(b) SOKD teacher branch", "(c) imitation"):
        assert heading in text
    assert "SOKD vs KD: " in text and "one seed" in text
    assert "not measured yet" not in text  # every number is present


def test_claims_ablation_rows_are_differences_from_the_default_run_and_the_teacher(tmp_path, teacher_file):
    import json

    from sokd import claims
    for name, kbm_init in (("sokd", "random"), ("sokd_init_teacher", "teacher"), ("sokd_kbm_finetune", "teacher")):
        cfg = tiny_config(tmp_path, "sokd", name=name, train={"epochs": 1})
        cfg["method"]["kbm_init"] = kbm_init
        if name == "sokd_kbm_finetune":
            cfg["optim"]["lr_per_role"] = {"kbm": 0.01}
        cfg["teacher"]["checkpoint"] = str(teacher_file)
        cfg["output"]["dir"] = str(tmp_path / "runs" / name)
        runner.train(config.build(cfg))
    nets = {n: json.loads((tmp_path / "runs" / n / "summary.json").read_text())["networks"]
            for n in ("sokd", "sokd_init_teacher")}
    text = claims.check([str(tmp_path / "runs")])
    row = next(l for l in text.splitlines() if l.startswith("| sokd_init_teacher |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    abl, base = nets["sokd_init_teacher"], nets["sokd"]
    assert cells[4] == f"{abl['student']['top1_final'] - base['student']['top1_final']:+.2f}"
    assert cells[5] == f"{abl['kbm']['top1_final'] - base['kbm']['top1_final']:+.2f}"
    assert cells[6] == f"{abl['kbm']['top1_final'] - abl['teacher']['top1_initial']:+.2f}"
    # the fine-tuned-KBM follow-up answers claim (b) in its own line, against its own teacher
    ft = json.loads((tmp_path / "runs" / "sokd_kbm_finetune" / "summary.json").read_text())["networks"]
    line = next(l for l in text.splitlines() if l.startswith("- with the KBM fine-tuned from the teacher"))
    assert f"{ft['kbm']['top1_final']:.2f}" in line
    diff = ft["kbm"]["top1_final"] - ft["teacher"]["top1_initial"]
    assert f"difference {diff:+.2f}" in line


def test_claims_compare_pairs_seeds_and_applies_a_one_sided_t_test():
    from sokd.claims import compare
    # paired differences 1, 2, 1: mean 4/3, sd 1/sqrt(3), t = 4.0 > 2.920 (2 degrees of freedom)
    assert compare({0: 1.0, 1: 3.0, 2: 2.0}, {0: 0.0, 1: 1.0, 2: 1.0}).startswith("holds (")
    assert "paired t 4.00" in compare({0: 1.0, 1: 3.0, 2: 2.0}, {0: 0.0, 1: 1.0, 2: 1.0})
    # differences 1, -0.5, 1: mean 0.5, sd sqrt(0.75), t = 1.0: right direction, not significant
    assert compare({0: 1.0, 1: -0.5, 2: 1.0}, {0: 0.0, 1: 0.0, 2: 0.0}).startswith("direction holds but not significant")
    assert compare({0: 0.0, 1: 1.0, 2: 1.0}, {0: 1.0, 1: 3.0, 2: 2.0}).startswith("does not hold: the reverse")
    # only seeds both sides have are paired; none in common means nothing to say yet
    assert "one seed" in compare({0: 2.0, 5: 9.0}, {0: 1.0})
    assert compare({1: 2.0}, {0: 1.0}) == "not measured yet"


def test_paired_test_matches_scipy_and_the_t_table():
    """t, one-sided p and the 95% interval of the mean difference, against known values."""
    from sokd.claims import paired_test
    t, p, (lo, hi), crit = paired_test([1.0, 2.0, 1.0])
    assert round(t, 3) == 4.0 and round(crit, 3) == 2.920  # t table: 2 d.o.f., one-sided 5%
    assert 0.02 < p < 0.03  # P(T_2 > 4) = 0.0286
    assert round(lo, 3) == round(4 / 3 - 4.303 * (1 / 3 ** 0.5) / 3 ** 0.5, 3) and hi > lo
    t, p, ci, _ = paired_test([0.5, 0.5])
    assert t == float("inf") and p == 0.0 and ci == (0.5, 0.5)


def test_bench_compile_times_each_variant_compiled_beside_eager(monkeypatch):
    from sokd.engine import compiled
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")  # graph capture without code generation
    res = bench.run("resnet14", "resnet8", batch=4, precision="fp32", num_classes=10, shape=(3, 8, 8),
                    variants=["vanilla", "kd"], warmup=1, reps=1, steps_per_rep=1, plain=False,
                    memory=False, log=lambda *_: None, compile=True)
    by = {r["name"]: r for r in res["results"]}
    assert list(by) == ["vanilla", "vanilla compiled", "kd", "kd compiled"]
    assert by["kd compiled"]["compile_s"] >= 0 and by["kd"]["compile_s"] is None
    assert by["kd compiled"]["gflop_per_step"] == by["kd"]["gflop_per_step"]  # counted on the eager step
    assert set(res["ratios"]) >= {"vanilla_compiled_speedup", "kd_compiled_speedup"}


def test_the_reference_sokd_step_computes_the_loss_of_our_sokd_method():
    """The baseline `sokd bench` compares against is SOKD itself, written as the reference trainer
    writes it: with the same weights and batch, its loss is our method's (fp32, train mode)."""
    import copy
    from sokd import methods, models
    torch.manual_seed(0)
    teacher = models.create("resnet14", num_classes=10).requires_grad_(False)
    student = models.create("resnet8", num_classes=10)
    method = methods.create("sokd", input_shape=(3, 16, 16), teacher=copy.deepcopy(teacher),
                            student=copy.deepcopy(student)).train()
    step = bench.plain_sokd_step(teacher.train(), student.train(), 1)
    step.kbm.load_state_dict(method.nets["kbm"].state_dict())
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    ours = method(x, y)["loss"].detach()
    assert step(x, y) == pytest.approx(ours.item(), rel=1e-5)


def test_bench_command_prints_the_table_and_every_ratio_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--teacher", "resnet14", "--student", "resnet8", "--batch", "4", "--classes", "10",
                 "--input", "3x8x8", "--methods", "vanilla", "sokd", "--reps", "1", "--warmup", "0",
                 "--steps-per-rep", "1", "--no-memory", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved["results"]] == ["vanilla", "sokd", "plain sokd"]
    assert saved["ratios"]["best_sokd_step"] == "sokd"
    for key in saved["ratios"]:
        assert f"  {key}: " in printed


def test_variants_are_timed_in_rounds_so_host_drift_reaches_every_ratio_alike():
    calls = []
    steps = [lambda n=n: calls.append(n) for n in ("a", "b", "c")]
    rates = bench.time_interleaved(steps, images=8, device=torch.device("cpu"), warmup=1, reps=3, steps_per_rep=2)
    assert len(rates) == 3 and all(r > 0 for r in rates)
    assert calls[:3] == ["a", "b", "c"]                                  # warm-up, one each
    assert calls[3:] == ["a", "a", "b", "b", "c", "c"] * 3               # then rounds: each variant in turn
