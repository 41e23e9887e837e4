"""The posterior query API: pay per image, classify, perturb, truncate, round.

:class:`PosteriorAPI` serves a classifier victim (:class:`victims.classifier.ClassifierVictim`
or its int8 form from :mod:`victims.quantize`) the way MLaaS APIs serve class probabilities
(the setting of Tramèr et al., USENIX Sec'16; Orekondy et al., CVPR'19 / ICLR'20). One query:

1. ``ledger.charge(user, N)`` **before** the forward, repeats included (as
   :class:`victims.api.VictimAPI`): a failed or rejected batch that was charged stays paid;
   a query with an idempotency ``key`` is instead charged *with* its answer in one ledger
   transaction after the forward (:mod:`victims.purchase`), so a caller killed at any moment
   either paid nothing or reads what it paid for back (:meth:`PosteriorAPI.answer`);
2. ``p = softmax(model(images))`` in eval mode, without gradients;
3. the posterior defenses (``victims.defenses.posterior``) in order,
   ``defense(p [N, K], images, user) -> p``;
4. top-k truncation: keep the ``top_k`` largest entries, zero the rest, renormalise;
5. rounding to ``rounding`` decimals, renormalised (a row rounded to all zeros keeps a
   one-hot on its argmax).

Every returned row is a probability vector (entries >= 0, sum 1 in float32).

Example::

    >>> api = PosteriorAPI(load_classifier("runs/demo/victim_clf/classifier.pt"),
    ...                    QueryLedger("runs/ledger.sqlite"), top_k=3, rounding=2)
    >>> probs = api.query(images_uint8, user="attacker")     # float32 [N, K]
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from victims.ledger import QueryLedger
from victims.purchase import forget, kept_answer, query_once

__all__ = ["PosteriorDefense", "PosteriorAPI", "truncate_top_k", "round_probs"]

#: ``defense(probs [N, K] float32, images [N, C, H, W] uint8, user) -> probs``
PosteriorDefense = Callable[[Tensor, Tensor, str], Tensor]


def truncate_top_k(probs: Tensor, k: int) -> Tensor:
    """Keep each row's ``k`` largest entries (ties: lowest index first), zero the rest, renormalise."""
    if k >= probs.shape[1]:
        return probs
    idx = probs.topk(k, dim=1).indices
    kept = torch.zeros_like(probs).scatter_(1, idx, probs.gather(1, idx))
    return _renormalise(kept, probs)


def round_probs(probs: Tensor, decimals: int) -> Tensor:
    """Round to ``decimals`` decimals, then renormalise (all-zero rows become one-hot on the argmax)."""
    return _renormalise(torch.round(probs, decimals=decimals).clamp_min_(0), probs)


def _renormalise(p: Tensor, ref: Tensor) -> Tensor:
    s = p.sum(dim=1, keepdim=True)
    onehot = torch.zeros_like(p).scatter_(1, ref.argmax(dim=1, keepdim=True), 1.0)
    return torch.where(s > 0, p / s.clamp_min(1e-30), onehot)


class PosteriorAPI:
    """Serve a classifier's posteriors to users under a query budget.

    Args:
        model: ``uint8 [N, C, H, W] -> logits [N, K]`` with attributes ``arch, num_classes,
            in_chans, image_size`` (a ClassifierVictim or a quantized one); put in eval mode.
        ledger: per-user budgets; charged for every image before the forward.
        defenses: posterior defenses applied in order.
        top_k: return only the k most probable classes (renormalised); None = all K.
        rounding: decimals to round to (renormalised); None = full precision.
        device: where the model runs; answers stay there.
    """

    def __init__(
        self,
        model: nn.Module,
        ledger: QueryLedger,
        *,
        defenses: Sequence[PosteriorDefense] = (),
        top_k: int | None = None,
        rounding: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        for attr in ("arch", "num_classes", "in_chans", "image_size"):
            if not hasattr(model, attr):
                raise ValueError(f"PosteriorAPI needs a classifier with .{attr} (victims.classifier.ClassifierVictim)")
        k = int(model.num_classes)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= k):
            raise ValueError(f"top_k must be an int in [1, {k}] or None; got {top_k!r}")
        if rounding is not None and (isinstance(rounding, bool) or not isinstance(rounding, int) or rounding < 0):
            raise ValueError(f"rounding must be an int >= 0 (decimals) or None; got {rounding!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.ledger = ledger
        self.defenses = tuple(defenses)
        self.top_k, self.rounding = top_k, rounding

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def describe(self) -> dict[str, Any]:
        """What a user may know about the service (no weights, no defenses)."""
        return {
            "arch": self.model.arch,
            "num_classes": self.num_classes,
            "image_size": self.model.image_size,
            "in_chans": self.model.in_chans,
            "output": "posterior",
            "top_k": self.top_k,
            "rounding": self.rounding,
            "input": "uint8 [N, C, H, W], 0..255",
        }

    def _validate(self, images: Any) -> Tensor:
        c = int(self.model.in_chans)
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != c:
            got = f"{images.dtype} {list(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"query images must be uint8 [N, {c}, H, W] (0..255); got {got}")
        return images

    def query(self, images: Tensor, user: str, *, key: str | None = None) -> Tensor:
        """Charge ``user`` for every image, then return their (defended) posteriors.

        Args:
            key: an idempotency key (e.g. derived from the run and the images' keys,
                :meth:`stealer.cache.ResponseCache.batch_key`): the posteriors are computed, then
                charged and kept under ``key`` in one ledger transaction
                (:func:`victims.purchase.query_once`); asking again with the same key and images
                returns the kept answer without a charge or a forward, also from another process
                after a crash (:meth:`answer`). Over-budget batches are refused before the forward.

        Returns:
            float32 ``[N, K]`` on the API's device; every row sums to 1.

        Raises:
            ValueError: malformed images (nothing is charged), or ``key`` already paid for other images.
            victims.ledger.BudgetExceeded: the batch would pass the budget (nothing charged).
        """
        images = self._validate(images)
        if key is not None:
            return query_once(self.ledger, user, key, images, lambda x: self._answer(x, user), device=self.device,
                              width=self.num_classes)
        self.ledger.charge(user, int(images.shape[0]))
        if images.shape[0] == 0:
            return torch.empty(0, self.num_classes, device=self.device)
        return self._answer(images, user)

    def _answer(self, images: Tensor, user: str) -> Tensor:
        """Classify, defend, truncate and round (no charge): float32 ``[N, K]`` on the API's device."""
        images = images.to(self.device, non_blocking=True)
        self.model.eval()
        with torch.no_grad():
            probs = torch.softmax(self.model(images).float(), dim=1)  # N x K
        for defense in self.defenses:
            probs = defense(probs, images, user)
        if self.top_k is not None:
            probs = truncate_top_k(probs, self.top_k)
        if self.rounding is not None:
            probs = round_probs(probs, self.rounding)
        return probs.float()

    def answer(self, user: str, key: str) -> Tensor | None:
        """The posteriors paid for under ``key`` (float32 ``[N, K]`` on the CPU), or None if nothing
        was paid under it (or it was forgotten)."""
        return kept_answer(self.ledger, user, key)

    def forget(self, user: str, keys: Sequence[str]) -> int:
        """Drop the answers kept under ``keys`` (the caller caches them now); what was charged stays
        charged, and a later query under one of these keys is a new purchase. Returns how many."""
        return forget(self.ledger, user, keys)
