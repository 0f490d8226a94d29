"""Small image folders decoded once into uint8 tensors, cached on disk, then trained in memory.

A CIFAR-sized folder re-decoded by PIL workers every epoch spends most of the epoch in JPEG/PNG
decoding; decoded once it is 150 MB for 50,000 32x32 images and takes the same fast path as the
built-in in-memory data sets. The cache file records a fingerprint of the folder (every file's
relative path, size and modification time, the class list and the decoded size): a folder that
changed, a file from another folder or a file that cannot be read is rebuilt, never trusted.
Files are written atomically (temporary file, then rename).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from ..errors import SokdError
from .paths import CACHE
from .sources import UnreadableImage

FORMAT = 1


def default_dir() -> Path:
    """Where decoded folders go without data.cache_dir: $SOKD_FOLDER_CACHE, else ~/.cache/sokd/folders."""
    env = os.environ.get("SOKD_FOLDER_CACHE")
    return Path(env).expanduser() if env else CACHE / "folders"


def image_size_of(path: str) -> tuple[int, int]:
    """(height, width) of one image file, from its header."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as err:  # noqa: BLE001 - PIL reports bad files with many exception types
        raise UnreadableImage(path, " ".join(str(err).split()) or type(err).__name__) from err
    return h, w


def decoded_bytes(count: int, size: int, channels: int = 3) -> int:
    return count * channels * size * size


def fingerprint(dataset, size: int) -> str:
    """Hash of what the decoded tensors depend on: files (path, size, mtime), classes, size."""
    h = hashlib.sha256(f"sokd-folder-cache {FORMAT} {size} {dataset.classes}".encode())
    root = Path(dataset.root)
    for path, label in dataset.samples:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_path(cache_dir: Path, dataset, split: str, size: int) -> Path:
    root = Path(dataset.root).resolve()
    tag = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    return cache_dir / f"{root.parent.name}-{root.name}-{tag}" / f"{split}-{size}px.pt"


def load_or_decode(dataset, split: str, size: int, cache_dir: Path | None, workers: int,
                   skip_unreadable: bool, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N,3,size,size) images, int64 labels) of an ImageFolder, from the cache when valid."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_dir()
    path = cache_path(cache_dir, dataset, split, size)
    key = fingerprint(dataset, size)
    cached = _read(path, key)
    if cached is not None:
        return cached
    images, labels = _decode(dataset, size, workers, skip_unreadable, progress, split)
    _write(path, {"format": FORMAT, "fingerprint": key, "root": str(Path(dataset.root).resolve()),
                  "images": images, "labels": labels})
    return images, labels


def _read(path: Path, key: str):
    if not path.exists():
        return None
    why = None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable cache file is rebuilt
        blob, why = None, f"unreadable ({type(err).__name__})"
    if blob is not None:
        ok = (isinstance(blob, dict) and blob.get("format") == FORMAT
              and isinstance(blob.get("images"), torch.Tensor) and isinstance(blob.get("labels"), torch.Tensor)
              and blob["images"].dtype == torch.uint8 and blob["images"].dim() == 4
              and blob["labels"].shape == blob["images"].shape[:1])
        if not ok:
            why = "not a sokd folder cache"
        elif blob.get("fingerprint") != key:
            why = "the folder changed since it was written" if blob.get("root") else "from another folder"
        else:
            return blob["images"], blob["labels"].to(torch.int64)
    print(f"note: rebuilding the decoded-image cache {path} ({why})", file=sys.stderr, flush=True)
    return None


def _write(path: Path, blob: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(blob, tmp)
        os.replace(tmp, path)
    except OSError as err:
        print(f"note: could not cache decoded images at {path} ({err.strerror or err}); set data.cache_dir "
              f"to a writable directory to skip decoding next time", file=sys.stderr, flush=True)


class _Decode(torch.utils.data.Dataset):
    """(uint8 CHW tensor or None, label, problem) per sample, resized to size x size when needed."""

    def __init__(self, dataset, size: int):
        self.samples, self.size = dataset.samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision.transforms import functional as TF

        from .folders import read_image

        path, label = self.samples[i]
        try:
            img = read_image(path)
        except UnreadableImage as err:
            return None, label, (err.path, err.reason)
        if img.size != (self.size, self.size):
            img = TF.resize(img, [self.size, self.size], antialias=True)
        return TF.pil_to_tensor(img), label, None


def _collate(batch):
    return batch


def _decode(dataset, size: int, workers: int, skip_unreadable: bool, progress: bool, split: str):
    from tqdm import tqdm

    n = len(dataset.samples)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    loader = torch.utils.data.DataLoader(_Decode(dataset, size), batch_size=256, num_workers=workers,
                                         collate_fn=_collate)
    kept, skipped = 0, []
    with tqdm(total=n, desc=f"decoding {split} images", unit="img", disable=None if progress else True,
              leave=False) as bar:
        for batch in loader:
            for x, label, problem in batch:
                if problem is not None:
                    if not skip_unreadable:
                        raise SokdError(f"cannot read image '{problem[0]}' ({problem[1]}); remove or replace it, "
                                        f"or set data.skip_unreadable=true")
                    skipped.append(problem[0])
                    continue
                images[kept], labels[kept] = x, label
                kept += 1
            bar.update(len(batch))
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image(s) in {split} (first: {skipped[0]})",
              file=sys.stderr, flush=True)
    return images[:kept].clone() if kept < n else images, labels[:kept].clone() if kept < n else labels
