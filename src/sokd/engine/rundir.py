"""Run directory rules: one process per run, never mix two runs, never touch the user's files.

A run directory goes through three states, and `RunDirectory` keeps each promise:

* **opened** — the lock is held and every check has passed; nothing else on disk has changed.
* **begun** — `config.yaml` (and then metrics) are written. For `output.overwrite=true` the
  previous run's files are moved aside into `.sokd-replaced/`, not deleted yet. Only files sokd
  wrote are ever moved: a directory that also holds anything else is refused.
* **committed** — the first checkpoint is on disk; the set-aside run is deleted.

A failure between "opened" and "committed" rolls back: the files this run created are removed,
the set-aside run is moved back, and a directory this run created is removed, so the corrected
command can simply be run again. A process killed in that window leaves `.sokd-replaced/`
behind; the next open restores it.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
import socket
import time
import zipfile
from pathlib import Path

import yaml

from .. import artifacts
from ..errors import SokdError
from .checkpoint import atomic_write_text, safe_load
from .tracking.stored import DIRNAMES as TRACKER_DIRS, is_tracker_dir

RUN_FILES = ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "summary.json")
LOCK_NAME = ".sokd.lock"
ASIDE_NAME = ".sokd-replaced"
TB_DIR = "tb"
#: config entries a resumption may change; `optim.lr` / `optim.lr_per_role` re-base the schedule
RESUMABLE_CHANGES = ("output", "train.epochs", "train.device", "train.threads", "train.compile",
                     "train.sync_every", "data.eval_batch_size", "optim.lr", "optim.lr_per_role")
_TMP = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")  # atomic_write's temporary files


def _strip(cfg: dict) -> dict:
    """The config without the entries a resumption may change (RESUMABLE_CHANGES)."""
    cfg = copy.deepcopy(cfg)
    for path in RESUMABLE_CHANGES:
        *parents, leaf = path.split(".")
        node = cfg
        for key in parents:
            node = node.get(key, {})
        node.pop(leaf, None)
    return cfg


# ---------------------------------------------------------------------------- what sokd wrote
def _is_sokd_pt(path: Path) -> bool:
    """A checkpoint/model file sokd wrote (format recorded inside), or a TorchScript export."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    if any(n.endswith("/extra/sokd.json") for n in names):
        return True
    try:
        import torch
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is simply not recognised as ours
        return False
    return isinstance(obj, dict) and artifacts.kind(obj) is not None


def _is_sokd_onnx(path: Path) -> bool:
    """An ONNX export carries its `sokd.json` metadata (a plain string near the end of the file)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - (1 << 20)))
            return b'"format": "sokd-export"' in f.read()
    except OSError:
        return False


def _is_tb_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and all(
        p.is_file() and p.name.startswith("events.out.tfevents.") for p in path.iterdir())


def is_sokd_entry(path: Path) -> bool:
    """True for an entry of a run directory that sokd wrote (and so may replace or remove)."""
    name = path.name
    if path.is_symlink():
        return False
    if name in RUN_FILES or name == LOCK_NAME:
        return path.is_file()
    if name == ASIDE_NAME:
        return path.is_dir()
    if name == TB_DIR:
        return _is_tb_dir(path)
    if name in TRACKER_DIRS:
        return is_tracker_dir(path)
    tmp = _TMP.match(name)
    if tmp:
        target = tmp.group("target")
        return path.is_file() and (target in RUN_FILES or target.endswith((".pt", ".onnx", ".jsonl", ".json")))
    if name.endswith(".pt"):
        return path.is_file() and _is_sokd_pt(path)
    if name.endswith(".onnx"):
        return path.is_file() and _is_sokd_onnx(path)
    return False


def _holds_run(run_dir: Path) -> bool:
    return any((run_dir / f).exists() for f in RUN_FILES)


def _check_run_files_are_files(run_dir: Path) -> None:
    for name in RUN_FILES:
        path = run_dir / name
        if path.exists() and not path.is_file():
            raise SokdError(f"'{path}' is not a regular file (a run keeps its {name} there); "
                            f"move it away or choose another output.dir")


def stale_temp_files(run_dir: Path) -> list[Path]:
    """Temporary files of writes that were killed before their rename."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if _TMP.match(p.name) and is_sokd_entry(p))


