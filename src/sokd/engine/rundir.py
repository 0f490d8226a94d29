"""Run directory rules: one process per run, never mix two runs, never touch the user's files.

A run directory goes through three states, and `RunDirectory` keeps each promise:

* **opened** — the lock is held and every check has passed; nothing else on disk has changed.
* **begun** — `config.yaml` (and then metrics) are written. For `output.overwrite=true` the
  previous run's files are moved aside into `.sokd-replaced/`, not deleted yet. Only files sokd
  wrote are ever moved: a directory that also holds anything else is refused.
* **committed** — the first checkpoint is on disk; the set-aside run is deleted.

Every step between "opened" and "committed" is recorded first in a journal
(`.sokd-journal.json`, written atomically): which entries are being set aside, and which
entries the directory held when the run began. A failure in that window rolls back in-process;
a process killed anywhere in it leaves the journal, and the next open of the directory finishes
what the journal says: entries set aside go back (those not yet moved never left), the files
the killed run created are removed, or, when its first checkpoint is on disk, the set-aside run
is deleted. Nothing set aside is deleted before every entry was moved and the new run's
`last.pt` exists. Symbolic links at the names a run writes are refused, never written through.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path

import yaml

from .. import artifacts
from ..errors import SokdError
from ..files import atomic_write_text, pid_alive, safe_load, temp_target
from .tracking.stored import DIRNAMES as TRACKER_DIRS, is_tracker_dir

RUN_FILES = artifacts.RUN_FILES
LOCK_NAME = ".sokd.lock"
ASIDE_NAME = ".sokd-replaced"
JOURNAL_NAME = ".sokd-journal.json"
TB_DIR = "tb"
#: config entries a resumption may change; `optim.lr` / `optim.lr_per_role` re-base the schedule
RESUMABLE_CHANGES = ("output", "train.epochs", "train.device", "train.threads", "train.compile",
                     "train.sync_every", "data.eval_batch_size", "data.num_workers", "optim.lr",
                     "optim.lr_per_role")


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
def _is_tb_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and all(
        p.is_file() and p.name.startswith("events.out.tfevents.") for p in path.iterdir())


def is_sokd_entry(path: Path) -> bool:
    """True for an entry of a run directory that sokd wrote (and so may replace or remove)."""
    name = path.name
    if path.is_symlink():
        return False
    if name in RUN_FILES or name in (LOCK_NAME, JOURNAL_NAME):
        return path.is_file()
    if name == ASIDE_NAME:
        return path.is_dir()
    if name == TB_DIR:
        return _is_tb_dir(path)
    if name in TRACKER_DIRS:
        return is_tracker_dir(path)
    if temp_target(name) is not None:
        return path.is_file()
    if name.endswith((".pt", ".onnx")):
        return path.is_file() and artifacts.is_sokd_file(path)
    if name.endswith("_hf"):
        return path.is_dir() and (path / artifacts.NATIVE_MARK).is_file()
    return False


def _holds_run(run_dir: Path) -> bool:
    return any(os.path.lexists(run_dir / f) for f in RUN_FILES)


def _link_error(path: Path) -> SokdError:
    return SokdError(f"'{path}' is a symbolic link; sokd never writes through or replaces a link it did "
                     f"not make: remove the link (keep its target) or choose another output.dir")


def _check_run_files_are_files(run_dir: Path, names=RUN_FILES) -> None:
    for name in names:
        path = run_dir / name
        if path.is_symlink():
            raise _link_error(path)
        if name in RUN_FILES and path.exists() and not path.is_file():
            raise SokdError(f"'{path}' is not a regular file (a run keeps its {name} there); "
                            f"move it away or choose another output.dir")


def stale_temp_files(run_dir: Path) -> list[Path]:
    """Temporary files of sokd's writes that were killed before their rename."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if temp_target(p.name) is not None and is_sokd_entry(p))


def check_writable(run_dir: Path) -> None:
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise SokdError(f"output directory '{run_dir}' is not writable; set output.dir to a writable place")


