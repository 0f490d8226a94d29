"""The data layer under bad input: corrupt folder caches, odd pixel types in Hugging Face sets,
caches built skipping files, overlapping splits, unwritable cache directories, user readers that
raise or return huge labels, the default number of loader workers, and the data fingerprint."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import sokd
from sokd import data
from sokd.data import folder_cache
from sokd.data.config import AUTO_WORKERS, DataConfig, usable_cpus, workers_for
from sokd.data.hf import to_uint8
from sokd.errors import SokdError

from .conftest import tiny_config, write_config
from .test_data_plugins import registry  # noqa: F401 - fixture: readers a test registers are removed
from .test_folder_memory import folder_cfg, pixels, write_folder


def cache_file(tmp_path: Path, split: str = "train", size: int = 12) -> Path:
    return next((tmp_path / "cache").rglob(f"{split}-{size}px.pt"))


def notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(("note:", "warning:"))]


# ------------------------------------------------------------------------ corrupt folder cache

def test_corrupt_cache_is_rebuilt_never_trusted(tmp_path, capsys):
    root = write_folder(tmp_path / "f")
    cfg = folder_cfg(root, tmp_path)
    data.create(cfg)
    path = cache_file(tmp_path)
    good = torch.load(path, weights_only=True)
    assert good["format"] == folder_cache.FORMAT == 2 and len(good["checksum"]) == 64

    flipped = dict(good, images=good["images"].clone())
    flipped["images"][3, 1, 2, 2] ^= 0xFF                # one pixel byte, the checksum kept
    torch.save(flipped, path)
    capsys.readouterr()
    b = data.create(cfg)
    assert notes(capsys.readouterr().err) == [
        f"note: rebuilding the decoded-image cache {path} (corrupt: its images or labels do not match their "
        f"checksum)"]
    assert torch.equal(b.train.images, pixels(root, "train"))

    bad_label = dict(good, labels=good["labels"].clone())
    bad_label["labels"][5] = 250                         # was an internal error in training
    torch.save(bad_label, path)
    b = data.create(cfg)
    assert "(corrupt: its images or labels do not match their checksum)" in capsys.readouterr().err
    assert int(b.train.labels.max()) == 2

    old = {k: v for k, v in good.items() if k != "checksum"}
    torch.save(dict(old, format=1), path)                # a cache of the previous format
    b = data.create(cfg)
    assert "(written by another sokd version (format 1, this one reads 2))" in capsys.readouterr().err
    assert torch.equal(b.train.images, pixels(root, "train"))
    assert torch.load(path, weights_only=True)["checksum"] == good["checksum"]    # rewritten
    data.create(cfg)
    assert "rebuilding" not in capsys.readouterr().err                             # and now trusted


# -------------------------------------------------------------------------- hf pixel types

def test_hf_pixel_types_convert_when_plain_and_are_refused_otherwise(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)
    floats = rng.random((4, 6, 6, 3)).astype(np.float32)
    floats[0, 0, 0] = (0.0, 1.0, 0.5)
    wide = rng.integers(0, 65536, (4, 6, 6), dtype=np.uint16)
    wide[0, 0, :3] = (0, 65535, 257 * 100 + 128)
    flags = rng.random((4, 6, 6)) > 0.5
    small_ints = rng.integers(0, 256, (4, 6, 6, 3)).astype(np.int64)
    labels = [0, 1, 0, 1]

    def save(name, images, feature):
        path = tmp_path / name
        part = datasets.Dataset.from_dict({"image": list(images), "label": labels},
                                          features=datasets.Features({"image": feature,
                                                                      "label": datasets.Value("int64")}))
        datasets.DatasetDict({"train": part, "test": part}).save_to_disk(str(path))
        return DataConfig(name="hf", root=str(path), batch_size=2)

    b = data.create(save("floats", floats, datasets.Array3D((6, 6, 3), "float32")))
    want = torch.from_numpy(np.rint(floats * 255).astype(np.uint8)).permute(0, 3, 1, 2)
    assert torch.equal(b.train.images.cpu(), want)                   # not all black
    assert b.train.images[0, :, 0, 0].tolist() == [0, 255, 128]

    b = data.create(save("png16", [Image.fromarray(a) for a in wide], datasets.Image()))
    assert b.shape == (1, 6, 6)
    assert torch.equal(b.train.images[:, 0].cpu(), torch.from_numpy(((wide.astype(np.int64) + 128) // 257)
                                                                     .astype(np.uint8)))
    assert b.train.images[0, 0, 0, :3].tolist() == [0, 255, 100]      # round(x / 257), not clipped

    b = data.create(save("u16", wide, datasets.Array2D((6, 6), "uint16")))
    assert b.train.images[0, 0, 0, :3].tolist() == [0, 255, 100]
    b = data.create(save("bools", flags, datasets.Array2D((6, 6), "bool")))
    assert set(b.train.images.unique().tolist()) == {0, 255}
    b = data.create(save("ints", small_ints, datasets.Array3D((6, 6, 3), "int64")))
    assert torch.equal(b.train.images.cpu(), torch.from_numpy(small_ints.astype(np.uint8)).permute(0, 3, 1, 2))

    root = tmp_path / "outside"
    with pytest.raises(SokdError) as err:
        data.create(save("outside", floats * 2 - 0.5, datasets.Array3D((6, 6, 3), "float32")))
    assert str(err.value) == (f"hf data set '{root}' split 'train' column 'image' row 0: float32 pixels span "
                              f"-0.5..1.5, outside [0, 1]; store float images in [0, 1] (or uint8 0..255)")
    root = tmp_path / "negative"
    negative = small_ints.copy()
    negative[0, 0, 0, 0] = -3
    with pytest.raises(SokdError) as err:
        data.create(save("negative", negative, datasets.Array3D((6, 6, 3), "int64")))
    assert str(err.value) == (f"hf data set '{root}' split 'train' column 'image' row 0: int64 pixels span "
                              f"-3..{small_ints[0].max()}, which is neither 8-bit (0..255) nor a uint16 image; "
                              f"store the images as uint8 0..255 (or uint16, or floats in [0, 1])")
    with pytest.raises(SokdError, match=rf"column 'image' row 0: int32 pixels span "
                                        rf"{small_ints[0].min() * 4}\.\.{small_ints[0].max() * 4}, which is neither"):
        data.create(save("int32", small_ints.astype(np.int32) * 4, datasets.Array3D((6, 6, 3), "int32")))
    with pytest.raises(SokdError, match=r"float64 pixels include NaN or infinity; store float images in \[0, 1\]"):
        to_uint8(np.array([[np.nan, 0.5]]), "x")


# ----------------------------------------------------------- cache key and data.skip_unreadable

def test_cache_built_skipping_files_is_not_reused_by_a_run_that_stops_on_them(tmp_path, capsys):
    root = write_folder(tmp_path / "f")
    bad = root / "train" / "bee" / "2.png"
    bad.write_bytes(bad.read_bytes()[:40])
    skipping = data.create(folder_cfg(root, tmp_path, skip_unreadable=True))
    assert skipping.train_size == 11
    capsys.readouterr()
    with pytest.raises(SokdError) as err:
        data.create(folder_cfg(root, tmp_path))
    assert notes(capsys.readouterr().err)[0] == (f"note: rebuilding the decoded-image cache {cache_file(tmp_path)} "
                                                 f"(built with data.skip_unreadable=true)")
    assert str(err.value).startswith(f"cannot read image '{bad}' (")
    assert str(err.value).endswith("); remove or replace it, or set data.skip_unreadable=true")
    from torchvision.datasets import ImageFolder
    ds = ImageFolder(str(root / "train"))
    assert folder_cache.fingerprint(ds, 12, True) != folder_cache.fingerprint(ds, 12, False)


# --------------------------------------------------------------------- overlapping splits

def test_splits_that_share_a_folder_or_files_are_refused(tmp_path):
    cache = tmp_path / "cache"

    def refused(root, **extra) -> str:
        with pytest.raises(SokdError) as err:
            data.create(folder_cfg(root, tmp_path, **extra))
        assert not cache.exists()           # nothing decoded or cached for a refused input
        return str(err.value)

    linked = write_folder(tmp_path / "linked")
    os.symlink(linked / "test", linked / "val")            # val/ -> test/
    assert refused(linked) == (f"the test folder '{linked / 'test'}' and the validation folder '{linked / 'val'}' "
                               f"are the same folder ({linked / 'test'}); give each split its own images (for model "
                               f"selection, data.val_split=0.1 holds out part of train/)")
    plain = write_folder(tmp_path / "plain")
    assert refused(plain, val=str(plain / "train")).startswith(
        f"the training folder '{plain / 'train'}' and the validation folder '{plain / 'train'}' are the same folder")
    per_file = write_folder(tmp_path / "per_file")         # val/ holding links to test/'s files
    for src in (per_file / "test").glob("*/*.png"):
        (per_file / "val" / src.parent.name).mkdir(parents=True, exist_ok=True)
        os.symlink(src, per_file / "val" / src.parent.name / src.name)
    assert refused(per_file) == (
        f"the test folder '{per_file / 'test'}' and the validation folder '{per_file / 'val'}' share 12 image "
        f"file(s) (e.g. '{per_file / 'val' / 'ant' / '0.png'}' is '{per_file / 'test' / 'ant' / '0.png'}'); "
        f"give each split its own images")
    hard = write_folder(tmp_path / "hard", splits=("train",))    # test/ holding a hard link into train/
    write_folder(hard, splits=("test",), n=2)
    os.link(hard / "train" / "cat" / "3.png", hard / "test" / "cat" / "9.png")
    assert refused(hard).startswith(f"the training folder '{hard / 'train'}' and the test folder "
                                    f"'{hard / 'test'}' share 1 image file(s)")
    streamed = refused(per_file, in_memory=False)
    assert "share 12 image file(s)" in streamed
    # separate folders still work, with a shipped validation split
    ok = write_folder(tmp_path / "ok", splits=("train", "val", "test"))
    assert data.create(folder_cfg(ok, tmp_path)).val_size == 12


# ------------------------------------------------------------------ unwritable cache directory

def _fd_in(fd: int, folder: Path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder))
    except OSError:
        return False


def test_full_or_read_only_cache_dir_warns_and_trains_without_caching(tmp_path, monkeypatch, capsys):
    root = write_folder(tmp_path / "f")
    cfg = folder_cfg(root, tmp_path)
    cache = tmp_path / "cache"
    real_write, real_open = os.write, os.open

    def full_disk(fd, buf):
        if _fd_in(fd, cache):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, buf)

    monkeypatch.setattr(os, "write", full_disk)
    capsys.readouterr()
    b = data.create(cfg)
    monkeypatch.setattr(os, "write", real_write)
    lines = notes(capsys.readouterr().err)
    folders = {split: next(cache.glob(f"f-{split}-*")) for split in ("train", "test")}
    assert lines == [f"warning: cannot write the decoded-image cache in {folders[split]} "
                     f"({os.strerror(errno.ENOSPC)}); training from the decoded images without caching them; set "
                     f"data.cache_dir=DIR to a writable directory with free space to skip decoding next time"
                     for split in ("train", "test")]
    assert torch.equal(b.train.images, pixels(root, "train"))
    assert list(cache.rglob("*.*")) == []                    # no .tmp left, no half file

    def read_only(path, flags, *args, **kw):
        if str(path).startswith(str(cache)) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", read_only)
    b = data.create(cfg)
    monkeypatch.setattr(os, "open", real_open)
    lines = notes(capsys.readouterr().err)
    assert len(lines) == 2 and f"in {folders['train']} ({os.strerror(errno.EROFS)}); training from" in lines[0]
    assert torch.equal(b.test.images, pixels(root, "test")) and list(cache.rglob("*.*")) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_chmod_read_only_cache_dir(tmp_path, capsys):
    root = write_folder(tmp_path / "f")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o555)
    try:
        b = data.create(folder_cfg(root, tmp_path))
    finally:
        (tmp_path / "cache").chmod(0o755)
    assert "set data.cache_dir=DIR to a writable directory" in capsys.readouterr().err
    assert torch.equal(b.train.images, pixels(root, "train"))


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    root = write_folder(tmp_path / "f")
    cfg = folder_cfg(root, tmp_path)
    data.create(cfg)
    path = cache_file(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale, fresh = path.with_name(f".{path.name}.{dead}.tmp"), path.with_name(f".{path.name}.1.tmp")
    for tmp in (stale, fresh):
        tmp.write_bytes(b"half")
    old = time.time() - folder_cache.STALE_TEMP_AGE - 60
    os.utime(stale, (old, old))
    path.unlink()
    data.create(cfg)
    assert not stale.exists() and fresh.exists()    # pid 1 is alive: its file is left alone


# ------------------------------------------------------------------------- registered readers

def test_reader_that_raises_is_the_users_error(registry):  # noqa: F811
    @sokd.data.register("raising")
    def raising(root=None):
        raise ValueError("column 'px' missing\nsecond line")

    with pytest.raises(SokdError) as err:
        data.create(DataConfig(name="raising"))
    assert str(err.value) == "data set 'raising': your reader raised ValueError: column 'px' missing; fix that function"

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {}["image"]

    sokd.data.register("broken")(lambda root=None: {"train": Broken(), "test": Broken()})
    with pytest.raises(SokdError) as err:
        data.create(DataConfig(name="broken"))
    assert str(err.value) == ("data set 'broken' train sample 0: your Dataset raised KeyError: 'image'; fix its "
                              "__getitem__")

    @sokd.data.register("typo")
    def typo(root=None):
        return undefined_name  # noqa: F821 - a bug in the user's reader, not a bad keyword
    with pytest.raises(SokdError, match=r"^data set 'typo': your reader raised NameError: name 'undefined_name' is"):
        data.create(DataConfig(name="typo"))


def test_huge_or_negative_labels_are_refused_before_anything_is_allocated(registry):  # noqa: F811
    @sokd.data.register("labelled")
    def labelled(root=None, label=2**40, classes=None):
        x = np.zeros((4, 8, 8, 3), np.uint8)
        y = np.array([0, 1, 0, label])
        return {"train": (x, y), "test": (x, np.array([0, 1, 0, 1])), "classes": classes}

    with pytest.raises(SokdError) as err:   # 2**40 class names would exhaust memory first
        data.create(DataConfig(name="labelled"))
    assert str(err.value) == ("data set 'labelled': train label 1099511627776 would make 1099511627777 classes (at "
                              "most 100000); labels are class indices 0..K-1: fix the labels, or return 'classes' "
                              "with one name per class")
    with pytest.raises(SokdError) as err:
        data.create(DataConfig(name="labelled", options={"label": -1}))
    assert str(err.value) == ("data set 'labelled': train label -1 is negative; labels are class indices 0..K-1: "
                              "fix the labels")
    with pytest.raises(SokdError, match=r"^data set 'labelled': train label 1099511627776 is outside 0\.\.1 \(2 "):
        data.create(DataConfig(name="labelled", options={"classes": ["a", "b"]}))
    assert data.create(DataConfig(name="labelled", options={"label": 2}, batch_size=2)).num_classes == 3


RAISING_PLUGIN = '''
import sokd

@sokd.data.register("moody")
def moody(root=None):
    raise ValueError("no file named labels.csv in " + str(root))
'''


def test_cli_reports_a_raising_reader_in_one_line(tmp_path):
    (tmp_path / "moody_data.py").write_text(RAISING_PLUGIN)
    cfg = tiny_config(tmp_path, "vanilla", imports=[str(tmp_path / "moody_data.py")],
                      data={"name": "moody", "root": "/data/x"})
    for key in ("synthetic_size", "synthetic_shape", "synthetic_classes"):
        del cfg["data"][key]
    proc = subprocess.run([sys.executable, "-m", "sokd", "train", str(write_config(tmp_path, cfg))],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sokd: error: data set 'moody': your reader raised ValueError: no file named labels.csv in /data/x; "
        "fix that function"]
    assert not Path(cfg["output"]["dir"]).exists()


# --------------------------------------------------------------------------- loader workers

def test_default_workers_follow_the_machine_and_explicit_numbers_are_kept():
    assert DataConfig(name="synthetic").num_workers is None
    assert DataConfig(name="synthetic", num_workers="auto").num_workers is None
    assert DataConfig.from_dict({"name": "synthetic", "num_workers": 4}).num_workers == 4    # saved runs load
    assert workers_for(DataConfig(name="synthetic")) == min(AUTO_WORKERS, usable_cpus())
    assert workers_for(DataConfig(name="synthetic", num_workers=7)) == 7
    assert workers_for(DataConfig(name="synthetic", num_workers=0)) == 0
    for bad in (-1, "many", True):
        with pytest.raises(SokdError, match=rf"data.num_workers must be auto \(or null\) or an integer >= 0, "
                                            rf"got {bad!r}"):
            DataConfig(name="synthetic", num_workers=bad)


def test_default_workers_raise_no_dataloader_warning(tmp_path):
    root = write_folder(tmp_path / "f", n=2)
    base = dict(name="imagefolder", root=str(root), batch_size=2, eval_batch_size=4,
                cache_dir=str(tmp_path / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.create(DataConfig(**base, num_workers=8))    # decoding a small folder starts no workers
        streamed = data.create(DataConfig(**base, in_memory=False))
        next(iter(streamed.train))
    assert streamed.train.loader.num_workers == min(AUTO_WORKERS, usable_cpus())
    assert [str(w.message) for w in caught if "worker" in str(w.message)] == []


# ------------------------------------------------------------------------- data fingerprint

def test_fingerprint_names_the_training_and_validation_data(registry, tmp_path):  # noqa: F811
    @sokd.data.register("fp")
    def fp(root=None, pixel=False, label=False):
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8), np.arange(12) % 3
        if pixel:
            x[7, 3, 3, 1] ^= 1
        if label:
            y[4] = (y[4] + 1) % 3
        return {"train": (x, y), "test": (x[:6], y[:6])}

    base = data.create(DataConfig(name="fp", batch_size=4))
    same = data.create(DataConfig(name="fp", batch_size=4))
    fingerprint = data.fingerprint(base)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert fingerprint == data.fingerprint(same) == same.fingerprint
    assert data.fingerprint(data.create(DataConfig(name="fp", batch_size=4, options={"pixel": True}))) != fingerprint
    assert data.fingerprint(data.create(DataConfig(name="fp", batch_size=4, options={"label": True}))) != fingerprint
    held = data.create(DataConfig(name="fp", batch_size=4, val_split=0.25))
    assert data.fingerprint(held) not in (fingerprint, data.fingerprint(data.create(
        DataConfig(name="fp", batch_size=4, val_split=0.25, split_seed=1))))

    from PIL import Image
    root = write_folder(tmp_path / "f", splits=("train", "val", "test"))
    for in_memory in (True, False):
        cfg = folder_cfg(root, tmp_path, in_memory=in_memory)
        first = data.fingerprint(data.create(cfg))
        assert data.fingerprint(data.create(cfg)) == first
        img = root / "val" / "cat" / "1.png"        # one validation pixel changed
        raw, st = img.read_bytes(), img.stat()
        px = np.array(Image.open(img))
        px[0, 0, 0] ^= 1
        Image.fromarray(px).save(img)
        assert data.fingerprint(data.create(cfg)) != first
        img.write_bytes(raw)
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert data.fingerprint(data.create(cfg)) == first
