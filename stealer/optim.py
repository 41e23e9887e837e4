"""Optimizers and the learning-rate schedule for the student.

Parameters with ``ndim <= 1`` (biases, norm weights) get no weight decay and,
under LARS, no trust-ratio adaptation (as in moco-v3's ``moco/optimizer.py``):
timm's ``Lars`` adapts a group only when its ``weight_decay != 0`` (or
``always_adapt``), so a zero-decay group is plain SGD with momentum.

Example::

    >>> opt = build_optimizer("lars", model, lr=4.8, weight_decay=1e-6)
    >>> sched = build_schedule(opt, total_steps=10_000, warmup_steps=500)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from timm.optim import Lars
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "param_groups",
    "build_optimizer",
    "build_schedule",
    "OPTIMIZERS",
    "TORCHLARS_MISSING",
]

TORCHLARS_MISSING = (
    "optimizer=torchlars needs the torchlars package, and torchlars 0.1.2 does not "
    "build against torch 2.x; use optimizer=lars (timm's LARS) instead"
)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a no-decay group.

    Args:
        model: the module whose parameters are optimised; parameters with
            ``requires_grad=False`` are skipped.
        weight_decay: decay of the ``ndim >= 2`` parameters (weights).

    Returns:
        ``[{"params": weights, "weight_decay": weight_decay},
        {"params": biases_and_norms, "weight_decay": 0.0}]``; empty groups omitted.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _lars(
    groups: list[dict[str, Any]], lr: float, weight_decay: float, momentum: float, **kw: Any
) -> Optimizer:
    kw.setdefault("trust_coeff", 0.001)
    kw.setdefault("trust_clip", False)  # True: LARC (trust ratio clipped at 1/lr)
    kw["always_adapt"] = False  # no-decay groups (biases, norms) skip adaptation
    return Lars(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **kw)


def _sgd(
    groups: list[dict[str, Any]], lr: float, weight_decay: float, momentum: float, **kw: Any
) -> Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **kw)


def _adamw(
    groups: list[dict[str, Any]], lr: float, weight_decay: float, momentum: float, **kw: Any
) -> Optimizer:
    # momentum is SGD's; AdamW's first-moment decay is betas[0] (pass betas= in kw).
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **kw)


def _torchlars(
    groups: list[dict[str, Any]], lr: float, weight_decay: float, momentum: float, **kw: Any
) -> Optimizer:
    try:
        import torchlars  # type: ignore[import-not-found]
    except ImportError as e:
        raise ImportError(TORCHLARS_MISSING) from e
    base = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    opt: Optimizer = torchlars.LARS(
        optimizer=base, eps=kw.get("eps", 1e-8), trust_coef=kw.get("trust_coef", 0.001)
    )
    return opt


OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "lars": _lars,
    "sgd": _sgd,
    "adamw": _adamw,
    "torchlars": _torchlars,
}


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    **kw: Any,
) -> Optimizer:
    """Build a registered optimizer over :func:`param_groups` of ``model``.

    Args:
        name: one of ``OPTIMIZERS``: ``lars`` (``timm.optim.Lars``; ``trust_coeff``
            default 0.001, ``trust_clip=True`` gives LARC), ``sgd``, ``adamw``,
            ``torchlars`` (only if the torchlars package imports).
        model: module to optimise.
        lr: base learning rate.
        weight_decay: decay of ``ndim >= 2`` parameters; biases and norms get 0.
        momentum: SGD/LARS momentum (ignored by adamw).
        **kw: passed to the optimizer constructor.

    Returns:
        The optimizer.

    Raises:
        ValueError: unknown ``name``.
        ImportError: ``torchlars`` requested but not importable.
    """
    try:
        factory = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; choose one of: {', '.join(sorted(OPTIMIZERS))}"
        ) from None
    return factory(param_groups(model, weight_decay), lr, weight_decay, momentum, **kw)


def build_schedule(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int,
    final_lr_fraction: float = 0.0,
) -> LambdaLR:
    """Linear warmup then cosine decay, as a multiplier on each group's lr.

    Step it once per optimizer step. At step ``k``:

    * ``k < warmup_steps``: ``(k + 1) / warmup_steps`` (so step 0 is small, not 0);
    * afterwards: ``f + (1 - f) · 0.5 · (1 + cos(pi · p))`` with
      ``p = (k - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1]
      and ``f = final_lr_fraction``; 1 at ``k = warmup_steps``, ``f`` at
      ``k = total_steps``.

    If ``total_steps <= warmup_steps`` there is no decay phase: the factor stays at
    1 once warmup is over.

    Args:
        optimizer: optimizer whose groups' lr are the peak values.
        total_steps: number of optimizer steps in the run (warmup included).
        warmup_steps: linear warmup length.
        final_lr_fraction: lr at the end as a fraction of the peak.

    Returns:
        ``torch.optim.lr_scheduler.LambdaLR``.
    """
    decay_steps = total_steps - warmup_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay_steps <= 0:
            return 1.0
        progress = min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)
        cos = 0.5 * (1.0 + math.cos(math.pi * progress))
        return final_lr_fraction + (1.0 - final_lr_fraction) * cos

    return LambdaLR(optimizer, lr_lambda=factor)
