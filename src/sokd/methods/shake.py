"""SHAKE, shadow knowledge distillation (Li & Jin, NeurIPS 2022), as its released code trains it.

A frozen teacher (eval mode) and a **shadow head**: new layers (not a copy of the teacher's)
that fuse the outputs of the teacher's last stages top-down and end in the teacher's own
classifier, frozen. The shadow head learns online with the student, one backward pass per step:

    student: CE(y, S) + KL_T(H → S)                        (+ α KL_T(T → S), α = 0 by default)
    shadow:  CE(y, H) + KL_T(S → H) + MSE(H, T)

with every logit vector layer-normalised (no affine) and scaled by π before every loss
(`logit_norm`), T = 4, and all other weights 1 (the released CIFAR-100 script: -a 0 -b 1).

How it differs from SOKD's knowledge bridge (`sokd`):
- what is fed: SHAKE's head reads several teacher stages (the last three), detached; SOKD's KBM
  reads the output of the one stage before it;
- what it is: SHAKE's head is new, lightweight fusion layers (3x3 conv-BN-ReLU down paths and
  1x1 conv-BN-ReLU laterals) ending in the teacher's frozen classifier; SOKD's KBM is a trainable
  copy of the teacher's last stage(s) *and* head;
- how it follows the teacher: SHAKE matches the teacher's normalised logits with MSE; SOKD with
  KL_T(teacher → A);
- logits: SHAKE layer-normalises every logit vector before every loss (the CE terms included);
  SOKD uses raw logits;
- the teacher: SHAKE's frozen teacher runs in eval mode; SOKD's reference keeps its BatchNorm on
  batch statistics (`teacher_bn: train`).
Both: the head learns with CE and from the student (KL, target detached), the student learns
from the head, and the student gets no direct teacher term by default.

Generalised beyond the released code (which fixes three stages and CIFAR strides): any number of
fed stages (`shadow_stages`, capped at the teacher's), down paths strided by the ratio of the
stages' sizes, and a last conv to the classifier's input width (so heads with extra layers before
their linear classifier work).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import SokdError
from ..models.staged import StagedNet, dry_forward, final_linear, split_embedding
from ..models.tokens import prefix_tokens, stage_map
from . import losses
from .base import Method, MethodOptions, Role
from .registry import register


class SHAKEOptions(MethodOptions):
    shadow_stages: int = Field(3, ge=1, description="how many of the teacher's last stages the shadow head "
                               "fuses (the released code: 3, every stage of a CIFAR ResNet/WRN)")
    logit_norm: float = Field(3.1415, ge=0, description="every logit vector is layer-normalised and multiplied "
                              "by this before every loss, as the released code does; 0 = raw logits")


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def teacher_classifier(net: StagedNet) -> nn.Linear:
    """The teacher's linear classifier, which the shadow head ends in; SokdError when it has none."""
    linear = final_linear(net)
    if linear is None:
        raise SokdError(f"the teacher's head ({type(net.head).__name__}) has no linear classifier for SHAKE's "
                        f"shadow head to end in; pick a teacher whose head ends in nn.Linear")
    return linear


class ShadowHead(nn.Module):
    """Top-down fusion of k teacher stage outputs f_1..f_k (shallow to deep):
    x = f_1; x = down_i(x) + lateral_i(f_{i+1}) for i < k; x = last(x); logits = classifier(GAP(x)).
    The classifier is the teacher's, called but not owned (it stays frozen, outside this module)."""

    def __init__(self, shapes: list[tuple[int, int, int]], width: int, classifier: nn.Linear):
        super().__init__()
        self.down = nn.ModuleList()
        self.lateral = nn.ModuleList()
        self.sizes = [s[1:] for s in shapes]
        for (c0, h0, _), (c1, h1, _) in zip(shapes, shapes[1:]):
            self.down.append(_conv_bn_relu(c0, c1, 3, max(1, round(h0 / max(h1, 1)))))
            self.lateral.append(_conv_bn_relu(c1, c1, 1))
        self.last = _conv_bn_relu(shapes[-1][0], width, 3)
        self._classifier = [classifier]   # a list: not a submodule, so not trained or saved twice
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[0]
        for i, (down, lateral) in enumerate(zip(self.down, self.lateral)):
            x = down(x)
            if x.shape[-2:] != feats[i + 1].shape[-2:]:
                x = F.adaptive_avg_pool2d(x, feats[i + 1].shape[-2:])
            x = x + lateral(feats[i + 1])
        x = self.last(x).mean(dim=(2, 3))
        return self._classifier[0](x)


