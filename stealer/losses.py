"""Stealing losses: how far the student's representation is from the victim's.

Every loss has the signature::

    fn(student, target, *, temperature=0.1, gather=False, **kwargs) -> scalar Tensor

``student`` [N, D] carries the gradient; ``target`` [N, D] is the victim's response
and is detached here. Unused keyword arguments are accepted and ignored, so a
caller can pass the same config to any loss.

Registered (``LOSSES``): per row or element ``mse``, ``mse_mean``, ``cosine``,
``symmetrized``, ``soft_ce``, ``bce``, ``wasserstein``; with in-batch negatives or
batch statistics (``gather=True`` reaches every rank) ``infonce``, ``infonce_sym``,
``supcon``, ``softnn``, ``barlow``. The ICML'22 stealing code (Dziedzic et al.,
cleverhans-lab/ssl-attacks-defenses @1d3874ff) accepts infonce, mse (its reduction is
``mse_mean`` here), softce, bce, wasserstein, softnn, supcon, symmetrized and barlow;
each docstring gives the exact reduction, the reference function, and where it departs
from theirs (docs/fidelity.md has the table and the tests that pin each one).

Per-loss defaults (:data:`LOSS_DEFAULTS`, :func:`default_temperature`): the temperature
a loss gets when ``train.temperature`` is left unset — ``softnn`` 100 (the ICML'22
``--temperaturesn``), ``soft_ce`` 1 (their ``soft_cross_entropy`` has no temperature),
every other loss 0.2 (this project's default; the ICML'22 ``--temperature`` is 0.07).

Example::

    >>> loss = get_loss("infonce")(student, victim_reps, temperature=0.1, gather=True)
"""

from __future__ import annotations

import math
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

__all__ = [
    "mse",
    "mse_mean",
    "cosine",
    "symmetrized",
    "infonce",
    "infonce_sym",
    "supcon",
    "softnn",
    "barlow",
    "soft_ce",
    "bce",
    "wasserstein",
    "LOSSES",
    "LOSS_DEFAULTS",
    "default_temperature",
    "get_loss",
]


def _check(student: Tensor, target: Tensor) -> None:
    if student.ndim != 2 or student.shape != target.shape:
        raise ValueError(
            f"student and target must both be [N, D]; got {tuple(student.shape)} "
            f"and {tuple(target.shape)}"
        )


