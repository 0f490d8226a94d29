"""Plain supervised training: the baseline, and how teachers are trained."""
from __future__ import annotations

from . import losses
from .base import Method, MethodOptions, roles_required
from .registry import register


@register("vanilla")
class Vanilla(Method):
    term_names = ("model_ce",)
    primary = "model"
    accepts = ("model", "student")
    config_roles = ("model",)
    accepts_features = False
    distills_logits = False
    features_refused = "has no teacher to take features from; remove method.features or use {slashed}"

    def __init__(self, model=None, student=None, options: MethodOptions | None = None, input_shape=None):
        roles_required(self.name, {"model": model or student}, ["model"])
        super().__init__({"model": model or student}, options or MethodOptions())

    def forward(self, images, labels):
        logits = self.nets["model"](images)
        return self.combine({"model_ce": losses.cross_entropy(logits, labels)}, {"model": logits})
