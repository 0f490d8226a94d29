"""Fashion-MNIST from its IDX files (plain or gzipped), or from an .npz given as data.root."""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from ..errors import SokdError
from .arrays import ArraySplits, check_splits, to_labels, to_nchw
from .npz import load_npz
from .paths import CACHE, run_download, search_roots
from .registry import ARRAYS, register

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_DEFAULTS = ("/usr/share/datasets/fashion-mnist", "~/.cache/sokd/fashion-mnist",
                          "~/.cache/sokd", "./data")

_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_FMNIST_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
                 "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


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
    for base in search_roots(root, FASHION_MNIST_DEFAULTS):
        for folder in (base, base / "FashionMNIST" / "raw", base / "fashion-mnist"):
            files = _idx_files(folder)
            if files:
                return files
    return None


def load_fashion_mnist(root: str | None, download: bool = False) -> ArraySplits:
    if root is not None and str(root).endswith(".npz"):
        return load_npz(root, FASHION_MNIST_CLASSES)
    files = find_fashion_mnist(root)
    if files is None and download:
        import torchvision
        target = Path(root).expanduser() if root else CACHE

        def fetch():
            for train in (True, False):
                torchvision.datasets.FashionMNIST(str(target), train=train, download=True)
        run_download("Fashion-MNIST", fetch, target,
                     "install it with `apt-get install dataset-fashion-mnist` or set data.root to the IDX files")
        files = find_fashion_mnist(str(target))
    if files is None:
        looked = ", ".join(str(p) for p in search_roots(root, FASHION_MNIST_DEFAULTS))
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


@register("fashion_mnist", kind=ARRAYS, reads_config=True, mean=(0.2860,), std=(0.3530,))
def read_fashion_mnist(cfg) -> ArraySplits:
    """The `fashion_mnist` entry: IDX files (or an .npz) at data.root or a default place."""
    return load_fashion_mnist(cfg.root, cfg.download)
