"""Loss terms as small pure functions; a method is a weighted composition of them."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def fp32(fn):
    """Run a loss with autocast off: its inputs are cast to fp32 inside, and under bf16 autocast
    its matmuls (similarity and distance matrices) would otherwise be rounded back to bf16."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)
    return wrapper


def soft_target(target_logits: torch.Tensor, logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Hinton's KL_T(target -> logits): KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean.

    The target side is detached: gradient flows only into `logits`. Computed in fp32 so bf16
    autocast does not round the small probabilities away.
    """
    t = target_logits.detach().float() / T
    s = logits.float() / T
    log_p_t = F.log_softmax(t, dim=1)
    log_p_s = F.log_softmax(s, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * (T * T)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def attention_map(feat: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention: mean over channels of |f|^p, flattened, L2-normalised."""
    am = feat.float().pow(p).mean(dim=1)
    return F.normalize(am.flatten(1), dim=1)


def _match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger feature map down to the smaller one's spatial size."""
    ha, hb = a.shape[-2:], b.shape[-2:]
    if ha == hb:
        return a, b
    size = (min(ha[0], hb[0]), min(ha[1], hb[1]))
    return F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)


def attention_transfer(student_feat: torch.Tensor, target_feat: torch.Tensor, p: int = 2) -> torch.Tensor:
    """AT loss for one stage: mean squared distance of normalised attention maps (target detached).

    Multiply by beta (1000 in the AT paper) via the term's weight.
    """
    s, t = _match_spatial(student_feat, target_feat.detach())
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


def hint(regressed_student: torch.Tensor, target_feat: torch.Tensor) -> torch.Tensor:
    """FitNet hint loss: MSE between the regressed student feature and the (detached) target."""
    s, t = _match_spatial(regressed_student, target_feat.detach())
    return F.mse_loss(s.float(), t.float())


# -- logit distances beside KL ---------------------------------------------------------------

@fp32
def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): per-sample (z - mean) / (std + eps).

    Removes each logit vector's shift and scale before the softmax, so a student need not match
    the teacher's logit magnitude, only its shape; the temperature then acts as a base temperature.
    Uses the unbiased std over classes, in fp32.
    """
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p || q) from log-probabilities (zero where p is zero)."""
    return torch.where(log_p > -float("inf"), log_p.exp() * (log_p - log_q), 0.0).sum(dim=1)


