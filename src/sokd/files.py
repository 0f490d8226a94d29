"""The ground floor for files: every layer writes and reads through here.

* **Atomic writes.** Bytes are serialised in memory first, checked against the free space of the
  target's file system, written to a temporary file in the same directory (created exclusively,
  never through a link, named with a tag only this module computes, so a file merely named like
  one is never taken for sokd's), flushed and fsynced, then renamed over the target: a crash
  leaves the old file or the new one, and a full disk is a one-line SokdError that leaves no
  temporary file behind.
* **Safe loads.** `torch.load(weights_only=True)` on the CPU: a pickle crafted to execute code is
  refused, and every failure is one line saying what the file is and what to do instead (torch's
  own message is eight lines advising `weights_only=False`, which is what sokd must not do).
* **Strict state loading.** Loading a state dict into a network either copies every tensor or
  says, in one wording for every kind of file, which tensors do not fit.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import IO, Any, Callable

import torch
from torch import nn

from .errors import SokdError


# ---------------------------------------------------------------------------------- writing
#: free space a write must leave on the file system (its metadata, other processes' appends)
FREE_MARGIN = 64 * 1024
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
OUTPUT_DIR_FIX = "free space or set output.dir elsewhere"


def _mb(n: int | float) -> str:
    mb = n / 2 ** 20
    return f"{mb:.2f}" if mb < 10 else f"{mb:.0f}"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free for writing in the directory holding `path` (None when it cannot be told)."""
    try:
        return shutil.disk_usage(Path(path).parent).free
    except OSError:
        return None


def no_space_error(path: str | os.PathLike, needed: int | None, fix: str = OUTPUT_DIR_FIX) -> SokdError:
    """The one-line error for a file that does not fit on its file system."""
    free = free_bytes(path)
    parts = [f"needed ~{_mb(needed)} MB" if needed is not None else None,
             f"{_mb(free)} MB free" if free is not None else None]
    detail = ", ".join(p for p in parts if p)
    return SokdError(f"no space left on device writing '{path}'" + (f" ({detail})" if detail else "")
                     + f"; {fix}")


def is_no_space(err: BaseException) -> bool:
    """Whether `err` is a full disk or an exceeded quota."""
    return isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS


def check_free_space(path: str | os.PathLike, size: int, fix: str = OUTPUT_DIR_FIX) -> None:
    """SokdError unless `size` bytes (plus FREE_MARGIN) fit next to `path`."""
    free = free_bytes(path)
    if free is not None and free < size + FREE_MARGIN:
        raise no_space_error(path, size, fix)


def write_bytes(fd: int, data: bytes, path: str | os.PathLike, fix: str = OUTPUT_DIR_FIX) -> None:
    """Write all of `data` to the open file descriptor `fd` (a file that will become `path`) and
    fsync it; a full disk is a SokdError naming `path`."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as err:
        if is_no_space(err):
            raise no_space_error(path, len(data), fix) from None
        raise


#: name of a temporary file sokd writes: `.<target>.<token><tag>.sokd.tmp`, where `tag` is a
#: keyed digest of target and token, so a file merely named like one is never taken for sokd's
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<token>[0-9a-f]{12})(?P<tag>[0-9a-f]{8})\.sokd\.tmp$")


def _temp_tag(target: str, token: str) -> str:
    return hashlib.sha256(f"sokd-temporary-file\0{target}\0{token}".encode()).hexdigest()[:8]


def temp_target(name: str) -> str | None:
    """The file a temporary file of sokd's was to become (its name only), or None when `name`
    is not one sokd made: the name must carry the tag only sokd's writer computes."""
    match = _TEMP_NAME.match(name)
    if match is None or _temp_tag(match["target"], match["token"]) != match["tag"]:
        return None
    return match["target"]


