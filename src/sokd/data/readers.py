"""Readers for the supported data sets, each turning files into validated uint8 tensors.

Every problem a user can cause (missing files, truncated/corrupt files, wrong dtypes or shapes,
labels out of range, unsafe pickles) is a one-line `SokdError` naming the file and the fix.

In-memory data sets come back as `ArraySplits` (uint8 N,C,H,W tensors + int64 labels, on the CPU);
image folders come back as torchvision datasets for `LoaderBatches`.
"""
from __future__ import annotations

import codecs
import gzip
import math
import pickle
import socket
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import SokdError
from .sources import UnreadableImage, mix_seed

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile
cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter
palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket
rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper
table tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf
woman worm""".split()

STATS = {  # (mean, std) per channel of the training images, in [0, 1] units
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
STATS["imagefolder"] = STATS["imagenet"]

CACHE = Path("~/.cache/sokd").expanduser()
_REPO = Path(__file__).resolve().parents[3]  # <repo>/src/sokd/data/readers.py -> <repo> (source checkouts)


@dataclass
class ArraySplits:
    """Both splits of an in-memory data set: uint8 (N,C,H,W) images and int64 (N,) labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str]
    source: str                 # where it was read from, for messages

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------------------- helpers

def to_nchw(x: np.ndarray, what: str) -> torch.Tensor:
    """Validate an image array (N,H,W) or (N,H,W,C) uint8 and return a uint8 (N,C,H,W) tensor."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        dtype = getattr(x, "dtype", type(x).__name__)
        raise SokdError(f"{what} must be a uint8 image array, got dtype {dtype}; store pixels as uint8 0..255")
    if x.ndim not in (3, 4):
        raise SokdError(f"{what} has shape {x.shape}; expected (N, H, W) or (N, H, W, C) uint8 images")
    if x.ndim == 4 and not 1 <= x.shape[3] <= 4:
        raise SokdError(f"{what} has shape {x.shape}: {x.shape[3]} channels in the last axis; "
                        f"store images as (N, H, W, C) with C = 1 or 3")
    if not x.flags.writeable:  # e.g. np.frombuffer over bytes: torch wants writable memory
        x = x.copy()
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.unsqueeze(1) if x.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()


def to_labels(y, n: int | None, what: str) -> torch.Tensor:
    """Validate integer labels (1-D, length n) and return an int64 tensor."""
    y = np.asarray(y) if not isinstance(y, np.ndarray) else y
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or (y.dtype == object and y.size == 0)):
        raise SokdError(f"{what} must be a 1-D integer array, got dtype {y.dtype} shape {y.shape}")
    if n is not None and y.shape[0] != n:
        raise SokdError(f"{what} has {y.shape[0]} labels but there are {n} images; they must match")
    return torch.from_numpy(y.astype(np.int64))


def check_splits(s: ArraySplits) -> ArraySplits:
    """Cross-split checks: matching image shapes, labels in [0, num_classes)."""
    k = s.num_classes
    if s.x_train.shape[1:] != s.x_test.shape[1:]:
        raise SokdError(f"{s.source}: train images are {tuple(s.x_train.shape[1:])} but test images are "
                        f"{tuple(s.x_test.shape[1:])} (C,H,W); both splits need one shape")
    for split, y in (("train", s.y_train), ("test", s.y_test)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise SokdError(f"{s.source}: {split} label {bad} is outside 0..{k - 1} ({k} classes); "
                            f"fix the labels (or, in an .npz, store one class_names entry per class)")
    return s


def first_per_class(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (ascending, i.e. file order) of the first `n` samples of each class."""
    if labels.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    counts = torch.bincount(sorted_labels)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(labels.numel()) - starts[sorted_labels]
    return torch.sort(order[rank_in_class < n]).values


@contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _download(what: str, fetch: Callable[[], object], target: Path, alternatives: str) -> None:
    """Run a torchvision download with a socket timeout; any failure becomes a SokdError."""
    try:
        target.mkdir(parents=True, exist_ok=True)
        with _socket_timeout(30):
            fetch()
    except SokdError:
        raise
    except Exception as err:  # network, checksum, disk: all "could not download"
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SokdError(f"downloading {what} into '{target}' failed ({msg}); {alternatives}") from None


def _search_roots(root: str | None, defaults: Iterable[Path]) -> list[Path]:
    if root is not None:
        return [Path(root).expanduser()]
    seen, out = set(), []
    for p in defaults:
        p = Path(p).expanduser()
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


