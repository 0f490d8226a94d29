"""Loading data pickles (the CIFAR python batches) without letting them run code."""
from __future__ import annotations

import codecs
import importlib
import pickle
from pathlib import Path

import numpy as np

from ..errors import SokdError


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a callable outside the data-only allow-list."""


def _numpy_attr(*paths: str):
    """First importable `module:name` among paths (numpy moved numpy.core to numpy._core in 2.0)."""
    for p in paths:
        mod, name = p.split(":")
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    return None


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
    """The object in a CIFAR-style data pickle (bytes dict keys decoded as latin1), or a SokdError."""
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
