"""Which samples a run uses: stratified limits, validation splits and model selection on them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sokd import config, data, runner
from sokd.data.config import DataConfig
from sokd.data.subsets import class_quotas, stratified_subset, validation_split
from sokd.errors import SokdError

from .conftest import tiny_config

SHARED_CIFAR100 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar100.npz"


def sorted_npz(path: Path, classes: int = 10, per_class: int = 20, hw: int = 8) -> Path:
    """An .npz stored sorted by class, like CIFAR-100's: the first N are a few classes only."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class)
    np.savez(path, x_train=rng.integers(0, 256, (labels.size, hw, hw, 3), dtype=np.uint8), y_train=labels,
             x_test=rng.integers(0, 256, (labels.size, hw, hw, 3), dtype=np.uint8), y_test=labels)
    return path


def test_quotas_are_proportional_and_exact():
    counts = torch.tensor([50, 30, 20])
    assert class_quotas(counts, 10).tolist() == [5, 3, 2]
    q = class_quotas(torch.tensor([3, 3, 3]), 4)         # remainder to the lowest class index
    assert q.tolist() == [2, 1, 1] and int(q.sum()) == 4
    assert class_quotas(torch.tensor([1, 5]), 100).tolist() == [1, 5]   # never more than a class has


def test_stratified_subset_keeps_every_class_of_a_sorted_split():
    labels = torch.arange(10).repeat_interleave(100)          # sorted by class
    keep = stratified_subset(labels, 100, seed=0)
    assert keep.numel() == 100 and torch.equal(keep, torch.sort(keep).values)
    assert torch.bincount(labels[keep], minlength=10).tolist() == [10] * 10
    assert torch.equal(keep, stratified_subset(labels, 100, seed=0))         # fixed by the seed
    assert not torch.equal(keep, stratified_subset(labels, 100, seed=1))
    assert labels[:100].unique().numel() == 1                                  # what "first N" would keep


def test_validation_split_is_disjoint_stratified_and_refuses_empty_classes():
    labels = torch.arange(4).repeat_interleave(10)
    train, val = validation_split(labels, 0.2, seed=0)
    assert set(train.tolist()).isdisjoint(val.tolist()) and train.numel() + val.numel() == 40
    assert torch.bincount(labels[val]).tolist() == [2, 2, 2, 2]
    with pytest.raises(SokdError, match=r"data.val_split=0.5 leaves class 1 \(1 training image"):
        validation_split(torch.tensor([0, 0, 0, 0, 1]), 0.5, seed=0)


def test_limits_on_a_class_sorted_file_keep_classes_and_warn_when_they_cannot(tmp_path, capsys):
    npz = sorted_npz(tmp_path / "sorted.npz")
    b = data.create(DataConfig(name="cifar10", root=str(npz), train_limit=50, test_limit=30, batch_size=10))
    train_labels = torch.cat([y for _, y in b.train])
    test_labels = torch.cat([y for _, y in b.test])
    assert train_labels.unique().numel() == 10 and test_labels.unique().numel() == 10
    assert (b.train_size, b.test_size) == (50, 30)
    assert capsys.readouterr().err == ""
    data.create(DataConfig(name="cifar10", root=str(npz), test_limit=4, batch_size=10))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: data.test_limit keeps 4 of the 10 classes in the test split; scores on it are not "
                   "comparable with the full data set (raise data.test_limit to at least 10)"]


def test_train_per_class_keeps_its_meaning(tmp_path):
    npz = sorted_npz(tmp_path / "sorted.npz")
    b = data.create(DataConfig(name="cifar10", root=str(npz), train_per_class=3, batch_size=5))
    assert b.train_size == 30      # the first 3 of each class, as before


@pytest.mark.skipif(not SHARED_CIFAR100.exists(), reason="the shared CIFAR-100 copy is not on this machine")
def test_cifar100_test_limit_keeps_all_classes():
    b = data.create(DataConfig(name="cifar100", root=str(SHARED_CIFAR100), test_limit=1000, train_limit=5000))
    assert torch.cat([y for _, y in b.test]).unique().numel() == 100
    assert b.test.labels.unique().numel() == 100 and b.train.labels.unique().numel() == 100


def test_val_split_config_errors():
    for bad in (0, 1, 1.5, -0.1, True, "0.1"):
        with pytest.raises(SokdError, match="data.val_split must be a fraction between 0 and 1"):
            DataConfig(name="synthetic", val_split=bad)
    with pytest.raises(SokdError, match="data.val .* applies to image folders"):
        DataConfig(name="synthetic", val="somewhere")
    with pytest.raises(SokdError, match="both choose a validation set"):
        DataConfig(name="imagefolder", root="x", val="v", val_split=0.1)
    with pytest.raises(SokdError, match="unknown data.augment 'cifra'.*did you mean 'cifar'"):
        DataConfig(name="synthetic", augment="cifra")


def test_val_split_selects_best_epoch_on_validation(tmp_path):
    cfg = tiny_config(tmp_path, "vanilla", data={"val_split": 0.25}, train={"epochs": 3, "seed": 0})
    summary = runner.train(config.build(cfg))
    run = Path(cfg["output"]["dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val" in r and "model" in r["val"] for r in rows)
    net = summary["networks"]["model"]
    pick = max(rows[1:], key=lambda r: (r["val"]["model"]["top1"], r["epoch"]))
    assert net["selected_epoch"] == pick["epoch"]
    assert net["top1_selected"] == pick["test"]["model"]["top1"]
    assert net["top1_val_best"] == pick["val"]["model"]["top1"]
    assert summary["val_size"] == 64 and "honest" in summary["note"]
    from sokd.files import safe_load
    assert safe_load(run / "best.pt")["epoch"] == pick["epoch"]    # best.pt follows validation
    # the training set lost the held-out images: 256 - 64 images, 32 per batch
    assert rows[1]["train"]["samples"] == 192


def test_without_val_split_nothing_changes(tmp_path):
    cfg = tiny_config(tmp_path, "vanilla", train={"epochs": 1, "seed": 0})
    summary = runner.train(config.build(cfg))
    assert "top1_selected" not in summary["networks"]["model"]
    rows = [json.loads(line) for line in (Path(cfg["output"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert all("val" not in r for r in rows)
