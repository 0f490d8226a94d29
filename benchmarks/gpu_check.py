#!/usr/bin/env python3
"""What sokd's training step does on a GPU, in one command: one JSON line per measurement.

    .venv/bin/python benchmarks/gpu_check.py [--data ../shared/data/cifar100.npz] [--out FILE]
    .venv/bin/python benchmarks/gpu_check.py --quick        # about 4 minutes of GPU time
    .venv/bin/python benchmarks/gpu_check.py --smoke        # the same code on a CPU, in seconds

Sections, each printed as {"what": ..., ...} (a failing section prints {"what": ..., "error":
...} and the others still run; the exit code is 1 when any failed):
- `versions`: Python, torch, torchvision, CUDA, cuDNN, sokd and its git commit, the device;
- `matmul_peak`: dense matmul GFLOP/s in bf16, fp32 and (CUDA) TF32: the ceiling of a step;
- `step`: vanilla, kd and sokd, wrn_40_2 -> wrn_40_1, batch 128, bf16 + channels_last, each
  eager, compiled (`train.compile=true`) and as CUDA graphs (`train.compile=reduce-overhead`):
  device ms/step from CUDA events, host enqueue ms/step (the Python side, before the
  synchronise), compile seconds, and dynamo's graph breaks with their reasons;
- `fit`: a real `sokd train` of SOKD for 2 short epochs on CIFAR-100 (`--data`): ms/step from
  its metrics against the `step` figure, evaluation and checkpoint seconds;
- `imagenet_step`: tv.resnet34 -> tv.resnet18 at 224x224, batch 256, kd and sokd, eager and
  compiled.
- `peers`: benchmarks/peers.py's side-by-side kd step against timm and torchdistill (when the
  `peers` extra is installed), eager settings only.
Frozen networks are prepared as `sokd train` prepares them (`engine.frozen`). It is meant to take
at most 5 minutes on one GPU (an estimate until it has run on one). `--quick` keeps what fits in
about 4 minutes: versions, the kd and sokd steps eager and compiled (no CUDA graphs, no
ImageNet-sized step), the peers in 3 rounds, and a fit of 2 epochs of 50 steps.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sokd import bench, methods, models  # noqa: E402
from sokd.engine import frozen  # noqa: E402
from sokd.engine.compiled import compile_step  # noqa: E402


class Report:
    """Prints (and optionally appends to a file) one JSON line per measurement; counts failures."""

    def __init__(self, out: Path | None):
        self.out, self.failed = out, 0

    def line(self, what: str, **fields) -> None:
        text = json.dumps({"what": what, **fields}, default=str)
        print(text, flush=True)
        if self.out is not None:
            with self.out.open("a") as f:
                f.write(text + "\n")

    def section(self, what: str, run) -> None:
        try:
            run()
        except Exception as err:  # noqa: BLE001 - a section's failure is reported, the rest runs
            self.failed += 1
            self.line(what, error=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}",
                      where=traceback.format_exc().strip().splitlines()[-3][:200])


def sizes(smoke: bool) -> dict:
    """What each section runs: the real sizes, or toy ones that exercise the same code on a CPU."""
    if smoke:
        return dict(teacher="resnet14", student="resnet8", batch=8, shape=(3, 16, 16), classes=10,
                    warmup=1, reps=2, imagenet=("tv.resnet18", "tv.resnet18", 2, (3, 32, 32), 10),
                    fit_steps=2, fit_classes=4)
    return dict(teacher="wrn_40_2", student="wrn_40_1", batch=128, shape=(3, 32, 32), classes=100,
                warmup=5, reps=20, imagenet=("tv.resnet34", "tv.resnet18", 256, (3, 224, 224), 1000),
                fit_steps=100, fit_classes=100)


def versions(rep: Report, device: torch.device) -> None:
    import torchvision
    import sokd
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or None
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "sokd": getattr(sokd, "__version__", None),
            "commit": commit, "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), gpu=props.name,
                    capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2 ** 30, 1))
    else:
        info.update(cpu=platform.processor() or platform.machine())
    rep.line("versions", **info)


def matmul_peak(rep: Report, device: torch.device, smoke: bool) -> None:
    n = 512 if smoke else 8192
    fields = {p: bench.matmul_peak_gflops(device, p, n=n) for p in ("bf16", "fp32")}
    if device.type == "cuda":
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        fields["tf32"] = bench.matmul_peak_gflops(device, "fp32", n=n)
        torch.backends.cuda.matmul.allow_tf32 = before
    rep.line("matmul_peak", gflops={k: round(v) for k, v in fields.items()}, size=n)


def build(variant: str, teacher: str, student: str, classes: int, shape, device, layout, precision="bf16",
          x=None, compile_mode=False):
    """A method of `variant` (a `sokd bench` variant) on fresh networks, its frozen networks
    prepared as `sokd train` prepares them (given a batch `x`), and its optimizer."""
    method_name, opts = bench.VARIANTS[variant]
    t = models.create(teacher, num_classes=classes, in_channels=shape[0])
    s = models.create(student, num_classes=classes, in_channels=shape[0])
    nets = bench.pair_networks(method_name, t, s)
    method = methods.create(method_name, input_shape=shape, num_samples=1024, **nets, **opts)
    method = method.to(device, memory_format=layout).train()
    if x is not None:
        frozen.prepare(method, x[:8], precision, compile=compile_mode)
    opt = torch.optim.SGD(method.param_groups(lr=0.01), momentum=0.9, weight_decay=5e-4,
                          **({"fused": True} if device.type == "cuda" else {}))
    return method, opt


def graph_breaks(method, x, y) -> dict:
    """dynamo's view of the method's forward: how many graphs, where it breaks and why."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(method)(x, y)
    reasons = sorted({str(getattr(b, "reason", b)).splitlines()[0][:160] for b in explained.break_reasons})
    torch._dynamo.reset()
    return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count, "reasons": reasons}


