"""Signs of life during an epoch: a tqdm bar on a terminal, a plain line every ~30 s elsewhere.

A run whose output goes to a file or a pipe (a batch job, `nohup`, `| tee`) has no bar; without a
line of its own, a long first epoch would say nothing for many minutes.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

#: seconds between two plain progress lines
PLAIN_EVERY_S = 30.0


class PlainProgress:
    """The part of tqdm's interface the loop uses, printing `desc: step N/total (x%), postfix`
    at most every `every_s` seconds."""

    def __init__(self, total: int, initial: int, desc: str, every_s: float = PLAIN_EVERY_S, out=None):
        self.total, self.n, self.desc = total, initial, desc
        self.every_s = every_s
        self.out = out or sys.stdout
        self.postfix = ""
        self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            pct = 100.0 * self.n / self.total if self.total else 100.0
            print(f"{self.desc}: step {self.n}/{self.total} ({pct:.0f}%)"
                  + (f", {self.postfix}" if self.postfix else ""), file=self.out, flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass


def epoch_progress(total: int, initial: int, desc: str, show: bool):
    """A bar on a terminal, plain lines when stdout is not one, nothing when `show` is false."""
    if show and not sys.stdout.isatty():
        return PlainProgress(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                disable=not show)
