"""Turn what a registered reader returns into checked in-memory splits (`ArraySplits`).

Readers may hand back arrays or torch Datasets; both end as uint8 (N,C,H,W) tensors so that a
user's data set gets the same fast path and the same one-line errors as CIFAR or Fashion-MNIST.
An exception raised by the user's reader or Dataset is theirs, not sokd's: it becomes a one-line
SokdError naming the data set and the exception, so the CLI reports it as a user error (exit 2).
"""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from ..errors import SokdError
from .arrays import ArraySplits, check_splits, to_labels, to_nchw

#: labels of a data set that names no classes make this many classes at most (each class gets a
#: name and a logit: a stray huge label must be refused, not allocated)
MAX_CLASSES = 100_000


def raised(err: BaseException) -> str:
    """`ExceptionType: first line of its message` (at most 200 characters of it)."""
    text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_with_options(name: str, fn, cfg) -> ArraySplits:
    """Call a user's reader `fn`, registered as `name`, as `fn(root=data.root, **data.options)`
    and check what it returns (`splits_from`). The arguments are checked against its signature
    first, so a mismatch is named as one (not as an error inside the reader)."""
    try:
        inspect.signature(fn).bind(root=cfg.root, **cfg.options)
    except TypeError as err:
        raise SokdError(f"data set '{name}': its reader does not accept root=... and data.options "
                        f"{sorted(cfg.options)} ({err}); give it a `root` argument and those keywords") from None
    except ValueError:  # no signature to check (a builtin): the call below tells
        pass
    try:
        result = fn(root=cfg.root, **cfg.options)
    except SokdError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the user's function raises is reported as theirs
        raise SokdError(f"data set '{name}': your reader raised {raised(err)}; fix that function") from err
    return splits_from(result, f"data set '{name}'")


def splits_from(result: Any, what: str) -> ArraySplits:
    """Checked splits from a reader's result (see `sokd.data.registry` for the accepted forms)."""
    if isinstance(result, ArraySplits):
        return check_splits(result)
    if isinstance(result, dict):
        parts, classes = (result.get("train"), result.get("test")), result.get("classes")
        if parts[0] is None or parts[1] is None:
            raise SokdError(f"{what}: its reader returned a mapping without 'train' and 'test' "
                            f"(keys: {sorted(result)}); return {{'train': ..., 'test': ...}}")
    elif isinstance(result, (tuple, list)) and len(result) in (2, 3):
        parts, classes = (result[0], result[1]), (result[2] if len(result) == 3 else None)
    else:
        raise SokdError(f"{what}: its reader returned {type(result).__name__}; return "
                        f"{{'train': ..., 'test': ...}} or (train, test)")
    (x_train, y_train), (x_test, y_test) = (_arrays(p, f"{what} {s}") for p, s in zip(parts, ("train", "test")))
    for split, y in (("train", y_train), ("test", y_test)):
        if y.numel() and int(y.min()) < 0:
            raise SokdError(f"{what}: {split} label {int(y.min())} is negative; labels are class indices "
                            f"0..K-1: fix the labels")
        if y.numel() and classes is None and int(y.max()) >= MAX_CLASSES:
            raise SokdError(f"{what}: {split} label {int(y.max())} would make {int(y.max()) + 1} classes (at most "
                            f"{MAX_CLASSES}); labels are class indices 0..K-1: fix the labels, or return "
                            f"'classes' with one name per class")
    if classes is None:
        labels = torch.cat([y_train, y_test])
        count = int(labels.max()) + 1 if labels.numel() else 0
        classes = [str(i) for i in range(count)]
    elif not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise SokdError(f"{what}: 'classes' must be a list of class names (strings)")
    return check_splits(ArraySplits(x_train, y_train, x_test, y_test, list(classes), what))


def _arrays(part: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 NCHW images, int64 labels) from a pair of arrays or a Dataset of (image, label)."""
    if isinstance(part, torch.utils.data.Dataset) or (hasattr(part, "__getitem__") and hasattr(part, "__len__")
                                                       and not isinstance(part, (tuple, list))):
        return _materialise(part, what)
    if not isinstance(part, (tuple, list)) or len(part) != 2:
        raise SokdError(f"{what}: expected (images, labels) or a Dataset of (image, label), got "
                        f"{type(part).__name__}")
    x, y = part
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8:
            raise SokdError(f"{what} images are {x.dtype}; give uint8 pixels 0..255")
        if x.dim() == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
            x = x.permute(0, 2, 3, 1)   # NCHW -> NHWC for to_nchw
        x = x.cpu().numpy()
    y = y.cpu().numpy() if isinstance(y, torch.Tensor) else y
    images = to_nchw(x, f"{what} images")
    return images, to_labels(y, images.shape[0], f"{what} labels")


def _image(x: Any, what: str, i: int) -> np.ndarray:
    """One sample's image as a uint8 (H,W,C) array."""
    from PIL import Image

    if isinstance(x, Image.Image):
        return np.asarray(x)[..., None] if x.mode == "L" else np.asarray(x.convert("RGB"))
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8:
            raise SokdError(f"{what} sample {i}: image tensor is {x.dtype}; give uint8 (C,H,W) pixels 0..255 "
                            f"(no ToTensor/Normalize in the reader: sokd normalises)")
        if x.dim() == 2:
            x = x[None]
        if x.dim() != 3:
            raise SokdError(f"{what} sample {i}: image tensor has shape {tuple(x.shape)}; expected (C,H,W)")
        return x.permute(1, 2, 0).cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise SokdError(f"{what} sample {i}: image array is {x.dtype}; give uint8 (H,W[,C]) pixels 0..255")
        return x[..., None] if x.ndim == 2 else x
    raise SokdError(f"{what} sample {i}: image is {type(x).__name__}; give a PIL image or a uint8 tensor/array")


def _materialise(ds, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        n = len(ds)
    except Exception as err:  # noqa: BLE001 - the user's Dataset: report its error as theirs
        raise SokdError(f"{what}: your Dataset's len() raised {raised(err)}; fix its __len__") from err
    if n == 0:
        return torch.zeros(0, 1, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    images, labels = [], []
    for i in range(n):
        try:
            sample = ds[i]
        except SokdError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's Dataset: report its error as theirs
            raise SokdError(f"{what} sample {i}: your Dataset raised {raised(err)}; fix its __getitem__") from err
        if not isinstance(sample, (tuple, list)) or len(sample) < 2:
            raise SokdError(f"{what} sample {i} is {type(sample).__name__}; a Dataset must give (image, label)")
        img = _image(sample[0], what, i)
        if images and img.shape != images[0].shape:
            raise SokdError(f"{what} sample {i} has shape {img.shape} but sample 0 has {images[0].shape} (H,W,C); "
                            f"resize the images to one size in the reader")
        label = sample[1]
        if isinstance(label, (torch.Tensor, np.ndarray)) and np.prod(label.shape) == 1:
            label = label.item()
        if not isinstance(label, (int, np.integer)) or isinstance(label, bool) or not -2**63 <= label < 2**63:
            raise SokdError(f"{what} sample {i}: label {label!r} is not an integer class index")
        images.append(img)
        labels.append(int(label))
    x = to_nchw(np.stack(images), f"{what} images")
    return x, to_labels(np.asarray(labels, dtype=np.int64), x.shape[0], f"{what} labels")
