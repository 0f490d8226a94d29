"""What every method shares: networks held by role, which of them learn, weighted loss terms.

A method is an nn.Module. `forward(images, labels)` returns
`{"loss": scalar, "terms": {name: tensor}, "logits": {role: tensor}}`; the engine backpropagates
"loss" and never looks at the method's name. Methods know nothing about files, devices or
processes: forward calls each network as `self.nets[role]`, and the engine decides how the whole
method is run (on one process, or wrapped for data-parallel training).

What a method needs from a run is declared once, on its class: `roles` maps each network's role
to a `Role` (given by the config? trained first? frozen? drawn in reports?), and
`accepts_features` says whether feature terms may ride on it. Everything else (`config_roles`,
`frozen`, `needs_trained_teacher`, what `create` accepts, what `sokd bench` builds) is derived
from that declaration; `sokd.methods` answers those questions by name for the layers above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import nn

from ..errors import SokdError, suggest
from ..models.staged import StagedNet
from . import registry
from . import losses
from .features import FeatureSpec, FeatureTerms
from .temperature import CTKDOptions, CurriculumTemperature


class DKDOptions(BaseModel):
    """Decoupled KD's two weights; defaults are the DKD paper's CIFAR-100 setting."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    alpha: float = Field(1.0, ge=0, description="weight of TCKD (target-class KD)")
    beta: float = Field(8.0, ge=0, description="weight of NCKD (non-target-class KD)")


class DISTOptions(BaseModel):
    """DIST's two weights; defaults are the DIST paper's CIFAR-100 setting (with T = 4)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    beta: float = Field(2.0, ge=0, description="weight of the inter-class (per sample) distance")
    gamma: float = Field(2.0, ge=0, description="weight of the intra-class (per class) distance")


class NKDOptions(BaseModel):
    """Normalized KD's weight of the non-target part; its temperature is method.T."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    gamma: float = Field(3.5, ge=0, description="weight of the normalised non-target part (NKD's "
                         "CIFAR-100 setting, with T = 3; ImageNet: 1.5 with T = 1)")


class MLKDOptions(BaseModel):
    """Multi-level logit distillation's views."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    strong_view: bool = Field(True, description="train on a strong (RandAugment + Cutout) view of every "
                              "batch beside the usual one, as MLKD does; false: the usual view only")


class OFALogitOptions(BaseModel):
    """OFA-KD's loss on the final logits; its temperature is method.T (OFA's default: T = 1)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    eps: float = Field(1.0, gt=0, description="exponent enhancing the label class (ImageNet CNN students: 1.5)")


