"""The one shape every sokd network has: stem -> ordered stages -> head.

Distillation methods only ever talk to this interface: feature terms read stage outputs, and the
knowledge bridge module is built by copying a teacher's last stages and head. Any network that can
be cut this way (CIFAR zoo, torchvision, a user's own) works with every method.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class InputAdapter(nn.Module):
    """Takes images as the run's data pipeline normalises them to what one network was trained on:
    per channel x * scale + shift (= (x·std_data + mean_data − mean_net) / std_net) and, where the
    network's image size differs, a bilinear resize. No parameters and no saved state: the run
    rebuilds it from the records of the network and the data."""

    def __init__(self, data_mean, data_std, net_mean, net_std, size: tuple[int, int] | None = None):
        super().__init__()
        dm, ds, nm, ns = (torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                          for v in (data_mean, data_std, net_mean, net_std))
        self.register_buffer("scale", ds / ns, persistent=False)
        self.register_buffer("shift", (dm - nm) / ns, persistent=False)
        self.mean, self.std = [float(v) for v in net_mean], [float(v) for v in net_std]
        self.size = tuple(size) if size is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = torch.nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return x

    def describe(self) -> str:
        fmt = lambda v: "[" + ", ".join(f"{x:.4g}" for x in v) + "]"  # noqa: E731
        size = f", resized to {self.size[0]}x{self.size[1]}" if self.size is not None else ""
        return f"its images renormalised to its own mean {fmt(self.mean)} std {fmt(self.std)}{size}"


class StagedNet(nn.Module):
    """A classifier cut into `stem`, `stages` (nn.ModuleList) and `head` (pool + classifier).

    `head` maps the last stage's output to logits (it holds everything after the last stage:
    final norm/activation, extra 1x1 convs, pooling, flatten, dropout, linear).
    """

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], head: nn.Module):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head

    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        """`input_adapter` (a submodule the run sets when the network was trained on images
        normalised or sized otherwise than the run's data) before the stem."""
        adapter = self._modules.get("input_adapter")
        return x if adapter is None else adapter(x)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor, embedding: bool = False):
        """(logits, [output of each stage]): what feature terms compare, at no extra cost.

        With `embedding`, (logits, [stage outputs], embedding): the embedding is what the final
        classifier reads (`head_with_embedding`)."""
        x = self.stem(self._enter(x))
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        if embedding:
            logits, emb = head_with_embedding(self.head, x)
            return logits, feats, emb
        return self.head(x), feats

    def forward_trunk(self, x: torch.Tensor, upto: int):
        """Run stem and stages[:upto]; returns (output, [stage outputs])."""
        x = self.stem(self._enter(x))
        feats = []
        for stage in self.stages[:upto]:
            x = stage(x)
            feats.append(x)
        return x, feats

    def forward_tail(self, x: torch.Tensor, start: int, embedding: bool = False):
        """Run stages[start:] and the head on a trunk output; returns (logits, [stage outputs]),
        and the embedding third with `embedding` (as `forward_features`)."""
        return run_tail(self.stages[start:], self.head, x, embedding)

    def reset_parameters(self, module: nn.Module | None = None) -> None:
        """Fresh initialisation of `module` (default: the whole net), as at construction.

        Subclasses with a custom init scheme override `init_module`.
        """
        for m in (module if module is not None else self).modules():
            self.init_module(m)

    def init_module(self, m: nn.Module) -> None:
        """Default init: each layer's own `reset_parameters`."""
        if hasattr(m, "reset_parameters") and m is not self:
            m.reset_parameters()


def split_embedding(out: tuple) -> tuple:
    """(logits, [stage outputs], embedding or None) from what `forward_features` or
    `forward_tail` returned, with or without `embedding`."""
    return out if len(out) == 3 else (*out, None)


def run_tail(stages, head: nn.Module, x: torch.Tensor, embedding: bool = False):
    """`stages` then `head` on `x`: (logits, [stage outputs]) and, with `embedding`, the
    embedding the head's classifier reads, third."""
    feats = []
    for stage in stages:
        x = stage(x)
        feats.append(x)
    if embedding:
        logits, emb = head_with_embedding(head, x)
        return logits, feats, emb
    return head(x), feats


def embedding_cut(head: nn.Module) -> int | None:
    """Where a sequential head's classifier begins: the index of its last nn.Linear, moved back over
    the dropouts right before it (the embedding is taken before dropout, as the penultimate
    features distillers compare are). None when the head is not an nn.Sequential with a linear."""
    if not isinstance(head, nn.Sequential):
        return None
    linears = [k for k, m in enumerate(head) if isinstance(m, nn.Linear)]
    if not linears:
        return None
    cut = linears[-1]
    while cut > 0 and isinstance(head[cut - 1], nn.Dropout):
        cut -= 1
    return cut


def has_embedding(head: nn.Module) -> bool:
    """Whether `head_with_embedding` can split this head into embedding and classifier."""
    return hasattr(head, "forward_embedding") or embedding_cut(head) is not None


def head_with_embedding(head: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, embedding) of `head` on a last-stage output, in one pass.

    The embedding is the penultimate representation: what the final classifier reads, after the
    head's own normalisation, activation and pooling (a pre-activation network's final BN + ReLU,
    a MobileNet's last 1x1 convolution, a transformer's final norm and token pooling). PKT, RKD,
    CRD and KD++ compare this vector, not a raw stage output. Heads that are not a plain
    sequence give it through their own `forward_embedding(x) -> (logits, embedding)`.
    """
    own = getattr(head, "forward_embedding", None)
    if own is not None:
        return own(x)
    cut = embedding_cut(head)
    if cut is None:
        raise TypeError(f"{type(head).__name__} has no embedding to give: it is neither an nn.Sequential "
                        "ending in a linear classifier nor a head with forward_embedding")
    for module in head[:cut]:
        x = module(x)
    emb = x
    for module in head[cut:]:
        x = module(x)
    return x, emb


def final_linear(net: StagedNet) -> nn.Linear | None:
    """The linear classifier that ends a network's head (the last nn.Linear in it), or None."""
    linears = [m for m in net.head.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def dry_forward(net: nn.Module, input_shape, run):
    """`run(net, x)` on one zero image of `input_shape`, in eval mode without gradients, the net's
    mode restored afterwards: how methods learn a network's shapes before training."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            param = next(net.parameters())
            x = torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device)
            return run(net, x)
    finally:
        net.train(was_training)

