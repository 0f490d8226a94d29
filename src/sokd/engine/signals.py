"""SIGINT/SIGTERM -> finish the current step, checkpoint, exit with a resume hint."""
from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager recording the first SIGINT/SIGTERM instead of dying mid-step."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.signum is not None:  # second signal: give up waiting
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    @property
    def requested(self) -> bool:
        return self.signum is not None


class Interrupted(Exception):
    """Raised after the checkpoint of an interrupted run has been written."""

    def __init__(self, signum: int, epoch: int, step: int, run_dir):
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped at epoch {epoch + 1} step {step} and saved "
                         f"{run_dir}/last.pt; resume with the same command plus output.resume=true")
        self.exit_code = 128 + signum
