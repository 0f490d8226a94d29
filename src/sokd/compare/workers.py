"""Running a grid: workers claim runs with lock files, so any number of them — threads of one
`sokd compare --workers N`, or `sokd compare --worker` processes on machines sharing the folder
(NFS), e.g. a SLURM job array — run every run exactly once.

This coordinates independent runs; one run spread over several machines is torchrun's job.

A claim is a file `<out>/.claims/<run>.claim` holding the host, the worker's pid and its
training process's pid. It is written beside its place and hard-linked into it, so it appears
whole or not at all and never over another claim (a link is exclusive, also on NFS); a claim
whose text cannot be read yet counts as held until it is stale. The holder touches it every
HEARTBEAT_S seconds while the run trains. A claim is stale when its host is this one and neither
pid is alive, or when its host is another and it has not been touched for STALE_S seconds. A
stale claim is replaced under the run's takeover lock by one taker alone, and the run resumes
from its last.pt. A finished run (summary.json) is never run again. A failed run leaves
`<run>.failed` with its last error line; the next `sokd compare` retries it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from ..engine.signals import PARENT_ENV, Stopped
from ..files import atomic_write_text, pid_alive
from .spec import Grid

HEARTBEAT_S = 30.0
STALE_S = 300.0
TAKEOVER_STALE_S = 60.0
POLL_S = 5.0


def _create_whole(path: Path, text: str) -> bool:
    """Create `path` holding `text` unless it exists (then False): written beside it and
    hard-linked in, so it appears whole or not at all (a link is exclusive, also on NFS)."""
    draft = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.new")
    draft.write_text(text)
    try:
        os.link(draft, path)
        return True
    except FileExistsError:
        return False
    finally:
        draft.unlink(missing_ok=True)


class Claims:
    def __init__(self, out: Path):
        self.dir = out / ".claims"
        self.host = socket.gethostname()

    def path(self, run: str) -> Path:
        return self.dir / f"{run}.claim"

    def holder(self, run: str) -> dict | None:
        """The live claim on `run`, or None (no claim, or a stale one)."""
        path = self.path(run)
        try:
            age = time.time() - path.stat().st_mtime
            text = path.read_text()
        except OSError:
            return None
        try:
            info = json.loads(text)
        except ValueError:
            return {"worker": None, "unreadable": True} if age < STALE_S else None
        if info.get("host") == self.host:
            alive = any(pid_alive(p) for p in (info.get("pid"), info.get("child")) if isinstance(p, int))
            return info if alive else None
        return info if age < STALE_S else None

    def take(self, run: str, worker: str) -> bool:
        """Claim `run` for this worker; False when another live worker holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(run)
        if not path.exists():
            return self._link_claim(run, worker)
        if self.holder(run) is not None:
            return False
        # A stale claim is replaced only under the run's takeover lock, and judged stale again
        # there: two takers that both found it stale would otherwise each move aside whatever claim
        # is in its place by then, the other's fresh one included, and both run the run.
        with self._takeover_lock(run) as mine:
            if not mine:
                return False
            if path.exists() and self.holder(run) is None:
                path.unlink(missing_ok=True)
            return self._link_claim(run, worker)

    def _link_claim(self, run: str, worker: str) -> bool:
        return _create_whole(self.path(run), json.dumps({"host": self.host, "pid": os.getpid(), "worker": worker,
                                                         "since": time.time()}))

    @contextmanager
    def _takeover_lock(self, run: str):
        """Yields True while this taker alone may replace `run`'s stale claim, False when another
        is doing it. The lock lives for microseconds; one older than TAKEOVER_STALE_S was left by a
        taker that died inside it and is cleared."""
        lock = self.dir / f"{run}.takeover"
        if not _create_whole(lock, f"{self.host} {os.getpid()}"):
            try:
                if time.time() - lock.stat().st_mtime > TAKEOVER_STALE_S:
                    lock.unlink(missing_ok=True)
            except OSError:
                pass
            yield False
            return
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)

    def note_child(self, run: str, worker: str, child: int) -> None:
        atomic_write_text(self.path(run), json.dumps({"host": self.host, "pid": os.getpid(), "worker": worker,
                                                      "child": child, "since": time.time()}))

    def touch(self, run: str) -> None:
        try:
            os.utime(self.path(run))
        except OSError:
            pass

    def release(self, run: str) -> None:
        self.path(run).unlink(missing_ok=True)


def run_name(name: str, seed: int) -> str:
    return f"{name}-s{seed}"


def finished(grid: Grid, name: str, seed: int) -> bool:
    return (grid.run_dir(name, seed) / "summary.json").is_file()


def failed_note(grid: Grid, name: str, seed: int) -> Path:
    return grid.out / ".claims" / f"{run_name(name, seed)}.failed"


