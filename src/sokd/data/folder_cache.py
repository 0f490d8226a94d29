"""Small image folders decoded once into uint8 tensors, cached on disk, then trained in memory.

A CIFAR-sized folder re-decoded by PIL workers every epoch spends most of the epoch in JPEG/PNG
decoding; decoded once it is 150 MB for 50,000 32x32 images and takes the same fast path as the
built-in in-memory data sets. The cache file records a fingerprint of the folder (every file's
relative path, size and modification time, the class list, the decoded size and whether
unreadable files were skipped) and a SHA-256 checksum of its own image and label bytes: a folder
that changed, a file from another folder, a file that cannot be read or whose bytes do not match
their checksum is rebuilt, never trusted. Files are written atomically (temporary file, then
rename); a cache directory that cannot be written (read-only, full) only costs the cache: the run
trains from the decoded tensors, with a one-line warning, and no temporary file is left behind.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import io
import os
import sys
import time
from pathlib import Path

import torch

from ..errors import SokdError
from ..files import pid_alive
from .digest import tensor_digest, update_folder_samples
from .paths import CACHE
from .sources import UnreadableImage

#: 2: files carry a checksum of their images and labels; older files are rebuilt
FORMAT = 2
#: a temporary file of a writer that is gone is removed once it is this old (seconds)
STALE_TEMP_AGE = 600
#: folders with fewer images are decoded in this process: starting workers costs more than it saves
DECODE_WORKERS_FROM = 2048


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


def fingerprint(dataset, size: int, skip_unreadable: bool = False) -> str:
    """Hash of what the decoded tensors depend on: files (path, size, mtime), classes, size, and
    `skip_unreadable` (a cache that left files out must not serve a run that stops on them)."""
    h = hashlib.sha256(f"sokd-folder-cache {FORMAT} {size} skip_unreadable={bool(skip_unreadable)}\n".encode())
    update_folder_samples(h, dataset)
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
    key = fingerprint(dataset, size, skip_unreadable)
    cached = _read(path, key, len(dataset.classes), skip_unreadable)
    if cached is not None:
        return cached
    images, labels = _decode(dataset, size, workers, skip_unreadable, progress, split)
    _write(path, {"format": FORMAT, "fingerprint": key, "root": str(Path(dataset.root).resolve()),
                  "skip_unreadable": bool(skip_unreadable), "checksum": tensor_digest(images, labels), "images": images, "labels": labels})
    return images, labels


def _read(path: Path, key: str, num_classes: int, skip_unreadable: bool):
    """The cached (images, labels) when the file is whole and this folder's, else None (with a
    one-line note saying why it is rebuilt)."""
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
        if isinstance(blob, dict) and isinstance(blob.get("format"), int) and blob["format"] != FORMAT:
            why = f"written by another sokd version (format {blob['format']}, this one reads {FORMAT})"
        elif not ok:
            why = "not a sokd folder cache"
        elif blob.get("fingerprint") != key and blob.get("skip_unreadable", skip_unreadable) != skip_unreadable:
            why = f"built with data.skip_unreadable={str(blob['skip_unreadable']).lower()}"
        elif blob.get("fingerprint") != key:
            why = "the folder changed since it was written" if blob.get("root") else "from another folder"
        elif blob.get("checksum") != tensor_digest(blob["images"], blob["labels"]):
            why = "corrupt: its images or labels do not match their checksum"
        else:
            labels = blob["labels"].to(torch.int64)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                why = "corrupt: a label is outside the folder's classes"
            else:
                return blob["images"], labels
    print(f"note: rebuilding the decoded-image cache {path} ({why})", file=sys.stderr, flush=True)
    return None


class _FdWriter(io.RawIOBase):
    """A file object over a descriptor for torch.save, keeping the first OSError it met (torch
    reports a failed write as a RuntimeError; the OSError says why: full disk, quota, ...)."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd, self.error = fd, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as err:
            self.error = self.error or err
            raise
        return done


def _write(path: Path, blob: dict) -> None:
    """Write the cache file atomically. A directory that cannot take it (read-only, full, no
    permission) only costs the cache: one warning line, and the temporary file is removed."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            out = _FdWriter(fd)
            try:
                torch.save(blob, out)
            except RuntimeError:
                if out.error is not None:
                    raise out.error from None
                raise
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        reason = err.strerror or str(err) or errno.errorcode.get(err.errno, type(err).__name__)
        print(f"warning: cannot write the decoded-image cache in {path.parent} ({reason}); training from the "
              f"decoded images without caching them; set data.cache_dir=DIR to a writable directory with "
              f"free space to skip decoding next time", file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files of killed writers of `path`: their pid is gone from this host and
    they have not changed for STALE_TEMP_AGE seconds (a writer on another host keeps writing)."""
    for tmp in glob.glob(os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.tmp")):
        pid = os.path.basename(tmp)[len(path.name) + 2:-4]
        try:
            if pid.isdigit() and not pid_alive(int(pid)) and time.time() - os.stat(tmp).st_mtime > STALE_TEMP_AGE:
                os.unlink(tmp)
        except OSError:
            pass


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
    workers = workers if n >= DECODE_WORKERS_FROM else 0
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
