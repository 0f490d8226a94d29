"""Image folders: in-memory decoding with a checked cache, augmentation choice, split folder names,
shipped validation folders, and the uint8 streaming pipeline."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sokd import data
from sokd.data import folder_cache
from sokd.data.config import DataConfig
from sokd.errors import SokdError


def write_folder(root: Path, splits=("train", "test"), classes=("ant", "bee", "cat"), n=4, hw=12,
                 fmt="png") -> Path:
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (hw, hw, 3), dtype=np.uint8)).save(root / split / c / f"{i}.{fmt}")
    return root


def folder_cfg(root: Path, tmp_path: Path, **extra) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), batch_size=4, eval_batch_size=4, num_workers=0,
                      cache_dir=str(tmp_path / "cache"), **extra)


def pixels(root: Path, split: str) -> torch.Tensor:
    """The split's images in ImageFolder order, read independently with PIL."""
    from PIL import Image
    files = sorted((root / split).glob("*/*.png"))
    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])


def test_small_folder_goes_in_memory_with_cifar_augmentation(tmp_path):
    root = write_folder(tmp_path / "f")
    b = data.create(folder_cfg(root, tmp_path))
    assert isinstance(b.train, data.TensorBatches) and isinstance(b.test, data.TensorBatches)
    assert b.shape == (3, 12, 12)            # the images' own size: no 224 upscale, no blur
    assert torch.equal(b.test.images, pixels(root, "test"))
    assert torch.equal(b.train.images, pixels(root, "train"))
    assert b.train.crop_padding == 4 and b.train.hflip
    cached = list((tmp_path / "cache").rglob("*.pt"))
    assert sorted(p.name for p in cached) == ["test-12px.pt", "train-12px.pt"]


def test_cache_is_reused_rebuilt_when_the_folder_changes_and_never_trusted_when_corrupt(tmp_path, capsys):
    root = write_folder(tmp_path / "f")
    cfg = folder_cfg(root, tmp_path)
    data.create(cfg)
    path = next((tmp_path / "cache").rglob("train-12px.pt"))
    stamp = path.stat().st_mtime_ns
    capsys.readouterr()
    data.create(cfg)
    assert path.stat().st_mtime_ns == stamp and "rebuilding" not in capsys.readouterr().err   # reused
    from PIL import Image
    img = root / "train" / "bee" / "0.png"
    Image.fromarray(np.full((12, 12, 3), 7, np.uint8)).save(img)
    os.utime(img, ns=(time.time_ns(), time.time_ns() + 10**9))
    b = data.create(cfg)
    assert "the folder changed" in capsys.readouterr().err
    assert torch.equal(b.train.images, pixels(root, "train"))
    path.write_bytes(b"not a tensor file")
    b = data.create(cfg)
    assert "rebuilding" in capsys.readouterr().err and torch.equal(b.train.images, pixels(root, "train"))
    # a cache file of another folder copied in place: its fingerprint does not match
    other = write_folder(tmp_path / "g", n=2)
    data.create(folder_cfg(other, tmp_path))
    foreign = next(p for p in (tmp_path / "cache").rglob("train-12px.pt") if "g-" in p.parent.name)
    path.write_bytes(foreign.read_bytes())
    b = data.create(cfg)
    assert "rebuilding" in capsys.readouterr().err and b.train_size == 12


def test_augment_choice_and_image_size(tmp_path):
    root = write_folder(tmp_path / "f")
    streamed = data.create(folder_cfg(root, tmp_path, augment="imagenet"))
    assert isinstance(streamed.train, data.LoaderBatches) and streamed.shape == (3, 224, 224)
    none = data.create(folder_cfg(root, tmp_path, augment="none"))
    assert none.train.crop_padding == 0 and not none.train.hflip
    big = data.create(folder_cfg(root, tmp_path, image_size=16))
    assert big.shape == (3, 16, 16) and big.train.images.shape[-1] == 16
    with pytest.raises(SokdError, match="with data.augment=imagenet set data.in_memory=false"):
        data.create(folder_cfg(root, tmp_path, augment="imagenet", in_memory=True))
    with pytest.raises(SokdError, match="data.augment=imagenet .* applies to streamed image folders"):
        data.create(DataConfig(name="synthetic", augment="imagenet"))


