"""`.npz` data sets: x_train, y_train, x_test, y_test (+ optional class_names), read without pickle."""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import SokdError
from .arrays import ArraySplits, check_splits, to_labels, to_nchw


def load_npz(path: str | Path, default_classes: Sequence[str]) -> ArraySplits:
    """x_train, y_train, x_test, y_test (uint8 N,H,W[,C] / integer labels), optional class_names.

    Without a usable class_names array the classes are `default_classes` (the data set's own).
    """
    path = Path(path).expanduser()
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
        names = list(default_classes)  # labels beyond these are reported by check_splits
    return check_splits(ArraySplits(x_train, y_train, x_test, y_test, names, str(path)))
