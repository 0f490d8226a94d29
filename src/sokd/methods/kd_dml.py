"""KD + DML: a pretrained teacher that keeps learning, mutually with the student."""
from __future__ import annotations

from .base import Method, MethodOptions, Role
from . import losses
from .registry import register


@register("kd_dml")
class KDDML(Method):
    term_names = ("teacher_ce", "teacher_kl_student", "student_ce", "student_kl_teacher")
    comparisons = (("teacher", "student"),)
    roles = {"teacher": Role(trained=True, like="teacher", initial=True), "student": Role()}
    accepts_features = False

    def __init__(self, teacher=None, student=None, options: MethodOptions | None = None, input_shape=None):
        self.require(teacher=teacher, student=student)
        super().__init__({"teacher": teacher, "student": student}, options or MethodOptions())

    def forward(self, images, labels):
        t = self.nets["teacher"](images)
        s = self.nets["student"](images)
        terms = {
            "teacher_ce": losses.cross_entropy(t, labels),
            "teacher_kl_student": self.distill(s, t, labels),
            "student_ce": losses.cross_entropy(s, labels),
            "student_kl_teacher": self.distill(t, s, labels),
        }
        return self.combine(terms, {"teacher": t, "student": s})
