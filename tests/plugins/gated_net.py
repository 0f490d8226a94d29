"""`gated_resnet8`: resnet8 with an identity module in front that can pause or fail a run.

Tests use it to act at an exact training step instead of guessing with sleeps: with
SOKD_TEST_GATE="train:K" (or "eval:K") the K-th forward in that mode touches
`$SOKD_TEST_GATE_DIR/reached` and waits until `$SOKD_TEST_GATE_DIR/go` exists;
SOKD_TEST_GATE="aftertrain:K" waits at the first evaluation forward after K training
forwards; SOKD_TEST_GATE="fail:K" raises at the K-th training forward; SOKD_TEST_GATE="nan:K" makes
the K-th and every later training forward non-finite (a blow-up at a known step). Without the variable it is
exactly resnet8 (the gate has no parameters and changes nothing).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn

import sokd


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
                folder = Path(os.environ["SOKD_TEST_GATE_DIR"])
                (folder / "reached").touch()
                deadline = time.time() + 300
                while not (folder / "go").exists() and time.time() < deadline:
                    time.sleep(0.01)
        return x


@sokd.models.register("gated_resnet8", overwrite=True)
def gated_resnet8(num_classes: int, in_channels: int = 3) -> sokd.models.StagedNet:
    net = sokd.models.create("resnet8", num_classes=num_classes, in_channels=in_channels)
    return sokd.models.adapt(stem=nn.Sequential(Gate(), net.stem), stages=list(net.stages), head=net.head)
