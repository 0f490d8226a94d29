"""Training-step speed of every method on one device/precision, in one process.

For each variant: warm-up steps (excluded), then repetitions of timed steps; the median images/s
is reported with FLOPs per step (counted by torch.utils.flop_counter), achieved GFLOP/s, the
fraction of a matmul peak measured on the same device and precision, and peak memory.
`plain_sokd_step` is the reference trainer's SOKD step (fp32, NCHW, one full teacher forward
whose stage output feeds the KBM), so our speed-up is a ratio measured in the same run.
With `compile`, each variant is also timed with its forward compiled as `train.compile` compiles
it (`engine.compiled.compile_step`); its compile time is the first compiled step's wall time less
one compiled step, and the gain is compiled over eager images/s, both measured in the same run.
Frozen networks are prepared as `sokd train` prepares them (`engine.frozen`: BatchNorm folded,
weights cast once; compiled as frozen inference graphs in the compiled variants).
"""
from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from . import methods, models
from .config import OptimSpec
from .engine import frozen
from .engine.compiled import check_setting, compile_step
from .engine.dot import backward
from .engine.optim import build_optimizer
from .engine.precision import autocast
from .engine.views import step_inputs
from .errors import SokdError

VARIANTS = {
    "vanilla": ("vanilla", {}),
    "kd": ("kd", {}),
    "kd+at": ("kd", {"features": [{"kind": "at", "stages": [0, 1, 2]}]}),
    "kd+fitnet": ("kd", {"features": [{"kind": "fitnet", "stages": [-1]}]}),
    "dml": ("dml", {}),
    "kd_dml": ("kd_dml", {}),
    "sokd": ("sokd", {}),
    "sokd+at": ("sokd", {"features": [{"kind": "at", "stages": [0, 1, 2]}]}),
    "sokd+fitnet": ("sokd", {"features": [{"kind": "fitnet", "stages": [-1]}]}),
    "kd+dkd": ("kd", {"logit_loss": "dkd"}),
    "kd+dist": ("kd", {"logit_loss": "dist"}),
    "kd+ls": ("kd", {"logit_standardize": True, "T": 2.0}),
    "kd+sp": ("kd", {"features": [{"kind": "sp"}]}),
    "kd+pkt": ("kd", {"features": [{"kind": "pkt"}]}),
    "kd+rkd": ("kd", {"features": [{"kind": "rkd"}]}),
    "kd+crd": ("kd", {"features": [{"kind": "crd"}]}),
    "kd+reviewkd": ("kd", {"features": [{"kind": "reviewkd"}]}),
    "one": ("one", {}),
    "kdcl": ("kdcl", {}),
    "sokd+dkd": ("sokd", {"logit_loss": "dkd"}),
    "sokd+crd": ("sokd", {"features": [{"kind": "crd"}]}),
    "sokd+reviewkd": ("sokd", {"features": [{"kind": "reviewkd"}]}),
    "shake": ("shake", {}),
    "kd+nkd": ("kd", {"logit_loss": "nkd", "T": 3.0}),
    "kd+mlkd": ("kd", {"logit_loss": "mlkd"}),
    "sokd+mlkd": ("sokd", {"logit_loss": "mlkd"}),
    "kd+ctkd": ("kd", {"temperature": "ctkd"}),
    "kd+nd": ("kd", {"features": [{"kind": "nd"}]}),
    "kd+dot": ("kd", {}),
    "kd+ofa": ("kd", {"features": [{"kind": "ofa"}]}),
    "deit": ("deit", {}),   # a distilled DeiT student (--student timm.deit_*_distilled_*)
}
#: variants trained by another optimizer than SGD (optim overrides; the rest: SGD, momentum 0.9)
OPTIMIZERS = {"kd+dot": {"name": "dot"}}
#: what `sokd bench` times when no variant is named (`--methods all` times every one)
DEFAULT_VARIANTS = ("vanilla", "kd", "kd+at", "kd+fitnet", "dml", "kd_dml", "sokd", "sokd+at", "sokd+fitnet")