# --------------------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path, expect_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped or plain.

    Checks the magic number (two zero bytes, a dtype code, the number of dimensions), that the
    payload is exactly prod(dims) * itemsize bytes, and (optionally) the number of dimensions.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise SokdError(f"cannot read IDX file '{path}': {err.strerror or err}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise SokdError(f"IDX file '{path}' is a corrupt or truncated gzip file ({err}); "
                            f"re-download or re-install it") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise SokdError(f"'{path}' is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); "
                        f"point data.root at the original Fashion-MNIST/MNIST files")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise SokdError(f"IDX file '{path}' has {ndim} dimensions, expected {expect_ndim}; "
                        f"images and labels may be swapped or the file is not Fashion-MNIST")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SokdError(f"IDX file '{path}' is truncated inside its header; re-download it")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        state = "truncated" if len(raw) - header < expected else "longer than its header says"
        raise SokdError(f"IDX file '{path}' is {state}: header {dims} needs {expected} data bytes, "
                        f"found {len(raw) - header}; re-download it")
    arr = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False) if dtype.byteorder == ">" else arr


def write_idx(path: str | Path, arr: np.ndarray, compress: bool | None = None) -> None:
    """Write `arr` (uint8/int8/int16/int32/float32/float64) as IDX; gzip when the name ends in .gz."""
    codes = {v.newbyteorder("=").str[1:]: k for k, v in _IDX_DTYPES.items()}
    arr = np.asarray(arr)
    code = codes[arr.dtype.newbyteorder("=").str[1:]]
    body = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    body += arr.astype(_IDX_DTYPES[code], copy=False).tobytes()
    path = Path(path)
    compress = path.suffix == ".gz" if compress is None else compress
    path.write_bytes(gzip.compress(body, compresslevel=1) if compress else body)


# ----------------------------------------------------------------------------------- Fashion-MNIST

_FMNIST_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
                 "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
FASHION_MNIST_DEFAULTS = ("/usr/share/datasets/fashion-mnist", "~/.cache/sokd/fashion-mnist",
                          "~/.cache/sokd", "./data")


def _idx_files(folder: Path) -> dict[str, Path] | None:
    """The four Fashion-MNIST files in `folder` (plain or .gz), or None if any is missing."""
    found = {}
    for key, stem in _FMNIST_FILES.items():
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                found[key] = folder / name
                break
        else:
            return None
    return found


def find_fashion_mnist(root: str | None) -> dict[str, Path] | None:
    for base in _search_roots(root, FASHION_MNIST_DEFAULTS):
        for folder in (base, base / "FashionMNIST" / "raw", base / "fashion-mnist"):
            files = _idx_files(folder)
            if files:
                return files
    return None


def load_fashion_mnist(root: str | None, download: bool = False) -> ArraySplits:
    if root is not None and str(root).endswith(".npz"):
        return load_npz(root, "fashion_mnist")
    files = find_fashion_mnist(root)
    if files is None and download:
        import torchvision
        target = Path(root).expanduser() if root else CACHE

        def fetch():
            for train in (True, False):
                torchvision.datasets.FashionMNIST(str(target), train=train, download=True)
        _download("Fashion-MNIST", fetch, target,
                  "install it with `apt-get install dataset-fashion-mnist` or set data.root to the IDX files")
        files = find_fashion_mnist(str(target))
    if files is None:
        looked = ", ".join(str(p) for p in _search_roots(root, FASHION_MNIST_DEFAULTS))
        raise SokdError(f"Fashion-MNIST not found (looked in {looked}); install it with "
                        f"`apt-get install dataset-fashion-mnist`, set data.root=DIR with "
                        f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz], or set data.download=true")
    arrays = {k: read_idx(p, expect_ndim=3 if k.startswith("x") else 1) for k, p in files.items()}
    x_train = to_nchw(arrays["x_train"], f"'{files['x_train']}'")
    x_test = to_nchw(arrays["x_test"], f"'{files['x_test']}'")
    splits = ArraySplits(x_train, to_labels(arrays["y_train"], len(x_train), f"'{files['y_train']}'"),
                         x_test, to_labels(arrays["y_test"], len(x_test), f"'{files['y_test']}'"),
                         list(FASHION_MNIST_CLASSES), str(files["x_train"].parent))
    return check_splits(splits)


# ------------------------------------------------------------------------------ safe pickle loading

