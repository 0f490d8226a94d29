#!/usr/bin/env python3
"""End-to-end SOKD training epoch on CIFAR-100, data included: our path vs the plain path.

Ours: in-memory uint8 tensors, batched crop/flip on the device, bf16 + channels_last, shared
trunk (sokd.data + sokd.methods). Plain: PIL transforms in DataLoader workers, fp32 NCHW, the
straightforward SOKD step (sokd.bench.plain_sokd_step). Both run `--steps` steps after a warm-up
and the epoch time is extrapolated to a full epoch (390 steps of 128); say so when quoting it.

    .venv/bin/python benchmarks/epoch_speed.py --steps 40 [--root ../shared/data/cifar100.npz]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from sokd import bench, data, methods, models
from sokd.data.config import DataConfig
from sokd.engine.precision import autocast


class PilCifar(Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray, transform):
        self.x, self.y, self.t = x, y, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.t(Image.fromarray(self.x[i])), int(self.y[i])


def ours(root, steps, warmup, batch):
    bundle = data.create(DataConfig(name="cifar100", root=root, batch_size=batch, pad_mode="zeros"), "cpu")
    bundle.train.channels_last = True
    t = models.create("wrn_40_2", num_classes=100)
    s = models.create("wrn_40_1", num_classes=100)
    m = methods.create("sokd", teacher=t, student=s).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(m.param_groups(lr=0.1), momentum=0.9, weight_decay=5e-4)
    dev = torch.device("cpu")
    bundle.train.set_epoch(0)
    it = iter(bundle.train)
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        x, y = next(it)
        with autocast(dev, "bf16"):
            out = m(x, y)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    return (time.perf_counter() - t0) / steps, len(bundle.train)


def plain(root, steps, warmup, batch, workers):
    arrays = np.load(root)
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
                             transforms.Normalize((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))])
    loader = DataLoader(PilCifar(arrays["x_train"], arrays["y_train"], tf), batch_size=batch, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    t = models.create("wrn_40_2", num_classes=100).train().requires_grad_(False)
    s = models.create("wrn_40_1", num_classes=100).train()
    step = bench.plain_sokd_step(t, s, 1)
    it = iter(loader)
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        x, y = next(it)
        step(x, y)
    return (time.perf_counter() - t0) / steps, len(loader)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="../shared/data/cifar100.npz")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ours_s, n = ours(args.root, args.steps, args.warmup, args.batch)
    print(f"ours : {ours_s * 1000:.0f} ms/step -> {ours_s * n / 60:.1f} min/epoch ({n} steps)", flush=True)
    plain_s, n2 = plain(args.root, args.steps, args.warmup, args.batch, args.workers)
    print(f"plain: {plain_s * 1000:.0f} ms/step -> {plain_s * n2 / 60:.1f} min/epoch ({n2} steps)")
    print(f"speed-up end to end: {plain_s / ours_s:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ours_s_per_step": ours_s, "plain_s_per_step": plain_s, "steps_timed": args.steps,
                       "steps_per_epoch": n, "speedup": plain_s / ours_s,
                       "note": "epoch time extrapolated from the timed steps"}, f, indent=2)


if __name__ == "__main__":
    main()
