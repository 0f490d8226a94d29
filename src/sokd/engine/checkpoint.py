"""Checkpoints that survive crashes and refuse to run code.

Writes go to a temporary file in the same directory, are flushed and fsynced, then renamed over
the target, so a crash leaves either the old file or the new one. Loads use
`torch.load(weights_only=True)`: a pickle crafted to execute code is refused.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import torch
from torch import nn

from ..errors import SokdError


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(file)` on a temporary file next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        commit_file(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def commit_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished, fsynced temporary file over `path` and make the rename durable."""
    path = Path(path)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def safe_load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True; every failure is a one-line SokdError."""
    path = Path(path)
    if not path.is_file():
        raise SokdError(f"checkpoint '{path}' not found; check the path (train the run first, or "
                        f"point to its last.pt / best.pt / student.pt)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        detail = next((ln.strip() for ln in text.splitlines()
                       if "GLOBAL" in ln or "Unsupported" in ln or "invalid load key" in ln), "")
        if "GLOBAL" in text:
            raise SokdError(f"checkpoint '{path}' was refused: it would import code on load "
                            f"({detail[:140]}); only load checkpoints holding plain tensors") from None
        raise SokdError(f"checkpoint '{path}' is corrupt or truncated, or not a PyTorch checkpoint "
                        f"({detail[:100] or type(err).__name__}); use another copy, e.g. best.pt") from None
    except Exception as err:  # noqa: BLE001 - arbitrary bytes can fail anywhere in the unpickler
        # (IndexError, TypeError, struct.error, ... seen on random files); weights_only runs no
        # code, so every failure here means an unreadable file.
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SokdError(f"checkpoint '{path}' is corrupt or truncated ({msg[:120]}); "
                        f"use another copy, e.g. best.pt or an older backup") from None
    if not isinstance(obj, dict):
        raise SokdError(f"checkpoint '{path}' is not a sokd checkpoint (expected a mapping)")
    return obj


def load_state_strict(module: nn.Module, state: dict, what: str) -> None:
    """load_state_dict that names missing, unexpected and mis-shaped tensors in one line."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape mismatch: {', '.join(shapes[:3])}" + (" ..." if len(shapes) > 3 else ""))
        if missing:
            parts.append(f"missing: {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
        if unexpected:
            parts.append(f"unexpected: {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
        raise SokdError(f"{what} does not fit this architecture/number of classes ({'; '.join(parts)}); "
                        f"check the arch and data set it was trained with")
    module.load_state_dict(state)
