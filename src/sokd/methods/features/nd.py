"""KD++'s norm-and-direction term (Wang et al., "Improving Knowledge Distillation via Regularizing
Feature Norm and Direction", 2023) as the module feature kind "nd".

Student and target embeddings are by default what each classifier reads (the released code's
features before the fc; a stage output given in `stages` is pooled, `losses.embedding`); a
student embedding of another width goes through a projector (BatchNorm1d -> Dropout(0.5) ->
Linear, as the released code's) first. The loss (`losses.norm_direction`) pulls each student
embedding towards the direction of its class's centre and, while it is shorter than the target's
embedding of the same image, lengthens it.

Class centres (`options.centres`):
- "mean" (the released code's): the mean target embedding of each class over the training data.
  The released code computes it in a pass over the augmented training set before training; here
  it accumulates over the training steps instead (running sums and counts per class, buffers of
  the method, so checkpoints hold them and a resume continues them): after the first epoch it is
  the mean over one augmented pass, as the released code's, and it keeps refining. A class not
  seen yet has no direction (its samples' loss is 1 with no gradient).
- "classifier": the rows of the target's final linear classifier, the class directions the
  target scores with (available when the classifier reads an embedding of the compared stage's
  width).
Weight 2.0: the released CIFAR-100 scripts' weight for ResNet pairs (resnet56 -> resnet20,
resnet32x4 -> resnet8x4; 1.5 for WRN-40-2 -> WRN-40-1), added to KD at T = 4.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ...errors import SokdError
from ...models.staged import dry_forward, final_linear
from .. import losses
from .terms import EMBEDDING, TermContext, _Kind, register_kind


class NDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    centres: Literal["mean", "classifier"] = Field(
        "mean", description="class centres: the mean target embedding per class (released code) or the "
                            "target classifier's rows")


def _same_rows(x: torch.Tensor) -> torch.Tensor:
    return x


class NDTerm(nn.Module):
    #: kept equal on every data-parallel rank by this module (`gather`, as CRD's banks)
    replicated_buffers = ("centre_sums", "centre_counts")

    def __init__(self, student_stage: int, target_stage: int, student_dim: int, target_dim: int,
                 num_classes: int, classifier: nn.Linear | None):
        super().__init__()
        self.student_stage, self.target_stage = student_stage, target_stage
        self.project = (nn.Identity() if student_dim == target_dim else
                        nn.Sequential(nn.BatchNorm1d(student_dim), nn.Dropout(0.5), nn.Linear(student_dim, target_dim)))
        if not isinstance(self.project, nn.Identity):
            nn.init.zeros_(self.project[2].bias)
        self._classifier = [classifier] if classifier is not None else []   # the target's, not owned
        self.register_buffer("centre_sums", torch.zeros(num_classes, target_dim, dtype=torch.float64))
        self.register_buffer("centre_counts", torch.zeros(num_classes, dtype=torch.float64))
        self.gather = _same_rows

    def centres(self) -> torch.Tensor:
        if self._classifier:
            return self._classifier[0].weight.detach().float()
        return (self.centre_sums / self.centre_counts.clamp(min=1)[:, None]).float()

    def forward(self, student_feats: list, target_feats: list, batch: dict) -> torch.Tensor:
        labels = batch["labels"]
        s = self.project(losses.embedding(student_feats[self.student_stage]))
        t = losses.embedding(target_feats[self.target_stage].detach()).detach()
        if not self._classifier:
            with torch.no_grad():
                rows, emb = self.gather(labels), self.gather(t)
                self.centre_sums.index_add_(0, rows, emb.double())
                self.centre_counts.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float64))
        return losses.norm_direction(s, t, self.centres(), labels)


def _build(pairs, options: NDOptions, ctx: TermContext) -> NDTerm:
    if len(pairs) != 1:
        raise SokdError(f"the nd feature term compares one student stage with one target stage, got "
                        f"{len(pairs)}; give one entry in method.features[nd].stages (default: embedding)")
    (i, j), = pairs
    s_dim, t_dim = ctx.channels("student")[i], ctx.channels("target")[j]
    num_classes = int(dry_forward(ctx.target, ctx.input_shape, lambda n, x: n(x)).shape[1])
    classifier = None
    if options.centres == "classifier":
        classifier = final_linear(ctx.target)
        if classifier is None or classifier.in_features != t_dim:
            width = classifier.in_features if classifier is not None else None
            raise SokdError(f"method.features[nd].options.centres=classifier needs the target's classifier to "
                            f"read embeddings of the compared stage's width ({t_dim}), but it reads {width}; "
                            f"use centres: mean")
    return NDTerm(i, j, s_dim, t_dim, num_classes, classifier)


register_kind("nd", _Kind(
    2.0, "KD++'s CIFAR-100 scripts (nd 2.0 for ResNet pairs, 1.5 for WRN-40-2 -> WRN-40-1), with KD at T = 4",
    build=_build, options=NDOptions, embedding=True, default_stages=lambda n: [EMBEDDING]))
