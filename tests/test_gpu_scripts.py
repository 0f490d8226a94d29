"""The GPU scripts cannot rot: their --smoke modes run the same code on the CPU in seconds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


def script(name: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=280)


def test_gpu_check_smoke_prints_every_section_as_json(tmp_path):
    proc = script("gpu_check.py", "--smoke", "--out", tmp_path / "lines.jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [json.loads(line) for line in (tmp_path / "lines.jsonl").read_text().splitlines()] == lines
    assert not [l for l in lines if "error" in l]
    by = {}
    for line in lines:
        by.setdefault(line["what"], []).append(line)
    assert by["versions"][0]["torch"] and by["matmul_peak"][0]["gflops"]["bf16"] > 0
    timed = {(l["variant"], l["mode"]) for l in by["step"] if l.get("ms_per_step", 0) > 0}
    assert timed == {("vanilla", "eager"), ("kd", "eager"), ("sokd", "eager")}
    assert {l["variant"] for l in by["step"] if l.get("mode") == "reduce-overhead" and "skipped" in l} == \
        {"vanilla", "kd", "sokd"}, "CUDA graphs are reported as skipped on a CPU"
    assert by["graph_breaks"][0]["graphs"] >= 1
    fit = by["fit"][0]
    assert fit["steps"] == 4 and fit["ms_per_step"] > 0 and fit["checkpoint_s"] > 0
    assert {l["variant"] for l in by["imagenet_step"] if l["ms_per_step"] > 0} == {"kd", "sokd"}
    assert by["done"] == [{"what": "done", "failed_sections": 0}]
    # the fit runs every speed setting at its default and says what `auto` chose
    assert set(fit["defaults"]) == {"precision", "channels_last", "compiled"} and fit["defaults"]["channels_last"]


def test_gpu_check_quick_keeps_to_its_short_list(tmp_path):
    proc = script("gpu_check.py", "--smoke", "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    whats = [l["what"] for l in lines]
    assert "imagenet_step" not in whats and whats[-1] == "done" and "fit" in whats
    assert {(l["variant"], l["mode"]) for l in lines if l["what"] == "step" and "variant" in l} == \
        {("kd", "eager"), ("sokd", "eager")}


def test_paper_gpu_smoke_runs_resumes_and_skips_and_prints_the_same_table(tmp_path):
    first = script("paper_gpu.py", "--smoke", "--out", tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    assert table in first.stdout and "SOKD student resnet8" in table
    (tmp_path / "sokd" / "summary.json").unlink()  # as if stopped after its last checkpoint
    second = script("paper_gpu.py", "--smoke", "--out", tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "done     teacher" in second.stdout and "resume   " in second.stdout
    third = script("paper_gpu.py", "--smoke", "--out", tmp_path)
    assert third.returncode == 0 and "done     teacher" in third.stdout and "done     sokd" in third.stdout
    assert (tmp_path / "table.md").read_text() == table and third.stdout.endswith(table)
