"""Checkpoints that survive crashes and refuse to run code.

Writes are serialised in memory first, checked against the free space of the target's file
system, written to a temporary file in the same directory, flushed and fsynced, then renamed over
the target, so a crash leaves either the old file or the new one, and a full disk is a one-line
SokdError that leaves no temporary file behind. Loads use
`torch.load(weights_only=True)`: a pickle crafted to execute code is refused.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import IO, Any, Callable

import torch
from torch import nn

from ..errors import SokdError
from ..safeload import load_weights_only
from ..models.common import state_mismatch


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


def non_finite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of `state` holding NaN or infinity (one host sync)."""
    named = [(k, v) for k, v in state.items()
             if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())]
    if not named:
        return []
    ok = torch.stack([torch.isfinite(v).all() for _, v in named]).cpu().tolist()
    return [k for (k, _), good in zip(named, ok) if not good]


def check_finite(state: dict, path: str | os.PathLike) -> None:
    """SokdError when weights or buffers of `state` are NaN or infinite: they score and export
    as if they were a model, so they are refused before either."""
    bad = non_finite_tensors(state)
    if bad:
        earlier = "an older backup" if Path(path).name == "best.pt" else "best.pt"
        raise SokdError(f"checkpoint '{path}' holds non-finite weights ({len(bad)} tensor"
                        f"{'s' if len(bad) != 1 else ''}, e.g. {bad[0]}); use an earlier checkpoint "
                        f"such as {earlier}")


def load_state_strict(module: nn.Module, state: dict, what: str) -> None:
    """load_state_dict that names missing, unexpected and mis-shaped tensors in one line."""
    missing, unexpected, mismatched = state_mismatch(module, state)
    shapes = [f"{k} {file_shape} vs {model_shape}" for k, file_shape, model_shape in mismatched]
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
