"""What online peer methods share (DML, KDCL): a student and one or more peers, all learning from
scratch at once, each with its own cross-entropy and one distillation term from the group.

A subclass names its distillation term (`term`: `<role>_kl_<term>`) and says what each network
learns from: `group_target` (computed once per step from every network's logits, e.g. KDCL's
ensemble; None when there is none) and `peer_loss` (one network's distillation loss).
"""
from __future__ import annotations

import torch
from torch import nn

from . import losses
from .base import Method, MethodOptions, Role, roles_required


def student_and_peers(method: str, student, peers=None, peer=None) -> tuple[dict[str, nn.Module], list[str]]:
    """The networks of a method that trains a student with peers from scratch: ({"student": ...,
    "peer" or "peer1", "peer2", ...}, peer role names); a clear error when a network is missing."""
    peers = list(peers or []) + ([peer] if peer is not None else [])
    roles_required(method, {"student": student, "peer": peers[0] if peers else None}, ["student", "peer"])
    names = ["peer"] if len(peers) == 1 else [f"peer{i + 1}" for i in range(len(peers))]
    return {"student": student, **dict(zip(names, peers))}, names


class PeerGroup(Method):
    """Base of DML and KDCL (see module doc); the student is compared with the first peer."""

    roles = {"student": Role(), "peers": Role(many=True, like="teacher")}
    aliases = {"peer": "peers"}
    accepts_features = False
    #: the distillation term of each network is `<role>_kl_<term>`
    term: str = "peers"

    def __init__(self, student=None, peers=None, peer=None, options: MethodOptions | None = None,
                 input_shape=None):
        nets, names = student_and_peers(self.name, student, peers, peer)
        self.term_names = tuple(t for r in nets for t in (f"{r}_ce", f"{r}_kl_{self.term}"))
        self.comparisons = ((names[0], "student"),)
        super().__init__(nets, options or self.Options())

    def group_target(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor | None:
        return None

    def peer_loss(self, role: str, logits: dict[str, torch.Tensor], labels: torch.Tensor,
                  target: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images, labels):
        logits = {role: net(images) for role, net in self.nets.items()}
        target = self.group_target(logits, labels)
        terms = {}
        for role, z in logits.items():
            terms[f"{role}_ce"] = losses.cross_entropy(z, labels)
            terms[f"{role}_kl_{self.term}"] = self.peer_loss(role, logits, labels, target)
        return self.combine(terms, logits)