def timed_steps(step, device: torch.device, warmup: int, reps: int) -> dict:
    """Device ms/step (CUDA events; wall time on a CPU) and host enqueue ms/step over `reps` steps."""
    for _ in range(warmup):
        step()
    bench.sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    host = (time.perf_counter() - t0) * 1000 / reps
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize(device)
        return {"ms_per_step": start.elapsed_time(end) / reps, "host_enqueue_ms_per_step": host}
    return {"ms_per_step": (time.perf_counter() - t0) * 1000 / reps, "host_enqueue_ms_per_step": host}


def steps(rep: Report, device: torch.device, sz: dict, what: str, variants, teacher, student, batch,
          shape, classes, modes) -> None:
    """Each variant in each compile mode: ms/step, enqueue time, compile time, graph breaks."""
    precision = "bf16"
    layout = torch.channels_last
    torch.manual_seed(0)
    x = torch.randn(batch, *shape, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, classes, (batch,), device=device)
    for variant in variants:
        for mode in modes:
            if mode == "reduce-overhead" and device.type != "cuda":
                rep.line(what, variant=variant, mode=mode, skipped="CUDA graphs need a GPU")
                continue

            def one(variant=variant, mode=mode):
                compiled = False if mode == "eager" else (True if mode == "compiled" else mode)
                if mode != "eager":
                    bare, _ = build(variant, teacher, student, classes, shape, device, layout)
                    fields = graph_breaks(bare, x, y)
                    del bare
                else:
                    fields = {}
                method, opt = build(variant, teacher, student, classes, shape, device, layout, precision, x, compiled)
                forward = method if mode == "eager" else compile_step(method, True if mode == "compiled" else mode,
                                                                      device, note=lambda *_: None)
                step = bench.make_train_step(method, opt, x, y, device, precision, forward)
                if mode != "eager":
                    bench.sync(device)
                    t0 = time.perf_counter()
                    step()
                    bench.sync(device)
                    fields["compile_s"] = round(time.perf_counter() - t0, 1)
                fields.update(timed_steps(step, device, sz["warmup"], sz["reps"]))
                fields["images_per_s"] = round(batch * 1000 / fields["ms_per_step"], 1)
                rep.line(what, variant=variant, mode=mode, teacher=teacher, student=student, batch=batch,
                         input=list(shape), precision=precision, channels_last=True,
                         **{k: round(v, 2) if isinstance(v, float) else v for k, v in fields.items()})
                torch._dynamo.reset()
            rep.section(what, one)


