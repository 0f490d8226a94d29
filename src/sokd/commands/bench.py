"""sokd bench: training-step speed of every method for a teacher/student pair."""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the training step of each method (images/s, FLOPs, peak)")
    p.add_argument("--teacher", default="wrn_40_2")
    p.add_argument("--student", default="wrn_40_1")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--input", default="3x32x32")
    p.add_argument("--methods", nargs="+", default=None, help="subset of variants (default: all)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps-per-rep", type=int, default=3)
    p.add_argument("--no-plain", action="store_true", help="skip the plain-PyTorch SOKD baseline")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--fp32-too", nargs="*", default=[], metavar="VARIANT",
                   help="also time these variants in fp32 NCHW in the same run (e.g. vanilla)")
    p.add_argument("--json", default=None, help="write the results here (default: print only)")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import bench
    from ..errors import SokdError
    from .table import render
    shape = tuple(int(v) for v in args.input.split("x"))
    unknown = [m for m in (args.methods or []) + args.fp32_too if m not in bench.VARIANTS]
    if unknown:
        raise SokdError(f"unknown bench variant '{unknown[0]}'; valid: {', '.join(bench.VARIANTS)}")
    res = bench.run(args.teacher, args.student, args.batch, args.device, args.precision,
                    not args.no_channels_last, args.classes, shape, args.methods, args.warmup,
                    args.reps, args.steps_per_rep, plain=not args.no_plain, memory=not args.no_memory,
                    fp32_too=args.fp32_too)
    rows = [[r["name"], r["precision"] + ("+CL" if r["channels_last"] else ""), f"{r['images_per_s']:.1f}",
             f"{r['step_ms']:.1f}", f"{r['gflop_per_step']:.2f}", f"{r['gflop_per_s']:.0f}",
             f"{100 * r['peak_fraction']:.0f}%",
             "" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"] for r in res["results"]]
    print(f"\n{args.teacher} -> {args.student}, batch {args.batch}, {res['device']}, "
          f"{res['threads']} threads; matmul peak {res['matmul_peak_gflops']:.0f} GFLOP/s ({args.precision})")
    print(render(["variant", "precision", "img/s", "ms/step", "GFLOP/step", "GFLOP/s", "of peak",
                  "peak MB"], rows))
    for k, v in res["ratios"].items():
        print(f"  {k}: {v:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