class MethodOptions(BaseModel):
    """Options every method accepts; methods extend this."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    T: float = Field(4.0, gt=0, description="softmax temperature of every logit-distillation term")
    weights: dict[str, float] = Field(default_factory=dict, description="per-term weights, default 1")
    features: list[FeatureSpec] = Field(default_factory=list,
                                        description="feature and relational terms (docs/methods.md)")
    logit_loss: Literal["kl", "dkd", "dist", "nkd", "mlkd", "ofa"] = Field(
        "kl", description="the distance every logit-distillation term uses: kl (Hinton), dkd, dist, nkd, mlkd, ofa")
    logit_standardize: bool = Field(
        False, description="z-score both logit vectors before the softmax (Sun et al., CVPR 2024)")
    dkd: DKDOptions = Field(default_factory=DKDOptions)
    dist: DISTOptions = Field(default_factory=DISTOptions)
    nkd: NKDOptions = Field(default_factory=NKDOptions)
    mlkd: MLKDOptions = Field(default_factory=MLKDOptions)
    ofa: OFALogitOptions = Field(default_factory=OFALogitOptions)
    temperature: Literal["fixed", "ctkd"] = Field(
        "fixed", description="fixed: method.T; ctkd: a temperature learnt adversarially with a curriculum "
                             "(Curriculum Temperature KD), shared by every distillation term")
    ctkd: CTKDOptions = Field(default_factory=CTKDOptions)
    warmup_epochs: int = Field(0, ge=0, description="ramp every distillation term's weight linearly "
                               "over this many epochs (DKD: 20); 0 = off")

    @field_validator("logit_standardize")
    @classmethod
    def _standardize_composes(cls, standardize: bool, info: ValidationInfo) -> bool:
        if standardize and info.data.get("logit_loss") == "dist":
            raise ValueError("logit_standardize composes with logit_loss kl or dkd; DIST already "
                             "compares correlations, so set logit_standardize: false or logit_loss: kl")
        return standardize

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, weights: dict[str, float]) -> dict[str, float]:
        for term, w in weights.items():
            if w < 0:
                raise ValueError(f"weight of term '{term}' must be >= 0 (0 switches it off), got {w}")
        return weights


@dataclass(frozen=True)
class Role:
    """What one network of a method is. A method declares its roles once (`Method.roles`); the
    config, the runner, `sokd bench`, checkpoints and reports read the declaration.

    A role given by the run config (`config=True`) is a config section of its name (`teacher:`,
    `student:`, or any name a plugin method declares); `many` makes it a list (`peers:`).
    Roles the method builds itself (SOKD's `kbm`) are declared with `config=False` so reports
    and files can describe them.
    """

    config: bool = True
    many: bool = False
    #: must come trained: the config gives a checkpoint or local weights
    trained: bool = False
    #: never learns (no gradient, no optimizer group)
    frozen: bool = False
    #: which network of a benchmark's (teacher, student) pair it is built as
    like: Literal["teacher", "student"] = "student"
    #: drawn in reports beside the run's primary network (a result of its own)
    plotted: bool = False
    #: its accuracy before training is worth reporting (it starts from a trained network)
    initial: bool = False
    #: for a part of another network (not a classifier on its own): what it is
    part: str = ""
    #: the standalone model file (name without .pt) that holds this part as a whole classifier
    file: str = ""


#: a role a method does not declare (generated names such as peer2, branch3)
UNDECLARED = Role(config=False)


class Method(nn.Module):
    """Base class: `nets` (role -> network), `learning` (roles that train), weighted terms."""

    Options = MethodOptions
    #: the name the method is registered under (`sokd.methods.register` sets it; an unregistered
    #: subclass is named after its class, lower-cased)
    name: str = "method"
    term_names: tuple[str, ...] = ()
    #: (reference, follower) role pairs whose test-set agreement and KL the engine reports
    comparisons: tuple[tuple[str, str], ...] = ()
    #: what each network of the method is (see Role); config roles first, in constructor order
    roles: dict[str, Role] = {"teacher": Role(trained=True, frozen=True, like="teacher", initial=True),
                              "student": Role()}
    #: other keyword names the constructor takes for a config role ({alias: role})
    aliases: dict[str, str] = {}
    #: whether method.features (feature terms) may be given; when not, they are refused with
    #: "method 'NAME' " + `features_refused`, where {either} / {slashed} name the methods that
    #: take them ("a or b" / "a/b")
    accepts_features: bool = True
    features_refused: str = "does not support feature terms; use {either}"
    #: the role whose test accuracy selects best.pt
    primary: str = "student"
    #: a reference baseline in comparisons (reports mark its plain runs with this label), or ""
    reference_label: str = ""
    #: whether the method has logit-distillation terms (`distill`); when not, the options that
    #: shape them (logit_loss, logit_standardize, dkd, dist, nkd, mlkd, temperature, warmup_epochs)
    #: are refused
    distills_logits: bool = True
    #: why those options are refused ("method 'NAME' " + this, {option} the first one given)
    logit_options_refused: str = ("has no distillation term, so method.{option} does nothing; remove it or pick "
                                  "a method that distils")
    #: the weight of a term when method.weights does not name it (terms not listed: 1)
    default_weights: dict[str, float] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__.lower()
        cls._derive_from_roles()

    @classmethod
    def _derive_from_roles(cls) -> None:
        """What follows from `roles`, kept beside it but never declared separately."""
        cls.config_roles = tuple(r for r, d in cls.roles.items() if d.config)
        cls.frozen = tuple(r for r, d in cls.roles.items() if d.frozen)
        cls.accepts = cls.config_roles + tuple(cls.aliases)
        cls.trained_roles = tuple(r for r, d in cls.roles.items() if d.config and d.trained)
        cls.needs_trained_teacher = bool(cls.trained_roles)

    def require(self, **given) -> None:
        """SokdError naming the first config role the constructor was not given a network for."""
        roles_required(self.name, given, [r for r in self.config_roles if r in given])

    @classmethod
    def role(cls, name: str) -> Role:
        """The declaration of role `name` (UNDECLARED for names the method generates)."""
        return cls.roles.get(name, UNDECLARED)

    def __init__(self, nets: dict[str, nn.Module], options: MethodOptions):
        super().__init__()
        self.nets = nn.ModuleDict(nets)
        self.options = options
        self._check_weights()
        self._weights = {t: float(options.weights.get(t, self.default_weights.get(t, 1.0))) for t in self.term_names}
        # warm-up factor of the distillation terms (set_epoch): a tensor, so a compiled forward
        # reads it as an input instead of recompiling for each new value; not saved (set_epoch
        # derives it from the epoch)
        self.register_buffer("ramp", torch.ones(()), persistent=False)
        for role, net in self.nets.items():  # the method decides what learns, whatever came before
            net.requires_grad_(role not in self.frozen)
        self.features: FeatureTerms | None = None
        self.temperature = CurriculumTemperature(options.ctkd) if options.temperature == "ctkd" else None
        shaping = ({"logit_loss", "logit_standardize", "dkd", "dist", "nkd", "mlkd", "ofa", "warmup_epochs", "temperature",
                    "ctkd"} & options.model_fields_set)
        if shaping and not self.distills_logits:
            raise SokdError(f"method '{self.name}' " + self.logit_options_refused.format(option=sorted(shaping)[0]))
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

    def _attach_features(self, student: StagedNet, target: StagedNet, input_shape,
                         num_samples: int | None = None) -> None:
        """Build feature terms (and their trainable parts) between student and target stages."""
        if self.options.features:
            self.features = FeatureTerms(self.options.features, student, target, input_shape, num_samples)
            self._weights.update(self.features.weights)
            if self.views > 1 and self.features.needs_index:
                raise SokdError("a feature term that keeps one memory row per training sample (crd) cannot "
                                "take the two views of each image method.logit_loss=mlkd trains on; set "
                                "method.mlkd.strong_view=false or drop that term")

    @property
    def features_embedding(self) -> bool:
        """Whether the feature terms compare embeddings: the method's forwards then ask each network
        for its embedding too (`forward_features(..., embedding=True)`)."""
        return self.features is not None and self.features.uses_embedding

    def distill(self, target_logits: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        """The configured logit distance from `target_logits` (detached) to `logits`.

        Every logit-distillation term of every method goes through here, so `method.logit_loss`
        and `method.logit_standardize` change all of them at once.
        """
        o = self.options
        T = self.temperature() if self.temperature is not None else o.T
        if o.logit_loss == "mlkd":   # standardises its instance level only, as MLKD + LS does
            return losses.mlkd(target_logits, logits, T, self.views, o.logit_standardize)
        if o.logit_standardize:
            target_logits, logits = losses.standardize(target_logits.detach()), losses.standardize(logits)
        if o.logit_loss == "dkd":
            return losses.dkd(target_logits, logits, labels, o.dkd.alpha, o.dkd.beta, T)
        if o.logit_loss == "dist":
            return losses.dist(target_logits, logits, o.dist.beta, o.dist.gamma, T)
        if o.logit_loss == "nkd":
            return losses.nkd(target_logits, logits, labels, o.nkd.gamma, T)
        if o.logit_loss == "ofa":
            return losses.ofa(target_logits, logits, labels, o.ofa.eps, T)
        return losses.soft_target(target_logits, logits, T)

    @property
    def views(self) -> int:
        """How many views of each training batch the method trains on: 2 when its logit distance
        asks for a strong view beside the usual one (MLKD). The engine then calls forward with
        the views stacked along the batch (`torch.cat([usual, strong])`, labels and indices
        repeated), and every term sees both; the distance splits them again."""
        o = self.options
        return 2 if self.distills_logits and o.logit_loss == "mlkd" and o.mlkd.strong_view else 1

    @staticmethod
    def is_label_term(term: str) -> bool:
        """Supervised terms (cross-entropy with the labels) are named "<role>_ce"; every other
        term distils and is what method.warmup_epochs ramps."""
        return term.endswith("_ce")

    def set_epoch(self, epoch: float) -> None:
        """The engine tells the method how far training is (epochs done, fractions allowed), so
        term weights can warm up: the distillation terms are scaled by min(1, (epoch + 1) / W)."""
        w = self.options.warmup_epochs
        self.ramp.fill_(1.0 if not w else min(1.0, (float(epoch) + 1.0) / w))
        if self.temperature is not None:
            self.temperature.set_epoch(epoch)

    def weight(self, term: str) -> float | torch.Tensor:
        """The term's weight in the loss: a number, or (distillation terms while
        method.warmup_epochs is set) that number times the warm-up tensor."""
        w = self._weights[term]
        if self.is_label_term(term) or not self.options.warmup_epochs:
            return w
        return w * self.ramp

    @property
    def needs_index(self) -> bool:
        """Whether forward needs each sample's training-set index (`index=`), e.g. for CRD."""
        return self.features is not None and self.features.needs_index

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
        if self.temperature is not None:
            mods["temperature"] = self.temperature
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
            base = role if role in self.nets or role == "temperature" else FeatureTerms.owner
            role_lr = lr_per_role.get(role, lr_per_role.get(base, lr))
            groups.append({"params": params, "lr": role_lr, "role": role, **group_options})
        return groups

    def train(self, mode: bool = True):
        """Trainable roles follow `mode`; frozen ones run in inference mode unless the method
        keeps their BatchNorm on batch statistics while it trains (`frozen_bn_train`). Even then a
        frozen network stays what it was trained to be: its running statistics are held, not
        updated from the batches, so its own evaluation, a network built on its trunk (SOKD's
        teacher branch) and the files saved from it see the statistics it was trained with."""
        super().train(mode)
        for role in self.frozen:
            batch_stats = mode and self.frozen_bn_train
            self.nets[role].train(batch_stats)
            hold_running_statistics(self.nets[role], batch_stats)
        return self

    frozen_bn_train: bool = False

    @property
    def inference_roles(self) -> tuple[str, ...]:
        """Frozen roles that run in inference mode in every call, training and evaluation alike
        (BatchNorm on running statistics): the engine may run them as inference networks, with
        BatchNorm folded into the convolutions (`engine.frozen`). A method whose frozen networks
        use batch statistics while it trains (`frozen_bn_train`) has none."""
        return () if self.frozen_bn_train else tuple(r for r in self.frozen if r in self.nets)

    @property
    def constant_roles(self) -> tuple[str, ...]:
        """Frozen roles, whose evaluation never changes during a run: their weights are fixed
        and their running statistics held (`train`), whatever they normalise by in training."""
        return tuple(r for r in self.frozen if r in self.nets)

    def combine(self, terms: dict[str, torch.Tensor], logits: dict[str, torch.Tensor]) -> dict:
        """The step's result: the weighted loss, and the same loss in two parts, "task" (the
        label terms) and "distill" (every other term), for optimizers that treat the gradients of
        the two apart (`engine.dot`)."""
        parts = {"task": 0.0, "distill": 0.0}
        for k, v in terms.items():
            parts["task" if self.is_label_term(k) else "distill"] += self.weight(k) * v
        return {"loss": parts["task"] + parts["distill"], "loss_parts": parts, "terms": terms, "logits": logits}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, known: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Test-time logits of every role worth reporting (the engine puts us in eval mode).
        `known`: logits of roles the engine kept from an earlier evaluation of the same images
        (roles that never change); they are returned as given instead of computed again."""
        known = known or {}
        return {role: known[role] if role in known else net(images) for role, net in self.nets.items()}

    def standalone(self) -> dict[str, tuple[str, nn.Module]]:
        """Classifiers worth saving on their own: name -> (role whose architecture it has, module)."""
        return {role: (role, self.nets[role]) for role in self.learning}


def roles_required(method: str, given: dict[str, object], required: Iterable[str]) -> None:
    """Clear error when a method is missing a network it needs."""
    missing = [r for r in required if given.get(r) is None]
    if missing:
        how = "add `peers: [{arch: NAME}]`" if missing[0] == "peer" else f"set `{missing[0]}.arch`"
        raise SokdError(f"method '{method}' needs a {' and a '.join(missing)} network; {how} in the config")


Method._derive_from_roles()


def hold_running_statistics(net: nn.Module, hold: bool = True) -> None:
    """Make `net`'s BatchNorm layers (those that keep running statistics) normalise by batch
    statistics in training mode without updating the running ones (`hold`), or restore the
    usual updates. In evaluation mode they use their running statistics either way."""
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.track_running_stats = not hold
