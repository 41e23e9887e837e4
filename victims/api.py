"""The victim's query API: pay per image, encode, pass through the defenses.

:class:`VictimAPI` is the in-process transport (same device as the attacker, no copy);
an HTTP transport (``victims/server.py``) wraps the same object, so both share one
ledger and one defense chain. Every image sent is charged *before* it is encoded,
repeats included: there are no free queries, and a query that fails after charging
stays paid. A query with an idempotency ``key`` is the exception that makes a crash cost
nothing: it is refused before the forward if over budget, then charged *with* its answer in one
ledger transaction, so a caller killed at any moment either paid nothing or can read what it
paid for back (:meth:`VictimAPI.answer`); asking again under the same key is free.

A defense is any callable ``defense(reps, images, user) -> reps`` (``reps`` float32
``[N, D]``, ``images`` the uint8 query on the API's device); they run in order.

Example::

    >>> api = VictimAPI(load_victim_encoder("runs/victim/checkpoint.pth.tar"),
    ...                 QueryLedger("runs/ledger.sqlite"))
    >>> api.ledger.set_budget("attacker", 50_000)
    >>> reps = api.query(images_uint8, user="attacker")    # [N, api.out_dim]
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from victims.ledger import QueryLedger
from victims.purchase import fingerprint, forget, kept_answer, query_once
from victims.simsiam import VictimEncoder

__all__ = ["Defense", "VictimAPI", "fingerprint"]

#: ``defense(reps [N, D] float32, images [N, C, H, W] uint8, user) -> reps``
Defense = Callable[[Tensor, Tensor, str], Tensor]


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` → bf16 on a GPU that has it, fp16 on other GPUs, fp32 elsewhere; others are checked."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"victim precision {precision!r} is not valid; choose one of: {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("victim precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return precision


class VictimAPI:
    """Serve a frozen :class:`VictimEncoder` to users under a query budget.

    Args:
        encoder: the victim; moved to ``device``.
        ledger: per-user budgets; charged for every image before encoding.
        defenses: applied in order to the representations.
        device: where the encoder runs; queries are moved there and answers stay there.
        precision: the encoder's forward: ``fp32``, ``bf16`` or ``fp16`` (autocast; answers are
            float32 either way and the defenses run in float32), or ``auto`` = bf16 on a GPU
            that has it, fp16 on other GPUs, fp32 on the CPU.
    """

    def __init__(
        self,
        encoder: VictimEncoder,
        ledger: QueryLedger,
        *,
        defenses: Sequence[Defense] = (),
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ) -> None:
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device)
        self.ledger = ledger
        self.defenses = tuple(defenses)
        self.precision = resolve_precision(precision, self.device)

    @property
    def out_dim(self) -> int:
        """Dimension of the answers: the encoder's, changed by defenses that reshape answers
        (any defense with ``out_dim(dim) -> dim``, e.g. B4B's pad-and-shuffle and binary transforms)."""
        dim = self.encoder.out_dim
        for defense in self.defenses:
            reshape = getattr(defense, "out_dim", None)
            if callable(reshape):
                dim = int(reshape(dim))
        return dim

    def describe(self) -> dict[str, Any]:
        """What a user may know about the service (no weights, no defenses)."""
        return {
            "arch": self.encoder.arch,
            "representation": self.encoder.representation,
            "out_dim": self.out_dim,  # what query() returns, after the defenses
            "image_size": self.encoder.image_size,
            # how images become the encoder's input (resize, crop, mean/std): a user decodes its
            # images with this geometry (victims/preprocess.py); caches record it
            "preprocess": self.encoder.preprocessing.record(),
            "in_chans": self.encoder.in_chans,
            "input": "uint8 [N, C, H, W], 0..255",
        }

    def _validate(self, images: Any) -> Tensor:
        c = self.encoder.in_chans
        if not isinstance(images, Tensor):
            raise ValueError(
                f"query images must be a torch.Tensor uint8 [N, {c}, H, W]; "
                f"got {type(images).__name__}"
            )
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != c:
            raise ValueError(
                f"query images must be uint8 [N, {c}, H, W] (0..255); got {images.dtype} "
                f"{list(images.shape)}"
            )
        return images

    def query(self, images: Tensor, user: str, *, receipt: str | None = None, key: str | None = None) -> Tensor:
        """Charge ``user`` for every image, encode, apply the defenses.

        Args:
            images: uint8 ``[N, C, H, W]``.
            user: who pays.
            receipt: recorded with the charge; a query with a receipt already charged is not
                charged again (:meth:`victims.ledger.QueryLedger.charge`); the answer is computed
                again (the HTTP server keeps its own store of answers).
            key: an idempotency key (e.g. derived from the run and the images' keys): the answer is
                computed, then charged and kept under ``key`` in one ledger transaction
                (:meth:`victims.ledger.QueryLedger.charge_answer`); asking again with the same key
                and images returns the kept answer without a charge or a forward, also from
                another process after a crash (:meth:`answer`). Over-budget batches are refused
                before the forward. ``key`` and ``receipt`` are exclusive.

        Returns:
            float32 ``[N, out_dim]`` on the API's device.

        Raises:
            ValueError: malformed images (nothing is charged), or ``key`` already paid for other images.
            victims.ledger.BudgetExceeded: the batch would pass the budget (nothing is
                charged, nothing is encoded).
        """
        images = self._validate(images)
        n = int(images.shape[0])
        if key is not None:
            if receipt is not None:
                raise ValueError("pass either key= (answer kept) or receipt= (charge only), not both")
            return self._query_once(images, user, key)
        self.ledger.charge(user, n, receipt=receipt)
        if n == 0:
            return torch.empty(0, self.out_dim, device=self.device)
        return self._answer(images, user)

    def _answer(self, images: Tensor, user: str) -> Tensor:
        """Encode and defend (no charge): float32 ``[N, out_dim]`` on the API's device."""
        images = images.to(self.device, non_blocking=True)
        dtype = _AUTOCAST.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            reps = self.encoder(images)  # N x D
        reps = reps.float()
        for defense in self.defenses:
            reps = defense(reps, images, user)
        return reps.float()

    def _query_once(self, images: Tensor, user: str, key: str) -> Tensor:
        return query_once(self.ledger, user, key, images, lambda x: self._answer(x, user), device=self.device,
                          width=self.out_dim)

    def answer(self, user: str, key: str) -> Tensor | None:
        """The answer paid for under ``key`` (float32 ``[N, out_dim]`` on the CPU), or None if
        nothing was paid under it (or it was forgotten)."""
        return kept_answer(self.ledger, user, key)

    def forget(self, user: str, keys: Sequence[str]) -> int:
        """Drop the answers kept under ``keys`` (the caller keeps them now); what was charged stays
        charged, and a later query under one of these keys is a new purchase. Returns how many."""
        return forget(self.ledger, user, keys)
