"""Semi-Online Knowledge Distillation (Liu, Liu & Huang, BMVC 2021).

The teacher is frozen; a knowledge bridge module (KBM) grafted onto its trunk learns online with
the student. One backward pass per step:
  KBM:     CE(y, A) + KL_T(teacher -> A) + KL_T(student -> A)
  student: CE(y, S) + KL_T(A -> S)            (+ optional feature terms vs the teacher branch)
The frozen trunk runs once per batch and feeds both the teacher's own tail and the KBM.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..models.staged import split_embedding
from .base import Method, MethodOptions, Role
from .kbm import build_kbm, teacher_branch
from . import losses
from .registry import register


class SOKDOptions(MethodOptions):
    kbm_stages: int = Field(1, ge=1, description="how many of the teacher's last stages the KBM copies")
    kbm_init: Literal["random", "teacher"] = Field("random", description="reference: random")
    teacher_bn: Literal["train", "eval"] = Field(
        "train", description="frozen teacher's BatchNorm while training: batch statistics (reference) or running "
                    "ones; its running statistics are never updated either way")


@register("sokd")
class SOKD(Method):
    Options = SOKDOptions
    term_names = ("kbm_ce", "kbm_kl_teacher", "kbm_kl_student", "student_ce", "student_kl_kbm")
    comparisons = (("teacher", "student"), ("kbm", "student"))
    reference_label = "SOKD"
    roles = {**Method.roles,
             "kbm": Role(config=False, plotted=True, initial=True, file="teacher_branch",
                         part="SOKD's knowledge bridge: the teacher's last stage(s) and head")}

    def __init__(self, teacher=None, student=None, options: SOKDOptions | None = None,
                 input_shape=(3, 32, 32), num_samples: int | None = None):
        self.require(teacher=teacher, student=student)
        options = options or SOKDOptions()
        kbm = build_kbm(teacher, options.kbm_stages, options.kbm_init)
        super().__init__({"teacher": teacher, "student": student, "kbm": kbm}, options)
        self.frozen_bn_train = options.teacher_bn == "train"
        self.split = teacher.num_stages - options.kbm_stages
        # student features are compared with the teacher branch: trunk stages, then KBM stages
        self._attach_features(student, teacher, input_shape, num_samples)

    def _branches(self, images):
        """Frozen trunk once; teacher tail and KBM both fed from it. Returns logits and features."""
        teacher, kbm = self.nets["teacher"], self.nets["kbm"]
        with torch.no_grad():
            trunk, trunk_feats = teacher.forward_trunk(images, self.split)
            t_logits, _ = teacher.forward_tail(trunk, self.split)
        a_logits, a_feats, a_emb = split_embedding(kbm(trunk.detach(), embedding=self.features_embedding))
        return t_logits, a_logits, trunk_feats + a_feats, a_emb

    def forward(self, images, labels, index=None):
        t_logits, a_logits, branch_feats, a_emb = self._branches(images)
        s_logits, s_feats, s_emb = split_embedding(
            self.nets["student"].forward_features(images, embedding=self.features_embedding))
        terms = {
            "kbm_ce": losses.cross_entropy(a_logits, labels),
            "kbm_kl_teacher": self.distill(t_logits, a_logits, labels),
            "kbm_kl_student": self.distill(s_logits, a_logits, labels),
            "student_ce": losses.cross_entropy(s_logits, labels),
            "student_kl_kbm": self.distill(a_logits, s_logits, labels),
        }
        if self.features is not None:
            terms.update(self.features(s_feats, branch_feats, labels, index, target_logits=a_logits.detach(),
                                       student_embedding=s_emb, target_embedding=a_emb))
        return self.combine(terms, {"student": s_logits, "teacher": t_logits, "kbm": a_logits})

    @torch.no_grad()
    def predict(self, images, known=None):
        teacher = self.nets["teacher"]
        trunk, _ = teacher.forward_trunk(images, self.split)
        t_logits = known["teacher"] if known and "teacher" in known else teacher.forward_tail(trunk, self.split)[0]
        a_logits, _ = self.nets["kbm"](trunk)
        return {"student": self.nets["student"](images), "teacher": t_logits, "kbm": a_logits}

    def standalone(self):
        branch = teacher_branch(self.nets["teacher"], self.nets["kbm"])
        return {"student": ("student", self.nets["student"]), "teacher_branch": ("teacher", branch)}
