"""Test-set evaluation of every role a method reports, plus agreement/KL between role pairs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import autocast


@torch.no_grad()
def evaluate(method, source, device, precision: str = "fp32", reduce=None) -> dict:
    """{"roles": {role: {top1, top5}}, "compare": {"a->b": {agreement, kl}}, "n": samples}.

    Accuracies in percent. KL(a || b) at T=1, mean over samples. `reduce(tensor)` sums counts across
    processes (distributed evaluation over disjoint shards).
    """
    was_training = method.training
    method.eval()
    sums: dict[str, torch.Tensor] = {}
    n = torch.zeros((), dtype=torch.float64, device=device)

    def add(key, value):
        sums[key] = sums.get(key, 0) + value.double()

    try:
        for images, labels in source:
            with autocast(device, precision):
                logits = method.predict(images)
            n += labels.numel()
            for role, z in logits.items():
                z = z.float()
                top5 = z.topk(min(5, z.shape[1]), dim=1).indices
                hit = top5.eq(labels[:, None])
                add(f"{role}/top1", hit[:, 0].sum())
                add(f"{role}/top5", hit.any(dim=1).sum())
            for ref, fol in method.comparisons:
                if ref in logits and fol in logits:
                    a, b = logits[ref].float(), logits[fol].float()
                    add(f"{ref}->{fol}/agreement", a.argmax(1).eq(b.argmax(1)).sum())
                    kl = F.kl_div(F.log_softmax(b, 1), F.log_softmax(a, 1), log_target=True,
                                  reduction="none").sum(1)
                    add(f"{ref}->{fol}/kl", kl.sum())
    finally:
        method.train(was_training)
    keys = sorted(sums)
    packed = torch.stack([sums[k] for k in keys] + [n]) if keys else n[None]
    if reduce is not None:
        packed = reduce(packed)
    total = max(float(packed[-1]), 1.0)
    values = {k: float(v) / total for k, v in zip(keys, packed[:-1])}
    out: dict = {"roles": {}, "compare": {}, "n": int(packed[-1])}
    for key, v in values.items():
        name, metric = key.rsplit("/", 1)
        scale = 100.0 if metric in ("top1", "top5", "agreement") else 1.0
        (out["compare"] if "->" in name else out["roles"]).setdefault(name, {})[metric] = v * scale
    return out
