#!/usr/bin/env python3
"""What `auto` should pick on this machine: a vanilla training step (batch 128, 32 px, 100
classes) of small and larger CIFAR networks in fp32 NCHW, fp32 channels_last and bf16
channels_last, timed in rounds (every variant once per round, medians).

    .venv/bin/python benchmarks/layout_precision.py
"""
import torch, copy
from sokd import models, methods, bench
torch.set_num_threads(2)
dev = torch.device("cpu")
steps, names = [], []
for arch in ("resnet20", "resnet8x4", "wrn_16_1", "wrn_40_1"):
    torch.manual_seed(0)
    net = models.create(arch, num_classes=100)
    x = torch.randn(128, 3, 32, 32); y = torch.randint(0, 100, (128,))
    for prec, cl in (("fp32", False), ("fp32", True), ("bf16", True)):
        m = methods.create("vanilla", model=copy.deepcopy(net)).to(memory_format=torch.channels_last if cl else torch.contiguous_format).train()
        opt = torch.optim.SGD(m.param_groups(lr=0.01), momentum=0.9)
        xs = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        steps.append(bench.make_train_step(m, opt, xs, y, dev, prec)); names.append((arch, prec, cl))
rates = bench.time_interleaved(steps, 128, dev, 2, 5, 1)
by = dict(zip(names, rates))
for arch in ("resnet20", "resnet8x4", "wrn_16_1", "wrn_40_1"):
    a, b, c = by[(arch, "fp32", False)], by[(arch, "fp32", True)], by[(arch, "bf16", True)]
    print(f"{arch}: fp32 NCHW {a:.0f} img/s, fp32 CL {b:.0f} ({b/a:.2f}x), bf16 CL {c:.0f} ({c/a:.2f}x NCHW fp32, {c/b:.2f}x CL fp32)")