def _numpy_attr(*paths: str):
    """First importable `module:name` among paths (numpy moved numpy.core to numpy._core in 2.0)."""
    import importlib
    for p in paths:
        mod, name = p.split(":")
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    return None


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a callable outside the data-only allow-list."""


def _latin1_encode(text, encoding="latin1", errors="strict"):
    if str(encoding).lower().replace("-", "") not in ("latin1", "iso88591"):
        raise RefusedGlobal(f"codec '{encoding}' is not allowed")
    return codecs.encode(text, "latin1", errors)


def _allowed_globals() -> dict[tuple[str, str], object]:
    reconstruct = _numpy_attr("numpy._core.multiarray:_reconstruct", "numpy.core.multiarray:_reconstruct")
    frombuffer = _numpy_attr("numpy._core.numeric:_frombuffer", "numpy.core.numeric:_frombuffer")
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
             ("_codecs", "encode"): _latin1_encode, ("builtins", "bytearray"): bytearray}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        if reconstruct is not None:
            table[(mod, "_reconstruct")] = reconstruct
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        if frombuffer is not None:
            table[(mod, "_frombuffer")] = frombuffer
    return table


class SafeUnpickler(pickle.Unpickler):
    """Unpickler for data files: plain containers, bytes, str, numbers and numpy arrays only.

    Any other global (os.system, builtins.eval, subprocess, ...) is refused before it is loaded,
    so a malicious file cannot run code.
    """

    _allowed = None

    def find_class(self, module: str, name: str):
        if SafeUnpickler._allowed is None:
            SafeUnpickler._allowed = _allowed_globals()
        try:
            return SafeUnpickler._allowed[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"refusing to load '{module}.{name}'") from None


def safe_unpickle(path: Path) -> object:
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(f, encoding="latin1").load()
    except RefusedGlobal as err:
        raise SokdError(f"'{path}' is not a safe data pickle ({err}); only arrays, lists and dicts are "
                        f"allowed — use the original CIFAR files from the official site") from None
    except OSError as err:
        raise SokdError(f"cannot read '{path}': {err.strerror or err}") from None
    except Exception as err:  # EOFError, ValueError, TypeError, ... from a truncated or odd file
        raise SokdError(f"'{path}' is corrupt or not a CIFAR pickle ({type(err).__name__}: {err}); "
                        f"re-download it") from None
    if isinstance(obj, dict):
        obj = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------------ CIFAR

_CIFAR = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "meta": "batches.meta", "names_key": "label_names",
                "label_key": "labels", "classes": CIFAR10_CLASSES, "npz": "cifar10.npz",
                "title": "CIFAR-10", "tv": "CIFAR10"},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta",
                 "names_key": "fine_label_names", "label_key": "fine_labels", "classes": CIFAR100_CLASSES,
                 "npz": "cifar100.npz", "title": "CIFAR-100", "tv": "CIFAR100"},
}


def cifar_defaults(name: str) -> list[Path]:
    info = _CIFAR[name]
    out = [Path("data") / info["folder"], Path("data") / info["npz"],
           CACHE / info["folder"], CACHE / info["npz"]]
    if name == "cifar100":
        out += [Path("../shared/data") / info["npz"], _REPO.parent / "shared" / "data" / info["npz"]]
    return out


def find_cifar(name: str, root: str | None) -> Path | None:
    """A pickle folder or .npz file for `name` at root (or its child folder), else in the defaults."""
    info = _CIFAR[name]
    for cand in _search_roots(root, cifar_defaults(name)):
        if cand.is_file() and cand.suffix == ".npz":
            return cand
        if cand.is_dir():
            for folder in (cand, cand / info["folder"]):
                # a partial folder is returned too: loading it names the missing/corrupt file
                if any((folder / f).is_file() for f in info["train"] + info["test"]):
                    return folder
            if root is not None and (cand / info["npz"]).is_file():
                return cand / info["npz"]
    return None


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():  # files are read in order, so an earlier corrupt file is reported first
        raise SokdError(f"'{path}' is missing: the CIFAR folder '{path.parent}' is incomplete; "
                        f"re-extract it, set data.download=true, or fix data.root")
    obj = safe_unpickle(path)
    if not isinstance(obj, dict):
        raise SokdError(f"'{path}' holds a {type(obj).__name__}, not a CIFAR batch dict; re-download it")
    for key in ("data", label_key):
        if key not in obj:
            raise SokdError(f"'{path}' has no '{key}' entry; it is not a "
                            f"{'CIFAR-100' if label_key == 'fine_labels' else 'CIFAR-10'} batch file")
    data, labels = obj["data"], obj[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise SokdError(f"'{path}': 'data' must be a uint8 array of shape (N, 3072), got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {shape}; re-download it")
    try:
        labels = np.asarray(labels)
    except Exception:
        raise SokdError(f"'{path}': '{label_key}' is not a list of integers") from None
    # stored as rows of R(1024) G(1024) B(1024): reshape to (N, 3, 32, 32), then (N, H, W, C)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar_pickles(folder: Path, name: str) -> ArraySplits:
    info = _CIFAR[name]
    out = {}
    for split in ("train", "test"):
        xs, ys = [], []
        for fname in info[split]:
            x, y = _cifar_batch(folder / fname, info["label_key"])
            xs.append(x)
            ys.append(to_labels(y, len(x), f"'{folder / fname}' {info['label_key']}"))
        out[f"x_{split}"] = to_nchw(np.concatenate(xs), f"'{folder}' {split} images")
        out[f"y_{split}"] = torch.cat(ys)
    names = list(info["classes"])
    meta = folder / info["meta"]
    if meta.is_file():
        obj = safe_unpickle(meta)
        got = obj.get(info["names_key"]) if isinstance(obj, dict) else None
        if isinstance(got, list) and got and all(isinstance(v, (str, bytes)) for v in got):
            names = [v.decode("latin1") if isinstance(v, bytes) else v for v in got]
    return check_splits(ArraySplits(class_names=names, source=str(folder), **out))


def load_npz(path: str | Path, name: str) -> ArraySplits:
    """x_train, y_train, x_test, y_test (uint8 N,H,W[,C] / integer labels), optional class_names."""
    path = Path(path).expanduser()
    defaults = {"fashion_mnist": FASHION_MNIST_CLASSES, "cifar10": CIFAR10_CLASSES,
                "cifar100": CIFAR100_CLASSES}[name]
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SokdError(f"data file '{path}' not found; fix data.root") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise SokdError(f"'{path}' is not a readable .npz archive ({err}); re-create it with numpy.savez") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise SokdError(f"'{path}' holds a single array, not an .npz archive with x_train, y_train, x_test, y_test")
    with npz:
        arrays = {}
        for key in ("x_train", "y_train", "x_test", "y_test"):
            if key not in npz.files:
                raise SokdError(f"'{path}' has no '{key}' array; an .npz data set needs x_train, y_train, "
                                f"x_test, y_test (found: {', '.join(npz.files) or 'nothing'})")
            try:
                arrays[key] = npz[key]
            except ValueError:
                raise SokdError(f"'{path}': '{key}' is an object array (needs pickle, refused); "
                                f"store it as a plain numeric array") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
                raise SokdError(f"'{path}': '{key}' is corrupt ({err}); re-create the file") from None
        names = None
        if "class_names" in npz.files:
            try:
                raw = npz["class_names"]
                if raw.ndim == 1 and raw.dtype.kind in "US" and raw.size:
                    names = [v.decode() if isinstance(v, bytes) else str(v) for v in raw.tolist()]
            except ValueError:  # object array (would need pickle): fall back to the defaults
                names = None
    x_train = to_nchw(arrays["x_train"], f"'{path}' x_train")
    x_test = to_nchw(arrays["x_test"], f"'{path}' x_test")
    y_train = to_labels(arrays["y_train"], len(x_train), f"'{path}' y_train")
    y_test = to_labels(arrays["y_test"], len(x_test), f"'{path}' y_test")
    if names is None:
        names = list(defaults)  # labels beyond these are reported by check_splits
    return check_splits(ArraySplits(x_train, y_train, x_test, y_test, names, str(path)))


def load_cifar(name: str, root: str | None, download: bool = False) -> ArraySplits:
    info = _CIFAR[name]
    if root is not None and str(root).endswith(".npz"):
        return load_npz(root, name)
    found = find_cifar(name, root)
    if found is None and download:
        import torchvision
        target = Path(root).expanduser() if root else CACHE
        cls = getattr(torchvision.datasets, info["tv"])
        _download(info["title"], lambda: cls(str(target), train=True, download=True), target,
                  f"set data.root to a {info['folder']} folder or an .npz file")
        found = find_cifar(name, str(target))
    if found is None:
        looked = ", ".join(str(p) for p in _search_roots(root, cifar_defaults(name)))
        raise SokdError(f"{info['title']} not found (looked in {looked}); set data.root to a {info['folder']} "
                        f"folder (or its parent) or an .npz with x_train/y_train/x_test/y_test, "
                        f"or set data.download=true")
    return load_npz(found, name) if found.suffix == ".npz" else load_cifar_pickles(found, name)


# --------------------------------------------------------------------------------------- synthetic

def make_synthetic(size: int, shape: Iterable[int], num_classes: int) -> ArraySplits:
    """Random images whose class is visible as a per-class colour + oriented stripe pattern.

    Content is fixed by (size, shape, classes) — independent of the training seed — so that a
    checkpoint is scored on the same images it was trained on. Test split: size // 4 images.
    """
    c, h, w = (int(v) for v in shape)
    g = torch.Generator().manual_seed(mix_seed(0x5EED, size, c, h, w, num_classes))
    k = num_classes
    base = torch.rand(k, c, 1, 1, generator=g) * 120 + 68                       # class colour
    amp = (torch.rand(k, c, 1, 1, generator=g) * 2 - 1) * 60                    # stripe strength
    theta = torch.rand(k, generator=g) * math.pi
    freq = torch.rand(k, generator=g) * 2.5 + 1.0                               # cycles per image
    yy, xx = torch.meshgrid(torch.arange(h) / max(h, 1), torch.arange(w) / max(w, 1), indexing="ij")
    proj = torch.cos(theta)[:, None, None] * xx + torch.sin(theta)[:, None, None] * yy
    stripes = torch.sin(2 * math.pi * freq[:, None, None] * proj)[:, None]      # (K,1,H,W)
    templates = base + amp * stripes                                            # (K,C,H,W)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
        shift = torch.randn(n, 1, 1, 1, generator=g) * 12                       # brightness jitter
        noise = torch.randn(n, c, h, w, generator=g) * 28
        x = (templates[labels] + shift + noise).round().clamp_(0, 255).to(torch.uint8)
        return x, labels

    x_train, y_train = split(size)
    x_test, y_test = split(max(1, size // 4))
    names = [f"class_{i}" for i in range(k)]
    return ArraySplits(x_train, y_train, x_test, y_test, names, "synthetic")


# ------------------------------------------------------------------------------------ image folders

IMAGENET_DEFAULTS = ("data/imagenet", "~/.cache/sokd/imagenet", "/usr/share/datasets/imagenet")


def find_image_folder(name: str, root: str | None) -> Path:
    if root is None and name == "imagefolder":
        raise SokdError("data.root is required for imagefolder: a directory with train/ and val/ "
                        "class sub-folders (torchvision ImageFolder layout)")
    for cand in _search_roots(root, [Path(p) for p in IMAGENET_DEFAULTS]):
        if (cand / "train").is_dir() and (cand / "val").is_dir():
            return cand
    if root is None:
        raise SokdError(f"ImageNet not found (looked in {', '.join(IMAGENET_DEFAULTS)}); set data.root to a "
                        f"directory with train/ and val/ class sub-folders")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise SokdError(f"data.root '{path}' is not a directory; point it at a folder with train/ and val/")
    missing = [s for s in ("train", "val") if not (path / s).is_dir()]
    raise SokdError(f"data.root '{path}' has no {' or '.join(m + '/' for m in missing)} folder; an image "
                    f"folder data set needs train/ and val/, each with one sub-folder per class")


def read_image(path: str):
    """The RGB PIL image in `path`; any failure to open or decode it is an UnreadableImage."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as err:  # PIL signals bad data with OSError, SyntaxError, ValueError, ...
        raise UnreadableImage(path, " ".join(str(err).split()) or type(err).__name__) from err


