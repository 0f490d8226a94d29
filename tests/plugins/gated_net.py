"""`gated_resnet8`: resnet8 with an identity module in front that can pause or fail a run.

Tests use it to act at an exact training step instead of guessing with sleeps: with
SOKD_TEST_GATE="train:K" (or "eval:K") the K-th forward in that mode touches
`$SOKD_TEST_GATE_DIR/reached` and waits until `$SOKD_TEST_GATE_DIR/go` exists;
SOKD_TEST_GATE="aftertrain:K" waits at the first evaluation forward after K training
forwards; SOKD_TEST_GATE="fail:K" raises at the K-th training forward; SOKD_TEST_GATE="nan:K" makes
the K-th and every later training forward non-finite (a blow-up at a known step). Without the variable it is
exactly resnet8 (the gate has no parameters and changes nothing).

While paused, the gate acknowledges a SIGINT/SIGTERM: once the process's signal handling has
recorded it (the run's active `StopRequest` has its `signum`, or a signal after the last epoch
was recorded as late) it touches `$SOKD_TEST_GATE_DIR/signalled`, so a test waits for that file
(`GatedRun.wait_signalled`) instead of sleeping before its next action. Python runs signal
handlers in the main thread, which is the thread waiting here, so the file appears only after
the handler has finished. A gate never released fails the run after 300 s (a test that forgot
to release it), it never goes on by itself.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn

import sokd

RELEASE_TIMEOUT_S = 300


def signal_taken() -> bool:
    """Whether this process has taken in a SIGINT/SIGTERM: the active run's stop request is set,
    or a signal was recorded after the last epoch (`sokd.engine.signals`)."""
    from sokd.engine import signals
    active = getattr(signals, "_active", None)
    return ((active is not None and getattr(active, "signum", None) is not None)
            or getattr(signals, "_late", None) is not None)


def wait_for_release(folder: Path, where: str) -> None:
    (folder / "reached").touch()
    acknowledged = False
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while not (folder / "go").exists():
        if not acknowledged and signal_taken():
            (folder / "signalled").touch()
            acknowledged = True
        if time.monotonic() > deadline:
            raise RuntimeError(f"test gate at {where} was never released ({folder / 'go'} missing)")
        time.sleep(0.01)


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = {"train": 0, "eval": 0}

    def forward(self, x):
        spec = os.environ.get("SOKD_TEST_GATE")
        if spec:
            mode = "train" if self.training else "eval"
            self.calls[mode] += 1
            kind, at = spec.split(":")
            if kind == "fail" and mode == "train" and self.calls["train"] == int(at):
                raise RuntimeError("injected failure")
            if kind == "nan" and mode == "train" and self.calls["train"] >= int(at):
                return x * float("nan")
            after = kind == "aftertrain" and mode == "eval" and self.calls["train"] == int(at)
            if after:
                kind, at = "eval", self.calls["eval"]
            if kind == mode and self.calls[mode] == int(at):
                wait_for_release(Path(os.environ["SOKD_TEST_GATE_DIR"]), spec)
        return x


@sokd.models.register("gated_resnet8", overwrite=True)
def gated_resnet8(num_classes: int, in_channels: int = 3) -> sokd.models.StagedNet:
    net = sokd.models.create("resnet8", num_classes=num_classes, in_channels=in_channels)
    return sokd.models.adapt(stem=nn.Sequential(Gate(), net.stem), stages=list(net.stages), head=net.head)
