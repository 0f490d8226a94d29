"""Plain supervised training: the baseline, and how teachers are trained."""
from __future__ import annotations

from .base import Method, MethodOptions, roles_required
from . import losses


class Vanilla(Method):
    term_names = ("model_ce",)
    primary = "model"
    accepts = ("model", "student")

    def __init__(self, model=None, student=None, options: MethodOptions | None = None, input_shape=None):
        roles_required("vanilla", {"model": model or student}, ["model"])
        super().__init__({"model": model or student}, options or MethodOptions())
        if self.options.features:
            raise self._no_features()

    def _no_features(self):
        from ..errors import SokdError
        return SokdError("method 'vanilla' has no teacher to take features from; "
                         "remove method.features or use kd/sokd")

    def forward(self, images, labels):
        logits = self.net("model")(images)
        return self.combine({"model_ce": losses.cross_entropy(logits, labels)}, {"model": logits})
