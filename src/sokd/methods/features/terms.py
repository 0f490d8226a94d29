"""Feature-based and relational terms between a student's stages and a target's stages.

Stage outputs are compared as NCHW maps: a vision transformer's token sequences lose their prefix
tokens and are laid out on their patch grid (`models.tokens.stage_map`), so any term pairs a ViT's
stages with a CNN's (spatial sizes are matched by pooling the larger map, channels by each term's
own means: regressors, embeddings, Gram matrices).

Two shapes of term share one configuration (`method.features`):
- pairwise kinds (at, fitnet, sp, pkt, rkd) compare student stage i with target stage j (default
  j = i, counted the same way, so negative indices pair the last stages of nets with different
  depths); FitNet's 1x1-conv regressors are trainable;
- a "stage" may also be `embedding`: the vector each network's final classifier reads (after a
  pre-activation network's final BN + ReLU and the pooling; `models.staged.head_with_embedding`).
  PKT, RKD, CRD and KD++'s ND are defined on it, and it is their default; on a network whose last
  stage output is post-activation and pooled by the head (the CIFAR ResNets) it equals the pooled
  last stage;
- module kinds (crd, reviewkd) are nn.Modules built from the stage lists as a whole, with their
  own trainable parts (embedding heads, fusion blocks) and state (CRD's memory bank).
Everything trainable here is optimised with the student, in one param group; buffers are part
of the method's state, so a checkpoint holds them and a resume continues them exactly.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ...errors import SokdError, suggest
from ...models.staged import StagedNet, dry_forward, has_embedding
from ...models.tokens import prefix_tokens, stage_map
from ...registry import Registry
from ...validation import validate
from .. import losses


@dataclass
class TermContext:
    """What a module kind may use to build itself: the two networks and the run's shapes."""

    student: StagedNet
    target: StagedNet
    input_shape: tuple
    num_samples: int | None = None
    _channels: dict = field(default_factory=dict)

    def channels(self, who: str) -> list[int]:
        """Channels of each stage output of "student" or "target", then the width of its embedding
        where its head gives one (index num_stages; one dry forward, cached)."""
        if who not in self._channels:
            self._channels[who] = _stage_channels(getattr(self, who), self.input_shape)
        return self._channels[who]


#: the "stage" naming a network's embedding, the vector its final classifier reads
EMBEDDING = "embedding"

Stage = Union[int, Literal["embedding"]]


class _Kind:
    """One kind of term: its default weight, default stages and how it is computed.

    Pairwise kinds give `pair_loss(student feature, target feature) -> scalar`; module kinds give
    `build(pairs, options, context) -> nn.Module` whose forward takes (student stage outputs,
    target stage outputs, batch) with batch holding `labels`, `target_logits` (the target's
    logits, detached by the kinds that read them) and, where `needs_index`, `index` (each sample's
    position in the training set).
    """

    def __init__(self, default_weight: float, source: str, *, pair_loss: Callable | None = None,
                 regressed: bool = False, build: Callable | None = None, options=None,
                 default_stages: Callable[..., list] = lambda n: [-1], needs_index: bool = False,
                 target_stages: bool = True, embedding: bool = False):
        self.default_weight = default_weight
        self.source = source            # where the default weight comes from
        self.pair_loss = pair_loss
        self.regressed = regressed      # a trainable 1x1-conv regressor maps student to target channels
        self.build = build
        self.options = options          # pydantic model of the kind's own options (or None)
        self.default_stages = default_stages   # (student stages[, target stages]) -> student stage list
        self.needs_index = needs_index
        self.target_stages = target_stages   # whether it compares target stages (else the target's logits)
        self.embedding = embedding           # whether it may compare embeddings (vectors), not only maps

    def stages_by_default(self, student_stages: int, target_stages: int) -> list:
        """The student stages compared when the config names none; `default_stages` may take the
        student's stage count alone (as kinds registered by plugins do) or both counts."""
        try:
            takes_both = len(inspect.signature(self.default_stages).parameters) >= 2
        except (TypeError, ValueError):
            takes_both = False
        if takes_both:
            return self.default_stages(student_stages, target_stages)
        return self.default_stages(student_stages)


KINDS = Registry("feature kind")


def register_kind(name: str, kind: _Kind, overwrite: bool = False) -> _Kind:
    """Make `name` usable as method.features[].kind (a name taken is refused unless `overwrite`)."""
    return KINDS.add(name, kind, overwrite)


