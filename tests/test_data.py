"""Data layer: readers (IDX, CIFAR pickles, npz, image folders, synthetic), validation errors,
batched augmentation and the TensorBatches / LoaderBatches sources (determinism, resume, DDP)."""
from __future__ import annotations

import gzip
import os
import pickle
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sokd import data
from sokd.data import augment, cifar, idx
from sokd.data.arrays import first_per_class
from sokd.data.config import DataConfig
from sokd.data.npz import load_npz
from sokd.data.sources import EpochSampler, LoaderBatches, TensorBatches, epoch_indices, shard_bounds
from sokd.data.synthetic import make_synthetic
from sokd.errors import SokdError

from .datafiles import write_idx

FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
SHARED_CIFAR100 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar100.npz"


# ------------------------------------------------------------------------------------ local helpers

def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding written independently of sokd's writer (uint8 or int32 only)."""
    code = {np.dtype("u1"): 0x08, np.dtype("i4"): 0x0C}[arr.dtype]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_fmnist(folder: Path, n_train=30, n_test=10, hw=8, gz=True, classes=10) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, hw, hw), dtype=np.uint8),
              "train-labels-idx1-ubyte": (np.arange(n_train) % classes).astype(np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, hw, hw), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": (np.arange(n_test) % classes).astype(np.uint8)}
    for name, arr in arrays.items():
        raw = idx_bytes(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


def cifar_rows(n: int, offset: int = 0) -> np.ndarray:
    """(n, 3072) rows whose pixels encode (sample, channel) so the layout can be checked."""
    rows = np.zeros((n, 3, 1024), np.uint8)
    rows += (np.arange(n)[:, None, None] + offset).astype(np.uint8)
    rows[:, 1] += 100
    rows[:, 2] += 200
    return rows.reshape(n, 3072)


def py2_pickle(rows: np.ndarray, labels: list[int]) -> bytes:
    """A batch dict pickled the way Python 2 cPickle wrote the original CIFAR files: str payloads
    (BINSTRING, decoded as latin1 on load) and the old numpy.core.multiarray module path."""
    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b
    n, m = rows.shape
    arr = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + s(b"b") + b"\x87R"
           + b"(K\x01" + b"J" + struct.pack("<i", n) + b"J" + struct.pack("<i", m) + b"\x86"
           + b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
           + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
           + b"\x89" + s(rows.tobytes()) + b"tb")
    labs = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + arr + s(b"labels") + labs + b"u."


def write_cifar10(folder: Path, per_batch=4, protocol=2) -> Path:
    folder = folder / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        batch = {"data": cifar_rows(per_batch, (i - 1) * per_batch),
                 "labels": [j % 10 for j in range(per_batch)]}
        raw = (py2_pickle(batch["data"], batch["labels"]) if protocol == "py2"
               else pickle.dumps(batch, protocol=protocol))
        (folder / f"data_batch_{i}").write_bytes(raw)
    protocol = 2 if protocol == "py2" else protocol
    test = {b"data": cifar_rows(3), b"labels": [9, 8, 7]}  # bytes keys, as Python 2 pickles load
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=protocol))
    meta = {"label_names": cifar.CIFAR10_CLASSES}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder


def write_cifar100(folder: Path, protocol=pickle.HIGHEST_PROTOCOL) -> Path:
    folder = folder / "cifar-100-python"
    folder.mkdir(parents=True)
    train = {"data": cifar_rows(6), "fine_labels": [0, 99, 5, 5, 1, 2], "coarse_labels": [0] * 6}
    test = {"data": cifar_rows(2), "fine_labels": np.array([3, 4]), "coarse_labels": [0, 0]}
    (folder / "train").write_bytes(pickle.dumps(train, protocol=protocol))
    (folder / "test").write_bytes(pickle.dumps(test, protocol=protocol))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": cifar.CIFAR100_CLASSES}, protocol=protocol))
    return folder


