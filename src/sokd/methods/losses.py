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


# -- logit distances since 2023 ----------------------------------------------------------------

def _label_mask(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) boolean, true at each sample's label (a comparison: no host read of the labels)."""
    return labels[:, None] == torch.arange(num_classes, device=labels.device)


@fp32
def nkd(target_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, gamma: float = 1.5,
        T: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Normalized KD (Yang et al., ICCV 2023): a target part and a normalised non-target part.

    With p = softmax(t) and q = softmax(s) at temperature 1:
      target     = -mean_i p_iy · log q_iy
      non-target = -gamma · T² · mean_i Σ_{j≠y} p̂_ij · log q̂_ij,
    where p̂, q̂ are the non-target logits' softmax at temperature T, i.e. the non-target
    probabilities renormalised to sum to one. The non-target part is a cross-entropy (its
    gradient vanishes where q̂ = p̂, its value is the teacher's non-target entropy there).
    The released code's CIFAR-100 setting is T = 3, gamma = 3.5; ImageNet T = 1, gamma = 1.5.
    """
    t, s = target_logits.detach().float(), logits.float()
    is_label = _label_mask(labels, t.shape[1])
    p_y = F.softmax(t, dim=1).gather(1, labels[:, None]).squeeze(1)
    log_q_y = F.log_softmax(s, dim=1).gather(1, labels[:, None]).squeeze(1)
    target = -(p_y * log_q_y).mean()
    p_hat = F.softmax(t.masked_fill(is_label, -float("inf")) / T, dim=1)
    log_q_hat = F.log_softmax(s.masked_fill(is_label, -float("inf")) / T, dim=1).masked_fill(is_label, 0.0)
    non_target = -(p_hat * log_q_hat).sum(dim=1).mean()
    return target + gamma * non_target * (T * T)


#: MLKD's temperatures besides the configured one ("prediction augmentation", Jin et al. 2023)
MLKD_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)


def _class_gram_distance(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """MLKD's class level: ||P_tᵀP_t - P_sᵀP_s||²_F / C (C x C class-correlation matrices)."""
    return (p_t.t() @ p_t - p_s.t() @ p_s).pow(2).sum() / p_t.shape[1]


def _batch_gram_distance(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """MLKD's batch level: ||P_tP_tᵀ - P_sP_sᵀ||²_F / B (B x B sample-correlation matrices)."""
    return (p_t @ p_t.t() - p_s @ p_s.t()).pow(2).sum() / p_t.shape[0]


def _share_at_most_median(values: torch.Tensor) -> torch.Tensor:
    """The fraction of `values` at or below their median (linear interpolation, as numpy's)."""
    return (values <= torch.quantile(values, 0.5)).float().mean()


@fp32
def mlkd(target_logits: torch.Tensor, logits: torch.Tensor, T: float | torch.Tensor = 4.0, views: int = 1,
         standardize_instance: bool = False) -> torch.Tensor:
    """Multi-Level Logit Distillation (Jin, Wang & Lin, CVPR 2023), as its released code computes it.

    The rows are `views` equal blocks of one batch: the weak view, then (views = 2) the strong
    view of the same images. Over the temperatures {T, 3, 5, 2, 6}, with P = softmax(z / τ):
      instance level  KL_τ(target → logits) · τ²        on every view (weak view weighted m̄)
      class level     ||P_tᵀP_t − P_sᵀP_s||²_F / C       on the weak view, weighted c̄
      batch level     ||P_tP_tᵀ − P_sP_sᵀ||²_F / B       on the weak view, weighted m̄
    m̄ is the share of weak-view samples whose target confidence (max softmax at τ = 1) is at or
    below the batch median, c̄ the share of classes whose summed target probability is at or below
    the median over classes: the released code multiplies each scalar loss by its confidence mask
    and averages, which weights the level by the mask's share (about one half).
    `standardize_instance` z-scores both sides before the instance level only (MLKD + LS, Sun et
    al., CVPR 2024). Target side detached, fp32.
    """
    t_all, s_all = target_logits.detach().float(), logits.float()
    t_views, s_views = t_all.chunk(views, dim=0), s_all.chunk(views, dim=0)
    t_weak, s_weak = t_views[0], s_views[0]
    p_weak = F.softmax(t_weak, dim=1)
    sample_share = _share_at_most_median(p_weak.max(dim=1).values)
    class_share = _share_at_most_median(p_weak.sum(dim=0))
    loss = s_all.new_zeros(())
    for tau in (T, *MLKD_TEMPERATURES):
        for v, (t, s) in enumerate(zip(t_views, s_views)):
            ti, si = (standardize(t), standardize(s)) if standardize_instance else (t, s)
            kl = soft_target(ti, si, tau)
            loss = loss + (sample_share * kl if v == 0 else kl)
        p_t, p_s = F.softmax(t_weak / tau, dim=1), F.softmax(s_weak / tau, dim=1)
        loss = loss + class_share * _class_gram_distance(p_t, p_s) + sample_share * _batch_gram_distance(p_t, p_s)
    return loss


# -- feature norm and direction (KD++) ---------------------------------------------------------

@fp32
def norm_direction(student_emb: torch.Tensor, target_emb: torch.Tensor, centres: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """KD++'s ND loss (Wang et al., 2023): mean_i 1 − <s_i, c_y / ||c_y||> / max(||s_i||, ||t_i||).

    Pulls each student embedding towards the direction of its class centre (`centres`, C x D,
    from the target) and, while it is shorter than the target's embedding, lengthens it: where
    ||s|| < ||t|| the loss is 1 − (||s|| / ||t||) cos(s, c_y), beyond it 1 − cos(s, c_y). A class
    centre of zero (a class not seen yet) gives 1 with no gradient.
    """
    s = student_emb.float()
    t_norm = target_emb.detach().float().norm(dim=1)
    direction = F.normalize(centres.detach().float(), dim=1)[labels]
    scale = torch.maximum(s.norm(dim=1), t_norm).clamp(min=1e-12)
    return (1.0 - (s * direction).sum(dim=1) / scale).mean()


@fp32
def ofa(target_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, eps: float = 1.0,
        T: float | torch.Tensor = 1.0) -> torch.Tensor:
    """OFA-KD's loss (Hao et al., NeurIPS 2023): a soft-target cross-entropy whose target class is
    enhanced: -mean_i Σ_c w_ic log q_ic with w = (p + y)^eps − y, p = softmax(t / T), q = softmax(s / T)
    and y the one-hot label: the label's weight is (1 + p_y)^eps − 1, every other class's p_c^eps
    (not renormalised). eps = 1 is the plain soft-target cross-entropy. No T² factor; target detached.
    """
    p = F.softmax(target_logits.detach().float() / T, dim=1)
    log_q = F.log_softmax(logits.float() / T, dim=1)
    y = _label_mask(labels, p.shape[1]).float()
    weight = (p + y).pow(eps) - y
    return -(weight * log_q).sum(dim=1).mean()
