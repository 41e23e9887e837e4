"""Keyed purchases: an answer paid for under an idempotency key is paid once, whatever crashes.

Shared by the in-process victims (:class:`victims.api.VictimAPI` for representations,
:class:`victims.posterior_api.PosteriorAPI` for posteriors). :func:`query_once` refuses an
over-budget batch before the forward, computes the answer, then charges it *with* the answer in one
ledger transaction (:meth:`victims.ledger.QueryLedger.charge_answer`): a caller killed at any moment
either paid nothing or reads what it paid for back (:func:`kept_answer`); asking again under the
same key (with the same images) is free. :func:`forget` drops kept answers the caller now stores
itself; what was charged stays charged.

Example::

    >>> reps = query_once(ledger, "alice", "q:1f2e...", images, lambda x: model(x), device="cpu", width=10)
    >>> kept_answer(ledger, "alice", "q:1f2e...")  # the same answer, from another process after a crash
"""
from __future__ import annotations

import hashlib
import inspect
import io
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from victims.ledger import BudgetExceeded, QueryLedger

__all__ = ["fingerprint", "query_once", "kept_answer", "forget", "takes_key"]


def fingerprint(images: Tensor) -> str:
    """sha256 of a uint8 query's shape and bytes: what an idempotency key was paid for."""
    h = hashlib.sha256(repr(tuple(images.shape)).encode())
    arr = np.ascontiguousarray(images.detach().cpu().numpy())
    h.update(memoryview(arr).cast("B"))  # no copy of a CPU batch (3x faster than tobytes() on 256 x 224 px)
    return h.hexdigest()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _from_npy(body: bytes) -> np.ndarray:
    return np.load(io.BytesIO(body), allow_pickle=False)


def query_once(ledger: QueryLedger, user: str, key: str, images: Tensor, answer: Callable[[Tensor], Tensor], *,
               device: torch.device | str, width: int) -> Tensor:
    """The answer to ``images`` bought under ``key`` for ``user``: paid once, kept with its charge.

    Args:
        answer: ``images -> float32 [N, width]`` (the forward and defenses; it charges nothing).
        device: where a kept answer is returned (a fresh one is returned as computed).
        width: the answer's columns (for an empty batch).

    Raises:
        BudgetExceeded: the batch would pass the budget (checked before the forward; nothing charged).
        ValueError: ``key`` was paid for other images.
    """
    n = int(images.shape[0])
    if n == 0:
        return torch.empty(0, width, device=device)
    if ledger.answer(user, key) is not None:  # asked before: the kept answer, if it is the same question
        kept = ledger.answer(user, key, n=n, fingerprint=fingerprint(images))
        return torch.from_numpy(_from_npy(kept)).to(device)  # type: ignore[arg-type]
    left = ledger.remaining(user)
    if left is not None and left < n:  # refused before the forward, as a plain charge is
        raise BudgetExceeded(user, int(ledger.budget(user)), ledger.spent(user), n)  # type: ignore[arg-type]
    reps = answer(images)  # on a GPU the forward runs while the CPU hashes the images
    fp = fingerprint(images)
    body = _npy(reps.detach().cpu().numpy())
    # charge and answer in one transaction; another asker of the same key may have won the race
    kept = ledger.charge_answer(user, n, key, fp, body)
    return reps if kept == body else torch.from_numpy(_from_npy(kept)).to(device)


def kept_answer(ledger: QueryLedger, user: str, key: str) -> Tensor | None:
    """The answer paid for under ``key`` (float32 on the CPU), or None if nothing was paid under it
    (or it was forgotten)."""
    kept = ledger.answer(user, key)
    return None if kept is None else torch.from_numpy(_from_npy(kept))


def forget(ledger: QueryLedger, user: str, keys: Sequence[str]) -> int:
    """Drop the answers kept under ``keys``; what was charged stays charged, and a later query under
    one of these keys is a new purchase. Returns how many there were."""
    return ledger.drop_receipts([(user, k) for k in keys])


def takes_key(victim: Any) -> bool:
    """Whether ``victim.query`` takes an idempotency ``key=`` (:class:`victims.api.VictimAPI`,
    :class:`victims.posterior_api.PosteriorAPI`, ``stealer.client.HTTPVictim``; not every wrapper):
    a caller that journals its purchases asks with a key only where it is understood."""
    query = getattr(victim, "query", None)
    try:
        return query is not None and "key" in inspect.signature(query).parameters
    except (TypeError, ValueError):
        return False
