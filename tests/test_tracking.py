"""Experiment trackers (output.mlflow, output.wandb): what they record, offline, and how they fail.

MLflow runs against its default local store (SQLite in <run dir>/mlflow), W&B in offline mode;
neither test touches a network. Tests needing a tracker's package skip when it is missing
(`pip install 'sokd[mlflow,wandb]'`).
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import yaml

from sokd.cli import main
from sokd.engine import rundir
from sokd.engine.tracking import tensorboard_tracker

from .conftest import stop_after_checks, tiny_config, write_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]


def run_cli(*args):
    return main([str(a) for a in args])


@pytest.fixture(autouse=True)
def wandb_home(tmp_path, monkeypatch):
    """W&B's own settings/cache folders in the test's tmp dir; a WANDB_MODE=online in the
    environment must not override the config's offline mode."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def tracked_config(tmp_path: Path, **output) -> dict:
    cfg = tiny_config(tmp_path, "vanilla", model={"arch": "resnet8"},
                      data={"synthetic_size": 128}, train={"epochs": 2, "seed": 0})
    cfg["output"].update(output)
    return cfg


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------- reading what they wrote
def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sokd")
    runs = client.search_runs([experiment.experiment_id])
    return client, runs


def wandb_records(run_file: Path) -> list:
    """The records of an offline W&B run file (LevelDB log format: 32 KiB blocks of chunks with
    a 7-byte header — crc, length, type — after W&B's own 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunks, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding to the end of a block
            pos += left - 7
            continue
        chunks += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST chunk
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def wandb_logged(run_dir: Path, run_id: str) -> tuple[dict, list[dict], dict]:
    """(config, history rows, summary) of every offline run file of W&B run `run_id`. The runs
    of this test process share one W&B service, which may still be writing a finished run's file
    when `finish` returns (seen on a loaded machine: the last epoch missing); `wandb.teardown`
    waits until the service has written everything and stopped."""
    import wandb
    wandb.teardown()
    config, history, summary = {}, [], {}
    # a run resumed within the same second as its start gets a "-1" suffix on its folder name
    for run_file in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb")):
        for rec in wandb_records(run_file):
            kind = rec.WhichOneof("record_type")
            if kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in rec.config.update if u.key})
            elif kind == "history":
                history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                for i in rec.history.item})
            elif kind == "summary":
                summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json)
                                for u in rec.summary.update})
    return config, history, summary


# ---------------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A 2-epoch run with both trackers, then resumed to 3 epochs."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("wandb")
    tmp = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        mp.setenv(var, str(tmp / "wandb-home"))
    mp.setenv("WANDB_MODE", "online")
    mp.delenv("WANDB_API_KEY", raising=False)
    cfg = tracked_config(tmp, mlflow=True, wandb=True)
    path = write_config(tmp, cfg)
    run_dir = Path(cfg["output"]["dir"])
    assert run_cli("train", path) == 0
    first = {name: json.loads((run_dir / name / ".sokd-tracker").read_text()) for name in ("mlflow", "wandb")}
    assert run_cli("train", path, "train.epochs=3", "output.resume=true") == 0
    mp.undo()
    return run_dir, first


def test_mlflow_records_config_every_epoch_and_summary_and_resume_continues_its_run(tracked_run):
    run_dir, first = tracked_run
    client, runs = mlflow_run(run_dir)
    assert len(runs) == 1, "the resumed run continues the same MLflow run"
    run = runs[0]
    assert run.info.run_id == first["mlflow"]["id"] and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["model.arch"] == "resnet8"
    rows = metrics_rows(run_dir)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    history = client.get_metric_history(run.info.run_id, "test/model/top1")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["test"]["model"]["top1"]) for r in rows]
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.value for m in loss] == pytest.approx([r["train"]["loss"] for r in rows[1:]])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["summary/networks/model/top1_final"] == summary["networks"]["model"]["top1_final"]
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(run_dir / "mlflow")
    assert json.loads((artifacts / "summary.json").read_text()) == summary
    assert yaml.safe_load((artifacts / "config.yaml").read_text()) == yaml.safe_load(
        (run_dir / "config.yaml").read_text())
    assert yaml.safe_load((artifacts / "config.yaml").read_text())["train"]["epochs"] == 3


def test_wandb_offline_records_config_every_epoch_and_summary_and_resume_keeps_its_id(tracked_run):
    run_dir, first = tracked_run
    marker = json.loads((run_dir / "wandb" / ".sokd-tracker").read_text())
    assert marker["id"] == first["wandb"]["id"] and marker["epoch"] == 3
    assert marker["where"]["mode"] == "offline"
    files = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(files) == 2 and all((f / f"run-{marker['id']}.wandb").is_file() for f in files), \
        "offline, one id"
    config, history, summary = wandb_logged(run_dir, marker["id"])
    assert config["optim"]["lr"] == 0.05 and config["model"]["arch"] == "resnet8"
    assert config["train"]["epochs"] == 3, "the resumed run's config replaces the first one's"
    rows = metrics_rows(run_dir)
    logged = {int(h["epoch"]): h for h in history if "epoch" in h}
    assert sorted(logged) == [0, 1, 2, 3], "each epoch once: the resume sends only what was missing"
    for row in rows:
        assert logged[row["epoch"]]["test/model/top1"] == row["test"]["model"]["top1"]
    expected = json.loads((run_dir / "summary.json").read_text())
    assert summary["networks"]["model"]["top1_final"] == expected["networks"]["model"]["top1_final"]


def test_tracker_folders_count_as_sokd_files_and_foreign_ones_are_refused(tracked_run, tmp_path, capsys):
    run_dir, _ = tracked_run
    assert rundir.is_sokd_entry(run_dir / "mlflow") and rundir.is_sokd_entry(run_dir / "wandb")
    foreign = tmp_path / "runs" / "vanilla" / "wandb"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    assert not rundir.is_sokd_entry(foreign)
    path = write_config(tmp_path, tracked_config(tmp_path, wandb=True))
    assert run_cli("train", path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sokd did not create it" in err and str(foreign) in err
    assert sorted(p.name for p in foreign.parent.iterdir()) == ["wandb"]
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_missing_tracker_package_is_one_line_exit_2_and_nothing_written(tracker, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, tracker, None)  # import of it fails as if not installed
    cfg = tracked_config(tmp_path, **{tracker: True})
    path = write_config(tmp_path, cfg)
    assert run_cli("train", path) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"sokd: error: output.{tracker} is on but the '{tracker}' package is not installed; "
                   f"pip install 'sokd[{tracker}]' (or set output.{tracker}=false)")
    assert not (tmp_path / "runs").exists()


def test_wandb_online_without_credentials_is_refused_before_anything_is_written(tmp_path, capsys):
    pytest.importorskip("wandb")
    path = write_config(tmp_path, tracked_config(tmp_path, wandb={"mode": "online"}))
    assert run_cli("train", path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs W&B credentials" in err and "mode=offline" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value, message", [
    ("3", "output.mlflow must be true, false or a mapping of uri, experiment; got 3"),
    ("{url: x}", "unknown config key 'output.mlflow.url' (did you mean 'uri'?)"),
])
def test_bad_tracker_settings_are_one_line_errors(value, message, tmp_path, capsys):
    path = write_config(tmp_path, tracked_config(tmp_path))
    assert run_cli("train", path, f"output.mlflow={value}") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------- failures after the start
def test_a_tracker_failing_mid_run_is_one_warning_and_the_run_completes(tmp_path, monkeypatch, capsys):
    calls = []

    def lost_network(self, row):
        calls.append(row["epoch"])
        if row["epoch"] == 1:
            raise ConnectionError("server unreachable\nsecond line")

    monkeypatch.setattr(tensorboard_tracker.TensorBoardTracker, "log", lost_network)
    cfg = tracked_config(tmp_path, tensorboard=True)
    assert run_cli("train", write_config(tmp_path, cfg)) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == ["sokd: warning: tensorboard logging stopped (ConnectionError: server unreachable); "
                        "training goes on, metrics.jsonl and summary.json keep every epoch"]
    assert calls == [0, 1], "a failed tracker gets no further calls"
    run_dir = Path(cfg["output"]["dir"])
    assert [r["epoch"] for r in metrics_rows(run_dir)] == [0, 1, 2]
    assert (run_dir / "summary.json").is_file()


def test_a_run_failing_before_its_first_checkpoint_removes_the_tracker_folders(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    from sokd.engine import loop

    def crash(self, out, labels):
        raise RuntimeError("boom")

    monkeypatch.setattr(loop.EpochAccumulator, "add", crash)
    cfg = tracked_config(tmp_path, wandb=True)
    assert run_cli("train", write_config(tmp_path, cfg)) == 1
    assert "boom" in capsys.readouterr().err
    assert not Path(cfg["output"]["dir"]).exists(), "the directory this run created is gone, wandb/ too"


def wandb_epochs(run_dir: Path) -> tuple[str, list[int]]:
    run_id = json.loads((run_dir / "wandb" / ".sokd-tracker").read_text())["id"]
    _, history, _ = wandb_logged(run_dir, run_id)
    return run_id, [int(h["epoch"]) for h in history if "epoch" in h]


def test_a_killed_run_resumes_its_tracker_run_without_gaps_or_repeats(tmp_path):
    pytest.importorskip("wandb")
    cfg = tracked_config(tmp_path, wandb=True)
    path = write_config(tmp_path, cfg)
    run_dir = Path(cfg["output"]["dir"])
    with pytest.MonkeyPatch.context() as mp:
        stop_after_checks(mp, 6)  # 4 steps an epoch: SIGTERM in epoch 2, after epoch 1 was logged
        assert run_cli("train", path) == 143
    first_id, epochs = wandb_epochs(run_dir)
    assert epochs == [0, 1]
    assert run_cli("train", path, "output.resume=true") == 0
    run_id, epochs = wandb_epochs(run_dir)
    assert run_id == first_id and epochs == [0, 1, 2]


def test_a_tracker_turned_on_at_resume_receives_the_whole_history(tmp_path):
    pytest.importorskip("wandb")
    cfg = tracked_config(tmp_path)
    path = write_config(tmp_path, cfg)
    run_dir = Path(cfg["output"]["dir"])
    assert run_cli("train", path) == 0 and not (run_dir / "wandb").exists()
    assert run_cli("train", path, "train.epochs=3", "output.resume=true", "output.wandb=true") == 0
    _, epochs = wandb_epochs(run_dir)
    assert epochs == [0, 1, 2, 3]