class Worker:
    """Takes runnable runs of `grid` one at a time until none is left for it."""

    def __init__(self, grid: Grid, label: str, threads: int | None, log=print, stop: threading.Event | None = None):
        self.grid, self.label, self.threads, self.log = grid, label, threads, log
        self.claims = Claims(grid.out)
        self.stop = stop or threading.Event()
        self.failures: list[str] = []
        self.child: subprocess.Popen | None = None   # the run training now
        self._asked: subprocess.Popen | None = None   # the run already asked to stop

    def stop_child(self, force: bool = False) -> None:
        """Ask the run training now to stop: `sokd train` finishes its step (or evaluation), saves
        a resumable last.pt and exits. It is asked once: a second signal tells `sokd train` to stop
        at once without saving, which only a second signal to the worker (`force`) may pass on."""
        child = self.child
        if child is not None and child.poll() is None and (force or self._asked is not child):
            self._asked = child
            child.terminate()

    def pick(self, tried: set) -> tuple[str, int] | None | bool:
        """A run to do now; None when everything left is held or waits on a held teacher (worth
        waiting for); False when nothing is left for this worker."""
        waiting = False
        for name, seed in self.grid.runs():
            run = run_name(name, seed)
            if finished(self.grid, name, seed) or run in tried:
                continue
            dep = self.grid.depends_on(name, seed)
            if dep and not finished(self.grid, *dep):
                if run_name(*dep) in tried:   # its teacher failed in this invocation
                    continue
                waiting = True
                continue
            if self.claims.holder(run) is not None:
                waiting = True
                continue
            if self.claims.take(run, self.label):
                if finished(self.grid, name, seed):   # its holder finished it and let go meanwhile
                    self.claims.release(run)
                    continue
                return name, seed
            waiting = True
        return None if waiting else False

    def work(self) -> None:
        tried: set = set()
        while not self.stop.is_set():
            pick = self.pick(tried)
            if pick is False:
                return
            if pick is None:
                if self._all_left_held_by_others(tried):
                    return
                self.stop.wait(POLL_S)
                continue
            name, seed = pick
            tried.add(run_name(name, seed))
            self.run(name, seed)

    def _all_left_held_by_others(self, tried: set) -> bool:
        """True when every unfinished run this worker has not tried is held by another live
        worker (nothing here will become runnable for us): a cluster worker then ends."""
        for name, seed in self.grid.runs():
            run = run_name(name, seed)
            if finished(self.grid, name, seed) or run in tried:
                continue
            holder = self.claims.holder(run)
            if holder is None or holder.get("worker") == self.label:
                dep = self.grid.depends_on(name, seed)
                if dep and not finished(self.grid, *dep) and run_name(*dep) in tried:
                    continue
                return False
        return True

    def wait_for(self, child: subprocess.Popen, run: str) -> int:
        """The exit code of `run`'s training process; meanwhile its claim is touched every
        HEARTBEAT_S, and once the worker is stopping the process is asked (once) to stop."""
        beat = time.monotonic()
        while True:
            try:
                return child.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                if time.monotonic() - beat >= HEARTBEAT_S:
                    self.claims.touch(run)
                    beat = time.monotonic()
                if self.stop.is_set():
                    self.stop_child()

    def run(self, name: str, seed: int) -> None:
        run = run_name(name, seed)
        grid = self.grid
        try:
            tree = grid.config(name, seed)
            if self.threads:
                tree["train"]["threads"] = self.threads
            cfg_path = grid.out / ".configs" / f"{run}.yaml"
            cfg_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfg_path, yaml.safe_dump(tree, sort_keys=False))
            failed_note(grid, name, seed).unlink(missing_ok=True)
            from .results import record_start
            record_start(grid, name, seed, tree)
            verb = "resume" if tree["output"]["resume"] else "run"
            self.log(f"{verb:<7}{run} ({self.label})")
            t0 = time.time()
            log_path = grid.out / ".logs" / f"{run}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as log:
                # its own session: a Ctrl-C or a scheduler's signal to the worker's group reaches
                # the run once, from the worker (a second signal would stop it without saving);
                # it stops with the worker if the worker dies (`signals.stop_with_parent`)
                child = self.child = subprocess.Popen(
                    [sys.executable, "-m", "sokd", "train", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())},
                    start_new_session=True)
                self.claims.note_child(run, self.label, child.pid)
                code = self.wait_for(child, run)
                self.child = None
            if finished(grid, name, seed):   # a stop that came after its last epoch finished it
                self.log(f"done   {run} in {time.time() - t0:.0f} s")
            elif self.stop.is_set():
                saved = (grid.run_dir(name, seed) / "last.pt").exists()
                self.log(f"stopped {run}; rerun the same command to "
                         + ("resume it" if saved else "start it (it stopped before its first checkpoint)"))
            else:
                last = _last_line(log_path)
                atomic_write_text(failed_note(grid, name, seed), last + "\n")
                self.failures.append(f"{run}: {last}")
                self.log(f"FAILED {run} (exit {code}): {last}; its log: {log_path}")
        finally:
            self.claims.release(run)


def _last_line(path: Path) -> str:
    try:
        lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


def run_workers(grid: Grid, count: int, threads: int | None, log=print) -> list[str]:
    """Run the grid with `count` workers in this process (threads); returns the failures.

    SIGINT and SIGTERM (what a scheduler sends before it kills a job) are passed on to the runs
    in progress, once, however long they take to save a resumable last.pt and exit; a second
    signal is passed on too and stops them at once, unsaved. Then `Stopped` is raised. No training
    process outlives its worker."""
    label = f"{socket.gethostname()}:{os.getpid()}"
    stop = threading.Event()
    workers = [Worker(grid, f"{label}/{i}" if count > 1 else label, threads, log, stop) for i in range(count)]
    received: list[int] = []

    def pass_on(signum, frame) -> None:
        if not received:
            log(f"{signal.Signals(signum).name} received: the runs in progress save a resumable last.pt and stop")
        received.append(signum)
        stop.set()
        for w in workers:
            w.stop_child(force=len(received) > 1)

    threads_ = [threading.Thread(target=w.work, daemon=True) for w in workers]
    with _signals_to(pass_on):
        for t in threads_:
            t.start()
        try:
            while any(t.is_alive() for t in threads_):
                for t in threads_:
                    t.join(timeout=1.0)
        except BaseException:
            if not received:
                pass_on(signal.SIGINT, None)
            for t in threads_:
                t.join()
            raise
    if received:
        raise Stopped(received[0])
    return [f for w in workers for f in w.failures]


@contextmanager
def _signals_to(handler):
    """`handler` for SIGINT and SIGTERM while the block runs (main thread only), then the old ones."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
