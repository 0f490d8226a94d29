"""Device, numeric precision and memory format: decided once, used by every method."""
from __future__ import annotations

import contextlib

import torch

from ..errors import SokdError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SokdError(f"train.device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SokdError("train.device asks for CUDA but no GPU is visible; use train.device=auto or cpu")
    return dev


def native_bf16(device: torch.device) -> bool:
    """Whether this device computes bf16 in hardware. CPUs without AVX-512 BF16 or AMX emulate
    it, which makes a bf16 convolution several times slower than fp32 instead of faster."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 where the hardware has it (AMX / AVX-512 BF16 CPUs, Ampere+ GPUs), else fp32."""
    if name != "auto":
        return name
    return "bf16" if native_bf16(device) else "fp32"


def emulation_note(name: str, device: torch.device) -> str | None:
    """A one-line note when bf16 is asked for by name on a CPU that emulates it (there a WRN step
    runs about 10x slower than in fp32), else None. The run goes on: the numbers stay valid."""
    if name == "bf16" and device.type == "cpu" and not native_bf16(device):
        return ("note: train.precision=bf16 on a CPU without AMX or AVX-512 BF16: bf16 is emulated here and "
                "much slower than fp32; train.precision=auto picks fp32 on this machine")
    return None


def autocast(device: torch.device, precision: str):
    """Autocast context for bf16/fp16; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler for fp16 (disabled otherwise; bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def configure_cuda(device: torch.device, tf32: bool, cudnn_benchmark: bool) -> None:
    """The process-wide CUDA switches of `train.tf32` and `train.cudnn_benchmark`; nothing on
    other devices. TF32 runs fp32 matmuls and convolutions on tensor cores with a 10-bit
    mantissa (bf16/fp16 autocast regions are unaffected). cuDNN benchmarking times the
    convolution algorithms for each new input shape once and keeps the fastest: the training
    shapes are fixed (`data.drop_last`), so only the first steps and the first evaluation pay."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
