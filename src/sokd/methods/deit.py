"""DeiT's distillation through a token (Touvron et al., ICML 2021): `method.name: deit`.

The student is a vision transformer with a class token and a distillation token, each with its
own head (timm's distilled DeiTs, e.g. `timm.deit_tiny_distilled_patch16_224`, or any timm ViT
built with `kwargs: {distillation_token: true}`). The class head
learns from the labels, the distillation head from the frozen teacher:

    hard (DeiT's default):  0.5 · CE(y, z_cls) + 0.5 · CE(argmax teacher, z_dist)
    soft:                   0.5 · CE(y, z_cls) + 0.5 · KL_T(teacher → z_dist) · T² / C

(the soft term averaged over every logit, as DeiT's code does: its batch-mean KL divided by the
number of classes C; T = method.T, DeiT's tau 1 with soft targets). At test time the student
predicts with the mean of its two heads, as DeiT does (the student's ordinary forward).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..errors import SokdError
from . import losses
from .base import Method, MethodOptions
from .registry import register


class DeiTOptions(MethodOptions):
    deit_target: Literal["hard", "soft"] = Field("hard", description="the distillation head's target: the "
                                                 "teacher's class (hard, DeiT's default) or its softened distribution")


@register("deit")
class DeiT(Method):
    Options = DeiTOptions
    term_names = ("student_ce", "student_dist_teacher")
    default_weights = {"student_ce": 0.5, "student_dist_teacher": 0.5}
    comparisons = (("teacher", "student"),)
    reference_label = "DeiT"
    accepts_features = False
    distills_logits = False   # its distillation head has its own targets, not a logit distance
    logit_options_refused = ("distils through its token with its own targets (method.deit_target: hard or soft), "
                             "so method.{option} does nothing; remove it")
    features_refused = "trains a distillation token, not feature terms; use {either}"

    def __init__(self, teacher=None, student=None, options: DeiTOptions | None = None,
                 input_shape=(3, 32, 32), num_samples: int | None = None):
        self.require(teacher=teacher, student=student)
        super().__init__({"teacher": teacher, "student": student}, options or DeiTOptions())
        if getattr(getattr(student, "head", None), "head_dist", None) is None:
            raise SokdError("method 'deit' needs a student with a distillation token and head: a distilled DeiT "
                            "from timm (e.g. student.arch=timm.deit_tiny_distilled_patch16_224), or any timm "
                            "ViT given one (student.kwargs: {distillation_token: true})")

    def forward(self, images, labels, index=None):
        teacher, student = self.nets["teacher"], self.nets["student"]
        with torch.no_grad():
            t_logits = teacher(images)
        tokens, _ = student.forward_trunk(images, student.num_stages)
        z_cls, z_dist = student.head.both_heads(tokens)
        if self.options.deit_target == "hard":
            dist = F.cross_entropy(z_dist.float(), t_logits.detach().argmax(dim=1))
        else:
            dist = losses.soft_target(t_logits, z_dist, self.options.T) / z_dist.shape[1]
        terms = {"student_ce": losses.cross_entropy(z_cls, labels), "student_dist_teacher": dist}
        return self.combine(terms, {"student": (z_cls + z_dist) / 2, "teacher": t_logits})