def _gather_pair(s: Tensor, t: Tensor, gather: bool) -> tuple[int, Tensor, Tensor]:
    """Rows of every rank for in-batch negatives: ``(offset, s_all, t_all)``.

    Under torch.distributed with ``gather=True``: student rows are gathered with
    gradient, target rows without, and ``offset`` is where this rank's rows start
    in the ``M = sum_r n_r`` gathered rows. Otherwise ``(0, s, t)``.
    """
    if gather and is_distributed():
        sizes = gather_sizes(s.shape[0], s.device)
        offset = sum(sizes[: torch.distributed.get_rank()])
        return offset, gather_with_grad(s, sizes), gather_nograd(t, sizes)
    return 0, s, t


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
        against Model Extraction", ICML 2022. Not a reference reduction: their ``mse``
        is :func:`mse_mean` (this value / D).
    """
    _check(student, target)
    return ((student - target.detach()) ** 2).sum(dim=1).mean()


def mse_mean(
    student: Tensor,
    target: Tensor,
    *,
    temperature: float = 0.1,
    gather: bool = False,
    **kwargs: Any,
) -> Tensor:
    """Mean squared error over all N·D elements: ``torch.nn.MSELoss()``.

    ``((student - target) ** 2).mean()``, i.e. :func:`mse` divided by D. This is
    the reduction of the ICML'22 code's ``mse`` loss (``nn.MSELoss()`` with the
    default ``reduction='mean'``).

    Args:
        student: student representations [N, D].
        target: victim representations [N, D] (no gradient).
        temperature: ignored.
        gather: ignored (the loss is per element).

    Returns:
        Scalar tensor.

    Reference:
        Dziedzic et al., "On the Difficulty of Defending Self-Supervised Learning
        against Model Extraction", ICML 2022, cleverhans-lab/ssl-attacks-defenses @1d3874ff
        ``simclr.py:SimCLR.steal`` (loss ``mse``: ``nn.MSELoss()``). Pinned by
        tests/test_fidelity.py.
    """
    _check(student, target)
    return F.mse_loss(student, target.detach(), reduction="mean")


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
    """The ICML'22 stealing InfoNCE: NT-Xent over the 2N rows ``[student; victim]``.

    With ``z = [s; t]`` the 2N L2-normalised rows, each anchor a's positive is its
    other-side partner (student i <-> victim i) and its negatives are the 2N - 2 other
    rows, on both sides (same-side rows included)::

        L_a = -log( exp(z_a·z_pair(a) / T) / sum_{k != a} exp(z_a·z_k / T) )

    and the loss is ``mean_a L_a`` over the 2N anchors (``CrossEntropyLoss`` over the
    rows ``[positive, negatives]`` with label 0). Equal to :func:`supcon` without labels
    at scale 1 (``base_temperature=None``). The symmetric B x B cross-side form this
    project used before is :func:`infonce_sym` (13-14 % apart on the same inputs).

    With ``gather=True`` under torch.distributed the candidates come from every rank
    (student rows with gradient, victim rows without) and each rank returns the mean
    over its own 2N anchors; ranks may hold different batch sizes.

    Args:
        student: student representations [N, D].
        target: victim representations [N, D] (no gradient).
        temperature: softmax temperature T.
        gather: take negatives from every rank.

    Returns:
        Scalar tensor.

    Reference:
        Dziedzic et al., ICML 2022, cleverhans-lab/ssl-attacks-defenses @1d3874ff,
        ``simclr.py:SimCLR.info_nce_loss`` applied to ``torch.cat([features,
        query_features])`` in ``SimCLR.steal`` (loss ``infonce``; the same function is
        module-level in ``stealsimsiam.py`` and in stapaw/b4b-active-encoder-defense
        ``end2end-stealing/steal_model.py:info_nce_loss``); Chen et al., "SimCLR",
        ICML 2020 (NT-Xent). Pinned by tests/test_fidelity.py.
    """
    return _ntxent_pair(student, target, temperature, gather, labels=None, scale=1.0)


def infonce_sym(
    student: Tensor,
    target: Tensor,
    *,
    temperature: float = 0.1,
    gather: bool = False,
    **kwargs: Any,
) -> Tensor:
    """Symmetric (CLIP-style) InfoNCE between normalised student and victim rows.

    With ``s``, ``t`` the L2-normalised rows, ``logits[i, j] = s_i·t_j / T`` and
    the positive of row i is column i;
    ``loss = 0.5 · (CE(s → t) + CE(t → s))``, averaged over local rows. The
    negatives are only the other side's rows (B x B), unlike the ICML'22 code's
    :func:`infonce`. This was ``infonce`` before issue 14; the demo figures of the
    README were measured with it (``launch/configs/demo.yaml`` names it).

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
        2018; symmetric form as in Radford et al., "CLIP", ICML 2021 (the pseudo-code
        of its Figure 3). Not the form of any stealing reference code.
    """
    _check(student, target)
    s = F.normalize(student, dim=1)  # N x D
    t = F.normalize(target.detach(), dim=1)  # N x D
    n = s.shape[0]
    offset, s_all, t_all = _gather_pair(s, t, gather)  # M x D each, M = sum of sizes

    labels = torch.arange(offset, offset + n, device=s.device)
    logits_st = s @ t_all.T / temperature  # N x M: local students vs all targets
    logits_ts = t @ s_all.T / temperature  # N x M: local targets vs all students
    # sum / max(n, 1): a rank with no rows still joins the backward all-reduce
    ce = F.cross_entropy(logits_st, labels, reduction="sum") + F.cross_entropy(
        logits_ts, labels, reduction="sum"
    )
    return 0.5 * ce / max(n, 1)


def symmetrized(
    student: Tensor,
    target: Tensor,
    *,
    temperature: float = 0.1,
    gather: bool = False,
    two_views: bool = False,
    **kwargs: Any,
) -> Tensor:
    """SimSiam's symmetrised negative cosine, ``-(cos(s, t) + cos(t, s)) / 2``.

    With one view (default) the two terms are equal, so this is
    ``-mean_i cos(s_i, t_i)``, in [-1, 1]. Compared with :func:`cosine`
    (``2 - 2·cos``): same minimiser, ``cosine = 2 + 2·symmetrized``, so the
    gradient here is half of ``cosine``'s.

    With ``two_views=True`` the N rows are two augmented views stacked
    (``[x¹; x²]``, N even) and the pairs cross the views as in SimSiam:
    ``-(mean_i cos(s¹_i, t²_i) + mean_i cos(s²_i, t¹_i)) / 2``. The ICML'22 code
    uses this form with ``s`` the attacker's predictor output and ``t`` the
    victim's representation passed through the attacker's projector (which there
    receives gradient); here ``t`` is the victim's response, detached.

    Args:
        student: student representations [N, D] (SimSiam's ``p``).
        target: victim representations [N, D] (SimSiam's ``z``; stop-gradient).
        temperature: ignored.
        gather: ignored (the loss is per row).
        two_views: rows are ``[view 1; view 2]``; pair them across views.

    Returns:
        Scalar tensor.

    Reference:
        Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021
        (eq. 2); Dziedzic et al., ICML 2022, cleverhans-lab/ssl-attacks-defenses @1d3874ff
        ``simclr.py:SimCLR.steal`` (loss ``symmetrized``, ``nn.CosineSimilarity``).
    """
    _check(student, target)
    t = target.detach()
    if not two_views:
        # cos(s, t) == cos(t, s): the symmetrisation is a single term
        return -F.cosine_similarity(student, t, dim=1).mean()
    if student.shape[0] % 2:
        raise ValueError(f"two_views=True needs an even batch; got {student.shape[0]} rows")
    s1, s2 = student.chunk(2)  # N/2 x D each
    t1, t2 = t.chunk(2)
    return -0.5 * (
        F.cosine_similarity(s1, t2, dim=1).mean() + F.cosine_similarity(s2, t1, dim=1).mean()
    )


def _two_view_masks(
    n: int, m: int, offset: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Masks for anchors ``[s; t]`` (2N rows) vs candidates ``[s_all; t_all]`` (2M columns).

    Local student row i sits in column ``offset + i`` and its target in column
    ``m + offset + i``. Returns ``(self_mask, pair_mask)``, both bool 2N x 2M:
    each anchor's own column, and the column of its other-view partner.
    """
    idx = torch.arange(n, device=device) + offset
    rows = torch.arange(2 * n, device=device)
    self_mask = torch.zeros(2 * n, 2 * m, dtype=torch.bool, device=device)
    pair_mask = torch.zeros_like(self_mask)
    self_mask[rows, torch.cat([idx, idx + m])] = True
    pair_mask[rows, torch.cat([idx + m, idx])] = True
    return self_mask, pair_mask


def _ntxent_pair(
    student: Tensor, target: Tensor, temperature: float, gather: bool,
    labels: Tensor | None, scale: float,
) -> Tensor:
    """``scale ·`` SupCon / NT-Xent over the anchors ``[s; t]`` (see :func:`supcon`)."""
    _check(student, target)
    s = F.normalize(student, dim=1)  # N x D
    t = F.normalize(target.detach(), dim=1)  # N x D
    n = s.shape[0]
    offset, s_all, t_all = _gather_pair(s, t, gather)
    m = s_all.shape[0]

    logits = torch.cat([s, t]) @ torch.cat([s_all, t_all]).T / temperature  # 2N x 2M
    self_mask, pos = _two_view_masks(n, m, offset, s.device)
    if labels is not None:
        lab = labels.reshape(-1).to(s.device)
        if lab.shape[0] != n:
            raise ValueError(f"labels must have {n} entries; got {lab.shape[0]}")
        lab_all = gather_nograd(lab) if gather else lab
        same = torch.cat([lab, lab])[:, None] == torch.cat([lab_all, lab_all])[None]
        pos = same & ~self_mask

    others = logits.masked_fill(self_mask, float("-inf"))
    log_norm = torch.logsumexp(others, dim=1, keepdim=True)  # 2N x 1
    log_prob = logits - log_norm  # 2N x 2M
    # every anchor has at least its other-view partner as a positive
    mean_pos = torch.where(pos, log_prob, 0.0).sum(dim=1) / pos.sum(dim=1)  # 2N
    return -scale * mean_pos.sum() / max(2 * n, 1)


def supcon(
    student: Tensor,
    target: Tensor,
    *,
    temperature: float = 0.1,
    gather: bool = False,
    labels: Tensor | None = None,
    base_temperature: float | None = 0.07,
    **kwargs: Any,
) -> Tensor:
    """Supervised-contrastive loss with student and victim rows as the two views.

    Rows are L2-normalised; the 2N anchors are ``[s; t]`` and the candidates are
    all 2N rows but the anchor itself (same-view rows are negatives too, unlike
    :func:`infonce_sym`, whose negatives are only the other view). For anchor a with
    positive set P(a)::

        L_a = -(T / T_base) · mean_{p in P(a)} [ z_a·z_p / T
                                                 - log sum_{k != a} exp(z_a·z_k / T) ]

    and the loss is ``mean_a L_a`` over the 2N anchors. Without ``labels``,
    P(a) is the same index in the other view (the SimCLR / NT-Xent case of
    SupCon: :func:`infonce` times ``T / T_base``); with ``labels`` [N], every other
    row with the same label, in either view (how the ICML'22 code calls it, with the
    query set's class labels). ``base_temperature`` T_base is 0.07 as in the reference
    ``SupConLoss`` (which the ICML'22 code builds with ``temperature=args.temperature``
    and the default ``base_temperature=0.07``); ``None`` means T_base = T (scale 1).

    With ``gather=True`` under torch.distributed the candidates (and labels) come
    from all ranks as in :func:`infonce`; each rank returns the mean over its
    own 2N anchors.

    Args:
        student: student representations [N, D].
        target: victim representations [N, D] (no gradient).
        temperature: softmax temperature T.
        gather: take negatives from every rank.
        labels: optional class labels [N] shared by both views.
        base_temperature: T_base (default 0.07, the reference's); None means T.

    Returns:
        Scalar tensor.

    Reference:
        Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020 (eq. 2,
        ``L^sup_out``); Dziedzic et al., ICML 2022, cleverhans-lab/ssl-attacks-defenses
        @1d3874ff ``loss.py:SupConLoss.forward`` (contrast_mode ``all``), called from
        ``simclr.py:SimCLR.steal`` (loss ``supcon``). Pinned by tests/test_fidelity.py.
    """
    scale = 1.0 if base_temperature is None else temperature / base_temperature
    return _ntxent_pair(student, target, temperature, gather, labels, scale)


def softnn(
    student: Tensor,
    target: Tensor,
    *,
    temperature: float = 100.0,
    gather: bool = False,
    eps: float = 1e-9,
    **kwargs: Any,
) -> Tensor:
    """Soft nearest-neighbour loss with student and victim rows as the two views.

    As the ICML'22 code steals with it: the 2N rows ``x = [s; t]`` (not
    normalised) get labels ``[0..N-1, 0..N-1]``, so each row's only positive is
    its other-view partner. With squared Euclidean distances
    ``d_ab = ||x_a - x_b||²`` (computed in float64, as there)::

        L_a = -log( eps + exp(-d_{a,pair(a)} / T) / sum_{b != a} exp(-d_ab / T) )

    and the loss is ``mean_a L_a`` over the 2N rows. Computed in log space
    (``logaddexp(log ratio, log eps)``), so it equals their value but does not
    under/overflow. ``eps = 1e-9`` as there; it caps ``L_a`` at -log(1e-9) ≈ 20.7
    and the gradient vanishes once the ratio falls well below eps, so set
    ``eps=0`` for the plain log-ratio. Distances are unnormalised: T must suit the
    representation scale. The default T = 100 is the ICML'22 ``--temperaturesn``
    default (``steal.py``; their ImageNet scripts pass 1000), and ``train.loss=softnn``
    gets it when ``train.temperature`` is unset (:data:`LOSS_DEFAULTS`).

    With ``gather=True`` under torch.distributed the candidates come from all
    ranks as in :func:`infonce`; each rank returns the mean over its own 2N rows.

    Args:
        student: student representations [N, D].
        target: victim representations [N, D] (no gradient).
        temperature: distance temperature T (default 100, the reference's).
        gather: take negatives from every rank.
        eps: added to the probability ratio inside the log.

    Returns:
        Scalar tensor (float32, or float64 for float64 inputs).

    Reference:
        Frosst, Papernot & Hinton, "Analyzing and Improving Representations with
        the Soft Nearest Neighbor Loss", ICML 2019 (eq. 1); Dziedzic et al.,
        ICML 2022, cleverhans-lab/ssl-attacks-defenses @1d3874ff
        ``loss.py:soft_nn_loss`` with ``pairwise_euclid_distance`` (its stability
        epsilons cancel in the distance). Pinned by tests/test_fidelity.py.
    """
    _check(student, target)
    out_dtype = torch.promote_types(student.dtype, torch.float32)
    t = target.detach()
    n = student.shape[0]
    offset, s_all, t_all = _gather_pair(student, t, gather)
    m = s_all.shape[0]

    anchors = torch.cat([student, t]).double()  # 2N x D
    cands = torch.cat([s_all, t_all]).double()  # 2M x D
    sq_dist = (
        (anchors**2).sum(dim=1, keepdim=True) + (cands**2).sum(dim=1) - 2 * anchors @ cands.T
    )  # 2N x 2M
    logits = -sq_dist / temperature
    self_mask, pair_mask = _two_view_masks(n, m, offset, student.device)
    log_ratio = logits[pair_mask] - torch.logsumexp(
        logits.masked_fill(self_mask, float("-inf")), dim=1
    )  # 2N (one pair per row, in row order)
    if eps > 0:
        log_ratio = torch.logaddexp(log_ratio, log_ratio.new_tensor(math.log(eps)))
    return (-log_ratio.sum() / max(2 * n, 1)).to(out_dtype)


def _standardize(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-dimension batch normalisation without affine terms (BatchNorm1d, training mode)."""
    return (x - x.mean(dim=0)) / torch.sqrt(x.var(dim=0, unbiased=False) + eps)


def barlow(
    student: Tensor,
    target: Tensor,
    *,
    temperature: float = 0.1,
    gather: bool = False,
    lambd: float = 5e-3,
    **kwargs: Any,
) -> Tensor:
    """Barlow Twins redundancy reduction between student and victim rows.

    Each of ``s`` and ``t`` is standardised per dimension over the batch
    (``(x - mean) / sqrt(var + 1e-5)``, biased variance: ``BatchNorm1d`` without
    affine terms); ``C = bn(s)ᵀ bn(t) / M`` is the D x D cross-correlation and::

        loss = sum_i (1 - C_ii)² + lambd · sum_{i != j} C_ij²

    (a sum, not a mean, over the matrix). ``lambd = 5e-3`` as in the paper; the
    official code and the ICML'22 code use 0.0051. The ICML'22 code correlates two
    augmented views, each the concatenation ``[student; victim]``; here the two
    sides are the student and the victim on the same inputs.

    With ``gather=True`` under torch.distributed the batch statistics and C use
    the rows of every rank (student gathered with gradient, victim without), so
    M is the global batch and every rank returns the same loss; each rank then
    holds W times this loss's gradient for its rows, and DDP's averaging yields
    exactly its gradient.

    Args:
        student: student representations [N, D].
        target: victim representations [N, D] (no gradient).
        temperature: ignored.
        gather: compute statistics and C over every rank's rows.
        lambd: weight of the off-diagonal term.

    Returns:
        Scalar tensor.

    Reference:
        Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy
        Reduction", ICML 2021 (eq. 1); Dziedzic et al., ICML 2022,
        cleverhans-lab/ssl-attacks-defenses @1d3874ff ``loss.py:barlow_loss`` (``lambd=0.0051``
        reproduces its constant).
    """
    _check(student, target)
    _, s_all, t_all = _gather_pair(student, target.detach(), gather)
    c = _standardize(s_all).T @ _standardize(t_all) / max(s_all.shape[0], 1)  # D x D
    diag = torch.diagonal(c)
    off = ~torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
    return (1 - diag).pow(2).sum() + lambd * c[off].pow(2).sum()


def soft_ce(
    student: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    gather: bool = False,
    **kwargs: Any,
) -> Tensor:
    """Soft cross-entropy from the victim's softmax to the student's.

    ``mean_i sum_j -softmax(t_i / T)_j · log_softmax(s_i / T)_j``: summed over
    the D features, averaged over the N rows, no T² factor. The ICML'22 code's
    ``soft_cross_entropy(pred, soft_targets)`` has this reduction and no temperature:
    T = 1, the default here and what ``train.loss=soft_ce`` gets when
    ``train.temperature`` is unset (:data:`LOSS_DEFAULTS`), reproduces it. Another T
    divides both sides, as Hinton et al.'s distillation does (without their T²
    gradient factor). Departure: their stealing loop passes ``softmax(student)`` as
    the soft target (not the victim's response, so the victim never enters the loss);
    here the target is the victim's, as intended.

    Args:
        student: student representations [N, D] (logits).
        target: victim representations [N, D] (no gradient).
        temperature: softmax temperature T, applied to both sides (default 1: the
            reference has none).
        gather: ignored (the loss is per row).

    Returns:
        Scalar tensor.

    Reference:
        Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
        2015; Dziedzic et al., ICML 2022, cleverhans-lab/ssl-attacks-defenses
        @1d3874ff ``loss.py:soft_cross_entropy`` (loss ``softce`` in
        ``simclr.py:SimCLR.steal``). Pinned by tests/test_fidelity.py.
    """
    _check(student, target)
    p = F.softmax(target.detach() / temperature, dim=1)  # N x D
    return -(p * F.log_softmax(student / temperature, dim=1)).sum(dim=1).mean()


def bce(
    student: Tensor,
    target: Tensor,
    *,
    temperature: float = 0.1,
    gather: bool = False,
    binarize: bool = True,
    **kwargs: Any,
) -> Tensor:
    """Binary cross-entropy of the student's logits against the victim's bits.

    As in the ICML'22 code: ``y = round(sigmoid(t))`` (1 where ``t > 0``, 0
    where ``t <= 0``; ``round(0.5) = 0``) and
    ``BCEWithLogits(s, y) = mean_{i,j} -[y log σ(s) + (1 - y) log(1 - σ(s))]``,
    averaged over all N·D elements. With ``binarize=False`` the soft target
    ``y = sigmoid(t)`` is used instead.

    Args:
        student: student representations [N, D] (logits).
        target: victim representations [N, D] (no gradient).
        temperature: ignored.
        gather: ignored (the loss is per element).
        binarize: round the victim's sigmoid to {0, 1}.

    Returns:
        Scalar tensor.

    Reference:
        Dziedzic et al., ICML 2022, cleverhans-lab/ssl-attacks-defenses @1d3874ff
        (``simclr.py:SimCLR.steal``, loss ``bce``:
        ``nn.BCEWithLogitsLoss()(features, torch.round(torch.sigmoid(victim)))``).
    """
    _check(student, target)
    y = torch.sigmoid(target.detach())
    if binarize:
        y = torch.round(y)
    return F.binary_cross_entropy_with_logits(student, y, reduction="mean")


def wasserstein(
    student: Tensor,
    target: Tensor,
    *,
    temperature: float = 0.1,
    gather: bool = False,
    **kwargs: Any,
) -> Tensor:
    """The ICML'22 code's "Wasserstein" loss: 1-D W1 between rows read as histograms.

    Each row is divided by its sum (``+ 1e-14``) and treated as a distribution
    over the D feature *indices* (bins in their fixed order, no sorting, no
    critic); the loss is the L1 distance between the two cumulative sums::

        mean_i sum_k | cumsum(s_i / sum s_i)_k - cumsum(t_i / sum t_i)_k |

    i.e. W1 with unit bin spacing, averaged over rows. This is a distance only
    for non-negative rows (e.g. post-ReLU features); with negative entries the
    "distribution" is signed and a row sum near 0 makes it blow up.

    Args:
        student: student representations [N, D].
        target: victim representations [N, D] (no gradient).
        temperature: ignored.
        gather: ignored (the loss is per row).

    Returns:
        Scalar tensor.

    Reference:
        Dziedzic et al., ICML 2022, cleverhans-lab/ssl-attacks-defenses @1d3874ff
        (``loss.py:torch_wasserstein_loss``, i.e.
        ``torch_cdf_loss(student, victim, p=1)``).
    """
    _check(student, target)
    t = target.detach()
    cdf_s = torch.cumsum(student / (student.sum(dim=1, keepdim=True) + 1e-14), dim=1)
    cdf_t = torch.cumsum(t / (t.sum(dim=1, keepdim=True) + 1e-14), dim=1)
    return (cdf_s - cdf_t).abs().sum(dim=1).mean()


LOSSES: dict[str, Callable[..., Tensor]] = {
    "mse": mse,
    "mse_mean": mse_mean,
    "cosine": cosine,
    "symmetrized": symmetrized,
    "infonce": infonce,
    "infonce_sym": infonce_sym,
    "supcon": supcon,
    "softnn": softnn,
    "barlow": barlow,
    "soft_ce": soft_ce,
    "bce": bce,
    "wasserstein": wasserstein,
}


#: Per-loss keyword defaults where the reference code has its own (see the module docstring).
LOSS_DEFAULTS: dict[str, dict[str, Any]] = {
    "softnn": {"temperature": 100.0},  # ICML'22 steal.py --temperaturesn 100
    "soft_ce": {"temperature": 1.0},  # ICML'22 loss.py:soft_cross_entropy has no temperature
}
_DEFAULT_TEMPERATURE = 0.2  # this project's train.temperature for every other loss


def default_temperature(name: str) -> float:
    """The temperature loss ``name`` gets when ``train.temperature`` is unset."""
    get_loss(name)
    return float(LOSS_DEFAULTS.get(name, {}).get("temperature", _DEFAULT_TEMPERATURE))


def get_loss(name: str) -> Callable[..., Tensor]:
    """The loss registered as ``name``; ValueError listing valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown loss {name!r}; choose one of: {', '.join(sorted(LOSSES))}"
        ) from None