@register("shake")
class SHAKE(Method):
    Options = SHAKEOptions
    term_names = ("student_ce", "student_kl_teacher", "student_kl_shadow", "shadow_ce", "shadow_kl_student",
                  "shadow_mse_teacher")
    default_weights = {"student_kl_teacher": 0.0}
    comparisons = (("teacher", "student"), ("shadow", "student"))
    reference_label = "SHAKE"
    roles = {**Method.roles,
             "shadow": Role(config=False, plotted=True,
                            part="SHAKE's shadow head: fusion layers over the teacher's last stages, "
                                 "ending in the teacher's frozen classifier")}

    def __init__(self, teacher=None, student=None, options: SHAKEOptions | None = None,
                 input_shape=(3, 32, 32), num_samples: int | None = None):
        self.require(teacher=teacher, student=student)
        options = options or SHAKEOptions()
        k = min(options.shadow_stages, teacher.num_stages)
        prefix = prefix_tokens(teacher)   # a ViT teacher's stages reach the head as patch maps
        feats = [stage_map(f, prefix) for f in
                 dry_forward(teacher, tuple(input_shape), lambda n, x: n.forward_features(x)[1])[-k:]]
        classifier = teacher_classifier(teacher)
        shadow = ShadowHead([tuple(f.shape[1:]) for f in feats], classifier.in_features, classifier)
        super().__init__({"teacher": teacher, "student": student, "shadow": shadow}, options)
        self.fed, self.prefix = k, prefix
        self._attach_features(student, teacher, input_shape, num_samples)

    def _norm(self, logits: torch.Tensor) -> torch.Tensor:
        scale = self.options.logit_norm
        if not scale:
            return logits
        return F.layer_norm(logits.float(), logits.shape[-1:], eps=1e-7) * scale

    def _teacher_and_shadow(self, images):
        with torch.no_grad():
            t_logits, t_feats, t_emb = split_embedding(
                self.nets["teacher"].forward_features(images, embedding=self.features_embedding))
        h_logits = self.nets["shadow"]([stage_map(f.detach(), self.prefix) for f in t_feats[-self.fed:]])
        return t_logits, h_logits, t_feats, t_emb

    def forward(self, images, labels, index=None):
        t_logits, h_logits, t_feats, t_emb = self._teacher_and_shadow(images)
        s_logits, s_feats, s_emb = split_embedding(
            self.nets["student"].forward_features(images, embedding=self.features_embedding))
        t, h, s = self._norm(t_logits), self._norm(h_logits), self._norm(s_logits)
        terms = {
            "student_ce": losses.cross_entropy(s, labels),
            "student_kl_teacher": self.distill(t, s, labels),
            "student_kl_shadow": self.distill(h, s, labels),
            "shadow_ce": losses.cross_entropy(h, labels),
            "shadow_kl_student": self.distill(s, h, labels),
            "shadow_mse_teacher": F.mse_loss(h.float(), t.detach().float()),
        }
        if self.features is not None:
            terms.update(self.features(s_feats, t_feats, labels, index, target_logits=t_logits,
                                       student_embedding=s_emb, target_embedding=t_emb))
        return self.combine(terms, {"student": s_logits, "teacher": t_logits, "shadow": h_logits})

    @torch.no_grad()
    def predict(self, images, known=None):
        t_logits, h_logits, _, _ = self._teacher_and_shadow(images)
        if known and "teacher" in known:
            t_logits = known["teacher"]
        return {"student": self.nets["student"](images), "teacher": t_logits, "shadow": h_logits}

    def standalone(self):
        """The student alone: the shadow head is no classifier without the teacher under it."""
        return {"student": ("student", self.nets["student"])}
