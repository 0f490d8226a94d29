"""Deep Mutual Learning: N networks from scratch, each learning from the others online."""
from __future__ import annotations

from .base import Method, MethodOptions, Role, student_and_peers
from . import losses
from .registry import register


@register("dml")
class DML(Method):
    roles = {"student": Role(), "peers": Role(many=True, like="teacher")}
    aliases = {"peer": "peers"}
    accepts_features = False

    def __init__(self, student=None, peers=None, peer=None, options: MethodOptions | None = None,
                 input_shape=None):
        nets, names = student_and_peers(self.name, student, peers, peer)
        self.term_names = tuple(t for r in nets for t in (f"{r}_ce", f"{r}_kl_peers"))
        self.comparisons = ((names[0], "student"),)
        super().__init__(nets, options or MethodOptions())

    def forward(self, images, labels):
        logits = {role: net(images) for role, net in self.nets.items()}
        terms = {}
        for role, z in logits.items():
            others = [o for r, o in logits.items() if r != role]
            terms[f"{role}_ce"] = losses.cross_entropy(z, labels)
            terms[f"{role}_kl_peers"] = sum(self.distill(o, z, labels) for o in others) / len(others)
        return self.combine(terms, logits)
