"""The knowledge bridge module: a trainable copy of a teacher's last stage(s) and head.

Built from any StagedNet, so SOKD works with every teacher in the zoo (and torchvision models),
instead of being hard-wired into one architecture.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from ..errors import SokdError
from .. import models
from ..models.staged import StagedNet, run_tail
from .base import hold_running_statistics


class KnowledgeBridge(nn.Module):
    """stages + head copied from a teacher; input is the (detached) output of the stage before."""

    def __init__(self, stages: list[nn.Module], head: nn.Module):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x: torch.Tensor, embedding: bool = False):
        """(logits, [output of each KBM stage]), and with `embedding` the embedding its classifier
        reads, third (`models.staged.head_with_embedding`)."""
        return run_tail(self.stages, self.head, x, embedding)


def build_kbm(teacher: StagedNet, stages: int = 1,
              init: Literal["random", "teacher"] = "random") -> KnowledgeBridge:
    """Copy the teacher's last `stages` stages and its head; re-initialise unless init='teacher'."""
    n = teacher.num_stages
    if not 1 <= stages <= n - 1:
        raise SokdError(f"kbm_stages={stages} but the teacher has {n} stages; the KBM needs at least "
                        f"one frozen stage before it, so use 1..{n - 1}")
    kbm = KnowledgeBridge(copy.deepcopy(list(teacher.stages[n - stages:])), copy.deepcopy(teacher.head))
    kbm.requires_grad_(True)
    if init == "random":
        teacher.reset_parameters(kbm)
    elif init != "teacher":
        raise SokdError(f"kbm_init must be 'random' or 'teacher', got '{init}'")
    spec = models.spec_of(teacher)
    if spec is not None:  # the KBM is part of the teacher's architecture (its last stages + head)
        models.set_spec(kbm, spec)
    return kbm


def teacher_branch(teacher: StagedNet, kbm: KnowledgeBridge) -> StagedNet:
    """Frozen trunk + KBM as one standalone classifier with the teacher's architecture and keys."""
    n, k = teacher.num_stages, len(kbm.stages)
    branch = copy.deepcopy(teacher)
    for i in range(k):
        branch.stages[n - k + i] = copy.deepcopy(kbm.stages[i])
    branch.head = copy.deepcopy(kbm.head)
    branch.requires_grad_(False)
    hold_running_statistics(branch, False)   # a standalone network: usual BatchNorm, whatever the run's mode
    return branch
