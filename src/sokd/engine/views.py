"""A training batch as the method's forward takes it, with the views the method asks for.

A method that trains on a second, strongly augmented view of every batch (`Method.views == 2`,
e.g. MLKD) gets both views stacked along the batch, the usual one first, with the labels and
training-set indices repeated: every network runs once on 2B images and every term sees both
views; the terms that treat the views apart split them again. The step's statistics (training
accuracy, images per second) count the usual view only.
"""
from __future__ import annotations

import torch


def step_inputs(batch, with_index: bool, views: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(images, labels, keyword arguments) for the method's forward from a data batch: (images,
    labels[, index][, strong view])."""
    images, labels = batch[0], batch[1]
    index = batch[2] if with_index else None
    if views == 2:
        strong = batch[-1]
        images = torch.cat([images, strong])
        labels = labels.repeat(2)
        index = index.repeat(2) if index is not None else None
    return images, labels, ({"index": index} if index is not None else {})


def usual_view(out: dict, n: int, views: int) -> dict:
    """The step's result with each role's logits cut to the usual view's `n` rows (for statistics)."""
    if views == 1:
        return out
    return {**out, "logits": {role: z[:n] for role, z in out["logits"].items()}}
