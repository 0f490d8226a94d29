"""Reading a PyTorch file without running code: the one place `torch.load` is called on a file
a user gives, for every layer (models read weights files, the engine reads checkpoints).

`torch.load(weights_only=True)` refuses a pickle that would import code; its own message is
eight lines advising `weights_only=False`, which is exactly what sokd must not do. Each failure
becomes one line that says what the file is and what to do instead.
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import SokdError


def load_weights_only(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; every failure is a one-line SokdError
    beginning with `what` and the path."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # torch's notes on the pickle protocol of a file it reads give the user nothing to do
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        detail = next((ln.strip() for ln in text.splitlines()
                       if "GLOBAL" in ln or "Unsupported" in ln or "invalid load key" in ln), "")
        if "GLOBAL" in text:
            raise SokdError(f"{what} '{path}' was refused: it would import code on load "
                            f"({detail[:140]}); only load files holding plain tensors (re-save it "
                            f"with torch.save(model.state_dict(), ...) where it was made)") from None
        raise SokdError(f"{what} '{path}' is corrupt or truncated, or not a PyTorch file "
                        f"({detail[:100] or type(err).__name__}); use another copy") from None
    except (OSError, MemoryError) as err:
        raise SokdError(f"cannot read {what} '{path}' ({getattr(err, 'strerror', None) or err}); "
                        f"check the file") from None
    except Exception as err:  # noqa: BLE001 - arbitrary bytes can fail anywhere in the unpickler
        # (IndexError, TypeError, struct.error, ... seen on random files); weights_only runs no
        # code, so every failure here means an unreadable file.
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SokdError(f"{what} '{path}' is corrupt or truncated ({msg[:120]}); "
                        f"use another copy") from None
