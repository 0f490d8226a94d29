"""Loss terms as small pure functions; a method is a weighted composition of them."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
