"""Stealing losses: how far the student's representation is from the victim's.

Every loss has the signature::

    fn(student, target, *, temperature=0.1, gather=False, **kwargs) -> scalar Tensor

``student`` [N, D] carries the gradient; ``target`` [N, D] is the victim's response
and is detached here. Unused keyword arguments are accepted and ignored, so a
caller can pass the same config to any loss.

Example::

    >>> loss = get_loss("infonce")(student, victim_reps, temperature=0.1, gather=True)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from stealer.dist import (
    gather_nograd,
    gather_sizes,
    gather_with_grad,
    is_distributed,
)

__all__ = ["mse", "cosine", "infonce", "LOSSES", "get_loss"]


def _check(student: Tensor, target: Tensor) -> None:
    if student.ndim != 2 or student.shape != target.shape:
        raise ValueError(
            f"student and target must both be [N, D]; got {tuple(student.shape)} "
            f"and {tuple(target.shape)}"
        )


def mse(
    student: Tensor,
    target: Tensor,
    *,
    temperature: float = 0.1,
    gather: bool = False,
    **kwargs: Any,
) -> Tensor:
    """Squared L2 distance per row, averaged over the batch.

    ``((student - target) ** 2).sum(dim=1).mean()``: summed over the D features,
    then averaged over the N rows. Note that ``torch.nn.MSELoss()`` (the
    default ``reduction='mean'``) averages over all N·D elements, i.e. gives this
    value divided by D.

    Args:
        student: student representations [N, D].
        target: victim representations [N, D] (no gradient).
        temperature: ignored.
        gather: ignored (the loss is per row; DDP's averaging is enough).

    Returns:
        Scalar tensor.

    Reference:
        Dziedzic et al., "On the Difficulty of Defending Self-Supervised Learning
        against Model Extraction", ICML 2022.
    """
    _check(student, target)
    return ((student - target.detach()) ** 2).sum(dim=1).mean()


def cosine(
    student: Tensor,
    target: Tensor,
    *,
    temperature: float = 0.1,
    gather: bool = False,
    **kwargs: Any,
) -> Tensor:
    """Negative cosine similarity in BYOL's regression form, ``2 - 2·cos(s, t)``.

    Equal to the squared L2 distance between the L2-normalised rows; in [0, 4].

    Args:
        student: student representations [N, D].
        target: victim representations [N, D] (no gradient).
        temperature: ignored.
        gather: ignored (the loss is per row).

    Returns:
        Scalar tensor, ``mean_i (2 - 2·cos(s_i, t_i))``.

    Reference:
        Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020 (eq. 2);
        Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021.
    """
    _check(student, target)
    cos = F.cosine_similarity(student, target.detach(), dim=1)  # N
    return (2.0 - 2.0 * cos).mean()


def infonce(
    student: Tensor,
    target: Tensor,
    *,
    temperature: float = 0.1,
    gather: bool = False,
    **kwargs: Any,
) -> Tensor:
    """Symmetric InfoNCE between normalised student and victim rows.

    With ``s``, ``t`` the L2-normalised rows, ``logits[i, j] = s_i·t_j / T`` and
    the positive of row i is column i;
    ``loss = 0.5 · (CE(s → t) + CE(t → s))``, averaged over local rows.

    With ``gather=True`` under torch.distributed (world size > 1) the negatives
    come from all ranks: targets are gathered without gradient, student rows with
    gradient (:func:`stealer.dist.gather_with_grad`), and the positive of local row
    i is ``offset_rank + i``. Ranks may hold different batch sizes. Each rank
    returns the mean over its own rows; after backward each rank holds
    ``d(sum_r L_r)/d s_local`` and DDP's averaging gives the gradient of
    ``mean_r L_r``.

    Args:
        student: student representations [N, D].
        target: victim representations [N, D] (no gradient).
        temperature: softmax temperature T.
        gather: take negatives from every rank.

    Returns:
        Scalar tensor.

    Reference:
        Oord et al., "Representation Learning with Contrastive Predictive Coding",
        2018; symmetric form as in Radford et al., "CLIP", ICML 2021. Used for
        stealing by Dziedzic et al., ICML 2022 and Sha et al., "Cont-Steal", CVPR 2023.
    """
    _check(student, target)
    s = F.normalize(student, dim=1)  # N x D
    t = F.normalize(target.detach(), dim=1)  # N x D
    n = s.shape[0]

    if gather and is_distributed():
        sizes = gather_sizes(n, s.device)
        rank = torch.distributed.get_rank()
        offset = sum(sizes[:rank])
        s_all = gather_with_grad(s, sizes)  # M x D, M = sum of sizes
        t_all = gather_nograd(t, sizes)  # M x D
    else:
        offset, s_all, t_all = 0, s, t

    labels = torch.arange(offset, offset + n, device=s.device)
    logits_st = s @ t_all.T / temperature  # N x M: local students vs all targets
    logits_ts = t @ s_all.T / temperature  # N x M: local targets vs all students
    # sum / max(n, 1): a rank with no rows still joins the backward all-reduce
    ce = F.cross_entropy(logits_st, labels, reduction="sum") + F.cross_entropy(
        logits_ts, labels, reduction="sum"
    )
    return 0.5 * ce / max(n, 1)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "mse": mse,
    "cosine": cosine,
    "infonce": infonce,
}


def get_loss(name: str) -> Callable[..., Tensor]:
    """The loss registered as ``name``; ValueError listing valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown loss {name!r}; choose one of: {', '.join(sorted(LOSSES))}"
        ) from None