def make_temp(path: str | os.PathLike, fix: str = OUTPUT_DIR_FIX) -> tuple[int, str]:
    """A new temporary file next to `path`, as (fd, name), created exclusively (never through an
    existing file or link); a full disk is a SokdError."""
    path = Path(path)
    for _ in range(100):
        token = secrets.token_hex(6)
        tmp = path.parent / f".{path.name}.{token}{_temp_tag(path.name, token)}.sokd.tmp"
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), str(tmp)
        except FileExistsError:
            continue
        except OSError as err:
            if is_no_space(err):
                raise no_space_error(path, None, fix) from None
            raise
    raise FileExistsError(f"no free temporary name next to '{path}'")


def default_file_mode() -> int:
    """The permissions open() gives a new file: 0o666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fix: str = OUTPUT_DIR_FIX,
                       mode: int | None = None) -> None:
    """Write `data` to a temporary file next to `path`, fsync it, then rename it over `path`.

    A file that cannot fit is refused before anything is written; a full disk met while writing
    is a SokdError too. Either way the temporary file is removed and `path` is left as it was.
    `mode`: the file's permissions (default: the temporary file's, owner-only).
    """
    path = Path(path)
    check_free_space(path, len(data), fix)
    fd, tmp = make_temp(path, fix)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            write_bytes(fd, data, path, fix)
        finally:
            os.close(fd)
        commit_file(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(buffer)` on an in-memory buffer, then write its bytes atomically to `path`
    (see atomic_write_bytes): serialisers never see the disk, so a full one is always named."""
    buffer = io.BytesIO()
    write(buffer)
    atomic_write_bytes(path, buffer.getvalue())


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


def atomic_write_text(path: str | os.PathLike, text: str, fix: str = OUTPUT_DIR_FIX,
                      mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode(), fix, mode)


def safe_load(path: str | os.PathLike) -> dict:
    """Load a checkpoint to the CPU with weights_only=True; every failure is a one-line SokdError."""
    path = Path(path)
    if not path.is_file():
        raise SokdError(f"checkpoint '{path}' not found; check the path (train the run first, or "
                        f"point to its last.pt / best.pt / student.pt)")
    obj = load_weights_only(path, "checkpoint")
    if not isinstance(obj, dict):
        raise SokdError(f"checkpoint '{path}' is not a sokd checkpoint (expected a mapping)")
    return obj


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


# ------------------------------------------------------------------------- loading states
def state_mismatch(module: nn.Module, state: dict) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """(missing keys, unexpected keys, [(key, file shape, model shape)]) of loading `state` into
    `module`: what a strict loader reports before `load_state_dict` raises its own, longer error."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
              if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    return missing, unexpected, shapes


def does_not_fit(what: str, module: nn.Module, state: dict, shapes_only: bool = False) -> SokdError | None:
    """The one report for "this file does not fit this network" (None when it fits): `what` (e.g.
    "teacher.checkpoint 'x.pt'") and the tensors that differ. `shapes_only`: names are checked
    elsewhere (a loader that maps another layout's names)."""
    missing, unexpected, mismatched = state_mismatch(module, state)
    if shapes_only:
        missing, unexpected = [], []
    if not (missing or unexpected or mismatched):
        return None
    parts = []
    if mismatched:
        shown = ", ".join(f"{k} (file {f}, model {m})" for k, f, m in mismatched[:3])
        parts.append(f"shape mismatch: {shown}" + (" ..." if len(mismatched) > 3 else ""))
    if missing:
        parts.append(f"missing: {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
    if unexpected:
        parts.append(f"unexpected: {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
    return SokdError(f"{what} does not fit this network ({'; '.join(parts)}); a classifier mismatch means "
                     f"another number of classes, a first-layer mismatch other input channels: use it with "
                     f"the architecture and data it was trained for")


def load_state_strict(module: nn.Module, state: dict, what: str) -> None:
    """load_state_dict that names missing, unexpected and mis-shaped tensors in one line."""
    error = does_not_fit(what, module, state)
    if error is not None:
        raise error
    module.load_state_dict(state)


# ---------------------------------------------------------------------------- who wrote it
def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one we may not signal counts as alive): a lock
    or temporary file whose writer is gone may be taken over or removed."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