def test_memory_cap(tmp_path):
    root = write_folder(tmp_path / "f")
    with pytest.raises(SokdError, match=r"needs 0\.0 MiB, above data.memory_cap_gb=1e-07; raise the cap or set "
                                         r"data.in_memory=false"):
        data.create(folder_cfg(root, tmp_path, in_memory=True, memory_cap_gb=1e-7))
    auto = data.create(folder_cfg(root, tmp_path, memory_cap_gb=1e-7))      # auto: streams instead
    assert isinstance(auto.train, data.LoaderBatches)


def test_split_folder_names_and_shipped_validation(tmp_path, capsys):
    for name in ("val", "validation", "test"):
        root = write_folder(tmp_path / name, splits=("train", name))
        b = data.create(folder_cfg(root, tmp_path))
        assert b.test_size == 12 and b.val is None
    root = write_folder(tmp_path / "three", splits=("train", "val", "test"), n=3)
    capsys.readouterr()
    b = data.create(folder_cfg(root, tmp_path))
    assert b.val is not None and b.val_size == 9 and torch.equal(b.test.images, pixels(root, "test"))
    assert "model selection uses the validation folder" in capsys.readouterr().err
    streamed = data.create(folder_cfg(root, tmp_path, in_memory=False))
    assert isinstance(streamed.val, data.LoaderBatches) and streamed.val_size == 9
    with pytest.raises(SokdError, match="is this data set's validation split, so data.val_split does not apply"):
        data.create(folder_cfg(root, tmp_path, val_split=0.2))
    with pytest.raises(SokdError, match="data.val 'nowhere' is not a directory"):
        data.create(folder_cfg(root, tmp_path, val="nowhere"))
    with pytest.raises(SokdError, match="is the test split itself"):
        data.create(folder_cfg(root, tmp_path, val=str(root / "test")))


def test_val_split_of_a_streamed_folder_is_not_augmented(tmp_path):
    root = write_folder(tmp_path / "f", n=5)
    b = data.create(folder_cfg(root, tmp_path, in_memory=False, augment="cifar", val_split=0.2))
    assert (b.train_size, b.val_size) == (12, 3)
    first = torch.cat([x for x, _ in b.val])
    assert torch.equal(first, torch.cat([x for x, _ in b.val]))   # no random crop/flip


def test_uint8_stream_normalises_on_the_device_like_the_float_path(tmp_path):
    root = write_folder(tmp_path / "f")
    b = data.create(folder_cfg(root, tmp_path, in_memory=False, augment="none", mean=[0.5, 0.4, 0.3],
                               std=[0.2, 0.25, 0.3]))
    x = torch.cat([x for x, _ in b.test])
    assert x.dtype == torch.float32
    ref = (pixels(root, "test").float() / 255 - torch.tensor([0.5, 0.4, 0.3])[:, None, None]) \
        / torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    assert torch.allclose(x, ref, atol=1e-5)
    sample, _ = b.train.dataset[0]
    assert sample.dtype == torch.uint8                 # what workers send: a quarter of float32


def test_fingerprint_depends_on_files_and_size(tmp_path):
    from torchvision.datasets import ImageFolder
    root = write_folder(tmp_path / "f")
    ds = ImageFolder(str(root / "train"))
    assert folder_cache.fingerprint(ds, 12) == folder_cache.fingerprint(ImageFolder(str(root / "train")), 12)
    before = folder_cache.fingerprint(ds, 12)
    assert before != folder_cache.fingerprint(ds, 16)
    (root / "train" / "ant" / "0.png").rename(root / "train" / "ant" / "9.png")
    assert before != folder_cache.fingerprint(ImageFolder(str(root / "train")), 12)
