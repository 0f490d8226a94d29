"""`takd`: a method with a role sokd does not ship, in one file — TAKD's teaching assistant
(Mirzadeh et al., AAAI 2020: a mid-sized network trained first bridges the teacher–student gap).

The assistant is a config section of its own (`assistant: {arch: ..., checkpoint: ...}`), declared
here once; the config, runner, bench and reports take it from the declaration. The student learns
with cross-entropy and Hinton's soft targets from the frozen assistant.
"""
from __future__ import annotations

import torch

import sokd
from sokd.methods import Method, MethodOptions, Role, losses


@sokd.methods.register("takd", overwrite=True)
class TAKD(Method):
    term_names = ("student_ce", "student_kl_assistant")
    roles = {"assistant": Role(trained=True, frozen=True, like="teacher", initial=True), "student": Role()}
    comparisons = (("assistant", "student"),)
    accepts_features = False

    def __init__(self, assistant=None, student=None, options: MethodOptions | None = None, input_shape=None):
        self.require(assistant=assistant, student=student)
        super().__init__({"assistant": assistant, "student": student}, options or MethodOptions())

    def forward(self, images, labels):
        with torch.no_grad():
            target = self.nets["assistant"](images)
        logits = self.nets["student"](images)
        terms = {"student_ce": losses.cross_entropy(logits, labels),
                 "student_kl_assistant": self.distill(target, logits, labels)}
        return self.combine(terms, {"assistant": target, "student": logits})

