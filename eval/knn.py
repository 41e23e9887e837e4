"""Weighted k-nearest-neighbour classification of frozen features (the SSL papers' kNN monitor).

The classifier of Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination" (CVPR'18, InstDisc), as DINO's ``eval_knn.py`` implements it: features are
L2-normalised, each test sample retrieves the ``k`` training samples of highest cosine
similarity ``s``, and each neighbour votes for its label with weight ``exp(s / T)``
(``T = 0.07``, ``k = 20`` by default). The class with the largest summed vote wins; ties go to
the lowest class index. ``weighted=False`` gives a plain majority vote (weight 1 each).

Memory is bounded: test rows are processed ``test_chunk`` at a time, and the training set is
scanned ``train_chunk`` rows at a time, merging the running top-k, so at most
``test_chunk × (train_chunk + k)`` similarities exist at once.

Distributed: every rank holds all training features and all test features (what
:func:`eval.features.extract_features` returns); rank ``r`` of ``W`` classifies test rows
``r, r + W, r + 2W, ...`` and the correct counts are summed with ``accelerator.reduce``, so every
rank returns the same numbers.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["knn_classify", "knn_predict"]


@torch.no_grad()
def vote_counts(votes: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions (first max: lowest class) and ``[top-1 hits, top-5 hits, rows]`` of ``votes`` ``[N, C]``;
    top-5 hits stay 0 with fewer than 5 classes."""
    pred = votes.argmax(1) if len(y) else torch.empty(0, dtype=torch.long, device=votes.device)
    counts = torch.zeros(3, dtype=torch.long, device=votes.device)
    counts[0] = (pred == y).sum()
    if num_classes >= 5 and len(y):
        counts[1] = (votes.topk(5, dim=1).indices == y[:, None]).any(1).sum()
    counts[2] = len(y)
    return pred, counts


def _topk_neighbours(query: torch.Tensor, bank: torch.Tensor, k: int, train_chunk: int | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest ``query @ bank.T`` per row: (similarities, bank indices), best first."""
    n = bank.shape[0]
    step = n if not train_chunk or train_chunk >= n else int(train_chunk)
    best_s: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start in range(0, n, step):
        sim = query @ bank[start:start + step].T
        s, i = sim.topk(min(k, sim.shape[1]), dim=1, largest=True, sorted=True)
        i = i + start
        if best_s is not None:
            both = torch.cat([best_s, s], 1)
            s, j = both.topk(min(k, both.shape[1]), dim=1, largest=True, sorted=True)
            i = torch.cat([best_i, i], 1).gather(1, j)
        best_s, best_i = s, i
    assert best_s is not None and best_i is not None
    return best_s, best_i


@torch.no_grad()
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, *, num_classes: int,
                k: int = 20, temperature: float = 0.07, weighted: bool = True,
                test_chunk: int = 256, train_chunk: int | None = 65536) -> torch.Tensor:
    """Per-class vote totals ``[len(test_x), num_classes]`` (one process; no normalisation of the votes).

    ``train_x`` and ``test_x`` must already be L2-normalised and on the same device.
    """
    k = min(int(k), train_x.shape[0])
    votes = torch.zeros(test_x.shape[0], num_classes, dtype=torch.float32, device=test_x.device)
    for start in range(0, test_x.shape[0], max(1, int(test_chunk))):
        q = test_x[start:start + test_chunk]
        sim, idx = _topk_neighbours(q, train_x, k, train_chunk)
        w = (sim / temperature).exp() if weighted else torch.ones_like(sim)
        votes[start:start + q.shape[0]].scatter_add_(1, train_y[idx], w.float())
    return votes


@torch.no_grad()
def knn_classify(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    weighted: bool = True,
    accelerator: Any = None,
    test_chunk: int = 256,
    train_chunk: int | None = 65536,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Top-1 (and top-5) of the weighted kNN classifier on frozen features.

    Args:
        train_x, train_y, test_x, test_y: features ``[N, D]`` and integer labels ``>= 0``; all of
            them on every rank (the same tensors).
        k: neighbours per test sample (clamped to the training-set size).
        temperature: ``T`` of the vote weight ``exp(cos / T)``.
        weighted: ``False`` → each neighbour votes 1.
        accelerator: an ``accelerate.Accelerator``; with several processes each rank classifies its
            strided slice of the test set and the counts are summed with ``accelerator.reduce``.
            Computation happens on ``accelerator.device`` (else on ``train_x``'s device).
        test_chunk, train_chunk: chunk sizes bounding memory (``train_chunk=None``: whole bank).
        return_predictions: also return ``predictions``, the predicted class of every test row
            (``int64 [len(test_y)]`` on CPU, in test order, the same on every rank; gathered with
            ``accelerator.gather`` when distributed).

    Returns:
        ``{"top1", "top5", "k", "temperature", "n_test"}`` — ``top5`` is NaN with fewer than 5
        classes; plus ``predictions`` when asked for.
    """
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D; got train {tuple(train_x.shape)}, test {tuple(test_x.shape)}")
    if len(train_y) != len(train_x) or len(test_y) != len(test_x):
        raise ValueError("features and labels differ in length")
    if len(train_y) == 0:
        raise ValueError("kNN needs at least one training sample")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0 (got k={k}, temperature={temperature})")
    if (train_y < 0).any() or (test_y < 0).any():
        raise ValueError("kNN sets must be labelled (found samples without a cls); build them with launch/make_shards.py from labelled data")
    num_classes = int(max(train_y.max(), test_y.max() if len(test_y) else train_y.max()).item()) + 1

    rank, world = 0, 1
    if accelerator is not None:
        rank, world = int(accelerator.process_index), int(accelerator.num_processes)
    dev = accelerator.device if accelerator is not None else train_x.device
    bank = F.normalize(train_x.float().to(dev), dim=1)
    labels = train_y.long().to(dev)
    mine = torch.arange(rank, len(test_y), world)
    q = F.normalize(test_x[mine].float().to(dev), dim=1)
    y = test_y[mine].long().to(dev)

    votes = knn_predict(bank, labels, q, num_classes=num_classes, k=k, temperature=temperature, weighted=weighted,
                        test_chunk=test_chunk, train_chunk=train_chunk)
    pred, counts = vote_counts(votes, y, num_classes)
    top5_ok = num_classes >= 5
    if world > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    c1, c5, n = (int(v) for v in counts.cpu().tolist())
    out: dict[str, Any] = {
        "top1": c1 / n if n else float("nan"),
        "top5": c5 / n if (n and top5_ok) else float("nan"),
        "k": min(int(k), len(train_y)),
        "temperature": float(temperature),
        "n_test": n,
    }
    if return_predictions:
        if world > 1:
            m = (len(test_y) + world - 1) // world  # rank r holds rows r, r+W, ...: at most m of them
            padded = torch.full((m,), -1, dtype=torch.long, device=dev)
            padded[: len(pred)] = pred
            allp = accelerator.gather(padded).reshape(world, m)  # row r = rank r's slice
            pred = allp.T.reshape(-1)[: len(test_y)]  # interleave back into test order
        out["predictions"] = pred.cpu()
    return out