@fp32
def dkd_parts(target_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
              T: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (TCKD, NCKD) of Decoupled KD, each a KL at temperature T (not yet scaled by T^2).

    TCKD compares the binary (target class, all others) probabilities; NCKD compares the
    distributions over the non-target classes alone. With p the target's softmax, Zhao et al.
    show KL = TCKD + (1 - p_target) * NCKD: classical KD couples NCKD to the teacher's confidence.
    """
    t = target_logits.detach().float() / T
    s = logits.float() / T
    # a comparison, not F.one_hot: one_hot checks the labels' range by reading them on the host
    onehot = labels[:, None] == torch.arange(t.shape[1], device=labels.device)
    log_pt, log_ps = F.log_softmax(t, dim=1), F.log_softmax(s, dim=1)
    # binary probabilities in log space: log p_y and log(1 - p_y) = logsumexp over the others
    other = ~onehot
    lt_y = log_pt.gather(1, labels[:, None]).squeeze(1)   # gather, not a boolean mask: the
    ls_y = log_ps.gather(1, labels[:, None]).squeeze(1)   # mask's nonzero would read the device
    lt_rest = torch.logsumexp(log_pt.masked_fill(onehot, -float("inf")), dim=1)
    ls_rest = torch.logsumexp(log_ps.masked_fill(onehot, -float("inf")), dim=1)
    tckd = _kl_rows(torch.stack([lt_y, lt_rest], 1), torch.stack([ls_y, ls_rest], 1))
    # distributions over the non-target classes: softmax with the target class removed
    log_nt = F.log_softmax(t.masked_fill(onehot, -float("inf")), dim=1)
    log_ns = F.log_softmax(s.masked_fill(onehot, -float("inf")), dim=1)
    nckd = _kl_rows(log_nt.masked_fill(~other, -float("inf")), log_ns.masked_fill(~other, 0.0))
    return tckd, nckd


def dkd(target_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
        alpha: float = 1.0, beta: float = 8.0, T: float = 4.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): alpha * TCKD + beta * NCKD, each scaled by T^2.

    Defaults are the paper's CIFAR-100 setting (alpha 1, beta 8, T 4; the paper also ramps the
    term's weight over its first 20 epochs: method.warmup_epochs). Target side detached, fp32.
    """
    tckd, nckd = dkd_parts(target_logits, logits, labels, T)
    return (alpha * tckd.mean() + beta * nckd.mean()) * (T * T)


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """Mean over the other dimension of 1 - Pearson correlation along `dim`."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    r = (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)
    return (1.0 - r).mean()


@fp32
def dist(target_logits: torch.Tensor, logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
         T: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): correlation instead of exact match of probabilities.

    beta * inter-class distance (1 - Pearson r of each sample's class probabilities, averaged over
    the batch) + gamma * intra-class distance (1 - Pearson r of each class's probabilities across
    the batch, averaged over classes), times T^2. The signature's defaults are the paper's
    ImageNet setting; its CIFAR-100 setting (beta = gamma = 2, T = 4) is what the methods use.
    """
    p_t = F.softmax(target_logits.detach().float() / T, dim=1)
    p_s = F.softmax(logits.float() / T, dim=1)
    inter = _pearson_distance(p_s, p_t, dim=1)
    intra = _pearson_distance(p_s, p_t, dim=0)
    return (beta * inter + gamma * intra) * (T * T)


# -- relational terms (between samples of a batch) ---------------------------------------------

def embedding(feat: torch.Tensor) -> torch.Tensor:
    """A stage output as one vector per sample: global average pool of a map, else flattened."""
    feat = feat.float()
    return feat.mean(dim=(2, 3)) if feat.dim() == 4 else feat.flatten(1)


@fp32
def similarity_preserving(student_feat: torch.Tensor, target_feat: torch.Tensor) -> torch.Tensor:
    """SP (Tung & Mori, ICCV 2019): match the batch's sample-similarity matrices.

    G = F F^T of the flattened features with each row L2-normalised; loss = ||G_s - G_t||_F^2 / b^2.
    Invariant to a common scale of either network's features, and independent of their channel
    counts and spatial sizes (only the b x b matrices are compared).
    """
    def gram(f):
        f = f.float().flatten(1)
        return F.normalize(f @ f.t(), dim=1)
    b = student_feat.shape[0]
    return (gram(student_feat) - gram(target_feat.detach())).pow(2).sum() / (b * b)


@fp32
def pkt(student_emb: torch.Tensor, target_emb: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """PKT (Passalis & Tefas, ECCV 2018): match conditional probability distributions of samples.

    Cosine similarities of L2-normalised embeddings, shifted to [0, 1] and normalised per row into
    P(j | i); loss = mean over all (i, j) of p_t log(p_t / p_s) (the KL rows averaged, / b).
    Embeddings of any width; maps are pooled first (`embedding`).
    """
    def cond(e):
        e = F.normalize(embedding(e), dim=1)
        sim = (e @ e.t() + 1.0) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)
    p_s, p_t = cond(student_emb), cond(target_emb.detach())
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _pairwise_distance(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sq = e.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * e @ e.t()).clamp(min=eps)
    d = d2.sqrt()
    return d * (1.0 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j of every triplet (i, j, k): <(e_i - e_j)/|.|, (e_k - e_j)/|.|>."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # diff[j, i] = e_i - e_j
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


@fp32
def rkd(student_emb: torch.Tensor, target_emb: torch.Tensor, w_dist: float = 25.0,
        w_angle: float = 50.0) -> torch.Tensor:
    """RKD (Park et al., CVPR 2019): distance-wise + angle-wise relational losses.

    Distances between samples, each matrix divided by its mean non-zero distance, compared with
    the Huber (smooth L1) loss; cosines of the angles of every triplet compared the same way.
    Defaults are the paper's weights (25, 50). Invariant to a common scaling of either embedding.
    """
    s, t = embedding(student_emb), embedding(target_emb.detach())

    def normalised(e):
        d = _pairwise_distance(e)
        return d / d[d > 0].mean().clamp(min=1e-12)
    loss = s.new_zeros(())
    if w_dist:
        loss = loss + w_dist * F.smooth_l1_loss(normalised(s), normalised(t))
    if w_angle:
        loss = loss + w_angle * F.smooth_l1_loss(_angles(s), _angles(t))
    return loss
