"""Hinton KD: a frozen teacher (eval mode) teaches the student; optional feature terms."""
from __future__ import annotations

import torch

from ..models.staged import split_embedding
from .base import Method, MethodOptions
from . import losses
from .registry import register


@register("kd")
class KD(Method):
    term_names = ("student_ce", "student_kl_teacher")
    comparisons = (("teacher", "student"),)
    reference_label = "KD"

    def __init__(self, teacher=None, student=None, options: MethodOptions | None = None,
                 input_shape=(3, 32, 32), num_samples: int | None = None):
        self.require(teacher=teacher, student=student)
        super().__init__({"teacher": teacher, "student": student}, options or MethodOptions())
        self._attach_features(student, teacher, input_shape, num_samples)

    def forward(self, images, labels, index=None):
        teacher, student = self.nets["teacher"], self.nets["student"]
        emb = self.features_embedding
        with torch.no_grad():
            t_logits, t_feats, t_emb = split_embedding(teacher.forward_features(images, embedding=emb))
        s_logits, s_feats, s_emb = split_embedding(student.forward_features(images, embedding=emb))
        terms = {
            "student_ce": losses.cross_entropy(s_logits, labels),
            "student_kl_teacher": self.distill(t_logits, s_logits, labels),
        }
        if self.features is not None:
            terms.update(self.features(s_feats, t_feats, labels, index, target_logits=t_logits,
                                       student_embedding=s_emb, target_embedding=t_emb))
        return self.combine(terms, {"student": s_logits, "teacher": t_logits})