def peers(rep: Report, device: torch.device, rounds: int) -> None:
    """benchmarks/peers.py (wrn pair, eager settings): sokd's kd step against timm's and torchdistill's."""
    try:
        import timm.task  # noqa: F401
        import torchdistill  # noqa: F401
    except ImportError as err:
        rep.line("peers", skipped=f"{err}; pip install -e '.[peers]'")
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers as peer_bench
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peers.json"
        peer_bench.main(["--pair", "wrn", "--rounds", str(rounds), "--warmup", "2", "--json", str(out)])
        result = json.loads(out.read_text())
    rep.line("peers", rows=[{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                            for r in result["rows"]],
             ratios={k: round(v, 3) for k, v in result["ratios"].items()}, step0_losses=result["step0_losses"])


def fit(rep: Report, device: torch.device, sz: dict, data_path: Path | None, smoke: bool, bench_ms) -> None:
    """2 short epochs of SOKD through `sokd train` (the whole engine: data, eval, checkpoints)."""
    from sokd import config, runner
    from sokd.engine import checkpointing
    if not smoke and (data_path is None or not data_path.is_file()):
        rep.line("fit", skipped=f"no CIFAR-100 file at {data_path}; pass --data PATH (an .npz)")
        return
    saves = []
    atomic_save = checkpointing.atomic_save

    def timed_save(obj, path):
        t0 = time.perf_counter()
        atomic_save(obj, path)
        saves.append((Path(path).name, time.perf_counter() - t0))

    checkpointing.atomic_save = timed_save
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = ({"name": "synthetic", "synthetic_size": 64, "synthetic_shape": [3, 16, 16],
                     "synthetic_classes": sz["fit_classes"], "batch_size": sz["batch"]} if smoke else
                    {"name": "cifar100", "root": str(data_path), "batch_size": sz["batch"], "pad_mode": "zeros"})
            common = {"data": data, "optim": {"lr": 0.1}, "schedule": {"name": "constant"},
                      # every speed setting at its default: the fit shows what `auto` picks here
                      "train": {"epochs": 1, "seed": 0, "device": str(device), "steps_per_epoch": sz["fit_steps"]},
                      "output": {"tensorboard": False, "progress": False}}
            teacher_cfg = {**common, "name": "teacher", "method": {"name": "vanilla"},
                           "model": {"arch": sz["teacher"]}}
            teacher_cfg["output"] = {**common["output"], "dir": f"{tmp}/teacher"}
            runner.train(config.build(teacher_cfg))
            saves.clear()
            sokd_cfg = {**common, "name": "sokd", "method": {"name": "sokd"},
                        "teacher": {"arch": sz["teacher"], "checkpoint": f"{tmp}/teacher/model.pt"},
                        "student": {"arch": sz["student"]}}
            sokd_cfg["train"] = {**common["train"], "epochs": 2}
            sokd_cfg["output"] = {**common["output"], "dir": f"{tmp}/sokd"}
            t0 = time.perf_counter()
            summary = runner.train(config.build(sokd_cfg))
            wall = time.perf_counter() - t0
            rows = [json.loads(line) for line in Path(f"{tmp}/sokd/metrics.jsonl").read_text().splitlines()]
    finally:
        checkpointing.atomic_save = atomic_save
    trained = [r for r in rows if "train" in r]
    steps_done = sum(r["train"]["samples"] for r in trained) / sz["batch"]
    train_s = sum(r["train"]["seconds"] for r in trained)
    checkpoint_s = sum(s for _, s in saves)
    epoch_walls = [b["wall_time_s"] - a.get("wall_time_s", 0.0) for a, b in zip(rows, rows[1:])]
    rep.line("fit", method="sokd", teacher=sz["teacher"], student=sz["student"], epochs=len(trained),
             steps=int(steps_done), ms_per_step=round(1000 * train_s / max(steps_done, 1), 2),
             bench_ms_per_step=bench_ms, eval_and_other_s=round(sum(epoch_walls) - train_s - checkpoint_s, 2),
             checkpoint_s=round(checkpoint_s, 3), checkpoints=[n for n, _ in saves], wall_s=round(wall, 1),
             defaults={k: summary.get(k) for k in ("precision", "channels_last", "compiled")})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the code, measures nothing")
    ap.add_argument("--quick", action="store_true", help="what fits in about 4 minutes of GPU time (see above)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar100.npz")
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no GPU is visible; run it on a GPU machine, or use --smoke to check the code on a CPU",
              file=sys.stderr)
        return 2
    if args.smoke:
        torch.set_num_threads(1)
    sz = sizes(args.smoke)
    if args.quick:
        sz.update(reps=10, fit_steps=50)
    rep = Report(args.out)
    modes = ("eager", "compiled", "reduce-overhead") if not args.smoke else ("eager", "reduce-overhead")
    if args.quick:
        modes = ("eager",) if args.smoke else ("eager", "compiled")
    rep.section("versions", lambda: versions(rep, device))
    rep.section("matmul_peak", lambda: matmul_peak(rep, device, args.smoke))
    if args.smoke:
        rep.line("step", mode="compiled", skipped="--smoke leaves inductor out: compiling takes minutes on a CPU")

        def breaks():  # dynamo's capture of the sokd forward still runs: it is what compiling starts with
            method, _ = build("sokd", sz["teacher"], sz["student"], sz["classes"], sz["shape"], device,
                              torch.channels_last)
            x = torch.randn(sz["batch"], *sz["shape"], device=device).contiguous(memory_format=torch.channels_last)
            rep.line("graph_breaks", variant="sokd", **graph_breaks(method, x, torch.randint(0, sz["classes"], (sz["batch"],))))
        rep.section("graph_breaks", breaks)
    lines_before = []
    original = rep.line

    def keep(what, **fields):
        if what == "step" and fields.get("variant") == "sokd" and fields.get("mode") == "eager":
            lines_before.append(fields.get("ms_per_step"))
        original(what, **fields)

    rep.line = keep
    steps(rep, device, sz, "step", ("kd", "sokd") if args.quick else ("vanilla", "kd", "sokd"), sz["teacher"],
          sz["student"], sz["batch"], sz["shape"], sz["classes"], modes)
    rep.section("fit", lambda: fit(rep, device, sz, args.data, args.smoke, lines_before[0] if lines_before else None))
    if not args.smoke:
        rep.section("peers", lambda: peers(rep, device, 3))
    if args.quick:
        rep.line("done", failed_sections=rep.failed)
        return 1 if rep.failed else 0
    t, s, b, shape, classes = sz["imagenet"]
    steps(rep, device, sz, "imagenet_step", ("kd", "sokd"), t, s, b, shape, classes,
          ("eager",) if args.smoke else ("eager", "compiled"))
    rep.line("done", failed_sections=rep.failed)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
