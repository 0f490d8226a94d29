"""Bring your own model: a network of your own design, distilled with SOKD.

sokd's methods only need a network cut into `stem -> stages -> head` (a `StagedNet`).
`sokd.models.adapt(stem, stages, head)` makes one from the pieces of your model, and
`@sokd.models.register("my_net")` makes it available by name, so a run config can use it::

    imports: [examples/own_model.py]      # imported before the networks are built
    teacher: {arch: my_net, kwargs: {width: 32}, checkpoint: runs/my_teacher/model.pt}
    student: {arch: my_net, kwargs: {width: 8}}

Run as a script, it trains a wide `my_net` teacher for a few steps on random data, then distils it
into a narrow `my_net` student with SOKD and prints the losses:

    python examples/own_model.py [--steps 5]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import sokd


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MyNet(nn.Module):
    """Your own classifier, written without sokd in mind: a stem, three blocks, a pooled linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.stem = conv_bn(in_channels, width)
        self.block1 = nn.Sequential(conv_bn(width, width), conv_bn(width, width))
        self.block2 = nn.Sequential(conv_bn(width, 2 * width, stride=2), conv_bn(2 * width, 2 * width))
        self.block3 = nn.Sequential(conv_bn(2 * width, 4 * width, stride=2), conv_bn(4 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# overwrite=True: importing this file twice (a notebook cell re-run, a config's `imports` after the
# script already ran) registers the same name again instead of failing
@sokd.models.register("my_net", overwrite=True)
def my_net(num_classes: int, in_channels: int = 3, width: int = 16) -> sokd.models.StagedNet:
    """`my_net` by name: MyNet cut into stem / stages / head (the modules are shared, not copied)."""
    m = MyNet(num_classes, in_channels, width)
    # stage outputs are what feature terms and SOKD's knowledge bridge module (a trainable copy of
    # the last kbm_stages stages + head) work with; the head maps the last stage to logits
    return sokd.models.adapt(stem=m.stem, stages=[m.block1, m.block2, m.block3],
                             head=nn.Sequential(m.pool, nn.Flatten(1), m.fc))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="SOKD steps (the teacher gets twice as many)")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    images = torch.randn(4 * args.batch, 3, 32, 32)      # stand-in for your data loader
    labels = torch.randint(0, 10, (4 * args.batch,))

    def batches(n):
        for step in range(n):
            i = (step % 4) * args.batch
            yield images[i:i + args.batch], labels[i:i + args.batch]

    # 1. a teacher (in practice: trained for real, or loaded from a checkpoint)
    teacher = sokd.models.create("my_net", num_classes=10, width=32)
    vanilla = sokd.methods.create("vanilla", model=teacher)
    opt = torch.optim.SGD(vanilla.param_groups(lr=0.05), momentum=0.9)
    vanilla.train()
    for x, y in batches(2 * args.steps):
        out = vanilla(x, y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    print(f"teacher trained: loss {out['loss'].item():.4f}")

    # 2. SOKD: the teacher is frozen; a knowledge bridge module copied from its last stage learns
    #    online with the student
    student = sokd.models.create("my_net", num_classes=10, width=8)
    method = sokd.methods.create("sokd", teacher=teacher, student=student, kbm_stages=1, T=4)
    opt = torch.optim.SGD(method.param_groups(lr=0.05), momentum=0.9)  # student + KBM, never the teacher
    method.train()
    losses = []
    for step, (x, y) in enumerate(batches(args.steps), 1):
        out = method(x, y)  # {"loss", "terms": {name: tensor}, "logits": {role: tensor}}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        terms = "  ".join(f"{k} {v.item():.3f}" for k, v in out["terms"].items())
        print(f"sokd step {step}: loss {losses[-1]:.4f}  ({terms})")

    # the trained networks on their own: the student, and the teacher branch (frozen trunk + KBM)
    nets = method.standalone()
    method.eval()
    with torch.no_grad():
        logits = {name: net(images[:4]) for name, (_, net) in nets.items()}
    print("standalone networks:", ", ".join(f"{k} -> logits {tuple(v.shape)}" for k, v in logits.items()))
    return {"losses": losses, "standalone": sorted(nets)}


if __name__ == "__main__":
    main()
