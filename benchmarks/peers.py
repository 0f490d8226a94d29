#!/usr/bin/env python3
"""sokd's distillation steps side by side with timm's and torchdistill's, in one process.

Every library gets the same teacher and student (deep copies of one pair, so identical weights),
the same batch, SGD (lr 0.01, momentum 0.9, weight decay 5e-4) and Hinton KD with T=4 and both
weights 1 (CE + T^2 KL). Before timing, the step-0 losses of the three libraries are checked to
agree (fp32); then every variant is timed in rounds (each variant once per round, in turn, so a
host whose speed drifts slows all alike) and the median of the rounds is reported.

Variants, per library, in the settings a user of it would pick:
- sokd: the engine's step (`sokd.engine.frozen` prepares the frozen teacher, as `sokd train`
  does) for kd and sokd, in fp32 NCHW, fp32 channels_last, and bf16 channels_last where the device
  computes bf16 natively; `kd (plain teacher)` is the same kd step without the teacher
  preparation; with --compile also compiled as `train.compile: true` compiles it.
- timm: `timm.task.LogitDistillationTask` (its train script's --amp is autocast, --channels-last
  the memory format), in the same settings; with --compile also `task.compile()`.
- torchdistill: `DistillationBox` built from a KDLoss config, fp32 NCHW and channels_last, and
  wrapped in autocast by hand (its own AMP path goes through Hugging Face accelerate).

It also times the teacher's forward alone (no grad, eval) before and after the preparation,
and reports the largest logit difference.

    pip install -e '.[peers]'
    .venv/bin/python benchmarks/peers.py --pair wrn --rounds 5
    .venv/bin/python benchmarks/peers.py --pair resnet --rounds 5 --json docs/results/bench/peers_resnet.json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sokd import bench, methods, models
from sokd.engine import frozen
from sokd.engine.compiled import compile_step
from sokd.engine.precision import autocast, native_bf16

PAIRS = {
    "wrn": ("wrn_40_2", "wrn_40_1", (3, 32, 32)),
    "resnet": ("timm.resnet34", "timm.resnet18", (3, 64, 64)),
}
T = 4.0
SGD = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)


def settings(device: torch.device) -> list[tuple[str, str, bool]]:
    """(label, precision, channels_last) a user of each library would try on this device."""
    out = [("fp32", "fp32", False), ("fp32+CL", "fp32", True)]
    if native_bf16(device):
        out.append(("bf16+CL", "bf16", True))
    return out


def layout(cl: bool):
    return torch.channels_last if cl else torch.contiguous_format


def loss_dict_step(forward, opt, xs, y, precision):
    """One step of a module returning {"loss": ...} (sokd's methods and timm's task alike)."""
    def step():
        with autocast(xs.device, precision):
            out = forward(xs, y)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return out["loss"].detach()
    return step


# ------------------------------------------------------------------------------------- sokd
def sokd_step(method_name: str, teacher, student, x, y, precision, cl, prepare=True, compiled=False):
    nets = bench.pair_networks(method_name, copy.deepcopy(teacher), copy.deepcopy(student))
    method = methods.create(method_name, input_shape=tuple(x.shape[1:]), **nets).to(memory_format=layout(cl)).train()
    xs = x.contiguous(memory_format=layout(cl))
    if prepare:
        frozen.prepare(method, xs[:8], precision, compile=compiled)
    opt = torch.optim.SGD(method.param_groups(lr=SGD["lr"]), momentum=SGD["momentum"],
                          weight_decay=SGD["weight_decay"])
    forward = compile_step(method, True, x.device) if compiled else method
    return loss_dict_step(forward, opt, xs, y, precision)


# ------------------------------------------------------------------------------------- timm
def timm_step(teacher, student, x, y, precision, cl, compiled=False):
    from timm.task import LogitDistillationTask
    from timm.task.distillation import DistillationTeacher
    t, s = copy.deepcopy(teacher), copy.deepcopy(student)
    cfg = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    s.pretrained_cfg = t.pretrained_cfg = cfg   # equal: timm then feeds the teacher the same input
    s.num_classes = t.num_classes = int(y.max()) + 1
    t = DistillationTeacher(t, device=x.device)
    task = LogitDistillationTask(s, t, criterion=torch.nn.CrossEntropyLoss(), distill_loss_weight=1.0,
                                 task_loss_weight=1.0, temperature=T, device=x.device, verbose=False)
    task = task.to(memory_format=layout(cl))
    task.train()
    opt = torch.optim.SGD([p for p in s.parameters()], **SGD)
    if compiled:
        task.compile()
    return loss_dict_step(task, opt, x.contiguous(memory_format=layout(cl)), y, precision)


# ------------------------------------------------------------------------------ torchdistill
def torchdistill_step(teacher, student, x, y, precision, cl):
    from torchdistill.core.distillation import DistillationBox
    t, s = copy.deepcopy(teacher).to(memory_format=layout(cl)), copy.deepcopy(student).to(memory_format=layout(cl))
    kd = {"student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
          "teacher_module_io": "output", "temperature": T, "alpha": 1.0, "beta": 1.0}
    train_config = {
        "num_epochs": 1,
        "teacher": {"requires_grad": False, "forward_proc": "forward_batch_only"},
        "student": {"forward_proc": "forward_batch_only"},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {
            "kd": {"criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}}},
        "optimizer": {"key": "SGD", "kwargs": dict(SGD)},
    }
    box = DistillationBox(t, s, {}, train_config, x.device, None, False, 1)
    box.pre_epoch_process(epoch=0)
    box.teacher_model.eval()
    xs = x.contiguous(memory_format=layout(cl))

    def step():
        with autocast(x.device, precision):
            loss = box.forward_process(xs, y, supp_dict={})
        box.post_forward_process(loss)
        return loss.detach()
    return step


# --------------------------------------------------------------------------- teacher forward
def teacher_forwards(teacher, x, precision, cl):
    """(plain forward, prepared forward, largest logit difference) of the frozen teacher."""
    plain = copy.deepcopy(teacher).to(memory_format=layout(cl)).eval()
    ready = copy.deepcopy(teacher).to(memory_format=layout(cl)).eval()
    ready.requires_grad_(False)
    plain.requires_grad_(False)
    xs = x.contiguous(memory_format=layout(cl))

    class Holder(torch.nn.Module):   # the shape of a method: frozen roles by name, no batch statistics
        frozen = ("teacher",)
        inference_roles = ("teacher",)

        def __init__(self, net):
            super().__init__()
            self.nets = torch.nn.ModuleDict({"teacher": net})

    frozen.prepare(Holder(ready), xs[:8], precision)

    def run(net):
        def f():
            with torch.no_grad(), autocast(x.device, precision):
                return net(xs)
        return f
    with torch.no_grad():
        reference = plain(xs).float()   # fp32, unprepared: what both are compared with
        with autocast(x.device, precision):
            diff_plain = float((plain(xs).float() - reference).abs().max())
            diff_ready = float((ready(xs).float() - reference).abs().max())
    return run(plain), run(ready), {"plain_vs_fp32": diff_plain, "prepared_vs_fp32": diff_ready,
                                    "logit_scale": float(reference.abs().max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", choices=sorted(PAIRS), default="wrn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time sokd's and timm's compiled steps")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_arch, s_arch, shape = PAIRS[args.pair]
    torch.manual_seed(0)
    teacher = models.create(t_arch, num_classes=args.classes, in_channels=shape[0]).to(dev)
    student = models.create(s_arch, num_classes=args.classes, in_channels=shape[0]).to(dev)
    with torch.no_grad():   # running statistics a trained teacher would have, so folding matters
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    teacher.eval().requires_grad_(False)
    x = torch.randn(args.batch, *shape, device=dev)
    y = torch.randint(0, args.classes, (args.batch,), device=dev)

    # step-0 losses, fp32 NCHW, fresh copies of the same weights
    losses = {"sokd kd": float(sokd_step("kd", teacher, student, x, y, "fp32", False)()),
              "timm": float(timm_step(teacher, student, x, y, "fp32", False)()),
              "torchdistill": float(torchdistill_step(teacher, student, x, y, "fp32", False)())}
    spread = max(losses.values()) - min(losses.values())
    print(f"step-0 losses (fp32): " + ", ".join(f"{k} {v:.7f}" for k, v in losses.items())
          + f"  (largest difference {spread:.1e})", flush=True)

    variants = []   # (library, label, step)
    for label, prec, cl in settings(dev):
        variants += [("sokd", f"kd {label}", sokd_step("kd", teacher, student, x, y, prec, cl)),
                     ("sokd", f"kd (plain teacher) {label}", sokd_step("kd", teacher, student, x, y, prec, cl,
                                                                       prepare=False)),
                     ("sokd", f"sokd {label}", sokd_step("sokd", teacher, student, x, y, prec, cl)),
                     ("timm", f"timm kd {label}", timm_step(teacher, student, x, y, prec, cl)),
                     ("torchdistill", f"torchdistill kd {label}", torchdistill_step(teacher, student, x, y, prec, cl))]
        plain_fwd, ready_fwd, diffs = teacher_forwards(teacher, x, prec, cl)
        variants += [("teacher", f"teacher forward {label}", plain_fwd),
                     ("teacher", f"teacher forward prepared {label}", ready_fwd)]
        print(f"teacher logits {label}: largest |difference| from the fp32 teacher: plain {diffs['plain_vs_fp32']:.2e}, "
              f"prepared {diffs['prepared_vs_fp32']:.2e} (logits up to {diffs['logit_scale']:.1f})", flush=True)
    if args.compile:
        label, prec, cl = settings(dev)[-1]
        for lib, name, make in (("sokd", f"kd {label} compiled", lambda: sokd_step("kd", teacher, student, x, y, prec, cl, compiled=True)),
                                ("sokd", f"sokd {label} compiled", lambda: sokd_step("sokd", teacher, student, x, y, prec, cl, compiled=True)),
                                ("timm", f"timm kd {label} compiled", lambda: timm_step(teacher, student, x, y, prec, cl, compiled=True))):
            step = make()
            t0 = time.perf_counter()
            step()
            print(f"{name}: first step (compiling) {time.perf_counter() - t0:.0f} s", flush=True)
            variants.append((lib, name, step))

    flops = [bench.count_flops(step) for _, _, step in variants]
    # the bf16 and fp32 matmul ceilings join the rounds, so their drift is the steps' drift
    peaks = {p: bench.matmul_step(dev, p) for p in dict.fromkeys(prec for _, prec, _ in settings(dev))}
    rates = bench.time_interleaved([v[2] for v in variants] + [step for step, _ in peaks.values()], 1, dev,
                                   args.warmup, args.rounds, 1)
    peak = {p: flop * rate / 1e9 for (p, (_, flop)), rate in zip(peaks.items(), rates[len(variants):])}
    rows = []
    for (lib, name, _), rate, flop in zip(variants, rates, flops):
        prec = "bf16" if "bf16" in name else "fp32"
        rows.append({"library": lib, "variant": name, "images_per_s": rate * args.batch, "ms": 1000.0 / rate,
                     "gflop": flop / 1e9, "gflop_per_s": flop * rate / 1e9,
                     "peak_fraction": flop * rate / 1e9 / peak[prec]})
    print(f"\n{t_arch} -> {s_arch}, batch {args.batch}, {shape[1]} px, {dev}, {torch.get_num_threads()} threads; "
          f"median of {args.rounds} rounds; matmul peak " + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peak.items()))
    for r in rows:
        print(f"  {r['variant']:<36} {r['ms']:8.1f} ms/step  {r['images_per_s']:8.1f} img/s  {r['gflop']:6.1f} GFLOP  "
              f"{100 * r['peak_fraction']:4.0f}% of matmul peak")

    def best(prefix_lib, exclude=()):
        cands = [r for r in rows if r["library"] == prefix_lib[0] and r["variant"].startswith(prefix_lib[1])
                 and not any(e in r["variant"] for e in exclude)]
        return max(cands, key=lambda r: r["images_per_s"])
    kd = best(("sokd", "kd "), exclude=("plain teacher",))
    so = best(("sokd", "sokd "))
    tm = best(("timm", "timm"))
    td = best(("torchdistill", "torchdistill"))
    ratios = {"kd_over_timm_best": kd["images_per_s"] / tm["images_per_s"],
              "kd_over_torchdistill_best": kd["images_per_s"] / td["images_per_s"],
              "sokd_over_timm_best": so["images_per_s"] / tm["images_per_s"]}
    for label, _, _ in settings(dev):
        by = {r["variant"]: r for r in rows}
        ratios[f"teacher_forward_prepared_speedup {label}"] = (
            by[f"teacher forward prepared {label}"]["images_per_s"] / by[f"teacher forward {label}"]["images_per_s"])
        ratios[f"kd_prepared_over_plain_teacher {label}"] = (
            by[f"kd {label}"]["images_per_s"] / by[f"kd (plain teacher) {label}"]["images_per_s"])
    print(f"\nbest: sokd kd = {kd['variant']}, sokd sokd = {so['variant']}, timm = {tm['variant']}, "
          f"torchdistill = {td['variant']}")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x")
    result = {"pair": [t_arch, s_arch], "shape": list(shape), "batch": args.batch, "device": str(dev),
              "threads": torch.get_num_threads(), "rounds": args.rounds, "machine": machine(),
              "torch": torch.__version__, "versions": versions(), "step0_losses": losses, "rows": rows,
              "matmul_peak_gflops": peak,
              "ratios": ratios}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    except OSError:
        model = platform.processor()
    amx = native_bf16(torch.device("cpu"))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return f"{model}; bf16 native: {amx}" + (f"; GPU {gpu}" if gpu else "")


def versions() -> dict:
    out = {}
    for name in ("timm", "torchdistill"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
