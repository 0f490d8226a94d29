"""Where readers look for data files, and torchvision downloads that cannot hang.

With `data.root` set, a reader looks only there; otherwise it tries its own list of default
places (the user's cache `~/.cache/sokd`, `./data`, system data set folders).
"""
from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from ..errors import SokdError

CACHE = Path("~/.cache/sokd").expanduser()


def search_roots(root: str | None, defaults: Iterable[Path | str]) -> list[Path]:
    """[root] when given, else the defaults (user-expanded, first occurrence of each kept)."""
    if root is not None:
        return [Path(root).expanduser()]
    seen, out = set(), []
    for p in defaults:
        p = Path(p).expanduser()
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


@contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def run_download(what: str, fetch: Callable[[], object], target: Path, alternatives: str) -> None:
    """Run a torchvision download with a socket timeout; any failure becomes a SokdError."""
    try:
        target.mkdir(parents=True, exist_ok=True)
        with _socket_timeout(30):
            fetch()
    except SokdError:
        raise
    except Exception as err:  # network, checksum, disk: all "could not download"
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SokdError(f"downloading {what} into '{target}' failed ({msg}); {alternatives}") from None
