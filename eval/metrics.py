"""Fidelity of a stolen encoder to its victim on the same images.

- :func:`fidelity`: mean cosine similarity and mean L2 distance of row-aligned representations.
- :func:`rank_correlation`: Spearman correlation between the pairwise cosine similarities of the
  stolen representations and those of the victim (does the stolen encoder order image pairs by
  similarity the way the victim does? invariant to any rotation or per-row scaling).
- :func:`prediction_agreement`: the fraction of test images on which downstream classifiers
  trained on stolen and on victim features predict the same class.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["fidelity", "rank_correlation", "prediction_agreement", "spearman", "average_ranks"]


@torch.no_grad()
def fidelity(stolen: torch.Tensor, victim: torch.Tensor) -> dict[str, float]:
    """Mean cosine similarity and mean L2 distance between row-aligned representations.

    ``l2`` is on the raw vectors (the seeds' assignment scores it); ``l2_normalized`` on unit
    vectors, comparable across victims of different output scale.
    """
    if stolen.shape != victim.shape:
        raise ValueError(f"stolen {tuple(stolen.shape)} and victim {tuple(victim.shape)} representations differ in shape")
    s, v = stolen.float(), victim.float()
    return {
        "cosine": float(F.cosine_similarity(s, v, dim=1).mean()),
        "l2": float((s - v).norm(dim=1).mean()),
        "l2_normalized": float((F.normalize(s, dim=1) - F.normalize(v, dim=1)).norm(dim=1).mean()),
    }


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties given the mean of their ranks (``scipy.stats.rankdata``)."""
    x = x.reshape(-1)
    n = x.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.float64)
    vals, order = torch.sort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(vals, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0)  # 1-based rank of each tie group's last member
    mean_rank = (ends - counts + 1 + ends).double() / 2
    ranks = torch.empty(n, dtype=torch.float64, device=x.device)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equal-length 1-D samples (Pearson of average ranks).

    NaN when either sample is constant or has fewer than two values.
    """
    a, b = a.reshape(-1), b.reshape(-1)
    if a.numel() != b.numel():
        raise ValueError(f"samples differ in length: {a.numel()} vs {b.numel()}")
    if a.numel() < 2:
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


@torch.no_grad()
def rank_correlation(stolen: torch.Tensor, victim: torch.Tensor, *, max_pairs: int = 200_000, seed: int = 0,
                     chunk: int = 8192) -> float:
    """Spearman correlation of the pairwise cosine similarities of ``stolen`` and of ``victim``.

    Rows are the same images under both encoders (the output dimensions may differ). With
    ``N`` rows the pairs are the ``N(N-1)/2`` of the upper triangle ``i < j``; when there are
    more than ``max_pairs`` of them, ``max_pairs`` pairs ``i != j`` are drawn uniformly (with
    replacement) by a generator seeded with ``seed``, so the value is deterministic. Computed in
    float64. 1.0 when the stolen encoder ranks pairs exactly as the victim does (e.g. any
    rotation or positive per-row scaling of the victim's representations).
    """
    if stolen.ndim != 2 or victim.ndim != 2 or stolen.shape[0] != victim.shape[0]:
        raise ValueError(f"stolen {tuple(stolen.shape)} and victim {tuple(victim.shape)} must be [N, D] over the same N images")
    n = stolen.shape[0]
    s = F.normalize(stolen.double(), dim=1)
    v = F.normalize(victim.double(), dim=1)
    n_pairs = n * (n - 1) // 2
    if n_pairs <= max_pairs:
        iu = torch.triu_indices(n, n, offset=1, device=s.device)
        return spearman((s @ s.T)[iu[0], iu[1]], (v @ v.T)[iu[0], iu[1]])
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n, (max_pairs,), generator=g)
    j = torch.randint(0, n - 1, (max_pairs,), generator=g)
    j = j + (j >= i).long()  # uniform over j != i
    i, j = i.to(s.device), j.to(s.device)
    cs, cv = [], []
    for start in range(0, max_pairs, chunk):
        a, b = i[start:start + chunk], j[start:start + chunk]
        cs.append((s[a] * s[b]).sum(1))
        cv.append((v[a] * v[b]).sum(1))
    return spearman(torch.cat(cs), torch.cat(cv))


def _as_predictions(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 2:
        return x.argmax(1)
    if x.ndim == 1:
        if x.is_floating_point() and not torch.equal(x, x.round()):
            raise ValueError(f"{name}: a 1-D tensor must hold class indices; pass logits as [N, C]")
        return x.long()
    raise ValueError(f"{name} must be logits [N, C] or class indices [N]; got shape {tuple(x.shape)}")


@torch.no_grad()
def prediction_agreement(stolen: torch.Tensor, victim: torch.Tensor) -> float:
    """Fraction of test images on which the stolen-feature and victim-feature classifiers agree.

    Each argument is either logits/scores ``[N, C]`` (its argmax is the prediction) or predicted
    class indices ``[N]``; the two may be given in different forms. Row ``i`` of both must be the
    same test image. NaN for an empty test set. Agreement is label-free: it compares the two
    downstream classifiers with each other, not with the ground truth.
    """
    ps, pv = _as_predictions(stolen, "stolen"), _as_predictions(victim, "victim")
    if ps.shape != pv.shape:
        raise ValueError(f"stolen and victim predictions cover different test sets: {tuple(ps.shape)} vs {tuple(pv.shape)}")
    if ps.numel() == 0:
        return float("nan")
    return float((ps.cpu() == pv.cpu()).double().mean())