def check_writable(run_dir: Path) -> None:
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise SokdError(f"output directory '{run_dir}' is not writable; set output.dir to a writable place")


# ------------------------------------------------------------------------------------- locking
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive, crash-safe lock on a run directory (`.sokd.lock`).

    `flock` on the lock file is released by the kernel however the process ends, so a lock left
    by a crash is never mistaken for a live one. The file records pid, host and start time to
    name the holder. Where the file system has no flock, the pid is checked on the same host.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict) -> SokdError:
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        since = holder.get("started")
        return SokdError(f"run directory '{self.path.parent}' is in use by {who}"
                         f"{f' since {since}' if since else ''}; wait for that run to finish or stop it, "
                         f"or choose another output.dir (if no such process exists, delete '{self.path}')")

    def acquire(self) -> None:
        import fcntl
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    raise self._refuse(self._holder()) from None
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    fd = self._acquire_by_pid()
                    break
                raise
            # the file may have been unlinked by its previous holder between our open and flock
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise SokdError(f"could not lock '{self.path}' (it keeps changing); retry")
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd

    def _acquire_by_pid(self) -> int:
        holder = self._holder()
        if holder and holder.get("pid") != os.getpid():
            if holder.get("host") != socket.gethostname() or _pid_alive(int(holder.get("pid", 0))):
                raise self._refuse(holder)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # still holding the flock: a waiting opener re-checks the inode
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