def write_npz(path: Path, n_train=20, n_test=8, classes=10, hw=6, **override) -> Path:
    """Images whose pixel (0,0,0) holds the sample id, labels cycling over the classes."""
    x_train = np.zeros((n_train, hw, hw, 3), np.uint8)
    x_train[:, 0, 0, 0] = np.arange(n_train)
    x_test = np.zeros((n_test, hw, hw, 3), np.uint8)
    x_test[:, 0, 0, 0] = np.arange(n_test)
    arrays = {"x_train": x_train, "y_train": np.arange(n_train) % classes,
              "x_test": x_test, "y_test": np.arange(n_test) % classes}
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def id_batches(n=23, c=1, hw=6, batch_size=4, **kw) -> TensorBatches:
    """TensorBatches without augmentation whose labels are the sample ids 0..n-1."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, c, hw, hw).contiguous()
    return TensorBatches(images, torch.arange(n), batch_size, (0.0,) * c, (1.0,) * c, **kw)


def labels_of(source, start: int = 0) -> list[int]:
    return [int(v) for _, y in source.iter_from(start) for v in y]


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


# ----------------------------------------------------------------------------------------- config

def test_list_datasets():
    assert data.list_datasets()[:7] == ["fashion_mnist", "cifar10", "cifar100", "imagefolder", "imagenet",
                                        "synthetic", "hf"]


@pytest.mark.parametrize("kw, needle", [
    ({"name": "cifar11"}, "did you mean 'cifar10'"),
    ({"name": "synthetic", "pad_mode": "edge"}, "data.pad_mode"),
    ({"name": "synthetic", "batch_size": 0}, "data.batch_size"),
    ({"name": "synthetic", "crop_padding": -1}, "data.crop_padding"),
    ({"name": "synthetic", "train_limit": 0}, "data.train_limit"),
    ({"name": "synthetic", "synthetic_shape": [3, 32]}, "data.synthetic_shape"),
    ({"name": "synthetic", "mean": [0.5, 0.5], "std": [0.2]}, "data.mean"),
    ({"name": "synthetic", "std": [0.0, 1.0, 1.0]}, "data.std"),
    ({"name": "synthetic", "hflip": "yes"}, "data.hflip"),
])
def test_config_validation(kw, needle):
    with pytest.raises(SokdError, match=needle.replace("(", r"\(")):
        DataConfig(**kw)


def test_config_from_dict():
    c = DataConfig.from_dict({"name": "synthetic", "batch_size": 4})
    assert c.batch_size == 4
    with pytest.raises(SokdError, match="unknown config key 'data.batchsize' \\(did you mean 'batch_size'"):
        DataConfig.from_dict({"name": "synthetic", "batchsize": 4})
    with pytest.raises(SokdError, match="data.name"):
        DataConfig.from_dict({"root": "x"})


def test_config_inside_pydantic_model():
    """Embedded in another model (as in Config), validate() gives the same one-line messages."""
    from pydantic import BaseModel

    from sokd.validation import validate

    class Holder(BaseModel):
        data: DataConfig

    ok = validate(Holder, {"data": {"name": "synthetic", "synthetic_shape": [1, 8, 8]}})
    assert ok.data.synthetic_shape == [1, 8, 8] and ok.data.pad_mode == "reflect"
    with pytest.raises(SokdError, match=r"^unknown data.pad_mode 'wrap'; valid: reflect, zeros$"):
        validate(Holder, {"data": {"name": "synthetic", "pad_mode": "wrap"}})
    with pytest.raises(SokdError, match=r"^unknown config key 'data.padmode' \(did you mean 'pad_mode'\?\)"):
        validate(Holder, {"data": {"name": "synthetic", "padmode": "zeros"}})


@pytest.mark.parametrize("kw, message", [
    ({"name": "synthetic", "batch_size": 0}, "data.batch_size must be an integer >= 1, got 0"),
    ({"name": "synthetic", "test_limit": "x"}, "data.test_limit must be an integer >= 1 or null, got 'x'"),
    ({"name": "synthetic", "skip_unreadable": 1}, "data.skip_unreadable must be true or false, got 1"),
    ({"name": "synthetic", "synthetic_shape": [5, 8, 8]},
     "data.synthetic_shape has 5 channels; use 1 to 4 (e.g. [3, 32, 32])"),
    ({"name": "synthetic", "std": [-1]}, "data.std must be positive, got [-1.0]"),
    ({"name": "synthetic", "mean": [0.5, 0.5], "std": [0.2]},
     "data.mean has 2 values but data.std has 1; give one per channel in both"),
    ({"name": "synthetic", "mean": [float("nan")]}, "bad value for 'data.mean.0': it must be a finite number (got nan)"),
    ({"root": "x"}, "missing required config key 'data.name'"),
])
def test_config_messages_are_the_same_on_every_path(kw, message):
    from sokd import config

    tree = {"data": kw, "method": {"name": "vanilla"}, "model": {"arch": "resnet14"}}
    for build in (lambda: DataConfig(**kw), lambda: DataConfig.from_dict(kw), lambda: config.build(tree)):
        with pytest.raises(SokdError) as err:
            build()
        assert str(err.value) == message


# ---------------------------------------------------------------------------------------- augment

def _reference_crop(x, top, left, padding, mode):
    padded = F.pad(x.float(), (padding,) * 4, mode="reflect" if mode == "reflect" else "constant")
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, t:t + h, l:l + w] for i, (t, l) in enumerate(zip(top, left))]).to(x.dtype)


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_crop_flip_matches_pad_crop_flip_reference(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 9, 7), dtype=torch.uint8, generator=g)
    top, left = augment.crop_offsets(16, 3, g)
    mask = augment.random_flip_mask(16, g)
    ref = _reference_crop(x, top, left, 3, mode)
    assert torch.equal(augment.crop_flip(x, top, left, None, 3, mode), ref)
    assert torch.equal(augment.crop_flip(x, top, left, mask, 3, mode), augment.hflip(ref, mask))
    # centre offset == identity
    centre = torch.full((16,), 3)
    assert torch.equal(augment.crop_flip(x, centre, centre, None, 3, mode), x)


def test_random_crop_and_hflip_properties():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=g)
    out = augment.random_crop(x, 4, "reflect", torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment.random_crop(x, 4, "reflect", torch.Generator().manual_seed(5)))
    assert not torch.equal(out, x)
    # reflect crops only re-use pixels of the same image
    for i in range(4):
        assert set(out[i].unique().tolist()) <= set(x[i].unique().tolist())
    zeros = augment.random_crop(x, 4, "zeros", g)
    assert zeros.dtype == torch.uint8 and zeros.shape == x.shape
    assert augment.random_crop(x, 0, "reflect", g) is x
    mask = torch.rand(32, generator=g) < 0.5
    flipped = augment.hflip(x, mask)
    assert torch.equal(augment.hflip(flipped, mask), x)
    assert torch.equal(flipped[mask], x[mask].flip(3)) and torch.equal(flipped[~mask], x[~mask])


def test_normalize():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, 2, 1, 3).contiguous()
    out = augment.normalize(x, (0.2, 0.5), (0.5, 0.25))
    assert out.dtype == torch.float32 and out.shape == x.shape
    expect = (x.float() / 255 - torch.tensor([0.2, 0.5]).view(1, 2, 1, 1)) / torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)
    torch.testing.assert_close(out, expect)
    cl = augment.normalize(x, (0.2, 0.5), (0.5, 0.25), memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, expect)


# -------------------------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    arr = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))
    got = idx.read_idx(path, expect_ndim=3)
    assert got.dtype == np.uint8 and np.array_equal(got, arr)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    (tmp_path / "i.idx").write_bytes(idx_bytes(ints))
    assert idx.read_idx(tmp_path / "i.idx").tolist() == [1, -2, 70000]
    write_idx(tmp_path / "w.gz", arr)  # the tests' own writer reads back too
    assert np.array_equal(idx.read_idx(tmp_path / "w.gz"), arr)


@pytest.mark.parametrize("damage, needle", [
    (lambda raw: raw[:-5], "truncated"),
    (lambda raw: raw + b"\0", "longer than its header"),
    (lambda raw: b"\x12\x34" + raw[2:], "bad magic"),
    (lambda raw: raw[:2] + b"\x42" + raw[3:], "bad magic"),
    (lambda raw: raw[:6], "truncated inside its header"),
    (lambda raw: b"", "bad magic"),
])
def test_idx_corrupt(tmp_path, damage, needle):
    raw = idx_bytes(np.zeros((3, 4, 4), np.uint8))
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(damage(raw))
    with pytest.raises(SokdError, match=needle) as err:
        idx.read_idx(path)
    assert str(path) in str(err.value)


def test_idx_truncated_gzip_and_wrong_ndim(tmp_path):
    raw = gzip.compress(idx_bytes(np.zeros((50, 4, 4), np.uint8)))
    path = tmp_path / "x.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SokdError, match="corrupt or truncated gzip"):
        idx.read_idx(path)
    path.write_bytes(raw)
    with pytest.raises(SokdError, match="has 3 dimensions, expected 1"):
        idx.read_idx(path, expect_ndim=1)


# ---------------------------------------------------------------------------------- Fashion-MNIST

@pytest.mark.parametrize("layout", ["direct", "torchvision"])
def test_fashion_mnist_from_root(tmp_path, layout):
    folder = tmp_path if layout == "direct" else tmp_path / "FashionMNIST" / "raw"
    arrays = write_fmnist(folder, gz=layout == "direct")
    b = data.create(cfg(name="fashion_mnist", root=str(tmp_path), batch_size=8, crop_padding=2))
    assert (b.train_size, b.test_size, b.num_classes, b.shape) == (30, 10, 10, (1, 8, 8))
    assert b.class_names[0] == "T-shirt/top" and b.mean == (0.2860,) and b.std == (0.3530,)
    x, y = next(iter(b.test))
    assert x.shape == (10, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float()[:, None]
    torch.testing.assert_close(x, (raw / 255 - 0.2860) / 0.3530)
    assert y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    padded = data.create(cfg(name="fashion_mnist", root=str(tmp_path), pad_to=12, batch_size=8))
    assert padded.shape == (1, 12, 12)
    xp, _ = next(iter(padded.test))
    torch.testing.assert_close(xp[:, :, 2:10, 2:10], x)
    torch.testing.assert_close(xp[:, :, :2], torch.full_like(xp[:, :, :2], -0.2860 / 0.3530))


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    with pytest.raises(SokdError) as err:
        data.create(cfg(name="fashion_mnist", root=str(tmp_path / "nowhere")))
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "data.root" in msg and "data.download" in msg
    assert "\n" not in msg
    monkeypatch.setattr(idx, "FASHION_MNIST_DEFAULTS", (str(tmp_path / "a"), str(tmp_path / "b")))
    with pytest.raises(SokdError, match="apt-get"):
        data.create(cfg(name="fashion_mnist"))


def test_fashion_mnist_download_failure_is_wrapped(tmp_path, monkeypatch):
    import torchvision

    seen = {}

    def fail(root, train=True, download=False):
        seen["timeout"] = socket.getdefaulttimeout()
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fail)
    before = socket.getdefaulttimeout()
    with pytest.raises(SokdError, match="downloading Fashion-MNIST .* failed"):
        data.create(cfg(name="fashion_mnist", root=str(tmp_path / "dl"), download=True))
    assert seen["timeout"] == 30 and socket.getdefaulttimeout() == before


@pytest.mark.skipif(not FMNIST_SYSTEM.is_dir(), reason="apt package dataset-fashion-mnist not installed")
def test_fashion_mnist_default_location():
    b = data.create(cfg(name="fashion_mnist", pad_to=32, batch_size=256))
    assert (b.train_size, b.test_size, b.num_classes) == (60000, 10000, 10)
    assert b.shape == (1, 32, 32) and len(b.train) == 60000 // 256
    x, y = next(iter(b.train))
    assert x.shape == (256, 1, 32, 32) and y.max() < 10
    raw = idx.load_fashion_mnist(None)  # unpadded view of the same files
    assert raw.x_train.shape == (60000, 1, 28, 28) and raw.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(raw.y_train).tolist() == [6000] * 10


# ------------------------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("protocol", ["py2", 2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_pickle_folder(tmp_path, protocol):
    folder = write_cifar10(tmp_path, protocol=protocol)
    for root in (tmp_path, folder):  # the folder itself or its parent
        b = data.create(cfg(name="cifar10", root=str(root), batch_size=4, eval_batch_size=2))
        assert (b.train_size, b.test_size, b.num_classes, b.shape) == (20, 3, 10, (3, 32, 32))
        assert b.class_names == cifar.CIFAR10_CLASSES
    splits = cifar.load_cifar("cifar10", str(tmp_path))
    # row layout R(1024) G(1024) B(1024) -> (C, H, W): channel c of sample i holds i + 100 c
    assert splits.x_train[7, :, 5, 9].tolist() == [7, 107, 207]
    assert splits.x_train.shape == (20, 3, 32, 32) and splits.y_test.tolist() == [9, 8, 7]


def test_cifar100_pickle_folder(tmp_path):
    write_cifar100(tmp_path)
    b = data.create(cfg(name="cifar100", root=str(tmp_path), batch_size=2))
    assert (b.train_size, b.test_size, b.num_classes) == (6, 2, 100)
    assert b.mean == (0.5071, 0.4865, 0.4409) and b.class_names[99] == "worm"
    x, y = next(iter(b.test))
    assert y.tolist() == [3, 4] and x.shape == (2, 3, 32, 32)


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}, protocol=2))
    with pytest.raises(SokdError, match=r"not a safe data pickle.*refusing to load '(posix|os|nt)\.system'") as err:
        data.create(cfg(name="cifar10", root=str(tmp_path)))
    assert "data_batch_3" in str(err.value)
    assert not marker.exists()

    class Eval:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w')",))

    (folder / "data_batch_3").write_bytes(pickle.dumps(Eval(), protocol=4))
    with pytest.raises(SokdError, match="builtins.eval"):
        cifar.load_cifar("cifar10", str(folder))
    assert not marker.exists()


def test_cifar_pickle_wrong_content(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}))
    with pytest.raises(SokdError, match=r"data_batch_2.*\(N, 3072\)"):
        cifar.load_cifar("cifar10", str(folder))
    (folder / "data_batch_2").write_bytes(b"\x80\x02}q\x01(U")  # truncated
    with pytest.raises(SokdError, match="data_batch_2.*corrupt"):
        cifar.load_cifar("cifar10", str(folder))
    (folder / "data_batch_2").unlink()
    (folder / "test_batch").unlink()
    with pytest.raises(SokdError, match="data_batch_2' is missing.*incomplete"):
        cifar.load_cifar("cifar10", str(tmp_path))  # a partial folder is reported, not "not found"


def test_cifar_missing_mentions_fixes(tmp_path):
    with pytest.raises(SokdError) as err:
        data.create(cfg(name="cifar10", root=str(tmp_path)))
    assert "data.root" in str(err.value) and "data.download" in str(err.value)


# --------------------------------------------------------------------------------------------- npz

def test_npz_roundtrip(tmp_path):
    names = np.array([f"c{i}" for i in range(10)])
    path = write_npz(tmp_path / "set.npz", class_names=names)
    b = data.create(cfg(name="cifar10", root=str(path), batch_size=4, eval_batch_size=3, crop_padding=0,
                        hflip=False))
    assert b.class_names == names.tolist() and (b.train_size, b.test_size) == (20, 8)
    assert b.shape == (3, 6, 6)
    x, y = torch.cat([x for x, _ in b.test]), torch.cat([y for _, y in b.test])
    ids = (x[:, 0, 0, 0] * b.std[0] + b.mean[0]) * 255
    assert torch.allclose(ids, torch.arange(8).float(), atol=1e-3) and y.tolist() == [i % 10 for i in range(8)]
    # no class_names: dataset defaults
    plain = data.create(cfg(name="cifar10", root=str(write_npz(tmp_path / "plain.npz")), batch_size=4))
    assert plain.class_names == cifar.CIFAR10_CLASSES


@pytest.mark.parametrize("override, needle", [
    ({"y_test": None}, "no 'y_test' array"),
    ({"y_train": np.arange(20) % 11}, "label 10 is outside 0..9"),
    ({"y_test": -np.ones(8, np.int64)}, "label -1 is outside"),
    ({"x_train": np.zeros((20, 6, 6, 3), np.float32)}, "uint8"),
    ({"x_train": np.zeros((20, 3, 6, 6), np.uint8)}, r"\(N, H, W, C\)"),
    ({"x_test": np.zeros((8, 6), np.uint8)}, "expected"),
    ({"y_train": np.arange(19)}, "19 labels but there are 20 images"),
    ({"y_train": np.zeros(20, np.float32)}, "integer"),
    ({"x_test": np.zeros((8, 5, 5, 3), np.uint8)}, "both splits need one shape"),
    ({"x_test": np.array([None] * 8, dtype=object)}, "object array"),
    ({"x_test": np.zeros((0, 6, 6, 3), np.uint8), "y_test": np.zeros(0, np.int64)}, "test split .* is empty"),
])
def test_npz_errors(tmp_path, override, needle):
    path = write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(SokdError, match=needle) as err:
        data.create(cfg(name="cifar10", root=str(path), batch_size=4))
    assert "\n" not in str(err.value)


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(SokdError, match="not a readable .npz"):
        data.create(cfg(name="cifar10", root=str(path)))
    with pytest.raises(SokdError, match="not found"):
        data.create(cfg(name="cifar100", root=str(tmp_path / "missing.npz")))


def test_train_per_class_and_limits(tmp_path):
    labels = np.array([3, 1, 3, 0, 1, 3, 3, 0, 2, 1])
    path = write_npz(tmp_path / "s.npz", n_train=10, y_train=labels)
    splits = load_npz(path, cifar.CIFAR10_CLASSES)
    keep = first_per_class(splits.y_train, 2)
    assert keep.tolist() == [0, 1, 2, 3, 4, 7, 8]  # first two of each class, in file order
    b = data.create(cfg(name="cifar10", root=str(path), train_per_class=2, batch_size=7, crop_padding=0,
                        hflip=False, drop_last=False))
    assert b.train_size == 7
    x, y = next(iter(b.train))
    got = sorted(zip(torch.round((x[:, 0, 0, 0] * b.std[0] + b.mean[0]) * 255).long().tolist(), y.tolist()))
    assert got == [(i, int(labels[i])) for i in [0, 1, 2, 3, 4, 7, 8]]
    b = data.create(cfg(name="cifar10", root=str(path), train_per_class=2, train_limit=3, test_limit=5,
                        batch_size=2))
    assert (b.train_size, b.test_size) == (3, 5)
    assert data.create(cfg(name="cifar10", root=str(path), train_per_class=100, batch_size=2)).train_size == 10
    with pytest.raises(SokdError, match="no batches"):
        data.create(cfg(name="cifar10", root=str(path), train_limit=3, batch_size=4))


def test_shape_errors(tmp_path):
    path = write_npz(tmp_path / "s.npz")  # 6x6 images
    with pytest.raises(SokdError, match="crop_padding=6"):
        data.create(cfg(name="cifar10", root=str(path), crop_padding=6, batch_size=2))
    data.create(cfg(name="cifar10", root=str(path), crop_padding=6, pad_mode="zeros", batch_size=2))
    with pytest.raises(SokdError, match="pad_to=4 is smaller"):
        data.create(cfg(name="cifar10", root=str(path), pad_to=4, batch_size=2))
    with pytest.raises(SokdError, match="data.mean has 1 values"):
        data.create(cfg(name="cifar10", root=str(path), mean=[0.5], std=[0.5], batch_size=2))
    gray = write_npz(tmp_path / "g.npz", x_train=np.zeros((20, 6, 6), np.uint8), x_test=np.zeros((8, 6, 6), np.uint8))
    with pytest.raises(SokdError, match="default cifar10 mean has 3 values.*set data.mean and data.std"):
        data.create(cfg(name="cifar10", root=str(gray), batch_size=2))
    b = data.create(cfg(name="cifar10", root=str(gray), batch_size=2, mean=[0.5], std=[0.2]))
    assert b.shape == (1, 6, 6) and b.mean == (0.5,)


@pytest.mark.skipif(not SHARED_CIFAR100.is_file(), reason="../shared/data/cifar100.npz not present")
def test_cifar100_shared_npz():
    b = data.create(cfg(name="cifar100", root=str(SHARED_CIFAR100), batch_size=128))
    assert (b.train_size, b.test_size, b.num_classes, b.shape) == (50000, 10000, 100, (3, 32, 32))
    assert b.class_names[:3] == ["apple", "aquarium_fish", "baby"] == cifar.CIFAR100_CLASSES[:3]
    x, y = next(iter(b.train))
    assert x.shape == (128, 3, 32, 32) and 0 <= int(y.min()) and int(y.max()) < 100
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3


# ------------------------------------------------------------------------------------ TensorBatches

def test_tensor_batches_shapes_and_determinism():
    b = data.create(cfg(name="synthetic", synthetic_size=64, synthetic_shape=[3, 8, 8], synthetic_classes=4,
                        batch_size=16, eval_batch_size=10), seed=3)
    assert (len(b.train), b.train.num_samples, len(b.test), b.test.num_samples) == (4, 64, 2, 16)
    batches = list(b.train)
    assert all(x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
               for x, y in batches)
    again = data.create(cfg(name="synthetic", synthetic_size=64, synthetic_shape=[3, 8, 8],
                            synthetic_classes=4, batch_size=16, eval_batch_size=10), seed=3)
    for (x1, y1), (x2, y2) in zip(batches, again.train):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other_seed = data.create(cfg(name="synthetic", synthetic_size=64, synthetic_shape=[3, 8, 8],
                                 synthetic_classes=4, batch_size=16), seed=4)
    assert not torch.equal(next(iter(other_seed.train))[0], batches[0][0])
    assert torch.equal(other_seed.test.images, b.test.images)  # data content does not follow the seed
    # test split: fixed order, last partial batch kept
    assert [len(y) for _, y in b.test] == [10, 6]
    b.train.channels_last = True
    assert next(iter(b.train))[0].is_contiguous(memory_format=torch.channels_last)


def test_epochs_and_iter_from():
    src = id_batches(n=40, batch_size=8, mode="train", crop_padding=2, hflip=True, seed=7)
    src.set_epoch(0)
    e0 = labels_of(src)
    src.set_epoch(1)
    e1 = labels_of(src)
    assert sorted(e0) == sorted(e1) == list(range(40)) and e0 != e1
    full = list(src)
    for k in (0, 2, 4, 5):
        tail = list(src.iter_from(k))
        assert len(tail) == len(full) - k
        for (x1, y1), (x2, y2) in zip(full[k:], tail):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    src.set_epoch(0)
    assert labels_of(src) == e0


@pytest.mark.parametrize("n, drop_last", [(23, True), (23, False), (24, True), (3, False)])
def test_rank_slicing(n, drop_last):
    one = id_batches(n=n, batch_size=1, mode="train", drop_last=drop_last, seed=1)
    ranks = [id_batches(n=n, batch_size=1, mode="train", drop_last=drop_last, seed=1, rank=r, world_size=2)
             for r in range(2)]
    for s in [one] + ranks:
        s.set_epoch(5)
    single = labels_of(one)
    per_rank = [labels_of(s) for s in ranks]
    assert sorted(single) == list(range(n))
    assert len(per_rank[0]) == len(per_rank[1]) == ranks[0].num_samples == len(ranks[0])
    if drop_last:
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == sorted(single[: (n // 2) * 2])
    else:  # padded by wrapping: everything covered, at most one repeat per missing slot
        assert set(per_rank[0]) | set(per_rank[1]) == set(range(n))
        assert len(per_rank[0]) == -(-n // 2)
    # the interleave of the ranks is the single-process order
    merged = [v for pair in zip(*per_rank) for v in pair][:n]
    assert merged == single[: len(merged)]


def test_epoch_indices_matches_distributed_sampler_semantics():
    per_rank = [epoch_indices(10, seed=0, epoch=2, rank=r, world_size=4, drop_last=False) for r in range(4)]
    assert all(len(i) == 3 for i in per_rank)
    assert set(torch.cat(per_rank).tolist()) == set(range(10))
    per_rank = [epoch_indices(10, seed=0, epoch=2, rank=r, world_size=4, drop_last=True) for r in range(4)]
    assert all(len(i) == 2 for i in per_rank) and len(set(torch.cat(per_rank).tolist())) == 8


@pytest.mark.parametrize("n, world", [(10, 3), (7, 2), (2, 4), (16, 1)])
def test_test_shards_cover_each_sample_once(n, world):
    seen = []
    for r in range(world):
        src = id_batches(n=n, batch_size=3, mode="shard", rank=r, world_size=world)
        got = labels_of(src)
        assert got == list(range(*shard_bounds(n, r, world)))  # contiguous, in order
        assert src.num_samples == len(got)
        seen += got
    assert seen == list(range(n))


def test_synthetic_is_learnable_and_fixed():
    b = data.create(cfg(name="synthetic", synthetic_size=400, synthetic_shape=[3, 12, 12], synthetic_classes=5,
                        batch_size=50))
    xs, ys = b.train.images.float(), b.train.labels
    means = torch.stack([xs[ys == k].mean(0) for k in range(5)])
    xt, yt = b.test.images.float(), b.test.labels
    pred = torch.cdist(xt.flatten(1), means.flatten(1)).argmin(1)
    assert (pred == yt).float().mean() > 0.9  # nearest class mean already separates the classes
    assert b.train_size == 400 and b.test_size == 100 and b.class_names[0] == "class_0"
    again = make_synthetic(400, [3, 12, 12], 5)
    assert torch.equal(again.x_train, b.train.images)


# ---------------------------------------------------------------------------------- image folders

def write_image_folder(root: Path, classes=("cat", "dog", "eel"), n_train=3, n_val=2, val_classes=None):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n, names in (("train", n_train, classes), ("val", n_val, val_classes or classes)):
        for c in names:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
                img = Image.fromarray(arr) if i else Image.fromarray(arr[..., 0])  # one grayscale
                img.save(root / split / c / f"{i}.png")
    return root


def test_imagefolder_loader(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    c = cfg(name="imagefolder", root=str(root), image_size=8, batch_size=4, eval_batch_size=4, num_workers=0,
            in_memory=False)
    b = data.create(c, seed=1)
    assert isinstance(b.train, LoaderBatches) and isinstance(b.test, LoaderBatches)
    assert (b.num_classes, b.class_names, b.shape) == (3, ["cat", "dog", "eel"], (3, 8, 8))
    assert (b.train_size, b.test_size, len(b.train), len(b.test)) == (9, 6, 2, 2)
    assert b.mean == data.STATS["imagenet"][0]
    x, y = next(iter(b.train))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    val_labels = [int(v) for _, y in b.test for v in y]
    assert val_labels == [0, 0, 1, 1, 2, 2]
    b.train.set_epoch(3)
    order = labels_of(b.train)
    assert labels_of(b.train, 1) == order[4:]
    again = data.create(c, seed=1)
    again.train.set_epoch(3)
    assert labels_of(again.train) == order
    # DDP: eval shards tile the val set exactly once
    shards = [data.create(c, rank=r, world_size=2).test for r in range(2)]
    assert [int(v) for s in shards for _, y in s for v in y] == val_labels
    b.train.channels_last = True
    assert next(iter(b.train))[0].is_contiguous(memory_format=torch.channels_last)


def test_imagefolder_val_uses_train_classes_and_errors(tmp_path):
    root = write_image_folder(tmp_path / "a", val_classes=("dog",))
    b = data.create(cfg(name="imagefolder", root=str(root), image_size=8, batch_size=2, num_workers=0,
                        train_per_class=1))
    assert b.train_size == 3 and [int(v) for _, y in b.test for v in y] == [1, 1]
    bad = write_image_folder(tmp_path / "b", val_classes=("zebra",))
    with pytest.raises(SokdError, match="zebra"):
        data.create(cfg(name="imagefolder", root=str(bad), num_workers=0))
    (tmp_path / "c" / "train").mkdir(parents=True)
    with pytest.raises(SokdError, match=r"no test/, val/ or validation/ folder"):
        data.create(cfg(name="imagefolder", root=str(tmp_path / "c"), num_workers=0))
    with pytest.raises(SokdError, match="data.root is required"):
        data.create(cfg(name="imagefolder"))
    (tmp_path / "c" / "val").mkdir()
    with pytest.raises(SokdError, match="sub-folder per class"):
        data.create(cfg(name="imagefolder", root=str(tmp_path / "c"), num_workers=0))


def test_loader_with_worker_and_sampler_start():
    ds = torch.utils.data.TensorDataset(torch.zeros(10, 3, 4, 4), torch.arange(10))
    src = LoaderBatches(ds, 3, shuffle=True, drop_last=True, num_workers=1, seed=0)
    src.set_epoch(1)
    full = labels_of(src)
    assert len(full) == 9 and labels_of(src, 2) == full[6:] and labels_of(src) == full
    sampler = EpochSampler(10, shuffle=False, shard=True, rank=1, world_size=3)
    assert list(sampler) == [3, 4, 5]
