"""Test-set evaluation of every role a method reports, plus agreement/KL between role pairs."""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .precision import autocast


class FrozenLogits:
    """The evaluation logits of roles that never change (`Method.constant_roles`: frozen, their
    running statistics held), kept batch by batch from the first evaluation of a split, so later
    evaluations run only the networks that learn. The evaluation data come in the same order
    every time (no shuffling, no augmentation); a batch whose size differs from the kept one is
    computed again. Nothing is kept past `limit` elements (a large test set on a small device
    is evaluated in full each time instead)."""

    def __init__(self, roles, limit: int = 2 ** 26):
        self.roles, self.limit = tuple(roles), limit
        self.batches: list[dict[str, torch.Tensor]] = []
        self.size = 0
        self.full = False

    def known(self, index: int, images: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if index >= len(self.batches):
            return None
        kept = self.batches[index]
        return kept if all(t.shape[0] == images.shape[0] for t in kept.values()) else None

    def keep(self, index: int, logits: dict[str, torch.Tensor]) -> None:
        if self.full or index != len(self.batches):
            return
        kept = {r: logits[r].detach() for r in self.roles if r in logits}
        self.size += sum(t.numel() for t in kept.values())
        if self.size > self.limit:
            self.full, self.batches = True, []
            return
        self.batches.append(kept)


def _accepts_known(method) -> bool:
    try:
        return "known" in inspect.signature(method.predict).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def evaluate(method, source, device, precision: str = "fp32", reduce=None, cache: FrozenLogits | None = None) -> dict:
    """{"roles": {role: {top1, top5}}, "compare": {"a->b": {agreement, kl}}, "n": samples}.

    Accuracies in percent. KL(a || b) at T=1, mean over samples. `reduce(tensor)` sums counts across
    processes (distributed evaluation over disjoint shards). `cache`: the split's FrozenLogits.
    """
    cache = cache if cache is not None and cache.roles and _accepts_known(method) else None
    was_training = method.training
    method.eval()
    sums: dict[str, torch.Tensor] = {}
    n = torch.zeros((), dtype=torch.float64, device=device)

    def add(key, value):
        sums[key] = sums.get(key, 0) + value.double()

    try:
        for index, (images, labels) in enumerate(source):
            known = cache.known(index, images) if cache is not None else None
            with autocast(device, precision):
                logits = method.predict(images, known=known) if known else method.predict(images)
            if cache is not None and known is None:
                cache.keep(index, logits)
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
