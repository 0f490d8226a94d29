"""Plain supervised training: the baseline, and how teachers are trained."""
from __future__ import annotations

from ..errors import SokdError
from . import losses
from .base import Method, MethodOptions, roles_required


class Vanilla(Method):
    term_names = ("model_ce",)
    primary = "model"
    accepts = ("model", "student")

    def __init__(self, model=None, student=None, options: MethodOptions | None = None, input_shape=None):
        roles_required("vanilla", {"model": model or student}, ["model"])
        super().__init__({"model": model or student}, options or MethodOptions())
        if self.options.features:
            raise SokdError("method 'vanilla' has no teacher to take features from; "
                            "remove method.features or use kd/sokd")

    def forward(self, images, labels):
        logits = self.net("model")(images)
        return self.combine({"model_ce": losses.cross_entropy(logits, labels)}, {"model": logits})
