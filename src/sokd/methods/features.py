"""Feature-based terms (FitNet hints, attention transfer) between a student's and a target's stages.

A term compares student stage i with target stage j (default j = i, counted the same way, so
negative indices pair the last stages of nets with different depths). FitNet's 1x1-conv regressors
are trainable and are optimised together with the student, in one stage.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import SokdError
from ..models.staged import StagedNet
from . import losses


class _Kind:
    """One kind of feature term: its default weight and the loss of one (student, target) pair."""

    def __init__(self, default_weight: float, regressed: bool, pair_loss):
        self.default_weight = default_weight
        self.regressed = regressed    # a trainable 1x1-conv regressor maps student to target channels
        self.pair_loss = pair_loss    # (student feature, target feature) -> scalar


KINDS = {
    "at": _Kind(1000.0, regressed=False, pair_loss=lambda s, t: losses.attention_transfer(s, t)),
    "fitnet": _Kind(1.0, regressed=True, pair_loss=lambda s, t: losses.hint(s, t)),
}
DEFAULT_WEIGHT = {name: kind.default_weight for name, kind in KINDS.items()}


class FeatureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal[tuple(KINDS)]  # type: ignore[valid-type]
    stages: list[int] = Field(default_factory=lambda: [-1], min_length=1, description="student stage indices")
    target_stages: list[int] | None = Field(None, min_length=1, description="target stage indices (default: same)")
    weight: float | None = Field(None, ge=0, description="default: 1000 for at (beta), 1 for fitnet")


def _resolve(idx: int, n: int, who: str, kind: str) -> int:
    if not -n <= idx < n:
        raise SokdError(f"feature term '{kind}' asks for {who} stage {idx}, but the {who} has {n} "
                        f"stages (valid: 0..{n - 1} or -{n}..-1); fix method.features")
    return idx % n


def _stage_channels(net: StagedNet, input_shape) -> list[int]:
    """Channels of each stage output, from one dry forward in eval mode on a 1-image batch."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            param = next(net.parameters())
            x = torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device)
            _, feats = net.forward_features(x)
    finally:
        net.train(was_training)
    return [f.shape[1] for f in feats]


class FeatureTerms(nn.Module):
    """Computes every configured feature term; holds FitNet regressors as parameters."""

    #: the role whose features are compared: terms are named "<owner>_<kind>", and the regressors
    #: learn with it (its optim.lr_per_role entry applies to them)
    owner = "student"
    #: the regressors' param-group role (optim.lr_per_role may also name it)
    group = f"{owner}_regressors"

    def __init__(self, specs: list[FeatureSpec], student: StagedNet, target: StagedNet, input_shape):
        super().__init__()
        kinds = [s.kind for s in specs]
        if len(set(kinds)) != len(kinds):
            raise SokdError("method.features lists the same kind twice; list all its stages in one entry")
        ns, nt = student.num_stages, target.num_stages
        self.pairs: dict[str, list[tuple[int, int]]] = {}
        self.kinds: dict[str, _Kind] = {}
        self.weights: dict[str, float] = {}
        self.regressors = nn.ModuleDict()
        s_ch = t_ch = None
        for spec in specs:
            tgt = spec.target_stages if spec.target_stages is not None else spec.stages
            if len(tgt) != len(spec.stages):
                raise SokdError(f"feature term '{spec.kind}': stages and target_stages differ in length")
            pairs = [(_resolve(i, ns, "student", spec.kind), _resolve(j, nt, "teacher", spec.kind))
                     for i, j in zip(spec.stages, tgt)]
            name = f"{self.owner}_{spec.kind}"
            self.pairs[name] = pairs
            self.kinds[name] = KINDS[spec.kind]
            self.weights[name] = spec.weight if spec.weight is not None else KINDS[spec.kind].default_weight
            if KINDS[spec.kind].regressed:
                if s_ch is None:
                    s_ch, t_ch = _stage_channels(student, input_shape), _stage_channels(target, input_shape)
                for i, j in pairs:
                    self.regressors[f"{i}_{j}"] = nn.Sequential(
                        nn.Conv2d(s_ch[i], t_ch[j], kernel_size=1, bias=False), nn.BatchNorm2d(t_ch[j]))

    def forward(self, student_feats: list[torch.Tensor], target_feats: list[torch.Tensor]) -> dict:
        terms = {}
        for name, pairs in self.pairs.items():
            total = 0.0
            kind = self.kinds[name]
            for i, j in pairs:
                s = self.regressors[f"{i}_{j}"](student_feats[i]) if kind.regressed else student_feats[i]
                total = total + kind.pair_loss(s, target_feats[j])
            terms[name] = total
        return terms