@dataclass
class StepResult:
    name: str
    images_per_s: float
    step_ms: float
    gflop_per_step: float
    gflop_per_s: float
    peak_fraction: float | None
    peak_mem_mb: float | None
    precision: str
    channels_last: bool
    compile_s: float | None = None   # compiled variants: seconds the first step spent compiling

    def row(self) -> dict:
        return dict(self.__dict__)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_step(device: torch.device, precision: str, n: int = 2048, budget_s: float = 0.25):
    """(step, flop per call): a dense square matmul at this precision, sized and repeated so one
    call takes about `budget_s` — the practical ceiling the training steps are compared with.

    The size grows from 256 up to `n` while one product takes under `budget_s` / 8, so a
    precision the CPU only emulates (bf16 without AVX-512/AMX: tens of times slower than fp32)
    is measured in seconds, not in the minutes a 2048-sized product would take.
    """
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def operands(size: int):
        return (torch.randn(size, size, device=device, dtype=dtype),
                torch.randn(size, size, device=device, dtype=dtype))

    def seconds(a, b, count: int = 1) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(count):
            a @ b
        sync(device)
        return time.perf_counter() - t0

    size = 256
    while size < n and seconds(*operands(size)) * 8 < budget_s:
        size *= 2
    a, b = operands(size)
    seconds(a, b, 3)  # warm-up
    repeats = max(1, min(64, round(budget_s / max(seconds(a, b), 1e-6))))

    def step():
        for _ in range(repeats):
            a @ b
    return step, 2.0 * size ** 3 * repeats


def matmul_peak_gflops(device: torch.device, precision: str, n: int = 2048, reps: int = 10,
                       budget_s: float = 0.25) -> float:
    """Measured dense matmul throughput (GFLOP/s) at this precision: the best of `reps` calls."""
    step, flop = matmul_step(device, precision, n, budget_s)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return flop / best / 1e9


def count_flops(step) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


#: what the CPU profiler prints on every start, whatever the step does: kineto's start/stop
#: probes, its search for a GPU on a machine without a CUDA driver ("ERROR: ... gpuGetDeviceCount
#: failed"), and the allocator's note that blocks made before the profiler are not attributed
#: (the peak it measures is the step's own allocations by design)
PROFILER_CHATTER = ("USDT:", "gpuGetDeviceCount failed", "was allocated before the profiling started")


@contextlib.contextmanager
def without_profiler_chatter(chatter: tuple[str, ...] = PROFILER_CHATTER):
    """Kineto writes lines straight to file descriptor 2 every time a profiler starts (see
    PROFILER_CHATTER); in `sokd bench` they interleave with the table and read as failures.
    Capture fd 2 while profiling and pass every other line (warnings, errors) on to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(l for l in lines if not any(c in l for c in chatter)))
            sys.stderr.flush()


def peak_memory_mb(step, device: torch.device) -> float | None:
    """Peak memory of one step: CUDA allocator high-water, or the CPU profiler's live-bytes peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    from torch.profiler import ProfilerActivity, profile
    with without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage if hasattr(e, "self_cpu_memory_usage") else e.cpu_memory_usage
        peak = max(peak, live)
    return peak / 2 ** 20


def time_interleaved(steps, images: int, device, warmup: int, reps: int, steps_per_rep: int) -> list[float]:
    """Median rate (`images` per call / s) of each step, timed in rounds: every round times each
    step once, in turn.

    A shared or throttled host changes speed over minutes (the matmul peak of a shared 2-core
    VM has been seen to swing 2-3x within half an hour). Timing variant after variant would fold
    that drift into their ratios; rounds give every variant the same mix of fast and slow
    moments, so the ratios a bench run prints compare like with like.
    """
    for step in steps:
        for _ in range(warmup):
            step()
    sync(device)
    rates: list[list[float]] = [[] for _ in steps]
    for _ in range(reps):
        for i, step in enumerate(steps):
            t0 = time.perf_counter()
            for _ in range(steps_per_rep):
                step()
            sync(device)
            rates[i].append(images * steps_per_rep / (time.perf_counter() - t0))
    return [statistics.median(r) for r in rates]


def make_optimizer(method, variant: str | None = None) -> torch.optim.Optimizer:
    """The optimizer a bench step of `variant` uses: SGD (lr 0.01, momentum 0.9, weight decay
    5e-4), or what OPTIMIZERS names for it, built as `sokd train` builds it."""
    spec = OptimSpec(lr=0.01, momentum=0.9, weight_decay=5e-4, **OPTIMIZERS.get(variant or "", {}))
    return build_optimizer(method, spec)


