"""DistributedDataParallel for methods: the whole method is one DDP module.

The loop calls the wrapper; the method's forward calls its networks as usual (`self.nets[role]`)
and knows nothing of processes. DDP reduces the gradients of every parameter that requires one:
the learning networks and any feature regressors. Frozen networks (a KD/SOKD teacher) have
requires_grad False, so DDP leaves their parameters alone. Every learning parameter receives a
gradient each step (the SOKD KBM is fed a detached trunk output, an ordinary leaf input), so
`find_unused_parameters` stays off. The method itself is never changed, so its state_dict keys
are those of a single-process run (checkpoints are interchangeable).

Buffers are not broadcast per step (`broadcast_buffers=False`): a BatchNorm layer in train mode
normalises with its batch's statistics and only writes its running statistics, so letting each
rank keep its own during an epoch changes no gradient, and saves a broadcast of every buffer
before every forward. `sync_buffers` reconciles them once, wherever a run's state is read or
saved (the end of every epoch, before evaluation, and before a stop's checkpoint): every
BatchNorm running mean and variance becomes the mean over ranks (each rank saw different
images, so the mean estimates the statistics of all of them), every other buffer rank 0's.
Frozen networks are left out: loaded from one file and never updated (`Method.train` holds their
running statistics), they are equal on every rank already, and an average over three ranks would
round them.

Gradients: `gradient_as_bucket_view` makes each parameter's .grad a view into DDP's all-reduce
bucket, so no copy between the two; `static_graph` (distributed.static_graph, default on) tells
DDP that the same parameters receive gradients every step, which lets it skip its per-step
search for unused parameters and overlap all-reduces with the backward from the second step on.

A submodule that updates per-sample state in forward (CRD's memory banks) names those buffers in
`replicated_buffers` and has a `gather` attribute: the wrapper sets `gather` to an all-gather
(every rank's rows, concatenated in rank order), so each rank applies every rank's updates and
the buffers stay identical; they are broadcast from rank 0 once here and then left out of DDP's
per-step broadcast, which would otherwise overwrite the other ranks' rows (and copy the whole
bank every step). Keyword arguments of the loop's call (`index=`) reach the method unchanged.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..errors import SokdError


def wrap_method(method: nn.Module, ctx, sync_bn: bool = False, static_graph: bool = True) -> DDP:
    """The DDP module whose forward the loop calls. With `sync_bn`, the BatchNorm layers of what
    learns become SyncBatchNorm (frozen networks keep their own)."""
    if sync_bn and ctx.device.type != "cuda":
        raise SokdError("distributed.sync_bn needs CUDA (SyncBatchNorm has no CPU kernel); "
                        "set distributed.sync_bn=false on CPU")
    if sync_bn:
        for role, module in method.trainable_modules().items():
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            if converted is not module:  # a bare BN module as the whole network: rare
                raise RuntimeError(f"cannot convert {role} to SyncBatchNorm in place")
    replicated = []
    for prefix, module in method.named_modules():
        names = getattr(module, "replicated_buffers", ())
        if names:
            module.gather = _all_gather_rows
        for name in names:
            tdist.broadcast(getattr(module, name).data, src=0)
            replicated.append(f"{prefix}.{name}" if prefix else name)
    if replicated:
        DDP._set_params_and_buffers_to_ignore_for_model(method, replicated)
    method.replicated_buffer_names = tuple(replicated)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(method, device_ids=device_ids, broadcast_buffers=False, gradient_as_bucket_view=True,
               static_graph=static_graph)


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (same shape on each: the index plan gives every rank equal batches),
    concatenated along dim 0 in rank order."""
    parts = [torch.empty_like(t) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def sync_buffers(method: nn.Module, ctx) -> None:
    """Make every rank's buffers equal: BatchNorm running means and variances averaged over
    ranks, every other buffer (step counters, a method's own state) rank 0's; the buffers that
    replicate themselves (see `replicated_buffers`) are already equal and left alone. One
    collective per buffer, called at the same point by every rank."""
    if not ctx.enabled:
        return
    skip = set(getattr(method, "replicated_buffer_names", ()))
    frozen = tuple(f"nets.{role}" for role in getattr(method, "frozen", ()))
    world = tdist.get_world_size()
    for prefix, module in method.named_modules():
        if any(prefix == f or prefix.startswith(f + ".") for f in frozen):
            continue
        averaged = ("running_mean", "running_var") if isinstance(module, nn.modules.batchnorm._BatchNorm) else ()
        for name, buf in module.named_buffers(recurse=False):
            if buf is None or (f"{prefix}.{name}" if prefix else name) in skip:
                continue
            if name in averaged and buf.is_floating_point():
                tdist.all_reduce(buf.data)
                buf.data.div_(world)
            else:
                tdist.broadcast(buf.data, src=0)
