"""Fidelity of a stolen encoder to its victim on the same images."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fidelity"]


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
