"""CRD (Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020) as the
module feature kind "crd".

The student's and the target's embeddings (by default what each classifier reads, as the
official code's last feature; a stage output given in `stages` is pooled, `losses.embedding`)
are mapped by a linear head to `feat_dim` and L2-normalised: v_s, v_t. Two
memory banks (N x feat_dim buffers, N = training-set size) hold one embedding per training
sample: M_s of the student's, M_t of the target's. For a batch with training-set indices i_b,
every anchor gets K negatives n_b1..n_bK drawn uniformly from the other N - 1 indices, and

    p(v, M)_bk = exp(M[c_bk] . v_b / tau) / Z          c_b = (i_b, n_b1, ..., n_bK)

so column 0 scores the sample's own memory (the positive). NCE with the uniform noise
distribution P_n = 1/N (paper Eq. 18; eps = 1e-7 as in the official code):

    L(p) = -(1/B) sum_b [ log(p_b0 / (p_b0 + K P_n + eps))
                          + sum_{k>=1} log(K P_n / (p_bk + K P_n + eps)) ]

    loss = L(p(v_s, M_t)) + L(p(v_t, M_s))        (student-anchored + target-anchored)

Each side's Z is estimated once, on the first batch, as mean(exp(scores / tau)) * N, and then
kept (a buffer, so checkpoints hold it). After the scores, the banks move towards the batch:
M[i] <- normalise(m M[i] + (1 - m) v) for the batch's rows only. Banks start uniform in
[-a, a], a = 1 / sqrt(feat_dim / 3) (rows of norm about 1), as in the official code.

Only the embeddings learn: bank rows enter the scores as constants, the target's features are
detached (in SOKD the KBM is not trained by this term), and both heads learn with the student
(FeatureTerms' param group). The gradient with respect to each anchor is computed together with
the loss, so no B x (K+1) x feat_dim copy of bank rows is kept for the backward pass.

Negatives are drawn with torch's global generator (on the banks' device), which the engine seeds
per epoch and restores on a mid-epoch resume, so a resumed run draws the same negatives.

Deviation from the official code: its CIFAR-100 loader ("exact" mode) draws each anchor's
negatives without replacement from the samples of the *other classes*; here they are drawn with
replacement from every other sample, which needs no labels of the whole training set (the
official ContrastMemory's own fallback sampler is uniform as well). K is capped to N - 1 so tiny
data sets work.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ...errors import SokdError
from .. import losses
from .terms import EMBEDDING, TermContext, _Kind, register_kind

EPS = 1e-7
#: score every anchor against the whole bank with one matmul when B x N stays below this many
#: elements and the K + 1 contrast rows are a good share of the bank; otherwise gather the rows
#: in chunks of about _CHUNK_ELEMENTS floats
_DENSE_MAX = 1 << 24
_CHUNK_ELEMENTS = 1 << 22


class CRDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    feat_dim: int = Field(128, ge=1, description="embedding size of both heads and the memory banks")
    nce_k: int = Field(16384, ge=1, description="negatives per anchor (capped to training-set size - 1)")
    nce_t: float = Field(0.07, gt=0, description="temperature tau of the scores")
    momentum: float = Field(0.5, ge=0, lt=1, description="memory-bank momentum m")


def _nce_and_grad(p: torch.Tensor, num_samples: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L(p), d L / d scores) with p = exp(scores / tau) / Z (Z constant), in few passes over p.

    L(p) is paper Eq. 18 for p (B, K+1), column 0 the positive, the rest negatives:
    -(1/B) sum_b [log(p_b0 / (p_b0 + K P_n)) + sum_k log(K P_n / (p_bk + K P_n))], P_n = 1 / N.

    With q = p + K P_n + eps and r = p / q: the positive's term is log r_0, a negative's
    log(K P_n) - log q; d/ds is (r_0 - 1) / (B tau) for the positive and r / (B tau) for a negative.
    """
    b, k = p.shape[0], p.shape[1] - 1
    noise = k / float(num_samples)
    q = p + (noise + EPS)
    r = p / q
    log_q = q.log_()
    loss = -(r[:, 0].log().sum() + (math.log(noise) - log_q[:, 1:]).sum()) / b
    r[:, 0] -= 1.0
    return loss, r.mul_(1.0 / (b * temperature))


def update_memory(memory: torch.Tensor, index: torch.Tensor, emb: torch.Tensor, momentum: float) -> None:
    """memory[index] <- normalise(m memory[index] + (1 - m) emb), in place; other rows unchanged."""
    rows = memory.index_select(0, index).mul_(momentum).add_(emb.to(memory.dtype), alpha=1.0 - momentum)
    memory.index_copy_(0, index, F.normalize(rows, dim=1))


def sample_contrast(index: torch.Tensor, num_samples: int, k: int) -> torch.Tensor:
    """(B, K+1) bank rows per anchor: its own index, then K drawn uniformly (with replacement)
    from the other num_samples - 1 indices, with torch's global generator of index's device."""
    out = torch.empty(index.shape[0], k + 1, dtype=torch.int64, device=index.device)
    draws = out[:, 1:].random_(0, num_samples - 1)
    draws += draws >= index[:, None]  # skip the anchor's own row
    out[:, 0] = index
    return out


def _dense(batch: int, memory: torch.Tensor, contrast: torch.Tensor) -> bool:
    n = memory.shape[0]
    return batch * n <= _DENSE_MAX and n <= 8 * contrast.shape[1]


