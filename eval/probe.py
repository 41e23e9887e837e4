"""Linear probe on frozen features, trained data-parallel (DDP via accelerate when given).

A multinomial logistic regression with an L2 penalty, fitted by full-batch Adam for a fixed
number of steps (fixed, so every rank runs the same number of collective steps). The penalty
is chosen on a held-out tenth of the training features from a small grid, then the probe is
refitted on all of them and scored on the test features.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["linear_probe", "standardize"]


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale every set by the training set's per-dimension mean and std."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float, *, steps: int, lr: float, seed: int,
         accelerator: Any = None) -> nn.Linear:
    torch.manual_seed(seed)
    model = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    rank, world = 0, 1
    wrapped: nn.Module = model
    if accelerator is not None and accelerator.num_processes > 1:
        rank, world = accelerator.process_index, accelerator.num_processes
        wrapped, opt = accelerator.prepare(model, opt)
    dev = next(model.parameters()).device
    xs, ys = x[rank::world].to(dev), y[rank::world].to(dev)  # every rank holds all rows; each fits its share
    for _ in range(steps):
        loss = F.cross_entropy(wrapped(xs), ys) + wd * model.weight.pow(2).sum()
        opt.zero_grad(set_to_none=True)
        if accelerator is not None and world > 1:
            accelerator.backward(loss)
        else:
            loss.backward()
        opt.step()
        sched.step()
    return model.cpu().eval()


@torch.no_grad()
def _accuracy(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean().item()) if len(y) else float("nan")


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    accelerator: Any = None,
    steps: int = 300,
    lr: float = 0.01,
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2),
    val_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, float]:
    """Top-1 of a linear classifier on frozen features; returns test/train top-1, the chosen L2 and
    the test ``predictions`` (a tensor; drop it before writing JSON).

    Args:
        train_x, train_y, test_x, test_y: features ``[N, D]`` and integer labels (the same on every rank).
        accelerator: when it runs several processes, the fit is data-parallel over them.
        steps, lr: full-batch Adam steps (cosine-annealed) per fit.
        weight_decays: L2 penalties tried on a held-out ``val_fraction`` of the training set.
    """
    if steps < 1 or not lr > 0:
        raise ValueError(f"linear probe steps={steps} and lr={lr} must be >= 1 and > 0 (probe keys steps, lr); "
                         f"an unfitted probe reports chance accuracy")
    if (train_y < 0).any() or (test_y < 0).any():
        raise ValueError("probe sets must be labelled (found samples without a cls); build them with launch/make_shards.py from labelled data")
    num_classes = int(max(train_y.max(), test_y.max()).item()) + 1
    xtr, xte = standardize(train_x.float(), test_x.float())
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train_y), generator=g)
    n_val = max(1, int(len(perm) * val_fraction))
    val, fit = perm[:n_val], perm[n_val:]
    best_wd, best_acc = weight_decays[0], -1.0
    if len(weight_decays) > 1:
        for wd in weight_decays:
            m = _fit(xtr[fit], train_y[fit], num_classes, wd, steps=steps, lr=lr, seed=seed, accelerator=accelerator)
            acc = _accuracy(m, xtr[val], train_y[val])
            if acc > best_acc + 1e-9:
                best_wd, best_acc = wd, acc
    model = _fit(xtr, train_y, num_classes, best_wd, steps=steps, lr=lr, seed=seed, accelerator=accelerator)
    with torch.no_grad():
        predictions = model(xte).argmax(1)
    return {"top1": _accuracy(model, xte, test_y), "train_top1": _accuracy(model, xtr, train_y),
            "predictions": predictions,
            "weight_decay": float(best_wd), "val_top1": float(best_acc)}
