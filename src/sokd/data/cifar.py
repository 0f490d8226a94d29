"""CIFAR-10 / CIFAR-100: torchvision's python-pickle folders or an .npz file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import SokdError
from .arrays import ArraySplits, check_splits, to_labels, to_nchw
from .npz import load_npz
from .paths import CACHE, run_download, search_roots
from .registry import ARRAYS, register
from .safe_pickle import safe_unpickle

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile
cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter
palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket
rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper
table tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf
woman worm""".split()

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
    """Where `name` is looked for without data.root: ./data, then the cache (folder, then .npz)."""
    info = _CIFAR[name]
    return [Path("data") / info["folder"], Path("data") / info["npz"],
            CACHE / info["folder"], CACHE / info["npz"]]


def find_cifar(name: str, root: str | None) -> Path | None:
    """A pickle folder or .npz file for `name` at root (or its child folder), else in the defaults."""
    info = _CIFAR[name]
    for cand in search_roots(root, cifar_defaults(name)):
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


def load_cifar(name: str, root: str | None, download: bool = False) -> ArraySplits:
    info = _CIFAR[name]
    if root is not None and str(root).endswith(".npz"):
        return load_npz(root, info["classes"])
    found = find_cifar(name, root)
    if found is None and download:
        import torchvision
        target = Path(root).expanduser() if root else CACHE
        cls = getattr(torchvision.datasets, info["tv"])
        run_download(info["title"], lambda: cls(str(target), train=True, download=True), target,
                     f"set data.root to a {info['folder']} folder or an .npz file")
        found = find_cifar(name, str(target))
    if found is None:
        looked = ", ".join(str(p) for p in search_roots(root, cifar_defaults(name)))
        raise SokdError(f"{info['title']} not found (looked in {looked}); set data.root to a {info['folder']} "
                        f"folder (or its parent) or an .npz with x_train/y_train/x_test/y_test, "
                        f"or set data.download=true")
    return load_npz(found, info["classes"]) if found.suffix == ".npz" else load_cifar_pickles(found, name)


@register("cifar10", kind=ARRAYS, reads_config=True,
          mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
def read_cifar10(cfg) -> ArraySplits:
    """The `cifar10` entry: torchvision's pickle folder or an .npz at data.root or a default place."""
    return load_cifar("cifar10", cfg.root, cfg.download)


@register("cifar100", kind=ARRAYS, reads_config=True,
          mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762))
def read_cifar100(cfg) -> ArraySplits:
    """The `cifar100` entry: torchvision's pickle folder or an .npz at data.root or a default place."""
    return load_cifar("cifar100", cfg.root, cfg.download)
