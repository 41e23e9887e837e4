"""The maths shared by the classifier attacks: quantisation to what a victim accepts, soft
cross-entropy, logit recovery from posteriors (DFME) and the KL divergence (MAZE)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOG_FLOOR", "quantize", "soft_cross_entropy", "logits_from_posteriors", "kl_posteriors"]

LOG_FLOOR = 1e-8  # posteriors are clamped here before a log (exact zeros come from top-k, rounding, defenses)


def quantize(x: Tensor) -> Tensor:
    """Float images in [0, 1] → uint8 0..255 (rounded, clamped): what a victim API accepts."""
    return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8)


def soft_cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """``-Σ_k y_k log softmax(logits)_k`` per row (Knockoff's training loss); mean or none."""
    loss = -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    return loss.mean() if reduction == "mean" else loss


def logits_from_posteriors(p: Tensor) -> Tensor:
    """DFME's logit recovery: ``log p - mean_k log p`` (p clamped at LOG_FLOOR so zeros stay finite)."""
    lp = p.float().clamp_min(LOG_FLOOR).log()
    return lp - lp.mean(dim=1, keepdim=True)


def kl_posteriors(p: Tensor, logits: Tensor) -> Tensor:
    """``KL(p || softmax(logits))`` per row; ``0 log 0 = 0`` (MAZE's loss)."""
    return (torch.xlogy(p, p) - p * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
