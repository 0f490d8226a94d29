"""ONE: knowledge distillation by On-the-fly Native Ensemble (Lan, Zhu & Gong, NeurIPS 2018).

No pretrained teacher: the student's stem and first n-k stages become a trunk shared by N
branches, each the student's last k stages and head; a gate weighs the branches per image and
their gated sum of logits is the teacher, built on the fly and distilled back into every branch:

    g(x) = softmax(ReLU(BN(W · GAP(trunk(x)))))       N weights per image, summing to 1
    z_e  = sum_i g_i(x) · z_i
    L    = sum_i CE(y, z_i) + CE(y, z_e) + sum_i T² · KL(softmax(z_e/T) || softmax(z_i/T))

with z_e detached in the KL terms (the released code distils from a copy of the ensemble's data),
so the gate and the ensemble learn from CE(y, z_e) only. The gate is, as the paper describes it,
one FC layer followed by batch normalisation, ReLU and softmax, fed the features the branches take
(the trunk output, global-average-pooled as in the released code). T = 3 as in the paper; its
released code hard-codes the same value in its KL loss.

Branch 1 is the student's own last stages and head, so trunk + branch 1 *is* the student network,
with its architecture, keys and initialisation: `student.pt` is the deployable single-branch
model the paper evaluates, and `sokd eval` / `sokd export` read it like any student. The other
branches are deep copies re-initialised with the student's own scheme, so the ensemble's members
start different; each is also saved as a classifier of the student's architecture (trunk +
branch i: `branch2.pt`, ...). The ensemble is reported at test time as role "ensemble" but has
no file of its own: it needs every branch and the gate.

Not reproduced: the released code ramps the KL weight up with a sigmoid schedule over its first
80 epochs (the paper's loss has no ramp); the nearest setting is `method.warmup_epochs`, a linear
ramp of every distillation term, off by default as in the paper.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .. import models
from ..errors import SokdError
from ..models.staged import StagedNet, dry_forward
from . import losses
from .base import Method, MethodOptions, Role
from .kbm import KnowledgeBridge, teacher_branch
from .registry import register


class ONEOptions(MethodOptions):
    T: float = Field(3.0, gt=0, description="softmax temperature of the KL terms (paper: 3)")
    branches: int = Field(3, ge=2, description="branches sharing the trunk, the student's own included (paper: 3)")
    branch_stages: int = Field(1, ge=1, description="how many of the student's last stages each branch holds")


class Gate(nn.Module):
    """Per-image branch weights from the trunk output: GAP -> Linear -> BatchNorm1d -> ReLU -> softmax."""

    def __init__(self, channels: int, branches: int):
        super().__init__()
        self.fc = nn.Linear(channels, branches)
        self.bn = nn.BatchNorm1d(branches)

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        h = self.fc(F.adaptive_avg_pool2d(trunk, 1).flatten(1))
        if self.training and h.shape[0] == 1:
            # batch statistics of one sample are undefined: use the running ones for this batch
            h = F.batch_norm(h, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                             training=False, eps=self.bn.eps)
        else:
            h = self.bn(h)
        return torch.softmax(F.relu(h).float(), dim=1)


def branch_roles(branches: int) -> list[str]:
    """Role names of the branches, in branch order: the student's own first."""
    return ["student"] + [f"branch{i}" for i in range(2, branches + 1)]