def _chunks(contrast: torch.Tensor, dim: int):
    """contrast split along K so that one chunk's gathered rows hold about _CHUNK_ELEMENTS floats."""
    step = max(1, _CHUNK_ELEMENTS // max(1, contrast.shape[0] * dim))
    return contrast.split(step, dim=1)


def contrast_scores(v: torch.Tensor, memory: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """scores_bk = memory[contrast_bk] . v_b, shape (B, K+1)."""
    if _dense(v.shape[0], memory, contrast):
        return (v @ memory.t()).gather(1, contrast)
    return torch.cat([torch.bmm(memory[c], v[:, :, None]).squeeze(2) for c in _chunks(contrast, v.shape[1])], dim=1)


def contrast_vjp(g: torch.Tensor, memory: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """sum_k g_bk memory[contrast_bk]: the gradient of sum(g * scores) with respect to v, (B, D)."""
    if _dense(g.shape[0], memory, contrast):
        dense = torch.zeros(g.shape[0], memory.shape[0], dtype=g.dtype, device=g.device)
        return dense.scatter_add_(1, contrast, g) @ memory
    out = torch.zeros(g.shape[0], memory.shape[1], dtype=g.dtype, device=g.device)
    start = 0
    for c in _chunks(contrast, memory.shape[1]):
        out += torch.bmm(g[:, None, start:start + c.shape[1]], memory[c]).squeeze(1)
        start += c.shape[1]
    return out


class _MemoryNCE(torch.autograd.Function):
    """L(p(v, memory)) with Z set from this batch when still unset (z < 0); gradient to v only.

    The gradient is computed in forward, while the bank rows are those the scores used (the bank
    is updated in place right after), and is all that is kept for backward.
    """

    @staticmethod
    def forward(ctx, v, memory, contrast, z, temperature: float, num_samples: int):
        p = contrast_scores(v, memory, contrast).mul_(1.0 / temperature).exp_()
        z.copy_(torch.where(z < 0, p.mean() * num_samples, z))
        loss, grad_scores = _nce_and_grad(p.mul_(z.reciprocal()), num_samples, temperature)
        ctx.save_for_backward(contrast_vjp(grad_scores, memory, contrast))
        return loss

    @staticmethod
    def backward(ctx, grad):
        (grad_v,) = ctx.saved_tensors
        return grad * grad_v, None, None, None, None, None


def _same_rows(t: torch.Tensor) -> torch.Tensor:
    return t


class CRDTerm(nn.Module):
    """Both embedding heads, both memory banks and both Z; forward returns the CRD loss."""

    #: buffers kept identical on every data-parallel rank by this module itself: each update
    #: applies every rank's rows, concatenated by `gather` (identity on one process; the engine's
    #: data-parallel wrapper sets it and skips broadcasting these buffers)
    replicated_buffers = ("memory_s", "memory_t")

    def __init__(self, student_stage: int, target_stage: int, student_dim: int, target_dim: int,
                 num_samples: int, options: CRDOptions):
        super().__init__()
        self.student_stage, self.target_stage = student_stage, target_stage
        self.num_samples = int(num_samples)
        self.k = min(options.nce_k, self.num_samples - 1)
        self.temperature, self.momentum = float(options.nce_t), float(options.momentum)
        self.embed_s = nn.Linear(student_dim, options.feat_dim)
        self.embed_t = nn.Linear(target_dim, options.feat_dim)
        a = 1.0 / math.sqrt(options.feat_dim / 3)
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, torch.rand(self.num_samples, options.feat_dim).mul_(2 * a).sub_(a))
        self.register_buffer("z", torch.full((2,), -1.0))  # [student-anchored, target-anchored]; < 0: unset
        self.gather = _same_rows

    def forward(self, student_feats: list, target_feats: list, batch: dict) -> torch.Tensor:
        index = batch.get("index")
        if index is None:
            raise SokdError("the crd feature term needs each sample's training-set index; call the "
                            "method with index= (the engine passes it when method.needs_index)")
        fs = losses.embedding(student_feats[self.student_stage])
        ft = losses.embedding(target_feats[self.target_stage].detach())
        with torch.autocast(fs.device.type, enabled=False):  # the contrast is computed in fp32
            vs = F.normalize(self.embed_s(fs.float()), dim=1)
            vt = F.normalize(self.embed_t(ft.float()), dim=1)
            index = index.to(self.memory_s.device, torch.int64)
            contrast = sample_contrast(index, self.num_samples, self.k)
            loss = (_MemoryNCE.apply(vs, self.memory_t, contrast, self.z[0:1], self.temperature, self.num_samples)
                    + _MemoryNCE.apply(vt, self.memory_s, contrast, self.z[1:2], self.temperature, self.num_samples))
            with torch.no_grad():
                rows, es, et = self.gather(index), self.gather(vs.detach()), self.gather(vt.detach())
                update_memory(self.memory_s, rows, es, self.momentum)
                update_memory(self.memory_t, rows, et, self.momentum)
        return loss


def _build(pairs, options: CRDOptions, ctx: TermContext) -> CRDTerm:
    if len(pairs) != 1:
        raise SokdError(f"the crd feature term compares one student stage with one target stage, got "
                        f"{len(pairs)}; give one entry in method.features[crd].stages (default: embedding)")
    if ctx.num_samples is None or ctx.num_samples < 2:
        raise SokdError(f"the crd feature term needs the training-set size (>= 2 samples) for its memory "
                        f"banks, got {ctx.num_samples}; build the method with num_samples=")
    (i, j), = pairs
    return CRDTerm(i, j, ctx.channels("student")[i], ctx.channels("target")[j], ctx.num_samples, options)


register_kind("crd", _Kind(
    0.8, "RepDistiller's CIFAR-100 setting for CRD (-b 0.8; with KD: -r 1 -a 1 -b 0.8)",
    build=_build, options=CRDOptions, needs_index=True, embedding=True,
    default_stages=lambda n: [EMBEDDING]))
