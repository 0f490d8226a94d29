"""Your own data set: `@sokd.data.register` readers and saved Hugging Face data sets (`data.name=hf`)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import sokd
from sokd import data
from sokd.data.config import DataConfig
from sokd.data.registry import _READERS
from sokd.errors import SokdError

from .conftest import tiny_config


@pytest.fixture
def registry():
    """Readers registered by a test are removed afterwards."""
    before = dict(_READERS)
    yield
    _READERS.clear()
    _READERS.update(before)


def arrays(n: int, classes: int = 3, hw: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8), np.arange(n) % classes


class PairDataset(torch.utils.data.Dataset):
    """(image, label) samples in the form a user's torchvision-style Dataset gives them."""

    def __init__(self, n: int, kind: str):
        self.x, self.y = arrays(n)
        self.kind = kind

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image
        img = {"pil": lambda a: Image.fromarray(a), "tensor": lambda a: torch.from_numpy(a).permute(2, 0, 1),
               "array": lambda a: a}[self.kind](self.x[i])
        return img, int(self.y[i])


@pytest.mark.parametrize("kind", ["pil", "tensor", "array"])
def test_registered_dataset_takes_the_in_memory_path(registry, kind):
    @sokd.data.register("toy")
    def toy(root=None, n=12):
        return {"train": PairDataset(n, kind), "test": PairDataset(6, kind), "classes": ["a", "b", "c"]}

    b = data.create(DataConfig(name="toy", options={"n": 12}, batch_size=4))
    assert isinstance(b.train, data.TensorBatches)
    assert (b.num_classes, b.class_names, b.shape, b.train_size, b.test_size) == (3, ["a", "b", "c"], (3, 8, 8), 12, 6)
    x, _ = arrays(6)
    assert torch.equal(b.test.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert "toy" in data.list_datasets()


def test_registered_arrays_and_errors(registry):
    @sokd.data.register("pairs")
    def pairs(root=None, labels_off=False, float_images=False, bad_shape=False):
        x, y = arrays(9)
        if labels_off:
            y = y + 5
        if float_images:
            x = x.astype(np.float32)
        if bad_shape:
            x = x[:, :, :, :2].reshape(9, 8, 8, 2)[..., 0:1].repeat(7, axis=3)
        return (x, y), arrays(3), ["a", "b", "c"]

    b = data.create(DataConfig(name="pairs", batch_size=3))
    assert (b.num_classes, b.train_size) == (3, 9)
    with pytest.raises(SokdError, match=r"data set 'pairs': train label 7 is outside 0\.\.2"):
        data.create(DataConfig(name="pairs", batch_size=3, options={"labels_off": True}))
    with pytest.raises(SokdError, match="must be a uint8 image array, got dtype float32"):
        data.create(DataConfig(name="pairs", batch_size=3, options={"float_images": True}))
    with pytest.raises(SokdError, match="7 channels in the last axis"):
        data.create(DataConfig(name="pairs", batch_size=3, options={"bad_shape": True}))
    with pytest.raises(SokdError, match=r"does not accept root=\.\.\. and data.options \['nope'\]"):
        data.create(DataConfig(name="pairs", batch_size=3, options={"nope": 1}))
    with pytest.raises(SokdError, match="already registered"):
        sokd.data.register("pairs")(lambda root=None: None)
    with pytest.raises(SokdError, match="is built in"):
        sokd.data.register("cifar10")


def test_dataset_samples_are_checked(registry):
    class Floats(PairDataset):
        def __getitem__(self, i):
            return torch.rand(3, 8, 8), 0

    sokd.data.register("floats")(lambda root=None: (Floats(4, "array"), Floats(2, "array")))
    with pytest.raises(SokdError, match="sample 0: image tensor is torch.float32; give uint8"):
        data.create(DataConfig(name="floats", batch_size=2))
    with pytest.raises(SokdError, match="unknown data set data.name='flaots'.*did you mean 'floats'"):
        DataConfig(name="flaots")


PLUGIN = '''
import numpy as np
import sokd

@sokd.data.register("stripes")
def stripes(root=None, n=64):
    rng = np.random.default_rng(0)
    y = np.arange(n) % 4
    x = (rng.integers(0, 40, (n, 16, 16, 3)) + (y * 50)[:, None, None, None]).astype(np.uint8)
    return {"train": (x, y), "test": (x[:32], y[:32])}
'''


def test_plugin_from_a_config_trains_with_sokd_train(tmp_path):
    (tmp_path / "stripes_data.py").write_text(PLUGIN)
    cfg = tiny_config(tmp_path, "vanilla", imports=[str(tmp_path / "stripes_data.py")],
                      data={"name": "stripes", "batch_size": 16, "eval_batch_size": 32},
                      train={"epochs": 1, "seed": 0, "threads": 1})
    del cfg["data"]["synthetic_size"], cfg["data"]["synthetic_shape"], cfg["data"]["synthetic_classes"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "sokd", "train", str(path)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "vanilla on stripes: 1 epochs" in proc.stdout


# ------------------------------------------------------------------------------ Hugging Face

def save_hf(path: Path, n_train=12, n_test=6, image_col="image", label_col="label", single=False):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    def split(n, seed):
        x, y = arrays(n, seed=seed)
        return datasets.Dataset.from_dict(
            {image_col: [Image.fromarray(a) for a in x], label_col: y.tolist()},
            features=datasets.Features({image_col: datasets.Image(),
                                        label_col: datasets.ClassLabel(names=["cat", "dog", "eel"])}))
    if single:
        split(n_train, 0).save_to_disk(str(path))
    else:
        datasets.DatasetDict({"train": split(n_train, 0), "test": split(n_test, 1)}).save_to_disk(str(path))
    return path


def test_hf_saved_dataset_reads_offline(tmp_path):
    root = save_hf(tmp_path / "hf")
    b = data.create(DataConfig(name="hf", root=str(root), batch_size=4))
    assert (b.num_classes, b.class_names, b.train_size, b.test_size, b.shape) == (3, ["cat", "dog", "eel"], 12, 6,
                                                                                     (3, 8, 8))
    x, _ = arrays(6, seed=1)
    assert torch.equal(b.test.images, torch.from_numpy(x).permute(0, 3, 1, 2))   # PNG round trip is lossless


def test_hf_columns_and_bad_directories(tmp_path):
    root = save_hf(tmp_path / "hf", image_col="img", label_col="fine_label")
    b = data.create(DataConfig(name="hf", root=str(root), batch_size=4, hf={"image": "img", "label": "fine_label"}))
    assert b.train_size == 12
    with pytest.raises(SokdError, match=r"has columns \['img', 'fine_label'\] but not image, label; set data.hf"):
        data.create(DataConfig(name="hf", root=str(root)))
    with pytest.raises(SokdError, match="is not a saved Hugging Face data set"):
        (tmp_path / "empty").mkdir()
        data.create(DataConfig(name="hf", root=str(tmp_path / "empty")))
    with pytest.raises(SokdError, match="holds one split"):
        data.create(DataConfig(name="hf", root=str(save_hf(tmp_path / "one", single=True))))
    with pytest.raises(SokdError, match=r"has splits \['test', 'train'\] but not validation"):
        data.create(DataConfig(name="hf", root=str(root), hf={"test_split": "validation", "image": "img",
                                                              "label": "fine_label"}))
    with pytest.raises(SokdError, match="data.name=hf needs data.root"):
        data.create(DataConfig(name="hf"))
    with pytest.raises(SokdError, match="unknown config key 'data.hf.colour'; valid keys here: image, label"):
        DataConfig(name="hf", hf={"colour": "x"})


def test_the_own_data_example_builds(monkeypatch):
    from sokd import config
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)   # the example's imports: path is relative to the repository
    cfg = config.load(root / "examples" / "own_data.yaml")
    b = data.create(cfg.data)
    assert (b.num_classes, b.shape, b.train_size + b.val_size, b.test_size) == (8, (1, 20, 20), 2000, 500)
    assert b.val is not None and 150 <= b.val_size <= 250
