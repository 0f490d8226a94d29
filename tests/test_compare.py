"""sokd compare: one teacher per seed shared by every variant, every run once (resumable, several
workers), and a table whose pairs are honest. Tiny synthetic grids; every run is a real
`sokd train` subprocess."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sokd import cli, compare
from sokd.compare import results, workers
from sokd.compare.spec import TEACHER_RUN

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(400)


def write_spec(tmp_path: Path, seeds=(0, 1), variants=None, **extra) -> Path:
    spec = {
        "name": "tiny",
        "config": {
            "data": {"name": "synthetic", "synthetic_size": 128, "synthetic_shape": [3, 16, 16],
                     "synthetic_classes": 4, "batch_size": 32, "eval_batch_size": 64},
            "optim": {"lr": 0.05}, "schedule": {"name": "constant"},
            "train": {"epochs": 1, "precision": "fp32", "threads": 1},
            "output": {"tensorboard": False},
            "student": {"arch": "resnet8"},
        },
        "seeds": list(seeds),
        "teacher": {"arch": "resnet14"},
        "baseline": "kd",
        "variants": variants or {"kd": {"method": {"name": "kd"}}, "sokd": {"method": {"name": "sokd"}}},
        "out": str(tmp_path / "grid"),
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sokd(*args, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "sokd", *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def test_a_grid_trains_one_teacher_per_seed_shares_it_and_writes_table_and_plots(tmp_path, capsys):
    spec = write_spec(tmp_path)
    assert cli.main(["compare", str(spec)]) == 0
    out = capsys.readouterr().out
    grid = tmp_path / "grid"
    # the teacher of each seed trained once, first; both variants of the seed read its model.pt
    assert out.count(f"run    {TEACHER_RUN}-s0") == 1 and out.index("teacher-s0") < out.index("kd-s0")
    for seed in (0, 1):
        teacher = grid / f"teacher-s{seed}" / "model.pt"
        digest = results.file_digest(teacher)
        for variant in ("kd", "sokd"):
            used = yaml.safe_load((grid / f"{variant}-s{seed}" / "config.yaml").read_text())["teacher"]["checkpoint"]
            assert Path(used) == teacher
            assert json.loads((grid / ".records" / f"{variant}-s{seed}.json").read_text())["teacher_sha256"] == digest
    table = (grid / "compare.md").read_text()
    assert "4 of 4 runs finished" in table and "| sokd | 2 |" in table and "(n=2)" in table
    result = json.loads((grid / "compare.json").read_text())
    row = next(r for r in result["rows"] if r["variant"] == "sokd")
    assert row["vs_baseline"]["n"] == 2 and len(row["vs_baseline"]["ci95"]) == 2 and row["vs_baseline"]["p"] is not None
    assert {p.name for p in (grid / "plots").iterdir()} >= {"test_top1.png"}
    # the seeds' teachers are in the table too, on the headline column
    key = {"selected": "top1_selected", "final": "top1_final"}[result["headline"]]
    tops = [json.loads((grid / f"teacher-s{s}" / "summary.json").read_text())["networks"]["model"][key]
            for s in (0, 1)]
    assert result["teacher"]["seeds"] == [0, 1] and result["teacher"]["mean"] == pytest.approx(sum(tops) / 2)
    assert f"Teacher (resnet14, one per seed, trained alone): {sum(tops) / 2:.2f} ± " in table
    # a second run recomputes nothing
    stamps = {p: p.stat().st_mtime_ns for p in grid.glob("*-s*/summary.json")}
    assert cli.main(["compare", str(spec)]) == 0
    assert {p: p.stat().st_mtime_ns for p in grid.glob("*-s*/summary.json")} == stamps
    assert "run    " not in capsys.readouterr().out


def test_a_killed_grid_finishes_on_rerun_without_recomputing_finished_runs(tmp_path):
    spec = write_spec(tmp_path)
    grid = tmp_path / "grid"
    proc = sokd("compare", spec, start_new_session=True)
    first = grid / "kd-s0" / "summary.json"
    while not first.exists():   # kill the whole grid (the worker and its training process) once a run is done
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stamp = first.stat().st_mtime_ns
    done_before = {p.parent.name for p in grid.glob("*-s*/summary.json")}
    rerun = sokd("compare", spec)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert first.stat().st_mtime_ns == stamp
    for name in done_before:
        assert f"run    {name}" not in out and f"resume {name}" not in out
    assert len(list(grid.glob("*-s*/summary.json"))) == 6
    assert "4 of 4 runs finished" in (grid / "compare.md").read_text()


def test_a_terminated_compare_stops_its_training_run_which_then_resumes(tmp_path):
    """SIGTERM to `sokd compare` alone (what a scheduler sends) reaches the run it trains once:
    the run saves a resumable last.pt, no training process outlives its worker."""
    spec = write_spec(tmp_path, seeds=(0,))
    tree = yaml.safe_load(spec.read_text())
    tree["config"]["train"]["epochs"] = 500   # the teacher is still training when the signal comes
    spec.write_text(yaml.safe_dump(tree))
    grid = tmp_path / "grid"
    proc = sokd("compare", spec)
    claim = grid / ".claims" / f"{TEACHER_RUN}-s0.claim"
    child = None
    while child is None or not (grid / f"{TEACHER_RUN}-s0" / "metrics.jsonl").exists():
        assert proc.poll() is None, proc.stdout.read()
        try:
            child = json.loads(claim.read_text()).get("child")
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in out, out
    deadline = time.monotonic() + 300
    while workers.pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workers.pid_alive(child), "the training process outlived its worker"
    assert (grid / f"{TEACHER_RUN}-s0" / "last.pt").is_file()
    log = (grid / ".logs" / f"{TEACHER_RUN}-s0.log").read_text()
    assert "SIGTERM received: stopped at" in log and "second SIGTERM" not in log, log
    plan = sokd("compare", spec, "--plan")
    listing, _ = plan.communicate(timeout=120)
    assert f"{TEACHER_RUN}-s0" in listing and "started, will resume" in listing, listing


def test_two_workers_share_a_grid_and_never_run_the_same_run(tmp_path):
    spec = write_spec(tmp_path, variants={"kd": {"method": {"name": "kd"}}, "sokd": {"method": {"name": "sokd"}},
                                          "vanilla": {"method": {"name": "vanilla"}}})
    procs = [sokd("compare", spec, "--worker") for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    started = [line.split()[1] for out in outs for line in out.splitlines() if line.startswith(("run ", "resume "))]
    assert sorted(started) == sorted(set(started)) and len(started) == 8, outs   # 2 teachers + 3 x 2, once each
    table = tmp_path / "grid" / "compare.md"
    assert table.exists() and "6 of 6 runs finished" in table.read_text()


def test_claims_of_dead_or_silent_workers_are_taken_over(tmp_path):
    claims = workers.Claims(tmp_path)
    assert claims.take("kd-s0", "me") and not claims.take("kd-s0", "other")   # a live claim holds
    claims.release("kd-s0")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claims.dir.mkdir(parents=True, exist_ok=True)
    claims.path("kd-s1").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "worker": "x"}))
    assert claims.holder("kd-s1") is None and claims.take("kd-s1", "me")   # its process is gone
    claims.path("kd-s2").write_text(json.dumps({"host": "elsewhere", "pid": 1, "worker": "y"}))
    assert claims.holder("kd-s2") is not None and not claims.take("kd-s2", "me")   # another machine, recent
    old = time.time() - workers.STALE_S - 1
    os.utime(claims.path("kd-s2"), (old, old))
    assert claims.take("kd-s2", "me")   # another machine, silent for too long


def test_a_claim_appears_whole_and_one_of_many_racing_takers_wins_it(tmp_path):
    claims = workers.Claims(tmp_path)
    claims.dir.mkdir(parents=True, exist_ok=True)
    claims.path("kd-s0").write_text("")   # created, its text not yet written
    assert claims.holder("kd-s0") is not None and not claims.take("kd-s0", "me")
    old = time.time() - workers.STALE_S - 1
    os.utime(claims.path("kd-s0"), (old, old))
    assert claims.take("kd-s0", "me")   # never written and silent for too long: stale
    start = threading.Barrier(8)
    won = []

    def racer(i):
        start.wait()
        if claims.take("kd-s1", f"w{i}"):
            won.append(i)
    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and json.loads(claims.path("kd-s1").read_text())["worker"] == f"w{won[0]}"
    assert sorted(p.name for p in claims.dir.iterdir()) == ["kd-s0.claim", "kd-s1.claim"]   # no drafts left


def test_takers_that_all_found_one_claim_stale_leave_it_to_one_of_them(tmp_path):
    """Every taker judges the stale claim stale before any of them replaces it (the worst
    interleaving, forced): still exactly one holds the run afterwards."""
    count = 6
    judged = threading.Barrier(count)
    first_look = threading.local()

    class SlowToAct(workers.Claims):
        def holder(self, run):
            found = super().holder(run)
            if not getattr(first_look, "done", False):
                first_look.done = True
                judged.wait(timeout=30)
            return found

    claims = SlowToAct(tmp_path)
    claims.dir.mkdir(parents=True, exist_ok=True)
    claims.path("kd-s0").write_text(json.dumps({"host": "elsewhere", "pid": 1, "worker": "gone"}))
    old = time.time() - workers.STALE_S - 1
    os.utime(claims.path("kd-s0"), (old, old))
    won = []

    def racer(i):
        if claims.take("kd-s0", f"w{i}"):
            won.append(i)
    threads = [threading.Thread(target=racer, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1, won
    assert json.loads(claims.path("kd-s0").read_text())["worker"] == f"w{won[0]}"
    assert sorted(p.name for p in claims.dir.iterdir()) == ["kd-s0.claim"]   # no lock or draft left


def test_a_takeover_lock_left_by_a_dead_taker_is_cleared(tmp_path):
    claims = workers.Claims(tmp_path)
    claims.dir.mkdir(parents=True, exist_ok=True)
    claims.path("kd-s0").write_text(json.dumps({"host": "elsewhere", "pid": 1, "worker": "gone"}))
    lock = claims.dir / "kd-s0.takeover"
    lock.write_text("elsewhere 1")
    old = time.time() - workers.STALE_S - 1
    os.utime(claims.path("kd-s0"), (old, old))
    assert not claims.take("kd-s0", "me")   # a young lock: another taker is replacing the claim
    os.utime(lock, (old, old))
    assert not claims.take("kd-s0", "me") and not lock.exists()   # an old one is cleared ...
    assert claims.take("kd-s0", "me")   # ... and the next look takes the run


def test_a_stopping_worker_asks_its_run_to_stop_once_however_long_it_takes_to_save(tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "POLL_S", 0.05)
    count, ready = tmp_path / "signals", tmp_path / "ready"
    child = subprocess.Popen([sys.executable, str(ROOT / "tests" / "slow_to_stop.py"), count, ready])
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    worker = workers.Worker(SimpleNamespace(out=tmp_path), "me", None)
    worker.child = child
    worker.stop.set()
    worker.stop_child()
    assert worker.wait_for(child, "kd-s0") == 0 and count.read_text() == "1"   # saved, not forced


def test_runs_with_another_precision_or_teacher_are_not_paired_and_say_why(tmp_path, capsys):
    variants = {"kd": {"method": {"name": "kd"}},
                "kd_bf16": {"method": {"name": "kd"}, "train": {"precision": "bf16"}}}
    spec = write_spec(tmp_path, seeds=(0,), variants=variants)
    assert cli.main(["compare", str(spec)]) == 0
    table = (tmp_path / "grid" / "compare.md").read_text()
    assert "kd_bf16 seed 0 is not paired with kd seed 0: precision bf16 vs fp32" in table
    a = {"summary": {"precision": "fp32", "data_fingerprint": "d"}, "record": {"teacher_sha256": "t1"}}
    b = {"summary": {"precision": "fp32", "data_fingerprint": "d"}, "record": {"teacher_sha256": "t2"}}
    assert results.pair_problem(a, b) == "their teachers differ"
    b["record"]["teacher_sha256"] = "t1"
    b["summary"]["data_fingerprint"] = "e"
    assert results.pair_problem(a, b) == "they were trained on different data"
    b["summary"].update(data_fingerprint="d", versions={"sokd": "0.2", "torch": "2.14"})
    a["summary"]["versions"] = {"sokd": "0.1", "torch": "2.14"}
    assert results.pair_problem(a, b).startswith("software sokd 0.1/torch 2.14 vs sokd 0.2")


def test_a_copied_run_folder_is_no_extra_seed(tmp_path, capsys):
    spec = write_spec(tmp_path, seeds=(0,))
    assert cli.main(["compare", str(spec)]) == 0
    grid = tmp_path / "grid"
    shutil.copytree(grid / "kd-s0", grid / "kd-s1")      # looks like seed 1 of kd
    shutil.copytree(grid / "kd-s0", grid / "kd-s0-copy")
    result = compare.summarise(compare.load(str(spec)))
    assert next(r for r in result["rows"] if r["variant"] == "kd")["seeds"] == [0]


@pytest.mark.parametrize("change,expected", [
    ({"baseline": "dml"}, "baseline 'dml' is not one of the variants (kd, sokd)"),
    ({"seeds": [0, 0]}, "seeds must be distinct"),
    ({"variants": {"teacher": {"method": {"name": "kd"}}}, "baseline": "teacher"}, "variant name 'teacher'"),
    ({"teacher": None}, "variant 'kd' distils from a trained teacher; add teacher: {arch: NAME}"),
    ({"variants": {"kd": {"method": {"name": "kd", "T": -1}}}}, "method.T"),
])
def test_a_bad_spec_is_one_line_exit_2_and_runs_nothing(tmp_path, capsys, change, expected):
    spec = write_spec(tmp_path)
    tree = yaml.safe_load(spec.read_text())
    tree.update(change)
    spec.write_text(yaml.safe_dump(tree))
    assert cli.main(["compare", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "grid").exists()


def test_presets_load_and_name_the_unknown_ones(capsys):
    for name in ("fmnist", "cifar100-cpu"):
        grid = compare.load(f"preset:{name}")
        assert grid.runs() and grid.spec.baseline in grid.spec.variants
    assert cli.main(["compare", "preset:nope"]) == 2
    assert "no compare preset 'nope'; the presets are: cifar100-cpu, fmnist" in capsys.readouterr().err


def test_variants_run_a_subset_first_and_the_table_reads_every_finished_run(tmp_path, capsys):
    spec = write_spec(tmp_path, seeds=(0,), variants={"kd": {"method": {"name": "kd"}},
                                                      "vanilla": {"method": {"name": "vanilla"}},
                                                      "sokd": {"method": {"name": "sokd"}}})
    assert cli.main(["compare", str(spec), "--variants", "vanilla"]) == 0
    grid = tmp_path / "grid"
    assert (grid / "vanilla-s0" / "summary.json").exists()
    assert not (grid / f"{TEACHER_RUN}-s0").exists()   # no selected variant needs the teacher
    assert cli.main(["compare", str(spec), "--variants", "kd"]) == 0
    assert not (grid / "sokd-s0").exists()
    table = (grid / "compare.md").read_text()
    assert "2 of 3 runs finished" in table and "| vanilla | 1 |" in table
    capsys.readouterr()
    assert cli.main(["compare", str(spec), "--variants", "kd,nope"]) == 2
    assert "--variants names nope" in capsys.readouterr().err


def test_seeds_run_some_seeds_first(tmp_path, capsys):
    spec = write_spec(tmp_path, seeds=(0, 1), variants={"kd": {"method": {"name": "kd"}},
                                                         "vanilla": {"method": {"name": "vanilla"}}})
    assert cli.main(["compare", str(spec), "--variants", "vanilla", "--seeds", "1", "--plan"]) == 0
    assert capsys.readouterr().out.split() == ["vanilla-s1", "to", "run"]
    assert cli.main(["compare", str(spec), "--seeds", "1", "--plan"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [f"{TEACHER_RUN}-s1", "kd-s1",
                                                                                  "vanilla-s1"]
    assert cli.main(["compare", str(spec), "--seeds", "1,5"]) == 2
    assert "--seeds names 5, which is not a seed" in capsys.readouterr().err
    assert cli.main(["compare", str(spec), "--seeds", "one"]) == 2
    assert "--seeds takes seeds separated by commas" in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()


def test_the_teacher_recipe_s_constructor_options_reach_every_run_that_builds_it(tmp_path):
    spec = write_spec(tmp_path, seeds=(0,))
    tree = yaml.safe_load(spec.read_text())
    tree["teacher"] = {"arch": "timm.vit_tiny_patch16_224",
                       "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 4, "num_heads": 2}}
    spec.write_text(yaml.safe_dump(tree))
    grid = compare.load(str(spec))
    assert grid.config(TEACHER_RUN, 0)["model"]["kwargs"]["patch_size"] == 4
    kd = grid.config("kd", 0)
    assert kd["teacher"]["kwargs"]["depth"] == 4 and kd["teacher"]["checkpoint"].endswith("model.pt")
    assert "kwargs" not in kd["student"]


@pytest.mark.parametrize("preset", ["vit-teacher-fmnist", "vit-student-fmnist"])
def test_the_transformer_presets_build_every_run(preset):
    grid = compare.load(f"preset:{preset}")
    for name, seed in grid.runs():
        grid.config(name, seed)
