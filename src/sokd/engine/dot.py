"""DOT, the Distillation-Oriented Trainer (Zhao et al., ICCV 2023), as `optim.name: dot`.

SGD whose momentum treats the two gradients of a distillation step apart: the gradient of the
task loss (the label terms, `Method.combine`'s "task" part) and that of the distillation loss
(every other term, "distill") each keep their own momentum buffer,

    m_task = m - delta,  m_distill = m + delta          (CIFAR-100: m 0.9, delta 0.075)

so the distillation direction is followed with more inertia than the task's, which the paper
finds lets the distillation loss reach a lower value. Per parameter θ (lr, weight decay wd):

    with both gradients   B_t <- m_task · B_t + (g_t + wd θ);   B_d <- m_distill · B_d + g_d
    with one of them      its buffer <- m · buffer + (g + wd θ)
    θ <- θ - lr · (B_t + B_d)                 (a buffer starts as its first gradient)

Weight decay enters the task buffer only when a parameter has both. Both gradients are taken at
the same θ. The training loop runs one backward pass per part, in `loss_parts` order, and calls
`stash` after every part but the last; `step` reads the stashed gradients and `p.grad`.
"""
from __future__ import annotations

import torch


class DOT(torch.optim.Optimizer):
    #: the loss parts whose gradients are taken apart, in the order of their backward passes
    loss_parts = ("distill", "task")

    def __init__(self, params, lr: float, momentum: float = 0.9, delta: float = 0.075, weight_decay: float = 0.0):
        if not (0 <= momentum - delta and momentum + delta < 1):
            raise ValueError(f"DOT needs 0 <= momentum - delta and momentum + delta < 1, got {momentum}, {delta}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "delta": delta, "weight_decay": weight_decay})
        self._stashed: dict[torch.Tensor, torch.Tensor] = {}

    def stash(self) -> None:
        """Keep the gradients of the part just backpropagated (the distillation part); the loop
        then sets the gradients to None, so the next part's backward writes fresh tensors."""
        self._stashed = {p: p.grad for g in self.param_groups for p in g["params"] if p.grad is not None}

    @staticmethod
    def _accumulate(state: dict, key: str, update: torch.Tensor, momentum: float) -> torch.Tensor:
        buf = state.get(key)
        if buf is None:
            buf = state[key] = update.clone()
        else:
            buf.mul_(momentum).add_(update)
        return buf

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stashed, self._stashed = self._stashed, {}
        for group in self.param_groups:
            lr, m, delta, wd = group["lr"], group["momentum"], group["delta"], group["weight_decay"]
            for p in group["params"]:
                task, distill = p.grad, stashed.get(p)
                if task is None and distill is None:
                    continue
                state = self.state[p]
                both = task is not None and distill is not None
                direction = torch.zeros_like(p)
                if task is not None:
                    update = task.add(p, alpha=wd) if wd else task
                    direction.add_(self._accumulate(state, "momentum_buffer", update, m - delta if both else m))
                if distill is not None:
                    update = distill if both or not wd else distill.add(p, alpha=wd)
                    direction.add_(self._accumulate(state, "distill_momentum_buffer", update, m + delta if both else m))
                p.add_(direction, alpha=-lr)
        return loss


def backward(out: dict, optimizer: torch.optim.Optimizer, scaler) -> None:
    """Backpropagate a step's loss: in one pass, or, for an optimizer that takes the loss in parts
    (`loss_parts`, e.g. DOT), one pass per part with `stash` between them. The gradients are
    set to None first."""
    optimizer.zero_grad(set_to_none=True)
    parts = getattr(optimizer, "loss_parts", None)
    if not parts:
        scaler.scale(out["loss"]).backward()
        return
    losses = out.get("loss_parts")
    if losses is None:
        from ..errors import SokdError
        raise SokdError(f"optim.name={type(optimizer).__name__.lower()} takes the loss in parts {parts}, but the "
                        f"method returns only its total; build its result with Method.combine (see docs/byom.md) "
                        f"or use optim.name=sgd")
    for i, part in enumerate(parts):
        loss = losses[part]
        last = i == len(parts) - 1
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            scaler.scale(loss).backward(retain_graph=not last)
        if not last:
            optimizer.stash()
            optimizer.zero_grad(set_to_none=True)