register_kind("at", _Kind(1000.0, "AT paper (beta = 1000, at the end of every group of blocks)",
                          pair_loss=lambda s, t, o: losses.attention_transfer(s, t),
                          default_stages=lambda ns, nt: list(range(-min(ns, nt), 0))))
register_kind("fitnet", _Kind(100.0, "RepDistiller's and mdistiller's CIFAR-100 setting (weight 100, hint layer 2: "
                                     "the middle group)", regressed=True,
                              pair_loss=lambda s, t, o: losses.hint(s, t),
                              default_stages=lambda n: [(n - 1) // 2]))
register_kind("sp", _Kind(3000.0, "RepDistiller's CIFAR-100 setting for SP (the SP paper's gamma)",
                          pair_loss=lambda s, t, o: losses.similarity_preserving(s, t), embedding=True))
register_kind("pkt", _Kind(30000.0, "RepDistiller's CIFAR-100 setting for PKT",
                           pair_loss=lambda s, t, o: losses.pkt(s, t), embedding=True,
                           default_stages=lambda n: [EMBEDDING]))


class RKDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    w_dist: float = Field(25.0, ge=0, description="distance-wise weight (RKD paper: 25)")
    w_angle: float = Field(50.0, ge=0, description="angle-wise weight (RKD paper: 50)")


register_kind("rkd", _Kind(1.0, "RKD paper (w_dist 25, w_angle 50 inside the term)", options=RKDOptions,
                           pair_loss=lambda s, t, o: losses.rkd(s, t, o.w_dist, o.w_angle), embedding=True,
                           default_stages=lambda n: [EMBEDDING]))


def default_weight(kind: str) -> float:
    return KINDS[kind].default_weight


class FeatureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: str = Field(description="a registered feature kind: at, fitnet, sp, pkt, rkd, crd, nd, ofa, reviewkd")
    stages: list[Stage] | None = Field(None, min_length=1, description=(
        "student stage indices, or 'embedding' for the vector the classifier reads (default: the kind's)"))
    target_stages: list[Stage] | None = Field(None, min_length=1, description="target stage indices (default: same)")
    weight: float | None = Field(None, ge=0, description="default: the kind's (docs/methods.md)")
    options: dict[str, Any] = Field(default_factory=dict, description="the kind's own options")

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown feature kind '{kind}'{suggest(kind, KINDS)}; "
                             f"known: {', '.join(sorted(KINDS))}")
        return kind


def _resolve(idx: Stage, n: int, who: str, kind: str, net: StagedNet) -> int:
    """A stage index as a position in the stage list the term is given: 0..n-1 for stages, n for
    the embedding (appended after the stages when some term compares it)."""
    if idx == EMBEDDING:
        if not KINDS[kind].embedding:
            raise SokdError(f"feature term '{kind}' compares feature maps and cannot take the {who}'s embedding; "
                            f"give stage indices in method.features[{kind}]")
        if not has_embedding(net.head):
            raise SokdError(
                f"feature term '{kind}' compares the {who}'s embedding (what its classifier reads), but the "
                f"{who}'s head ({type(net.head).__name__}) gives none: it is neither a sequence ending in a "
                f"linear classifier nor a head with forward_embedding; set method.features[{kind}].stages "
                f"(e.g. [-1]) to compare pooled stage outputs instead")
        return n
    if not -n <= idx < n:
        raise SokdError(f"feature term '{kind}' asks for {who} stage {idx}, but the {who} has {n} "
                        f"stages (valid: 0..{n - 1} or -{n}..-1); fix method.features")
    return idx % n


def _stage_channels(net: StagedNet, input_shape) -> list[int]:
    """Channels of each stage output (as a map, `stage_map`), then the embedding's width where the
    head gives one, from one dry forward."""
    emb = has_embedding(net.head)
    out = dry_forward(net, input_shape, lambda n, x: n.forward_features(x, embedding=emb))
    channels = [stage_map(f, prefix_tokens(net)).shape[1] for f in out[1]]
    return channels + [out[2].shape[-1]] if emb else channels


class FeatureTerms(nn.Module):
    """Computes every configured term; holds their trainable parts and state as submodules."""

    #: the role whose features are compared: terms are named "<owner>_<kind>", and the trainable
    #: parts learn with it (its optim.lr_per_role entry applies to them)
    owner = "student"
    #: the trainable parts' param-group role (optim.lr_per_role may also name it)
    group = f"{owner}_regressors"

    def __init__(self, specs: list[FeatureSpec], student: StagedNet, target: StagedNet, input_shape,
                 num_samples: int | None = None):
        super().__init__()
        kinds = [s.kind for s in specs]
        if len(set(kinds)) != len(kinds):
            raise SokdError("method.features lists the same kind twice; list all its stages in one entry")
        ctx = TermContext(student, target, tuple(input_shape), num_samples)
        # a transformer's stage outputs are token sequences: every term compares them as maps
        self.prefix = (prefix_tokens(student), prefix_tokens(target))
        ns, nt = student.num_stages, target.num_stages
        self.pairs: dict[str, list[tuple[int, int]]] = {}
        self.kinds: dict[str, _Kind] = {}
        self.kind_options: dict[str, Any] = {}
        self.weights: dict[str, float] = {}
        self.regressors = nn.ModuleDict()   # FitNet's, keyed "i_j"
        self.modules_by_term = nn.ModuleDict()  # module kinds, keyed by term name
        for spec in specs:
            kind = KINDS[spec.kind]
            stages = spec.stages if spec.stages is not None else kind.stages_by_default(ns, nt)
            tgt = spec.target_stages if spec.target_stages is not None else stages
            if not kind.target_stages:
                if spec.target_stages is not None:
                    raise SokdError(f"feature term '{spec.kind}' learns from the target's logits, not its stages; "
                                    f"remove method.features[{spec.kind}].target_stages")
                tgt = [-1] * len(stages)
            if len(tgt) != len(stages):
                raise SokdError(f"feature term '{spec.kind}': stages and target_stages differ in length")
            pairs = [(_resolve(i, ns, "student", spec.kind, student), _resolve(j, nt, "teacher", spec.kind, target))
                     for i, j in zip(stages, tgt)]
            if kind.regressed and any(i == ns or j == nt for i, j in pairs):
                raise SokdError(f"feature term '{spec.kind}' regresses maps and cannot take an embedding")
            if kind.options is not None:
                opts = validate(kind.options, spec.options, prefix=f"method.features[{spec.kind}].options.")
            elif spec.options:
                raise SokdError(f"feature term '{spec.kind}' takes no options; remove "
                                f"method.features[{spec.kind}].options")
            else:
                opts = None
            name = f"{self.owner}_{spec.kind}"
            self.pairs[name] = pairs
            self.kinds[name] = kind
            self.kind_options[name] = opts
            self.weights[name] = spec.weight if spec.weight is not None else kind.default_weight
            if kind.build is not None:
                self.modules_by_term[name] = kind.build(pairs, opts, ctx)
            elif kind.regressed:
                s_ch, t_ch = ctx.channels("student"), ctx.channels("target")
                for i, j in pairs:
                    self.regressors[f"{i}_{j}"] = nn.Sequential(
                        nn.Conv2d(s_ch[i], t_ch[j], kernel_size=1, bias=False), nn.BatchNorm2d(t_ch[j]))
        #: whether some term compares an embedding: the networks' forwards must then give theirs
        #: (`forward_features(..., embedding=True)`) and `forward` be passed both
        self.uses_embedding = any(i == ns or j == nt for pairs in self.pairs.values() for i, j in pairs)

    @property
    def needs_index(self) -> bool:
        """Whether some term needs each sample's training-set index (`index=` in forward)."""
        return any(k.needs_index for k in self.kinds.values())

    def forward(self, student_feats: list[torch.Tensor], target_feats: list[torch.Tensor],
                labels: torch.Tensor | None = None, index: torch.Tensor | None = None,
                target_logits: torch.Tensor | None = None, student_embedding: torch.Tensor | None = None,
                target_embedding: torch.Tensor | None = None) -> dict:
        student_feats = [stage_map(f, self.prefix[0]) for f in student_feats]
        target_feats = [stage_map(f, self.prefix[1]) for f in target_feats]
        if self.uses_embedding:
            if student_embedding is None or target_embedding is None:
                raise RuntimeError("a feature term compares embeddings, but the method did not pass them")
            student_feats.append(student_embedding)
            target_feats.append(target_embedding)
        terms = {}
        for name, pairs in self.pairs.items():
            kind = self.kinds[name]
            if kind.build is not None:
                terms[name] = self.modules_by_term[name](
                    student_feats, target_feats, {"labels": labels, "index": index, "target_logits": target_logits})
                continue
            total = 0.0
            for i, j in pairs:
                s = self.regressors[f"{i}_{j}"](student_feats[i]) if kind.regressed else student_feats[i]
                total = total + kind.pair_loss(s, target_feats[j], self.kind_options[name])
            terms[name] = total
        return terms