@register("one")
class ONE(Method):
    """Roles: "student" (trunk + branch 1), "branch2".."branchN" (the other branches' stages and
    head, fed the trunk output), "gate"; each learns in its own param group. Test-time roles add
    "ensemble"; best.pt follows the student."""

    Options = ONEOptions
    roles = {"student": Role()}

    @classmethod
    def role(cls, name: str) -> Role:
        """The branches (branch2, branch3, ...) are the student's last stage(s) and head, saved as
        model files of their own on the student's trunk; the gate only weights the ensemble."""
        if name.startswith("branch"):
            return Role(config=False, file=name, part="ONE's branch: the student's last stage(s) and head")
        if name == "gate":
            return Role(config=False, part="ONE's gate: the ensemble's weights, no classifier of images on its own")
        return super().role(name)
    accepts_features = False

    def __init__(self, student=None, options: ONEOptions | None = None, input_shape=(3, 32, 32)):
        self.require(student=student)
        options = options or ONEOptions()
        n, k = student.num_stages, options.branch_stages
        if not 1 <= k <= n - 1:
            raise SokdError(f"branch_stages={k} but the student has {n} stages; the branches need at least "
                            f"one shared stage before them, so use 1..{n - 1}")
        self.split = n - k
        roles = branch_roles(options.branches)
        nets: dict[str, nn.Module] = {"student": student}
        spec = models.spec_of(student)
        for role in roles[1:]:
            branch = KnowledgeBridge(copy.deepcopy(list(student.stages[self.split:])), copy.deepcopy(student.head))
            student.reset_parameters(branch)
            if spec is not None:  # a branch is part of the student's architecture (its last stages + head)
                models.set_spec(branch, spec)
            nets[role] = branch
        nets["gate"] = Gate(_trunk_channels(student, self.split, input_shape), options.branches)
        self.branch_names = tuple(roles)
        self.term_names = tuple(t for r in roles for t in (f"{r}_ce", f"{r}_kl_ensemble")) + ("ensemble_ce",)
        self.comparisons = (("ensemble", "student"),)
        super().__init__(nets, options)

    def heads(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({branch role: logits}, gate weights (batch, branches)) from one pass of the trunk."""
        student = self.nets["student"]
        trunk, _ = student.forward_trunk(images, self.split)
        logits = {"student": student.forward_tail(trunk, self.split)[0]}
        for role in self.branch_names[1:]:
            logits[role] = self.nets[role](trunk)[0]
        return logits, self.nets["gate"](trunk)

    @staticmethod
    def ensemble(logits: dict[str, torch.Tensor], gate: torch.Tensor) -> torch.Tensor:
        """sum_i g_i · z_i, in fp32 (the gate's softmax is fp32 under autocast)."""
        stacked = torch.stack([z.float() for z in logits.values()], dim=1)  # (batch, branches, classes)
        return (gate.float().unsqueeze(-1) * stacked).sum(dim=1)

    def forward(self, images, labels):
        logits, gate = self.heads(images)
        z_e = self.ensemble(logits, gate)
        terms = {}
        for role, z in logits.items():
            terms[f"{role}_ce"] = losses.cross_entropy(z, labels)
            terms[f"{role}_kl_ensemble"] = self.distill(z_e, z, labels)  # z_e detached there
        terms["ensemble_ce"] = losses.cross_entropy(z_e, labels)
        return self.combine(terms, {**logits, "ensemble": z_e})

    @torch.no_grad()
    def predict(self, images):
        logits, gate = self.heads(images)
        return {**logits, "ensemble": self.ensemble(logits, gate)}

    def standalone(self):
        student = self.nets["student"]
        files = {"student": ("student", student)}
        for role in self.branch_names[1:]:
            files[role] = ("student", teacher_branch(student, self.nets[role]))
        return files


def _trunk_channels(student: StagedNet, upto: int, input_shape) -> int:
    """Channels of the trunk output, from one dry forward."""
    try:
        trunk = dry_forward(student, input_shape, lambda n, x: n.forward_trunk(x, upto)[0])
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SokdError(f"the student cannot take {tuple(input_shape)} images ({first[:160]}); use larger "
                        f"images (data.image_size / data.pad_to) or another architecture") from None
    if trunk.dim() != 4:
        raise SokdError(f"method 'one' needs the student's stage {upto - 1} to output feature maps "
                        f"(batch, channels, H, W), got shape {tuple(trunk.shape)}; use another architecture")
    return int(trunk.shape[1])
