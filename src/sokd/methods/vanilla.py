"""Plain supervised training: the baseline, and how teachers are trained."""
from __future__ import annotations

from . import losses
from .base import Method, MethodOptions, Role
from .registry import register


@register("vanilla")
class Vanilla(Method):
    term_names = ("model_ce",)
    primary = "model"
    roles = {"model": Role()}
    aliases = {"student": "model"}
    accepts_features = False
    distills_logits = False
    features_refused = "has no teacher to take features from; remove method.features or use {slashed}"

    def __init__(self, model=None, student=None, options: MethodOptions | None = None, input_shape=None):
        self.require(model=model or student)
        super().__init__({"model": model or student}, options or MethodOptions())

    def forward(self, images, labels):
        logits = self.nets["model"](images)
        return self.combine({"model_ce": losses.cross_entropy(logits, labels)}, {"model": logits})
