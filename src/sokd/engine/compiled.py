"""`train.compile`: the method's forward, losses included, compiled as one graph.

What is compiled: the module whose forward the loop calls (the method, or its DDP wrapper), so
one graph holds every network the step runs (a frozen teacher's no-grad pass, the learners, a
KBM, feature regressors) and every loss term, and AOTAutograd derives the backward of that same
graph, so the backward is compiled too. This is the unit that knows nothing of the loop: the
same compiled forward serves every method without the engine knowing which, the losses fuse
with the logits they read (softmax, log-softmax, KL and CE become a few kernels), and the
parameters stay ordinary leaves, so the optimizer, gradient scaling and DDP's gradient
all-reduce work unchanged. Left eager: the optimizer step (foreach SGD is already a handful of
multi-tensor kernels; compiling it adds compile time for little) and the loop's statistics (a
dozen tiny ops, `stepstats`). Evaluation runs the eager method (`method.predict`): it runs once
an epoch, and compiling a second, no-grad graph would double the compile time.

Under DDP the wrapper is compiled (`torch.compile(DDP(method))`), which is what PyTorch's
DDPOptimizer expects: dynamo splits the graph at DDP's gradient-bucket boundaries so that each
bucket's all-reduce overlaps the rest of the backward. Those splits are the only graph breaks
of the built-in methods (`torch._dynamo.explain` finds none in a single process).

Steady state never recompiles: every input of the graph is a tensor of the same shape each step
(`data.drop_last` is on by default; with it off, the smaller last batch compiles once more, in
the first epoch, as a dynamic-batch graph that later epochs reuse), and what changes between
epochs (the distillation warm-up factor) is a tensor buffer of the method, not a Python number
dynamo would guard on.
"""
from __future__ import annotations

import os
import shutil

import torch

from ..errors import SokdError

#: the torch.compile backend; tests use "aot_eager" to check graph capture and guards without
#: generating code
BACKEND = "inductor"
#: train.compile -> torch.compile mode (false: not compiled)
MODES = {True: "default", "max-autotune": "max-autotune", "reduce-overhead": "reduce-overhead"}


def check_setting(setting, device: torch.device, key: str = "train.compile") -> None:
    """SokdError for a compile setting this device cannot run: reduce-overhead captures the
    step as CUDA graphs (replayed with one launch; the shapes are static), which exist on CUDA only;
    inductor on the CPU needs a C++ compiler (`check_cpp_compiler`)."""
    if setting is False or setting is None:
        return
    if setting == "reduce-overhead" and device.type != "cuda":
        raise SokdError(f"{key}=reduce-overhead captures CUDA graphs, which need a GPU; on "
                        f"{device.type} use {key}=true (or max-autotune)")
    if BACKEND == "inductor" and device.type == "cpu":
        check_cpp_compiler(key)


def cpp_compilers() -> tuple[str, ...]:
    """The C++ compilers inductor tries on the CPU, in its order: `torch._inductor.config.cpp.cxx`
    (`$CXX`, else g++; clang++ on macOS). Its `None` entry, a g++ it would install through conda
    only when TORCH_INDUCTOR_INSTALL_GXX is set, is left out."""
    from torch._inductor import config
    search = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    return tuple(c for c in search if c)


def check_cpp_compiler(key: str = "train.compile") -> None:
    """SokdError when none of inductor's C++ compilers is on PATH: inductor would otherwise fail
    inside the first training step, after the run directory was written, with an internal error."""
    if os.environ.get("TORCH_INDUCTOR_INSTALL_GXX"):
        return  # inductor fetches g++ through conda itself
    compilers = cpp_compilers()
    if any(shutil.which(c) for c in compilers):
        return
    fix = f"drop {key}" if key.startswith("-") else f"set {key}=false"
    tried = ", ".join(compilers) or "none configured"
    raise SokdError(f"{key} compiles the training step with a C++ compiler on the CPU, but none was found "
                    f"(tried: {tried}); install a C++ compiler (e.g. apt-get install g++) or {fix}")


def compile_step(module, setting, device: torch.device, note=print):
    """`module` compiled per `train.compile` (`setting`), or `module` itself when it is false."""
    if setting is False or setting is None:
        return module
    check_setting(setting, device)
    mode = MODES[setting]
    if BACKEND != "inductor":
        return torch.compile(module, backend=BACKEND)
    return torch.compile(module, backend=BACKEND, mode=mode)
