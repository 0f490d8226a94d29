#!/usr/bin/env python3
"""Where does an SOKD training step spend its time? torch.profiler over a few steps.

    .venv/bin/python benchmarks/profile_step.py [--method sokd] [--precision bf16] [--out FILE]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from sokd import bench, methods, models


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="wrn_40_2")
    ap.add_argument("--student", default="wrn_40_1")
    ap.add_argument("--method", default="sokd")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cpu")
    torch.manual_seed(0)
    t = models.create(args.teacher, num_classes=100)
    s = models.create(args.student, num_classes=100)
    fmt = torch.channels_last
    m = methods.create(args.method, teacher=t, student=s).to(memory_format=fmt).train()
    opt = torch.optim.SGD(m.param_groups(lr=0.01), momentum=0.9)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 100, (args.batch,))
    step = bench.make_train_step(m, opt, x, y, dev, args.precision)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{args.method} {args.teacher}->{args.student} batch {args.batch} {args.precision}+CL, "
                    f"{args.steps} steps\n{table}\n")


if __name__ == "__main__":
    main()
