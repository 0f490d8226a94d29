"""`data.name=hf`: a Hugging Face data set saved with `DatasetDict.save_to_disk`, read offline.

The directory is read with `datasets.load_from_disk` (no network, no hub). Columns and split
names come from `data.hf` (image, label, train_split, test_split); class names from the label
column's `ClassLabel` feature when it has one. Images become uint8 tensors and take the
in-memory fast path, with the same checks as every other reader.

Pixels that are not uint8 are converted where they have one obvious meaning (`to_uint8`) and
refused with a one-line error naming the column otherwise.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SokdError
from .arrays import ArraySplits
from .plugin import splits_from
from .registry import ARRAYS, register


@register("hf", kind=ARRAYS, reads_config=True)
def load_hf(cfg) -> ArraySplits:
    """The `hf` entry: the data.hf columns of the splits saved at data.root (no statistics of its
    own: the generic 0.5 / 0.25 normalise it, or data.mean / data.std)."""
    try:
        import datasets
    except ImportError:
        raise SokdError("data.name=hf needs the Hugging Face datasets package; install it with "
                        "pip install 'sokd[hf]'") from None
    if cfg.root is None:
        raise SokdError("data.name=hf needs data.root: a directory written by DatasetDict.save_to_disk")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise SokdError(f"data.root '{root}' is not a directory; point it at a DatasetDict.save_to_disk folder")
    try:
        saved = datasets.load_from_disk(str(root))
    except (FileNotFoundError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise SokdError(f"data.root '{root}' is not a saved Hugging Face data set ({first}); write it with "
                        f"DatasetDict.save_to_disk") from None
    cols = cfg.hf
    if isinstance(saved, datasets.Dataset):
        raise SokdError(f"'{root}' holds one split; sokd needs '{cols.train_split}' and '{cols.test_split}': save a "
                        f"DatasetDict({{'{cols.train_split}': ..., '{cols.test_split}': ...}})")
    missing = [s for s in (cols.train_split, cols.test_split) if s not in saved]
    if missing:
        raise SokdError(f"'{root}' has splits {sorted(saved)} but not {', '.join(missing)}; set "
                        f"data.hf.train_split / data.hf.test_split")
    parts = []
    for split in (cols.train_split, cols.test_split):
        ds = saved[split]
        absent = [c for c in (cols.image, cols.label) if c not in ds.column_names]
        if absent:
            raise SokdError(f"'{root}' split '{split}' has columns {ds.column_names} but not {', '.join(absent)}; "
                            f"set data.hf.image / data.hf.label")
        parts.append(_Columns(ds, cols.image, cols.label, f"hf data set '{root}' split '{split}'"))
    feature = saved[cols.train_split].features[cols.label]
    classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return splits_from({"train": parts[0], "test": parts[1], "classes": classes}, f"hf data set '{root}'")


class _Columns:
    """A saved split seen as a sequence of (image, label) pairs, images as uint8 where they are
    arrays or 16-bit / float PIL images (`to_uint8`); other PIL images are passed on as they are."""

    def __init__(self, ds, image: str, label: str, where: str):
        self.ds, self.image, self.label, self.where = ds, image, label, where
        self.dtype = declared_dtype(ds.features[image])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        what = f"{self.where} column '{self.image}' row {i}"
        try:
            row = self.ds[i]
        except Exception as err:  # noqa: BLE001 - datasets/PIL signal unreadable rows in many ways
            msg = " ".join(str(err).split())[:200]
            raise SokdError(f"{what} cannot be read ({type(err).__name__}: {msg}); re-save the data set "
                            f"with DatasetDict.save_to_disk") from err
        return image_pixels(row[self.image], self.dtype, what), row[self.label]


def declared_dtype(feature) -> np.dtype | None:
    """The numpy dtype an Array / List / Value image column declares (None for Image columns)."""
    while hasattr(feature, "feature"):      # List, Sequence, LargeList of ...
        feature = feature.feature
    name = getattr(feature, "dtype", None)  # Value / ArrayND: "uint16", "float32", ...
    if not isinstance(name, str):
        return None
    try:
        return np.dtype(name)
    except TypeError:                        # Image's "PIL.Image.Image", "string", ...
        return None


#: PIL modes whose pixels are not 8-bit: read as arrays and converted by `to_uint8`
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def image_pixels(x, dtype: np.dtype | None, what: str):
    """One image as a uint8 array, or as the PIL image it is when that is already 8-bit."""
    from PIL import Image

    if isinstance(x, Image.Image):
        if x.mode not in _WIDE_MODES:
            return x
        png16 = x.mode == "I" and x.format == "PNG"   # PNG has no 32-bit integers: older Pillow reads
        x = np.asarray(x)                              # 16-bit PNGs as mode I
        if png16 and x.size and int(x.min()) >= 0 and int(x.max()) <= 65535:
            x = x.astype(np.uint16)
    elif isinstance(x, list):  # an Array/Sequence feature: nested lists of pixel values
        x = np.asarray(x, dtype=dtype) if dtype is not None else np.asarray(x)
    if isinstance(x, np.ndarray):
        return to_uint8(x, what)
    return x


def to_uint8(x: np.ndarray, what: str) -> np.ndarray:
    """Pixels as uint8, where their meaning is plain:

    * uint8: as they are; bool: 0 / 255;
    * uint16 (and PIL's 16-bit modes I;16*): round(x / 257), the inverse of the usual 8-to-16-bit
      widening x * 257, so 0 -> 0, 65535 -> 255 and 8-bit values stored as 16-bit come back;
    * other integers whose values all lie in 0..255: as they are (e.g. int64 from Python lists);
    * floats, all finite and in [0, 1]: round(x * 255).

    Anything else (negative or >255 integers that are not uint16, floats outside [0, 1] or not
    finite, other dtypes) is a SokdError naming `what`, the dtype and the range.
    """
    dtype = x.dtype
    if dtype == np.uint8:
        return x
    if dtype.kind == "b":
        return x.astype(np.uint8) * np.uint8(255)
    if x.size == 0 and dtype.kind in "iuf":
        return x.astype(np.uint8)
    if dtype.kind == "u" and dtype.itemsize == 2:
        return ((x.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if dtype.kind in "iu":
        lo, hi = int(x.min()), int(x.max())
        if lo >= 0 and hi <= 255:
            return x.astype(np.uint8)
        raise SokdError(f"{what}: {dtype} pixels span {lo}..{hi}, which is neither 8-bit (0..255) nor a uint16 "
                        f"image; store the images as uint8 0..255 (or uint16, or floats in [0, 1])")
    if dtype.kind == "f":
        finite = bool(np.isfinite(x).all())
        lo, hi = (float(x.min()), float(x.max())) if finite else (float(np.nanmin(x)), float(np.nanmax(x)))
        if finite and lo >= 0.0 and hi <= 1.0:
            return np.rint(x.astype(np.float32) * np.float32(255)).astype(np.uint8)
        span = f"span {lo:g}..{hi:g}, outside [0, 1]" if finite else "include NaN or infinity"
        raise SokdError(f"{what}: {dtype} pixels {span}; store float images in [0, 1] (or uint8 0..255)")
    raise SokdError(f"{what}: pixels of dtype {dtype} are not image values; store the images as uint8 0..255")
