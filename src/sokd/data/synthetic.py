"""The `synthetic` data set: generated images whose class can be learned, for tests and smoke runs."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .arrays import ArraySplits
from .registry import ARRAYS, register
from .sources import mix_seed


def make_synthetic(size: int, shape: Iterable[int], num_classes: int) -> ArraySplits:
    """Random images whose class is visible as a per-class colour + oriented stripe pattern.

    Content is fixed by (size, shape, classes) — independent of the training seed — so that a
    checkpoint is scored on the same images it was trained on. Test split: size // 4 images.
    """
    c, h, w = (int(v) for v in shape)
    g = torch.Generator().manual_seed(mix_seed(0x5EED, size, c, h, w, num_classes))
    k = num_classes
    base = torch.rand(k, c, 1, 1, generator=g) * 120 + 68                       # class colour
    amp = (torch.rand(k, c, 1, 1, generator=g) * 2 - 1) * 60                    # stripe strength
    theta = torch.rand(k, generator=g) * math.pi
    freq = torch.rand(k, generator=g) * 2.5 + 1.0                               # cycles per image
    yy, xx = torch.meshgrid(torch.arange(h) / max(h, 1), torch.arange(w) / max(w, 1), indexing="ij")
    proj = torch.cos(theta)[:, None, None] * xx + torch.sin(theta)[:, None, None] * yy
    stripes = torch.sin(2 * math.pi * freq[:, None, None] * proj)[:, None]      # (K,1,H,W)
    templates = base + amp * stripes                                            # (K,C,H,W)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
        shift = torch.randn(n, 1, 1, 1, generator=g) * 12                       # brightness jitter
        noise = torch.randn(n, c, h, w, generator=g) * 28
        x = (templates[labels] + shift + noise).round().clamp_(0, 255).to(torch.uint8)
        return x, labels

    x_train, y_train = split(size)
    x_test, y_test = split(max(1, size // 4))
    names = [f"class_{i}" for i in range(k)]
    return ArraySplits(x_train, y_train, x_test, y_test, names, "synthetic")


@register("synthetic", kind=ARRAYS, reads_config=True)
def read_synthetic(cfg) -> ArraySplits:
    """The `synthetic` entry: data.synthetic_size images of data.synthetic_shape, data.synthetic_classes
    classes (no statistics of its own: the generic 0.5 / 0.25 normalise it)."""
    return make_synthetic(cfg.synthetic_size, cfg.synthetic_shape, cfg.synthetic_classes)