def image_folders(root: Path, train_transform, val_transform):
    """(train, val) torchvision ImageFolders; val's labels use train's class -> index mapping.

    Images are read with `read_image`, so a file that cannot be decoded raises UnreadableImage
    naming it (LoaderBatches turns that into a SokdError or skips the file).
    """
    from torchvision.datasets import ImageFolder

    def build(path: Path, transform, allow_empty: bool):
        try:
            return ImageFolder(str(path), transform=transform, loader=read_image, allow_empty=allow_empty)
        except FileNotFoundError as err:
            raise SokdError(f"'{path}': {err}; put images (.png, .jpg, ...) in one sub-folder per class") from None

    train = build(root / "train", train_transform, False)
    val = build(root / "val", val_transform, True)
    extra = [c for c in val.classes if c not in train.class_to_idx]
    if extra:
        raise SokdError(f"'{root / 'val'}' has class folders not in train/: {', '.join(extra[:5])}; "
                        f"train/ and val/ need the same class names")
    if len(val) == 0:
        raise SokdError(f"'{root / 'val'}' holds no images; put images in one sub-folder per class")
    remap = [train.class_to_idx[c] for c in val.classes]   # val may lack some classes
    val.samples = [(p, remap[t]) for p, t in val.samples]
    val.imgs = val.samples
    val.targets = [t for _, t in val.samples]
    val.classes, val.class_to_idx = list(train.classes), dict(train.class_to_idx)
    return train, val
