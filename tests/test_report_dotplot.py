"""`sokd report`'s final_top1.png: the rows it plots (numbers, order, baselines) and the file."""
from __future__ import annotations

import json
import statistics
import struct

import pytest
import yaml

from sokd import report
from sokd.cli import main
from sokd.report_dotplot import final_top1_rows, plotted_panels, reference_baselines

#: run name -> (method, method options, {role: final top-1 for seeds 0, 1, 2})
RUNS = {
    "kd": ("kd", {"T": 4}, {"student": [70.0, 72.0, 74.0], "teacher": [80.0, 80.0, 80.0]}),
    "sokd": ("sokd", {"T": 4, "kbm_stages": 1, "kbm_init": "random"},
             {"student": [75.0, 76.0, 77.0], "teacher": [80.0, 81.0, 82.0], "kbm": [83.0, 83.0, 86.0]}),
    "sokd_at": ("sokd", {"features": [{"kind": "at", "stages": [0, 1], "weight": 1000}]},
                {"student": [73.0, 73.0, 76.0], "teacher": [80.0, 81.0, 82.0], "kbm": [82.0, 84.0, 86.0]}),
}


def write_run(root, name, method, options, top1s, seed, config=True):
    run = root / f"{name}-s{seed}"
    run.mkdir(parents=True)
    nets = {role: {"arch": "resnet8", "top1_final": v[seed], "top1_best": v[seed] + 0.5,
                   "top1_initial": 10.0} for role, v in top1s.items()}
    (run / "summary.json").write_text(json.dumps({
        "method": method, "name": name, "seed": seed, "primary_role": "student",
        "networks": nets, "compare": {}}))
    rows = [{"epoch": e, "test": {role: {"top1": 10.0 if e == 0 else v[seed]} for role, v in top1s.items()},
             **({"train": {"terms": {"student_ce": 1.0 / e}}} if e else {})} for e in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config:
        (run / "config.yaml").write_text(yaml.safe_dump({"name": name, "method": {"name": method, **options}}))
    return run


@pytest.fixture
def runs_dir(tmp_path):
    for name, (method, options, top1s) in RUNS.items():
        for seed in range(3):
            write_run(tmp_path / "runs", name, method, options, top1s, seed)
    return tmp_path / "runs"


def groups_of(path):
    return report.group([report.load(r) for r in report.find_runs([str(path)])])


def test_final_top1_rows_are_sorted_by_mean_with_each_seed_and_the_plain_baselines_marked(runs_dir):
    rows = final_top1_rows(groups_of(runs_dir))
    assert list(rows) == ["student", "teacher", "kbm"]  # most run names first
    student = rows["student"]
    assert [r.name for r in student] == ["sokd", "sokd_at", "kd"]  # best mean on top
    assert [r.mean for r in student] == [76.0, pytest.approx(74.0), 72.0]
    assert [r.std for r in student] == pytest.approx([1.0, 3 ** 0.5, 2.0])  # sample std over seeds
    assert student[2].seeds == ((0, 70.0), (1, 72.0), (2, 74.0)) and student[2].n == 3
    assert [r.baseline for r in student] == ["sokd", None, "kd"]  # sokd_at has feature terms
    assert [r.method for r in student] == ["sokd", "sokd", "kd"]
    # equal means are ordered by name; a role only some runs hold has only their rows
    assert [(r.name, r.mean) for r in rows["teacher"]] == [("sokd", 81.0), ("sokd_at", 81.0), ("kd", 80.0)]
    assert rows["teacher"][2].std == 0.0
    kbm = {r.name: r for r in rows["kbm"]}
    assert kbm["sokd"].mean == pytest.approx(statistics.mean([83.0, 83.0, 86.0]))
    assert kbm["sokd"].std == pytest.approx(statistics.stdev([83.0, 83.0, 86.0]))


def test_kbm_rows_with_a_tied_mean_are_ordered_by_name(runs_dir):
    # 84 = mean(82, 84, 86) = mean(83, 83, 86)
    assert [r.name for r in final_top1_rows(groups_of(runs_dir))["kbm"]] == ["sokd", "sokd_at"]


def test_only_the_plain_kd_and_sokd_runs_are_the_baselines(tmp_path):
    root = tmp_path / "runs"
    top1 = {"student": [70.0]}
    write_run(root, "kd", "kd", {"T": 4}, top1, 0)
    write_run(root, "kd_t2", "kd", {"T": 2}, top1, 0)                       # another temperature
    write_run(root, "kd_w", "kd", {"weights": {"student_ce": 0.5}}, top1, 0)  # weighted terms
    write_run(root, "sokd", "sokd", {}, top1, 0)
    write_run(root, "sokd_fp32", "sokd", {"T": 4.0}, top1, 0)   # default options, but not the named run
    write_run(root, "sokd_kbm2", "sokd", {"kbm_stages": 2}, top1, 0)
    write_run(root, "dml", "dml", {}, top1, 0)                  # not a reference method
    assert reference_baselines(groups_of(root)) == {"kd": "kd", "sokd": "sokd"}
    # with no run named like the method, every run with its default options is its plain run
    for name in ("sokd", "kd"):
        for f in (root / f"{name}-s0").iterdir():
            f.unlink()
        (root / f"{name}-s0").rmdir()
    assert reference_baselines(groups_of(root)) == {"sokd_fp32": "sokd"}
    # without config.yaml the options are unknown: only a run named like its method counts
    write_run(tmp_path / "old", "kd", "kd", {}, top1, 0, config=False)
    write_run(tmp_path / "old", "kd_x", "kd", {}, top1, 0, config=False)
    assert reference_baselines(groups_of(tmp_path / "old")) == {"kd": "kd"}


def test_roles_held_by_one_run_name_get_no_panel_but_the_student_always_does(runs_dir):
    rows = final_top1_rows(groups_of(runs_dir))
    assert list(plotted_panels(rows)) == ["student", "teacher", "kbm"]
    only_kd = {k: v for k, v in groups_of(runs_dir).items() if k == "kd"}
    assert list(plotted_panels(final_top1_rows(only_kd))) == ["student"]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_writes_final_top1_png_and_prints_its_path(runs_dir, tmp_path, capsys):
    out = tmp_path / "out"
    res = report.build([str(runs_dir)], str(out))
    assert str(out / "final_top1.png") in res["plots"]
    width, height = png_size(out / "final_top1.png")
    assert width > 600 and height > 400
    import matplotlib.image
    assert matplotlib.image.imread(str(out / "final_top1.png")).shape[:2] == (height, width)
    assert main(["report", str(runs_dir), "--out", str(tmp_path / "cli")]) == 0
    assert f"{tmp_path / 'cli'}/final_top1.png" in capsys.readouterr().out
    # more rows, a taller picture
    for name in ("kd_b", "kd_c", "kd_d"):
        for seed in range(3):
            write_run(runs_dir, name, "kd", {"T": 3}, RUNS["kd"][2], seed)
    report.build([str(runs_dir)], str(tmp_path / "more"))
    assert png_size(tmp_path / "more" / "final_top1.png")[1] > height
