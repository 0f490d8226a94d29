"""Parameter and MAC counts."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import SokdError
from .registry import create


def model_info(name_or_net: str | nn.Module, input_shape: tuple[int, ...] = (3, 32, 32),
               num_classes: int = 100) -> dict[str, int]:
    """{'params': trainable + frozen parameter count, 'macs': multiply-accumulates per image}.

    MACs are FLOPs / 2 as counted by `torch.utils.flop_counter.FlopCounterMode` (convolutions and
    matrix products; norms, activations and pooling are not counted) for one image of
    `input_shape` (C, H, W) in eval mode. A name is built with `create(name, num_classes,
    in_channels=input_shape[0])`; a module is measured as is (`num_classes` is then ignored).
    """
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise SokdError(f"input_shape must be (channels, height, width), got {input_shape!r}")
    net = create(name_or_net, num_classes, in_channels=shape[0]) if isinstance(name_or_net, str) else name_or_net
    if not isinstance(net, nn.Module):
        raise SokdError(f"model_info needs a model name or an nn.Module, got {type(net).__name__}")
    params = sum(p.numel() for p in net.parameters())
    first = next(iter(net.parameters()), None)
    x = torch.zeros(1, *shape, device=first.device if first is not None else None,
                    dtype=first.dtype if first is not None and first.is_floating_point() else None)
    was_training = net.training
    net.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            net(x)
    finally:
        net.train(was_training)
    return {"params": int(params), "macs": int(counter.get_total_flops() // 2)}