# ------------------------------------------------------------------------------ the directory
class RunDirectory:
    """Lock, checks, first writes and rollback of one run's output directory (see module doc)."""

    def __init__(self, path: Path, default_of=None):
        """`default_of(entry path)`: a config entry's default (see `with_added_defaults`)."""
        self.path = Path(path)
        self.default_of = default_of
        self.lock = RunLock(self.path)
        self.created_dir = False
        self.committed = False
        self.begun = False
        self._overwrite = False
        self._before: set[str] = set()   # entries present when this run began (never removed)
        self._aside: Path | None = None

    # -- opened ----------------------------------------------------------------------------
    def open(self, cfg: dict, resume: bool, overwrite: bool) -> dict | None:
        """Lock the directory and check it for this run; returns the checkpoint to resume from."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise SokdError(f"output.dir '{path}' is a file; choose a directory")
        if resume and overwrite:
            raise SokdError("output.resume and output.overwrite are both set; choose one")
        if not path.exists():
            try:
                path.mkdir(parents=True)
            except OSError as err:
                raise SokdError(f"cannot create output directory '{path}' ({err.strerror}); "
                                f"set output.dir to a writable place") from None
            self.created_dir = True
        try:
            check_writable(path)
            self.lock.acquire()
            self._restore_interrupted_overwrite()
            ckpt = self._check(cfg, resume, overwrite)
        except BaseException:
            self.close()
            raise
        self._overwrite = overwrite and _holds_run(path)
        self.committed = ckpt is not None
        return ckpt

    def _check(self, cfg: dict, resume: bool, overwrite: bool) -> dict | None:
        path = self.path
        _check_run_files_are_files(path)
        if resume:
            last = path / "last.pt"
            if not last.exists():
                if _holds_run(path):
                    raise SokdError(f"'{path}' has no last.pt to resume from; use output.overwrite=true "
                                    f"to start again")
                return None
            ckpt = safe_load(last)
            if artifacts.kind(ckpt) != artifacts.RUN_FORMAT:
                raise SokdError(f"'{last}' is not a run checkpoint (format {ckpt.get('format')!r}); put the "
                                f"run's own last.pt back, or use output.overwrite=true to start again")
            old = ckpt.get("config")
            if not isinstance(old, dict):
                raise SokdError(f"'{last}' has no config; it is not a sokd run checkpoint")
            old = with_added_defaults(old, cfg, self.default_of)
            if _strip(old) != _strip(cfg):
                diff = _first_difference(_strip(old), _strip(cfg))
                raise SokdError(f"cannot resume '{path}': config differs at '{diff}'; only "
                                f"{', '.join(RESUMABLE_CHANGES)} may change (or use output.overwrite=true)")
            return ckpt
        if _holds_run(path) and not overwrite:
            raise SokdError(f"'{path}' already holds a run; use output.resume=true to continue it, "
                            f"output.overwrite=true to replace it, or another output.dir")
        if overwrite:
            foreign = sorted(p.name for p in path.iterdir() if not is_sokd_entry(p))
            if foreign:
                shown = ", ".join(f"'{n}'" for n in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
                raise SokdError(f"output.overwrite=true removes only files sokd wrote, but '{path}' also holds "
                                f"{shown}; move them away or choose another output.dir")
        return None

    def _restore_interrupted_overwrite(self) -> None:
        """A run killed between overwrite and its first checkpoint: put the old run back."""
        aside = self.path / ASIDE_NAME
        if not aside.is_dir():
            return
        if (self.path / "last.pt").exists() and not (aside / "last.pt").exists():
            shutil.rmtree(aside)  # killed after its first checkpoint: the new run stands
            return
        for entry in self.path.iterdir():
            if entry.name not in (ASIDE_NAME, LOCK_NAME) and is_sokd_entry(entry):
                _remove(entry)
        for entry in aside.iterdir():
            os.replace(entry, self.path / entry.name)
        aside.rmdir()

    # -- begun -----------------------------------------------------------------------------
    def begin(self, cfg: dict) -> None:
        """The run's first writes: set the old run aside (overwrite), clean temp files, config.yaml."""
        for tmp in stale_temp_files(self.path):
            tmp.unlink()
        if self._overwrite:
            aside = self.path / ASIDE_NAME
            aside.mkdir()
            self._aside = aside
            for entry in list(self.path.iterdir()):
                if entry.name not in (ASIDE_NAME, LOCK_NAME):
                    os.replace(entry, aside / entry.name)
        self._before = {p.name for p in self.path.iterdir()}
        self.begun = True
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))

    # -- committed -------------------------------------------------------------------------
    def commit(self) -> None:
        """The first checkpoint is written: the run stands, the set-aside run goes."""
        if self.committed:
            return
        self.committed = True
        if self._aside is not None:
            shutil.rmtree(self._aside)
            self._aside = None

    def rollback(self) -> None:
        """Leave the directory as it was before this run (only before the first checkpoint)."""
        if self.committed or not self.begun:
            return
        for entry in list(self.path.iterdir()):
            if entry.name not in self._before | {ASIDE_NAME, LOCK_NAME} and is_sokd_entry(entry):
                _remove(entry)
        if self._aside is not None:
            for entry in self._aside.iterdir():
                os.replace(entry, self.path / entry.name)
            self._aside.rmdir()
            self._aside = None

    def close(self) -> None:
        self.lock.release()
        if self.created_dir and not self.committed and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()


def _remove(entry: Path) -> None:
    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def with_added_defaults(old: dict, new: dict, default_of, path: tuple = ()) -> dict:
    """`old` plus each entry only `new` has whose value is its default (`default_of(path)`):
    entries a newer sokd added, which an older run used implicitly. Any other difference stays."""
    filled = dict(old)
    for key, value in new.items():
        here = (*path, key)
        if key not in old:
            if default_of is not None and default_of(here) == value:
                filled[key] = value
        elif isinstance(value, dict) and isinstance(old[key], dict):
            filled[key] = with_added_defaults(old[key], value, default_of, here)
    return filled


def _first_difference(a, b, prefix="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return prefix.rstrip(".") or "(root)"
