#!/usr/bin/env python3
"""Batched augmentation on the CPU: the cost of one augmented 128x3x32x32 uint8 batch.

TensorBatches with crop padding 4 and horizontal flips (what the CIFAR recipes use), 2048 images
of random pixels, one warm-up pass, then `--passes` timed passes. Prints wall and CPU time per
batch and batches per second; a measurement, not a check (it was tests/test_data.py's
test_augmentation_throughput, which asserted nothing).

    .venv/bin/python benchmarks/data_throughput.py [--passes 5] [--threads N] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from sokd.data.sources import TensorBatches


def measure(passes: int, images: int = 2048, batch: int = 128) -> dict:
    g = torch.Generator().manual_seed(0)
    src = TensorBatches(torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g),
                        torch.zeros(images, dtype=torch.int64), batch, (0.5,) * 3, (0.25,) * 3,
                        crop_padding=4, hflip=True)
    list(src)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(passes):
        for _ in src:
            pass
    n = passes * len(src)
    wall, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    return {"batch": [batch, 3, 32, 32], "batches": n, "threads": torch.get_num_threads(),
            "wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3, "batches_per_s": 1 / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=5, help="timed passes over the 2048 images (16 batches each)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.passes)
    print(f"[data] augmented 128x3x32x32 batch: {r['wall_ms']:.3f} ms wall, {r['cpu_ms']:.3f} ms CPU "
          f"({r['batches_per_s']:.0f} batches/s, {r['threads']} threads, {r['batches']} batches)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
