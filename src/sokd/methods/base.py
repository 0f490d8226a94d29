"""What every method shares: networks held by role, which of them learn, weighted loss terms.

A method is an nn.Module. `forward(images, labels)` returns
`{"loss": scalar, "terms": {name: tensor}, "logits": {role: tensor}}`; the engine backpropagates
"loss" and never looks at the method's name. Methods know nothing about files, devices or
processes: forward calls each network as `self.nets[role]`, and the engine decides how the whole
method is run (on one process, or wrapped for data-parallel training).

What a method needs from a run is declared on its class (`config_roles`, `needs_trained_teacher`,
`accepts_features`); `sokd.methods` answers those questions by name for the layers above.
"""
from __future__ import annotations

from typing import Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..errors import SokdError, suggest
from ..models.staged import StagedNet
from . import registry
from .features import FeatureSpec, FeatureTerms


class MethodOptions(BaseModel):
    """Options every method accepts; methods extend this."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    T: float = Field(4.0, gt=0, description="softmax temperature of every KL term")
    weights: dict[str, float] = Field(default_factory=dict, description="per-term weights, default 1")
    features: list[FeatureSpec] = Field(default_factory=list, description="feature terms (at, fitnet)")

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, weights: dict[str, float]) -> dict[str, float]:
        for term, w in weights.items():
            if w < 0:
                raise ValueError(f"weight of term '{term}' must be >= 0 (0 switches it off), got {w}")
        return weights


class Method(nn.Module):
    """Base class: `nets` (role -> network), `learning` (roles that train), weighted terms."""

    Options = MethodOptions
    #: the name the method is registered under (`sokd.methods.register` sets it; an unregistered
    #: subclass is named after its class, lower-cased)
    name: str = "method"
    term_names: tuple[str, ...] = ()
    #: (reference, follower) role pairs whose test-set agreement and KL the engine reports
    comparisons: tuple[tuple[str, str], ...] = ()
    #: roles whose networks stay frozen (requires_grad False, excluded from param groups)
    frozen: tuple[str, ...] = ()
    #: constructor network arguments this method takes
    accepts: tuple[str, ...] = ("teacher", "student")
    #: network sections a run config gives this method: "model", "teacher", "student", "peers"
    config_roles: tuple[str, ...] = ("teacher", "student")
    #: whether the config's teacher must come trained (a checkpoint or local weights)
    needs_trained_teacher: bool = False
    #: whether method.features (feature terms) may be given; when not, they are refused with
    #: "method 'NAME' " + `features_refused`, where {either} / {slashed} name the methods that
    #: take them ("a or b" / "a/b")
    accepts_features: bool = True
    features_refused: str = "does not support feature terms; use {either}"
    #: the role whose test accuracy selects best.pt
    primary: str = "student"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__.lower()

    def __init__(self, nets: dict[str, nn.Module], options: MethodOptions):
        super().__init__()
        self.nets = nn.ModuleDict(nets)
        self.options = options
        self._check_weights()
        self._weights = {t: float(options.weights.get(t, 1.0)) for t in self.term_names}
        for role, net in self.nets.items():  # the method decides what learns, whatever came before
            net.requires_grad_(role not in self.frozen)
        self.features: FeatureTerms | None = None
        if options.features and not self.accepts_features:
            users = registry.with_features()
            raise SokdError(f"method '{self.name}' " + self.features_refused.format(
                either=" or ".join(users), slashed="/".join(users)))

    # -- construction helpers -------------------------------------------------------------
    def _check_weights(self) -> None:
        for name in self.options.weights:
            if name not in self.term_names:
                raise SokdError(
                    f"unknown loss-term weight '{name}'{suggest(name, self.term_names)} for method "
                    f"'{self.name}'; its terms are: {', '.join(self.term_names)}"
                )

    def _attach_features(self, student: StagedNet, target: StagedNet, input_shape) -> None:
        """Build feature terms (and their trainable regressors) between student and target stages."""
        if self.options.features:
            self.features = FeatureTerms(self.options.features, student, target, input_shape)
            self._weights.update(self.features.weights)

    def weight(self, term: str) -> float:
        return self._weights[term]

    @property
    def term_weights(self) -> dict[str, float]:
        """Every loss term's weight (logged terms are unweighted; reports need both)."""
        return dict(self._weights)

    # -- what the engine uses -------------------------------------------------------------
    @property
    def learning(self) -> list[str]:
        return [r for r in self.nets if r not in self.frozen]

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Role -> module holding that role's trainable parameters; feature regressors are one
        more entry, `FeatureTerms.group`, learning with `FeatureTerms.owner`."""
        mods: dict[str, nn.Module] = {r: self.nets[r] for r in self.learning}
        if self.features is not None and any(True for _ in self.features.parameters()):
            mods[FeatureTerms.group] = self.features
        return mods

    def param_groups(self, lr: float, lr_per_role: dict[str, float] | None = None,
                     **group_options) -> list[dict]:
        """One optimizer param group per learning role; only what learns is in them."""
        lr_per_role = dict(lr_per_role or {})
        known = set(self.trainable_modules()) | set(self.nets)
        for role in lr_per_role:
            if role not in known:
                raise SokdError(f"optim.lr_per_role names role '{role}'{suggest(role, known)}, "
                                f"but method '{self.name}' has roles: {', '.join(sorted(known))}")
        groups = []
        for role, module in self.trainable_modules().items():
            params = [p for p in module.parameters() if p.requires_grad]
            if not params:
                continue
            base = role if role in self.nets else FeatureTerms.owner
            role_lr = lr_per_role.get(role, lr_per_role.get(base, lr))
            groups.append({"params": params, "lr": role_lr, "role": role, **group_options})
        return groups

    def train(self, mode: bool = True):
        super().train(mode)
        for role in self.frozen:
            self.nets[role].train(mode and self.frozen_bn_train)
        return self

    frozen_bn_train: bool = False

    def combine(self, terms: dict[str, torch.Tensor], logits: dict[str, torch.Tensor]) -> dict:
        loss = sum(self.weight(k) * v for k, v in terms.items())
        return {"loss": loss, "terms": terms, "logits": logits}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Test-time logits of every role worth reporting (the engine puts us in eval mode)."""
        return {role: net(images) for role, net in self.nets.items()}

    def standalone(self) -> dict[str, tuple[str, nn.Module]]:
        """Classifiers worth saving on their own: name -> (role whose architecture it has, module)."""
        return {role: (role, self.nets[role]) for role in self.learning}


def roles_required(method: str, given: dict[str, object], required: Iterable[str]) -> None:
    """Clear error when a method is missing a network it needs."""
    missing = [r for r in required if given.get(r) is None]
    if missing:
        how = "add `peers: [{arch: NAME}]`" if missing[0] == "peer" else f"set `{missing[0]}.arch`"
        raise SokdError(f"method '{method}' needs a {' and a '.join(missing)} network; {how} in the config")
