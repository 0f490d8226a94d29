"""DistributedDataParallel for methods: each network that learns gets its own DDP wrapper.

Frozen networks (a KD/SOKD teacher) are not wrapped: they have no gradients to reduce. The SOKD
KBM is fed a detached trunk output, so its DDP sees an ordinary leaf input; every wrapped module
is called exactly once per step and all its parameters receive gradients, so
`find_unused_parameters` stays off. Wrappers are installed as the method's runners, which keeps
state_dict keys identical to single-process runs (checkpoints are interchangeable).
"""
from __future__ import annotations

import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..errors import SokdError


def wrap_learners(method, ctx, sync_bn: bool = False):
    if sync_bn and ctx.device.type != "cuda":
        raise SokdError("distributed.sync_bn needs CUDA (SyncBatchNorm has no CPU kernel); "
                        "set distributed.sync_bn=false on CPU")
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    for role, module in method.trainable_modules().items():
        if sync_bn:
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            if converted is not module:  # a bare BN module as the whole network: rare
                raise RuntimeError(f"cannot convert {role} to SyncBatchNorm in place")
        method.set_runner(role, DDP(module, device_ids=device_ids))
    return method


def sync_frozen_buffers(method, ctx) -> None:
    """Frozen nets in BN train mode update running stats per rank: make rank 0's the truth."""
    if not ctx.enabled:
        return
    for role in method.frozen:
        for buf in method.nets[role].buffers():
            tdist.broadcast(buf.data, src=0)
