"""SIGINT/SIGTERM: finish the current step, checkpoint, exit with a true one-line message.

Every moment a signal can arrive has its own outcome:

* during training (first signal): the loop finishes the step, writes `last.pt` and raises
  `Interrupted` (exit 128 + signal, with the resume command);
* a second signal before that checkpoint is written: stop at once, naming the last checkpoint
  that is on disk (atomic writes guarantee it is whole). A command-line process ends right in
  the handler (one line on stderr, `os._exit`): an exception raised from a signal handler can
  land in a finalizer, which prints a traceback and swallows it, or in the middle of a write
  whose clean-up then loses the message. What a killed process leaves (a temporary file, a run
  before its first checkpoint) the next `sokd train` puts right. Library callers get the
  `ForcedStop` exception instead;
* after the last epoch, while the run's final files are written: the signal is recorded, the run
  completes, and the command says so (`late_signal()`);
* outside training (a command that has not started training, or another command): `Stopped`.

`process_guard()` installs one handler for the life of a CLI process, so no signal ever finds
the default handler between the end of training and the process exit. Library callers of `fit`
without the guard get the same behaviour while `fit` runs, and their own handlers back after.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_active: "StopRequest | None" = None
_guarded = False
_late: int | None = None
_finished = False   # a run finished in this process: later signals are only reported
_exit_at_once = False   # a command-line process: a second signal ends it inside the handler


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def position(epoch: int, step: int) -> str:
    """Where a checkpoint stands: `epoch` epochs done, plus `step` steps of the next one."""
    return f"epoch {epoch}" if step == 0 else f"epoch {epoch + 1} step {step}"


class Stopped(Exception):
    """A signal outside training: nothing was in progress that needed saving."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {_name(signum)}")
        self.exit_code = 128 + signum


def forced_stop_message(signum: int, saved: str) -> str:
    if saved.startswith("last.pt"):
        then = "; resume with the same command plus output.resume=true"
    else:
        then = "; the same command starts the run again"
    return f"second {_name(signum)}: stopped at once without saving the current step; {saved}{then}"


class ForcedStop(Exception):
    """A second signal: stop at once without writing another checkpoint."""

    def __init__(self, signum: int, saved: str):
        super().__init__(forced_stop_message(signum, saved))
        self.exit_code = 128 + signum


def _exit_with(signum: int, line: str) -> None:
    """End the process from inside the signal handler, saying `line` on stderr."""
    import os
    import sys
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - the handler may have interrupted a write to stdout itself
        pass
    os.write(2, f"sokd: {line}\n".encode())
    os._exit(128 + signum)


class Interrupted(Exception):
    """Raised after the checkpoint of an interrupted run has been written."""

    def __init__(self, signum: int, epoch: int, step: int, run_dir):
        where = f"at the end of epoch {epoch}" if step == 0 else f"at {position(epoch, step)}"
        super().__init__(f"{_name(signum)} received: stopped {where} and saved {run_dir}/last.pt; "
                         f"resume with the same command plus output.resume=true")
        self.exit_code = 128 + signum


class StopRequest:
    """Records the first SIGINT/SIGTERM of a training run instead of dying mid-step."""

    def __init__(self):
        self.signum: int | None = None
        self.finishing = False   # True once the last epoch is done: signals no longer stop the run
        self.saved = "no checkpoint had been written yet"
        self._old: dict = {}

    def handle(self, signum: int) -> None:
        global _late
        if self.finishing:
            _late = signum
            return
        if self.signum is not None:
            if _exit_at_once:
                _exit_with(signum, forced_stop_message(signum, self.saved))
            raise ForcedStop(signum, self.saved)
        self.signum = signum

    def finish(self) -> None:
        """Training is over: a signal that arrived during the last epoch's evaluation, or arrives
        from now on, is reported once the run's files are complete."""
        global _late
        self.finishing = True
        if self.signum is not None:
            _late = self.signum

    def __enter__(self):
        global _active
        _active = self
        if not _guarded and threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._old[sig] = signal.signal(sig, lambda s, f: self.handle(s))
        return self

    def __exit__(self, exc_type, exc, tb):
        global _active, _finished
        _active = None
        if self.finishing and exc_type is None:
            _finished = True
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        return False

    @property
    def requested(self) -> bool:
        return self.signum is not None


def _guard_handler(signum, frame) -> None:
    global _late
    if _active is not None:
        _active.handle(signum)
    elif _late is None and _finished:
        _late = signum
    elif _exit_at_once:  # nothing in progress needs saving; an exception could be swallowed
        _exit_with(signum, str(Stopped(signum)))
    else:
        raise Stopped(signum)


def late_signal() -> int | None:
    """A signal that arrived after training had finished (the run completed regardless)."""
    return _late


def late_message(signum: int) -> str:
    return f"{_name(signum)} received after the last epoch; the run completed and all its files are written"


@contextmanager
def process_guard(restore: bool = True):
    """One SIGINT/SIGTERM handler for the whole command (main thread only).

    A command-line process passes `restore=False`: the handler then stays until the process
    exits, so there is no moment at which a signal meets the default handler.
    """
    global _guarded, _late, _finished, _exit_at_once
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _late, _finished = None, False
    old = {sig: signal.signal(sig, _guard_handler) for sig in _SIGNALS}
    _guarded = True
    _exit_at_once = not restore
    try:
        yield
    finally:
        if restore:
            _guarded = _exit_at_once = False
            for sig, handler in old.items():
                signal.signal(sig, handler)


#: set by a process that starts `sokd` commands as its helpers (`sokd compare`) to its own pid:
#: such a command stops, as on SIGTERM, when that process dies
PARENT_ENV = "SOKD_STOP_WITH_PARENT"
_PR_SET_PDEATHSIG = 1


def stop_with_parent() -> None:
    """When PARENT_ENV names our parent, ask the kernel (Linux) for a signal when the parent dies,
    so a helper never outlives the process that runs it, and stops the way one SIGTERM stops it
    (a run saves a resumable last.pt). The kernel may send the parent-death signal more than once
    (once per exiting thread of a threaded parent), so it comes as SIGHUP, which is turned into a
    single SIGTERM. A parent that is gone already stops us at once."""
    import os
    import sys
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    import ctypes
    orphaned = []

    def once(signum, frame) -> None:
        if not orphaned:
            orphaned.append(signum)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGHUP, once)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGHUP), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):
        once(signal.SIGHUP, None)
