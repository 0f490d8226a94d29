"""CRD's recipe for every CRD-benchmark pair, the published numbers, and `sokd report --published`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import sokd
import sokd.published as published
from sokd import config
from sokd.cli import main

ROOT = Path(__file__).resolve().parents[1]
CRD_CONFIGS = ROOT / "configs" / "cifar100-crd"
DOC = ROOT / "docs" / "published-results.md"
SMALL_LR_STUDENTS = {"mobilenetv2", "shufflenetv1", "shufflenetv2"}


def test_every_published_pair_builds_from_the_zoo_and_has_a_crd_recipe_config():
    zoo = set(sokd.models.list_models())
    pairs = published.table()["pairs"]
    assert len(pairs) == 13  # CRD's Table 1 (7 pairs) and Table 2 (6 pairs)
    for p in pairs:
        assert {p["teacher"], p["student"]} <= zoo
        cfg = config.load(CRD_CONFIGS / f"{p['teacher']}-{p['student']}.yaml")
        assert (cfg.teacher.arch, cfg.student.arch, cfg.data.name) == (p["teacher"], p["student"], "cifar100")
        assert cfg.optim.lr == (0.01 if p["student"] in SMALL_LR_STUDENTS else 0.05)
        assert cfg.method.name == "kd" and cfg.method.options()["weights"] == {"student_ce": 0.1,
                                                                              "student_kl_teacher": 0.9}
        assert cfg.teacher.weights.endswith("_vanilla/ckpt_epoch_240.pth")


def test_every_crd_config_validates_with_crds_recipe():
    files = sorted(CRD_CONFIGS.glob("*.yaml"))
    assert len(files) == 1 + 13 + 15  # recipe, pairs, one vanilla config per network
    for path in files:
        cfg = config.load(path)
        assert (cfg.train.epochs, cfg.data.batch_size, cfg.schedule.milestones, cfg.schedule.gamma) == \
            (240, 64, [150, 180, 210], 0.1)
        assert (cfg.optim.name, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.9, 5e-4)
        assert (cfg.data.crop_padding, cfg.data.hflip) == (4, True)
        arch = cfg.student.arch if cfg.student else (cfg.model.arch if cfg.model else None)
        if arch is not None:
            assert cfg.optim.lr == (0.01 if arch in SMALL_LR_STUDENTS else 0.05), path.name
    # the documented switch to another method drops CRD's KD term weights
    cfg = config.load(CRD_CONFIGS / "wrn_40_2-wrn_40_1.yaml", ["method.name=sokd", "method.weights={}"])
    assert cfg.method.name == "sokd" and cfg.method.options()["weights"] == {}


def test_the_published_table_names_a_source_for_every_column_and_holds_accuracies():
    t = published.table()
    assert set(t["columns"]) == {"teacher", "student", *published.METHOD_COLUMNS}
    assert set(t["columns"].values()) <= set(t["sources"])
    for p in t["pairs"]:
        values = [p[k] for k in ("teacher_top1", "student_top1", *published.METHOD_COLUMNS) if k in p]
        assert all(isinstance(v, float) and 50 < v < 90 for v in values), p
        assert p["teacher_top1"] > p["student_top1"]
        assert set(p) <= {"teacher", "student", "table", "teacher_top1", "student_top1", "note",
                          *published.METHOD_COLUMNS}
    assert published.pair("wrn_40_2", "wrn_40_1")["teacher_top1"] == 75.61  # the released teacher


def test_the_docs_table_is_generated_from_the_data_file():
    text = DOC.read_text(encoding="utf-8")
    start, end = "<!-- generated: sokd.published.markdown() -->\n", "<!-- end generated -->"
    body = text[text.index(start) + len(start):text.index(end)]
    assert body == published.markdown() + "\n", (
        "docs/published-results.md is stale: paste the output of "
        "`python -c 'import sokd.published as p; print(p.markdown())'` between its markers")


def fake_run(root: Path, name: str, data: str, method: str, roles: dict, primary: str, top1: float, seed=0):
    """A finished run directory as sokd writes it (config.yaml, summary.json, metrics.jsonl)."""
    run = root / f"{name}-s{seed}"
    run.mkdir(parents=True)
    cfg = {"name": name, "data": {"name": data}, "method": {"name": method},
           **{role: {"arch": arch} for role, arch in roles.items()}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    nets = {role: {"arch": arch, "top1_final": top1 if role == primary else 75.0, "top1_best": top1 + 0.5,
                   "top1_initial": None} for role, arch in roles.items()}
    (run / "summary.json").write_text(json.dumps({"name": name, "method": method, "seed": seed, "epochs": 240,
                                                  "primary_role": primary, "networks": nets, "compare": {}}))
    rows = [{"epoch": e, "test": {r: {"top1": top1} for r in roles}} for e in (0, 1)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_report_published_prints_a_run_next_to_its_pairs_published_numbers(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, top1 in ((0, 74.0), (1, 74.5)):
        fake_run(runs, "wrn_40_2-wrn_40_1", "cifar100", "kd", {"teacher": "wrn_40_2", "student": "wrn_40_1"},
                 "student", top1, seed)
    fake_run(runs, "vanilla_wrn_40_1", "cifar100", "vanilla", {"model": "wrn_40_1"}, "model", 71.5)
    fake_run(runs, "fmnist-kd", "fashion_mnist", "kd", {"teacher": "wrn_40_2", "student": "wrn_40_1"},
             "student", 93.0)
    fake_run(runs, "odd-pair", "cifar100", "kd", {"teacher": "resnet8", "student": "resnet14"}, "student", 60.0)
    assert main(["report", str(runs), "--published"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in out.splitlines() if line.startswith("| ") and "published KD" not in line}
    kd = rows["wrn_40_2-wrn_40_1"]
    assert kd[2:6] == ["wrn_40_2 → wrn_40_1", "2", "240", "74.25 ± 0.35"]
    assert kd[6:] == ["75.61", "71.98", "73.54", "72.24", "72.77", "74.14", "74.81", "75.09"]
    vanilla = rows["vanilla_wrn_40_1"]
    assert vanilla[2] == "vanilla student" and vanilla[5] == "71.50" and vanilla[7] == "71.98"
    assert "fmnist-kd (data set fashion_mnist, the published numbers are CIFAR-100)" in out
    assert "odd-pair (resnet8 → resnet14 is not a CRD-benchmark pair)" in out


@pytest.mark.parametrize("flag", [[], ["--published"]])
def test_report_without_runs_is_still_a_one_line_error(tmp_path, capsys, flag):
    assert main(["report", str(tmp_path), *flag]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