# ------------------------------------------------------------------------------------- locking
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

    def _open(self) -> int:
        """The lock file, never through a symbolic link (its target would be truncated)."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise _link_error(self.path) from None
            raise

    def acquire(self) -> None:
        import fcntl
        for _ in range(10):
            fd = self._open()
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
            if holder.get("host") != socket.gethostname() or pid_alive(int(holder.get("pid", 0))):
                raise self._refuse(holder)
        return self._open()

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
        self._outputs: tuple[str, ...] = RUN_FILES

    # -- opened ----------------------------------------------------------------------------
    def open(self, cfg: dict, resume: bool, overwrite: bool, outputs=(), inputs: dict | None = None) -> dict | None:
        """Lock the directory and check it for this run; returns the checkpoint to resume from.

        `outputs`: names this run writes besides the run files (model files such as student.pt);
        `inputs`: {config key: path} of the files the run reads (a teacher checkpoint, weights),
        which an overwrite must not delete.
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise SokdError(f"output.dir '{path}' is a file; choose a directory")
        if resume and overwrite:
            raise SokdError("output.resume and output.overwrite are both set; choose one")
        self._outputs = tuple(dict.fromkeys((*RUN_FILES, *outputs, TB_DIR)))
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
            self._recover()
            ckpt = self._check(cfg, resume, overwrite, inputs or {})
        except BaseException:
            self.close()
            raise
        self._overwrite = overwrite and _holds_run(path)
        self.committed = ckpt is not None
        return ckpt

    def _check(self, cfg: dict, resume: bool, overwrite: bool, inputs: dict) -> dict | None:
        path = self.path
        _check_run_files_are_files(path, self._outputs)
        if overwrite:
            self._check_inputs_survive(inputs)
        if resume:
            last = path / artifacts.LAST
            if not last.exists():
                if _holds_run(path):
                    raise SokdError(f"'{path}' has no last.pt to resume from; use output.overwrite=true "
                                    f"to start again")
                self._check_no_collision()
                return None
            self._check_outputs_are_sokds()
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
                then, now = _value_at(old, diff), _value_at(cfg, diff)
                was = (f" ({diff}={yaml.safe_dump(then, default_flow_style=True).strip().removesuffix('...').strip()}"
                       f" when the run began, {yaml.safe_dump(now, default_flow_style=True).strip().removesuffix('...').strip()}"
                       f" now)") if not isinstance(then, dict) and not isinstance(now, dict) else ""
                raise SokdError(f"cannot resume '{path}': config differs at '{diff}'{was}; only "
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
        else:
            self._check_no_collision()
        return None

    def _check_no_collision(self) -> None:
        """A new run writes only names that are free: a file already there (the user's own
        model.pt, say) is refused, not replaced."""
        taken = [n for n in self._outputs if os.path.lexists(self.path / n)]
        if taken:
            shown = ", ".join(f"'{n}'" for n in taken[:5])
            raise SokdError(f"'{self.path}' already holds {shown}, which this run would write; move "
                            f"{'it' if len(taken) == 1 else 'them'} away or choose another output.dir")

    def _check_outputs_are_sokds(self) -> None:
        """A resumed run rewrites its files: each one present must be one sokd wrote."""
        foreign = [n for n in self._outputs if os.path.lexists(self.path / n)
                   and not is_sokd_entry(self.path / n)]
        if foreign:
            raise SokdError(f"'{self.path / foreign[0]}' was not written by sokd, and resuming would "
                            f"replace it; move it away first")

    def _check_inputs_survive(self, inputs: dict) -> None:
        """output.overwrite=true deletes the directory's files: none of them may be a file this
        run reads."""
        root = self.path.resolve()
        for key, file in inputs.items():
            where = Path(file).expanduser().resolve()
            if where == root or root in where.parents:
                raise SokdError(f"output.overwrite=true would delete '{file}', which this run reads as "
                                f"{key}; copy it out of '{self.path}' or choose another output.dir")

    # -- the journal of the steps between opened and committed ----------------------------
    @property
    def _journal_path(self) -> Path:
        return self.path / JOURNAL_NAME

    @property
    def _aside_path(self) -> Path:
        return self.path / ASIDE_NAME

    def _write_journal(self, **entry) -> None:
        atomic_write_text(self._journal_path, json.dumps(entry) + "\n")

    def _read_journal(self) -> dict | None:
        path = self._journal_path
        if path.is_symlink():
            raise _link_error(path)
        if not path.exists():
            return None
        try:
            journal = json.loads(path.read_text())
            if journal.get("phase") not in ("aside", "begun"):
                raise ValueError(journal.get("phase"))
        except (OSError, ValueError, AttributeError):
            raise SokdError(f"'{path}' is not a journal sokd can read, so the interrupted run in "
                            f"'{self.path}' cannot be put right automatically; check the directory "
                            f"(a replaced run's files are in '{self._aside_path}') and delete the journal") from None
        return journal

    def _recover(self) -> None:
        """Finish what a killed run's journal says (see module doc); no journal: nothing to do."""
        journal = self._read_journal()
        aside = self._aside_path
        if journal is None:
            if aside.is_dir() and not aside.is_symlink():
                if any(aside.iterdir()):
                    raise SokdError(f"'{aside}' holds a replaced run but no journal says how it got there; "
                                    f"move its files back into '{self.path}' (or delete it) and retry")
                aside.rmdir()
            return
        if journal["phase"] == "begun" and (self.path / artifacts.LAST).is_file():
            self._drop_aside()  # the killed run wrote its first checkpoint: it stands
        else:
            self._undo(set(journal.get("before", [])) if journal["phase"] == "begun" else None)
            self.created_dir = self.created_dir or bool(journal.get("created_dir"))
            print(f"note: '{self.path}' held a run killed before its first checkpoint; the directory is "
                  f"back as it was before that run", flush=True)
        self._journal_path.unlink()

    def _undo(self, before: set[str] | None) -> None:
        """Remove what a run created after `before` (None: it created nothing yet), then move the
        set-aside run back."""
        if before is not None:
            for entry in list(self.path.iterdir()):
                if entry.name not in before | {ASIDE_NAME, LOCK_NAME, JOURNAL_NAME} and is_sokd_entry(entry):
                    _remove(entry)
        aside = self._aside_path
        if not aside.is_dir() or aside.is_symlink():
            return
        for entry in sorted(aside.iterdir()):
            target = self.path / entry.name
            if os.path.lexists(target):
                if not is_sokd_entry(target):
                    raise SokdError(f"cannot put '{entry}' back: '{target}' exists and sokd did not write "
                                    f"it; move one of them and retry")
                _remove(target)
            os.replace(entry, target)
        aside.rmdir()

    def _drop_aside(self) -> None:
        """Delete the set-aside run (only once the new run's first checkpoint is on disk)."""
        aside = self._aside_path
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)

    # -- begun -----------------------------------------------------------------------------
    def begin(self, cfg: dict) -> None:
        """The run's first writes: set the old run aside (overwrite), clean temp files, config.yaml.
        Each step is in the journal before it is taken (see module doc)."""
        for tmp in stale_temp_files(self.path):
            tmp.unlink()
        aside: list[str] = []
        if self._overwrite:
            aside = sorted(p.name for p in self.path.iterdir()
                           if p.name not in (ASIDE_NAME, LOCK_NAME, JOURNAL_NAME))
            self._write_journal(phase="aside", created_dir=self.created_dir)
            self._aside_path.mkdir()
            for name in aside:
                os.replace(self.path / name, self._aside_path / name)
        self._before = {p.name for p in self.path.iterdir()} - {ASIDE_NAME, LOCK_NAME, JOURNAL_NAME}
        if not self.committed:
            self._write_journal(phase="begun", before=sorted(self._before), created_dir=self.created_dir)
        self.begun = True
        atomic_write_text(self.path / artifacts.CONFIG, yaml.safe_dump(cfg, sort_keys=False))

    # -- committed -------------------------------------------------------------------------
    def commit(self) -> None:
        """The first checkpoint is written: the run stands, the set-aside run goes."""
        if self.committed:
            return
        self.committed = True
        self._drop_aside()
        self._journal_path.unlink(missing_ok=True)

    def rollback(self) -> None:
        """Leave the directory as it was before this run (only before the first checkpoint)."""
        if self.committed or not self.begun:
            return
        self._undo(self._before)
        self._journal_path.unlink(missing_ok=True)

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


def _value_at(tree, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _first_difference(a, b, prefix="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return prefix.rstrip(".") or "(root)"
