"""The speed settings a run resolves once: precision, memory layout, compile.

Each of `train.precision`, `train.channels_last` and `train.compile` may be `auto` (the default
of every config), and then this module decides, from the device and the run's length alone,
never from a timing taken at run time: a decision taken from a clock would make the same config
and seed give different numbers on a busy and on a quiet machine. The run's first line says what
was chosen and why (`Settings.line`), and the resolved values go into the summary and every
checkpoint, so a resumed run keeps the numerics it started with (`resolve(..., recorded=...)`).

The rules and the measurements behind them (docs/training-step.md, "Defaults"):

- precision: bf16 where the device computes it natively (Ampere+ GPUs, CPUs with AMX or
  AVX-512 BF16), else fp32; a CPU that emulates bf16 runs a WRN step about 10x slower in it.
- channels_last: on. Convolutions in NHWC are faster on GPUs' tensor cores and on oneDNN CPUs
  (2-core AVX-512 BF16 EPYC, a vanilla step at batch 128 timed in rounds,
  `benchmarks/layout_precision.py`: 1.35-1.87x fp32 NCHW for resnet20, resnet8x4, wrn_16_1 and
  wrn_40_1; bf16 channels_last 1.36-2.40x fp32 channels_last on the same networks).
- compile: on when the run is long enough to repay compiling its step (`COMPILE_AFTER_STEPS`
  per device kind: compiling a CIFAR step costs about 1 minute on a GPU and 3-5 minutes on a
  2-core CPU, and saves 10-40% of every step after), and the device can compile (a C++ compiler
  on the CPU); otherwise eager, with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SokdError
from .compiled import check_setting
from .precision import native_bf16

#: steps (epochs x steps per epoch) from which `train.compile: auto` compiles, per device kind
COMPILE_AFTER_STEPS = {"cuda": 5_000, "cpu": 20_000}


@dataclass(frozen=True)
class Settings:
    """The resolved speed settings of one run, each with the reason it was chosen."""

    precision: str
    channels_last: bool
    compile: bool | str
    reasons: tuple[tuple[str, str], ...] = ()   # (setting as shown, why)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def record(self) -> dict:
        """What a checkpoint keeps so a resumed run resolves `auto` to the same values."""
        return {"precision": self.precision, "channels_last": self.channels_last}

    def line(self, device: torch.device, extra: tuple[str, ...] = ()) -> str:
        """One line: device, then each setting and why it was chosen (the run's first line)."""
        threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
        parts = [f"{shown} ({why})" if why else shown for shown, why in self.reasons]
        return f"run on {device}{threads}: " + ", ".join(parts + list(extra))


def _precision(asked: str, device: torch.device, recorded: dict | None) -> tuple[str, str]:
    if asked != "auto":
        return asked, "set"
    if recorded and recorded.get("precision"):
        return recorded["precision"], "auto, as when the run began"
    if native_bf16(device):
        return "bf16", f"auto: this {device.type.upper() if device.type == 'cuda' else 'CPU'} computes bf16 natively"
    why = "this CPU has no AMX or AVX-512 BF16" if device.type == "cpu" else "this GPU has no bf16"
    return "fp32", f"auto: {why}"


def _channels_last(asked, recorded: dict | None) -> tuple[bool, str]:
    if asked != "auto":
        return bool(asked), "set"
    if recorded and "channels_last" in recorded:
        return bool(recorded["channels_last"]), "auto, as when the run began"
    return True, "auto: faster convolutions"


def _compile(asked, device: torch.device, steps: int) -> tuple[bool | str, str]:
    if asked != "auto":
        return asked, "set"
    threshold = COMPILE_AFTER_STEPS.get(device.type)
    if threshold is None or steps < threshold:
        return False, f"auto: {steps} steps < {threshold} on {device.type}, too short to repay compiling"
    try:
        check_setting(True, device)
    except SokdError:
        return False, "auto: no C++ compiler for inductor on this CPU"
    return True, f"auto: {steps} steps >= {threshold} on {device.type}"


def resolve(train, device: torch.device, steps: int, recorded: dict | None = None) -> Settings:
    """`train`'s precision, channels_last and compile with `auto` resolved for this device and a
    run of `steps` optimizer steps; `recorded`: the settings a resumed run's checkpoint holds."""
    precision, p_why = _precision(train.precision, device, recorded)
    channels_last, c_why = _channels_last(train.channels_last, recorded)
    compiled, k_why = _compile(train.compile, device, steps)
    shown_compile = "compiled" if compiled is True else (f"compiled ({compiled})" if compiled else "eager")
    reasons = ((precision, p_why), ("channels_last" if channels_last else "NCHW", c_why),
               (shown_compile, k_why))
    return Settings(precision, channels_last, compiled, reasons)
