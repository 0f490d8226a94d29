"""Writers of data files for tests (sokd itself only reads them)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

#: IDX type codes (the payload is big-endian)
IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B,
             np.dtype("i4"): 0x0C, np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}


def write_idx(path: str | Path, arr: np.ndarray, compress: bool | None = None) -> None:
    """Write `arr` (uint8/int8/int16/int32/float32/float64) as IDX; gzip when the name ends in .gz."""
    arr = np.asarray(arr)
    native = arr.dtype.newbyteorder("=")
    code = IDX_CODES[native]
    body = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    body += arr.astype(native.newbyteorder(">"), copy=False).tobytes()
    path = Path(path)
    compress = path.suffix == ".gz" if compress is None else compress
    path.write_bytes(gzip.compress(body, compresslevel=1) if compress else body)
