"""KDCL: online Knowledge Distillation via Collaborative Learning (Guo et al., CVPR 2020).

N networks (the student and its peers) learn from scratch together; at every step their logits
are ensembled, per image and with the label, into one soft target z_t that teaches all of them:

    L = sum_i [ CE(y, z_i) + T² · KL(softmax(z_t/T) || softmax(z_i/T)) ]     (z_t detached)

How z_t is built (`method.ensemble`):

* "minlogit" (KDCL-MinLogit, the default): shift each network's logits so that its target-class
  logit is 0, z_i^c = z_i - z_{i,y}, and take the element-wise minimum over networks,
  z_t = min_i z_i^c. CE is invariant to shifting all logits by a constant, and every non-target
  logit of z_t is the smallest any network gives, so CE(y, z_t) <= min_i CE(y, z_i) per image:
  the target is at least as confident in the right class as the best network.
* "naive" (KDCL-Naive): per image, the logits of the network with the smallest CE(y, z_i).

Unlike DML's pairwise terms (each network imitates every other), every network imitates one
teacher that is better than any of them on the batch. Both ensembles need the label, so there is
no "ensemble" role at test time; each network is reported and saved on its own.

Defaults: T = 2 and weight 1 on every term (the paper's λ = 1), as we recall the paper's
implementation details; its text was not at hand to check them against when this was written,
so treat them as settings (method.T, method.weights), not as quotations of the paper.

Not reproduced: KDCL-Linear (a per-batch convex fit of ensemble weights) and KDCL-General (weights
from a held-out set), and the paper's distinct random distortion of the input for each network:
the engine gives every network the same augmented batch.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .base import MethodOptions
from .peers import PeerGroup
from .registry import register


class KDCLOptions(MethodOptions):
    T: float = Field(2.0, gt=0, description="softmax temperature of the KL terms")
    ensemble: Literal["minlogit", "naive"] = Field(
        "minlogit", description="soft target: element-wise min of target-shifted logits, or the lowest-CE network's")


def minlogit_ensemble(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KDCL-MinLogit teacher from stacked logits (networks, batch, classes): min_i (z_i - z_{i,y})."""
    target = logits.gather(2, labels.view(1, -1, 1).expand(logits.shape[0], -1, 1))
    return (logits - target).amin(dim=0)


def naive_ensemble(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KDCL-Naive teacher from stacked logits (networks, batch, classes): per image, the logits of
    the network with the smallest cross-entropy (the first such network on a tie)."""
    n, b, c = logits.shape
    ce = torch.nn.functional.cross_entropy(logits.reshape(n * b, c), labels.repeat(n), reduction="none")
    best = ce.view(n, b).argmin(dim=0)
    return logits[best, torch.arange(b, device=logits.device)]


ENSEMBLES = {"minlogit": minlogit_ensemble, "naive": naive_ensemble}


@register("kdcl")
class KDCL(PeerGroup):
    Options = KDCLOptions
    term = "ensemble"

    def ensemble_target(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The ensemble soft target z_t (fp32, no gradient)."""
        with torch.no_grad():
            stacked = torch.stack([z.detach().float() for z in logits.values()])
            return ENSEMBLES[self.options.ensemble](stacked, labels)

    group_target = ensemble_target

    def peer_loss(self, role, logits, labels, target):
        return self.distill(target, logits[role], labels)
