"""Deep Mutual Learning: N networks from scratch, each learning from the others online."""
from __future__ import annotations

from .peers import PeerGroup
from .registry import register


@register("dml")
class DML(PeerGroup):
    term = "peers"

    def peer_loss(self, role, logits, labels, target):
        """The mean of the distances from every other network's logits."""
        z = logits[role]
        others = [o for r, o in logits.items() if r != role]
        return sum(self.distill(o, z, labels) for o in others) / len(others)
