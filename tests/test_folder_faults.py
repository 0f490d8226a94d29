"""Image-folder runs: corrupt images (one-line error or counted skip) and exact resume with workers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sokd import config, data, runner
from sokd.data.config import DataConfig
from sokd.engine import safe_load
from sokd.errors import SokdError

from .conftest import tiny_config, write_config

def write_folder(root: Path, n_train: int = 8, n_val: int = 2) -> Path:
    """3 classes of 16x16 RGB PNGs under root/train and root/val."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def truncate(path: Path) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("imgs") / "folder")


def folder_config(tmp_path: Path, root: Path, workers: int, epochs: int = 1, **data_extra) -> dict:
    return tiny_config(
        tmp_path, "vanilla",
        data={"name": "imagefolder", "root": str(root), "image_size": 16, "batch_size": 4,
              "eval_batch_size": 8, "num_workers": workers, "in_memory": False, **data_extra},
        train={"epochs": epochs, "seed": 0, "threads": 1})


def run_cli(cfg_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sokd", "train", str(cfg_path)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_one_line_error_naming_the_file(tmp_path, workers):
    root = write_folder(tmp_path / "folder")
    bad = truncate(root / "train" / "b" / "3.png")
    proc = run_cli(write_config(tmp_path, folder_config(tmp_path, root, workers)))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"sokd: error: cannot read image '{bad}' (")
    assert lines[0].endswith("remove or replace it, or set data.skip_unreadable=true")


def test_skip_unreadable_counts_skipped_images(tmp_path):
    root = write_folder(tmp_path / "folder")
    bad_train = truncate(root / "train" / "a" / "5.png")
    bad_val = truncate(root / "val" / "c" / "1.png")
    cfg = folder_config(tmp_path, root, 2, epochs=2, skip_unreadable=True)
    proc = run_cli(write_config(tmp_path, cfg))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    train_line = f"warning: skipped 1 unreadable image(s) in train (first: {bad_train})"
    val_line = f"warning: skipped 1 unreadable image(s) in val (first: {bad_val})"
    assert warnings.count(train_line) == 2, proc.stderr  # one per training epoch
    assert val_line in warnings and set(warnings) == {train_line, val_line}, proc.stderr
    rows = [json.loads(line) for line in (Path(cfg["output"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"]["samples"] for r in rows[1:]] == [24, 24]  # replaced, not dropped: full batches
    with pytest.raises(SokdError, match="data.skip_unreadable must be true or false"):
        DataConfig(name="imagefolder", skip_unreadable="yes")


def test_skip_unreadable_is_deterministic(tmp_path):
    root = write_folder(tmp_path / "folder")
    truncate(root / "train" / "c" / "0.png")
    b = data.create(DataConfig(name="imagefolder", root=str(root), image_size=16, batch_size=4,
                               num_workers=0, skip_unreadable=True, in_memory=False), seed=3)
    first, second = list(b.train), list(b.train)
    assert len(first) == 6 and all(x.shape[0] == 4 for x, _ in first)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, second))


def _numbers(row: dict) -> dict:
    train = {k: v for k, v in row.get("train", {}).items() if k not in ("seconds", "images_per_s")}
    return {"epoch": row["epoch"], "test": row["test"], "train": train}


def test_folder_resume_with_workers_is_exact(folder, tmp_path, one_thread):
    ref = folder_config(tmp_path / "ref", folder, 2, epochs=2)
    runner.train(config.build(ref))
    part = folder_config(tmp_path / "part", folder, 2, epochs=1)
    runner.train(config.build(part))
    part["train"]["epochs"], part["output"]["resume"] = 2, True
    runner.train(config.build(part))
    runs = [Path(c["output"]["dir"]) for c in (ref, part)]
    metrics = [[_numbers(json.loads(line)) for line in (d / "metrics.jsonl").read_text().splitlines()]
               for d in runs]
    assert len(metrics[0]) == 3 and metrics[0] == metrics[1]
    weights = [safe_load(d / "last.pt")["method"] for d in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_folder_batches_mid_epoch_and_across_worker_counts(folder, one_thread):
    passes = {}
    for workers in (0, 2):
        b = data.create(DataConfig(name="imagefolder", root=str(folder), image_size=16, batch_size=4,
                                   num_workers=workers, in_memory=False), seed=5)
        b.train.set_epoch(1)
        full = list(b.train)
        for k in (1, 4):
            tail = list(b.train.iter_from(k))
            assert len(tail) == len(full) - k
            assert all(torch.equal(x, fx) and torch.equal(y, fy) for (x, y), (fx, fy) in zip(tail, full[k:]))
        b.train.set_epoch(2)
        passes[workers] = full + list(b.train)
    assert len(passes[0]) == len(passes[2]) == 12
    assert all(torch.equal(x0, x2) and torch.equal(y0, y2) for (x0, y0), (x2, y2) in zip(passes[0], passes[2]))
    assert not torch.equal(passes[0][0][0], passes[0][6][0])  # epochs differ
