"""Process-group facts the loop needs; a single process is the degenerate case (no-ops)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto", backend: str = "auto") -> "DistContext":
        """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device != "cpu"
        dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        if not tdist.is_initialized():
            tdist.init_process_group(backend=("nccl" if use_cuda else "gloo") if backend == "auto" else backend)
        return cls(tdist.get_rank(), tdist.get_world_size(), local, dev)

    def wrap(self, method, sync_bn: bool = False, static_graph: bool = True):
        """The module whose forward the loop calls: the method itself, or its DDP wrapper.

        Only the loop calls the wrapper; evaluation, checkpoints and the optimizer use `method`."""
        if not self.enabled:
            return method
        from .ddp import wrap_method
        return wrap_method(method, self, sync_bn, static_graph)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        t = t.clone()
        tdist.all_reduce(t)
        return t

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return t

    def any_flag(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (an all-reduce and a host read: call it only
        where every process calls it, at the same point of the run)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def print(self, *args) -> None:
        if self.is_main:
            print(*args, flush=True)
