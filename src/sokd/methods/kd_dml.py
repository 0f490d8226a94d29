"""KD + DML: a pretrained teacher that keeps learning, mutually with the student."""
from __future__ import annotations

from .base import Method, MethodOptions, roles_required
from . import losses
from ..errors import SokdError


class KDDML(Method):
    term_names = ("teacher_ce", "teacher_kl_student", "student_ce", "student_kl_teacher")
    comparisons = (("teacher", "student"),)

    def __init__(self, teacher=None, student=None, options: MethodOptions | None = None, input_shape=None):
        roles_required("kd_dml", {"teacher": teacher, "student": student}, ["teacher", "student"])
        super().__init__({"teacher": teacher, "student": student}, options or MethodOptions())
        if self.options.features:
            raise SokdError("method 'kd_dml' does not support feature terms; use kd or sokd")

    @property
    def name(self) -> str:
        return "kd_dml"

    def forward(self, images, labels):
        t = self.net("teacher")(images)
        s = self.net("student")(images)
        T = self.options.T
        terms = {
            "teacher_ce": losses.cross_entropy(t, labels),
            "teacher_kl_student": losses.soft_target(s, t, T),
            "student_ce": losses.cross_entropy(s, labels),
            "student_kl_teacher": losses.soft_target(t, s, T),
        }
        return self.combine(terms, {"teacher": t, "student": s})
