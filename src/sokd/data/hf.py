"""`data.name=hf`: a Hugging Face data set saved with `DatasetDict.save_to_disk`, read offline.

The directory is read with `datasets.load_from_disk` (no network, no hub). Columns and split
names come from `data.hf` (image, label, train_split, test_split); class names from the label
column's `ClassLabel` feature when it has one. Images become uint8 tensors and take the
in-memory fast path, with the same checks as every other reader.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SokdError
from .arrays import ArraySplits
from .plugin import splits_from


def load_hf(cfg) -> ArraySplits:
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
        parts.append(_Columns(ds, cols.image, cols.label))
    feature = saved[cols.train_split].features[cols.label]
    classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return splits_from({"train": parts[0], "test": parts[1], "classes": classes}, f"hf data set '{root}'")


class _Columns:
    """A saved split seen as a sequence of (image, label) pairs."""

    def __init__(self, ds, image: str, label: str):
        self.ds, self.image, self.label = ds, image, label

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        row = self.ds[i]
        x = row[self.image]
        if isinstance(x, list):  # an Array/Sequence feature: nested lists of pixel values
            x = np.asarray(x, dtype=np.uint8)
        return x, row[self.label]
