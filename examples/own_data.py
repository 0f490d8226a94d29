"""Your own data set in sokd: register a reader, list this file under `imports:`.

    .venv/bin/sokd train examples/own_data.yaml

The reader returns both splits; each may be (uint8 images, labels) arrays or a torch Dataset of
(image, label) with PIL images or uint8 tensors. Here: a torch Dataset that draws digits-like
glyphs, standing in for a Dataset you already have (keep transforms out of it: sokd augments and
normalises). `data.options` in the config arrive as keyword arguments.
"""
from __future__ import annotations

import numpy as np
import torch

import sokd


class Glyphs(torch.utils.data.Dataset):
    """`n` 20x20 grayscale images of `classes` bar patterns with noise (uint8 tensors (1, H, W))."""

    def __init__(self, n: int, classes: int, seed: int):
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, classes, n)
        self.images = rng.integers(0, 60, (n, 1, 20, 20)).astype(np.uint8)
        for i, c in enumerate(self.labels):
            self.images[i, 0, 2 + 2 * c: 4 + 2 * c, 3:17] += 180        # a bar whose row is the class

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.images[i]), int(self.labels[i])


@sokd.data.register("glyphs")
def glyphs(root=None, train_size: int = 2000, test_size: int = 500, classes: int = 8):
    return {"train": Glyphs(train_size, classes, seed=0), "test": Glyphs(test_size, classes, seed=1),
            "classes": [f"bar{c}" for c in range(classes)]}