def make_train_step(method, optimizer, x, y, device, precision, forward=None):
    """One training step of `method`, as the training loop runs it (the views the method asks
    for, the backward its optimizer needs); `forward`: what to call instead of the method (compiled)."""
    # a method that needs each sample's training-set index (CRD) gets the batch's positions;
    # one that trains on a strong view too gets a mirrored copy of the batch in its place
    index = torch.arange(len(y), device=y.device)
    batch = (x, y, *((index,) if method.needs_index else ()), *((x.flip(3),) if method.views == 2 else ()))
    x, y, extra = step_inputs(batch, method.needs_index, method.views)
    forward = method if forward is None else forward
    no_scaling = torch.amp.GradScaler(device.type if isinstance(device, torch.device) else str(device), enabled=False)

    def step():
        with autocast(device, precision):
            out = forward(x, y, **extra)
        backward(out, optimizer, no_scaling)
        optimizer.step()
    return step


def plain_sokd_step(teacher, student, kbm_stages: int, T: float = 4.0, lr: float = 0.1):
    """The SOKD step as the reference trainer writes it: the yardstick for ours.

    fp32, NCHW; one full forward of the frozen teacher (no gradients) that also yields the output
    of the stage before the KBM; the KBM fed that output, detached; the student's forward; the
    five loss terms; one SGD step over student + KBM. No trunk sharing, precision or layout
    tricks: our SOKD step is measured against exactly this. Returns `step(images, labels)`,
    which returns the step's loss.
    """
    n = teacher.num_stages
    kbm = methods.build_kbm(teacher, kbm_stages)
    opt = torch.optim.SGD(list(student.parameters()) + list(kbm.parameters()), lr=lr, momentum=0.9,
                          weight_decay=5e-4)

    def kl(target, logits):
        return F.kl_div(F.log_softmax(logits / T, 1), F.softmax(target.detach() / T, 1),
                        reduction="batchmean") * T * T

    def step(x, y):
        with torch.no_grad():
            t_logits, feats = teacher.forward_features(x)      # the teacher, once, in full
        a_logits, _ = kbm(feats[n - kbm_stages - 1].detach())  # the KBM on the stage before it
        s_logits = student(x)
        loss = (F.cross_entropy(a_logits, y) + kl(t_logits, a_logits) + kl(s_logits, a_logits)
                + F.cross_entropy(s_logits, y) + kl(a_logits, s_logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    step.kbm = kbm  # the KBM it trains (tests give it the weights of another step's)
    return step


def check_args(teacher_arch: str, student_arch: str, batch, device: str, precision: str, num_classes,
               shape, variants, warmup, reps, steps_per_rep, fp32_too, teacher_kwargs=None,
               student_kwargs=None) -> torch.device:
    """SokdError (naming the `sokd bench` option) for any argument `run` cannot use; the device."""
    for flag, value, low in (("--batch", batch, 1), ("--classes", num_classes, 1), ("--reps", reps, 1),
                             ("--steps-per-rep", steps_per_rep, 1), ("--warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SokdError(f"{flag} must be an integer >= {low}, got {value!r}")
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise SokdError(f"--input must be three positive sizes CxHxW (e.g. 3x32x32), got {shape!r}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise SokdError(f"--precision must be fp32, bf16 or fp16, got {precision!r}")
    named = [] if variants and list(variants) == ["all"] else list(variants or [])
    for name in named + list(fp32_too):
        if name not in VARIANTS:
            from .errors import unknown
            raise unknown("bench variant", name, VARIANTS)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SokdError(f"--device '{device}' is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SokdError("--device asks for CUDA but no GPU is visible; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise SokdError(f"--device '{device}' is not supported by sokd bench; use cpu or cuda")
    for arch, kwargs in ((teacher_arch, teacher_kwargs), (student_arch, student_kwargs)):
        models.create(arch, num_classes=num_classes, in_channels=shape[0], **(kwargs or {}))  # fails before timing
    return dev


def pair_networks(method_name: str, teacher, student) -> dict:
    """The config networks of method `method_name` built from a benchmark's (teacher, student)
    pair: each role takes the architecture its declaration names (`Role.like`)."""
    nets = {}
    for section in methods.config_roles(method_name):
        role = methods.role(method_name, section)
        net = teacher if role.like == "teacher" else student
        nets[section] = [net] if role.many else net
    return nets


def _step_results(timed, rates, batch: int, precision: str, peak: float, peak_fp32: float, memory: bool,
                  dev, log) -> list["StepResult"]:
    """One StepResult per timed step, from its measured rate (images per second), logged."""
    results = []
    for (name, step, prec, cl, flops, compile_s), ips in zip(timed, rates):
        ms = 1000.0 * batch / ips
        gflops = flops / 1e9 * ips / batch
        ref_peak = peak if prec == precision else peak_fp32
        mem = peak_memory_mb(step, dev) if memory and compile_s is None else None
        compile_s = max(compile_s - ms / 1000.0, 0.0) if compile_s is not None else None
        r = StepResult(name, ips, ms, flops / 1e9, gflops, gflops / ref_peak, mem, prec, cl, compile_s)
        results.append(r)
        log(f"{name:>16}: {ips:8.1f} img/s  {ms:7.1f} ms/step  {flops / 1e9:7.2f} GFLOP/step  "
            f"{gflops:6.0f} GFLOP/s ({100 * r.peak_fraction:.0f}% of matmul peak)"
            + (f"  peak mem {mem:.0f} MB" if mem is not None else "")
            + (f"  compiled in {compile_s:.0f} s" if compile_s is not None else ""))
    return results


def _ratios(results: list["StepResult"]) -> dict:
    """The ratios the docs quote, between the variants that were timed (by variant name)."""
    ratios = {}
    for r_eager, r_comp in zip(results, results[1:]):
        if r_comp.name == f"{r_eager.name} compiled":
            ratios[f"{r_eager.name}_compiled_speedup"] = r_comp.images_per_s / r_eager.images_per_s
    by = {r.name: r for r in results}
    if "sokd" in by and "plain sokd" in by:
        ratios["sokd_vs_plain_speedup"] = by["sokd"].images_per_s / by["plain sokd"].images_per_s
        best = max((r for r in results if r.name in ("sokd", "sokd compiled")), key=lambda r: r.images_per_s)
        ratios["best_sokd_step"] = best.name
        ratios["best_sokd_vs_plain_speedup"] = best.images_per_s / by["plain sokd"].images_per_s
        ratios["best_sokd_peak_fraction"] = best.peak_fraction
    if "sokd" in by and "kd" in by:
        ratios["sokd_over_kd_time"] = by["sokd"].step_ms / by["kd"].step_ms
        ratios["sokd_over_kd_flops"] = by["sokd"].gflop_per_step / by["kd"].gflop_per_step
    if "vanilla" in by:
        ratios["student_step_peak_fraction"] = by["vanilla"].peak_fraction
    if "vanilla" in by and "vanilla (fp32)" in by:
        ratios["student_bf16_cl_over_fp32"] = by["vanilla"].images_per_s / by["vanilla (fp32)"].images_per_s
    return ratios


def run(teacher_arch: str, student_arch: str, batch: int = 128, device: str = "cpu",
        precision: str = "bf16", channels_last: bool = True, num_classes: int = 100,
        shape=(3, 32, 32), variants=None, warmup: int = 3, reps: int = 5, steps_per_rep: int = 3,
        plain: bool = True, memory: bool = True, fp32_too=(), log=print, compile=False,
        teacher_kwargs: dict | None = None, student_kwargs: dict | None = None) -> dict:
    """Time every variant's training step on one (teacher, student) pair; `*_kwargs`: the
    networks' constructor options (e.g. a ViT's img_size and patch_size)."""
    teacher_kwargs, student_kwargs = dict(teacher_kwargs or {}), dict(student_kwargs or {})
    dev = check_args(teacher_arch, student_arch, batch, device, precision, num_classes, shape, variants,
                     warmup, reps, steps_per_rep, fp32_too, teacher_kwargs, student_kwargs)
    if compile:
        check_setting(compile, dev, "--compile")
    torch.manual_seed(0)
    x = torch.randn(batch, *shape, device=dev)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    # the ceilings join the timing rounds: on a host whose speed drifts, a peak measured once
    # at the start would not be the peak the steps met
    peaks = {p: matmul_step(dev, p) for p in dict.fromkeys((precision, "fp32"))}
    timed = []  # (name, step, precision, channels_last, flops, compile_s); timed together below

    def prepare(name, step, prec, cl, flops_step=None, compiled=False):
        compile_s = None
        if compiled:  # the first call compiles; time it on its own
            sync(dev)
            t0 = time.perf_counter()
            step()
            sync(dev)
            compile_s = time.perf_counter() - t0
            log(f"{name:>16}: compiled in {compile_s:.0f} s")
        timed.append((name, step, prec, cl, count_flops(flops_step or step), compile_s))

    if variants and list(variants) == ["all"]:
        variants = list(VARIANTS)
    runs = [(name, precision, channels_last) for name in variants or DEFAULT_VARIANTS]
    runs += [(name, "fp32", False) for name in fp32_too]
    # every variant's learning networks stay alive until the rounds end; raise dynamo's per-code
    # recompile limit so variants sharing a method class each keep their own compiled graph
    limits = torch._dynamo.config.patch(recompile_limit=max(64, 4 * len(runs)),
                                        accumulated_recompile_limit=max(256, 16 * len(runs)))
    if compile:
        torch._dynamo.reset()
    with limits:
        for name, prec, cl in runs:
            method_name, opts = VARIANTS[name]
            teacher = models.create(teacher_arch, num_classes=num_classes, in_channels=shape[0], **teacher_kwargs)
            student = models.create(student_arch, num_classes=num_classes, in_channels=shape[0], **student_kwargs)
            nets = pair_networks(method_name, teacher, student)
            layout = torch.channels_last if cl else torch.contiguous_format
            # num_samples: a CIFAR-sized training set for the terms that keep per-sample state (CRD)
            method = methods.create(method_name, input_shape=shape, num_samples=50_000, **nets, **opts).to(dev, memory_format=layout)
            opt = make_optimizer(method, name)
            xs = x.contiguous(memory_format=layout)
            method.train()
            label = name if (prec, cl) == (precision, channels_last) else f"{name} ({prec})"
            twin = copy.deepcopy(method) if compile else None   # the compiled variant's own networks
            # frozen networks run as `sokd train` runs them (engine.frozen)
            frozen.prepare(method, xs[:8], prec)
            eager = make_train_step(method, opt, xs, y, dev, prec)
            prepare(label, eager, prec, cl)
            if compile:
                twin_opt = make_optimizer(twin, name)
                frozen.prepare(twin, xs[:8], prec, compile=compile)
                forward = compile_step(twin, compile, dev, log)
                prepare(f"{label} compiled", make_train_step(twin, twin_opt, xs, y, dev, prec, forward), prec, cl,
                        flops_step=eager, compiled=True)
        if plain:
            teacher = models.create(teacher_arch, num_classes=num_classes, in_channels=shape[0],
                                    **teacher_kwargs).to(dev)
            student = models.create(student_arch, num_classes=num_classes, in_channels=shape[0],
                                    **student_kwargs).to(dev)
            teacher.requires_grad_(False)
            teacher.train()
            student.train()
            plain_step = plain_sokd_step(teacher, student, 1)
            prepare("plain sokd", lambda: plain_step(x, y), "fp32", False)
        calls = time_interleaved([t[1] for t in timed] + [step for step, _ in peaks.values()], 1, dev, warmup,
                                 reps, steps_per_rep)
    rates = [batch * c for c in calls[:len(timed)]]
    gflops_of = {p: flop * c / 1e9 for (p, (_, flop)), c in zip(peaks.items(), calls[len(timed):])}
    peak, peak_fp32 = gflops_of[precision], gflops_of["fp32"]
    log(f"matmul peak (median over the same rounds): {peak:.0f} GFLOP/s ({precision}), {peak_fp32:.0f} GFLOP/s (fp32)")

    results = _step_results(timed, rates, batch, precision, peak, peak_fp32, memory, dev, log)
    ratios = _ratios(results)
    return {"teacher": teacher_arch, "student": student_arch, "batch": batch, "device": str(dev),
            "precision": precision, "channels_last": channels_last, "shape": list(shape),
            "threads": torch.get_num_threads(), "matmul_peak_gflops": peak,
            "matmul_peak_gflops_fp32": peak_fp32, "results": [r.row() for r in results], "ratios": ratios}
