"""The posterior cache: every posterior bought is kept on disk, keyed by the image's pixels, and paid once.

An image already bought -- in this run, or by an earlier run of the same attack on the same victim --
is served from disk and never paid for twice; a rerun of a deterministic attack replays its own
history for free. ``cache.spent`` counts exactly the images sent to the victim, which is what the
victim's ledger charges.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from stealer.cache import ResponseCache
from stealer.shards import encode_png
from victims.purchase import takes_key

__all__ = ["PosteriorTarget", "PosteriorCache"]


class PosteriorTarget(Protocol):
    """What the attack needs from a classifier victim transport."""

    def query(self, images: Tensor, user: str) -> Tensor: ...

    def describe(self) -> dict[str, Any]: ...


def _image_key(img: np.ndarray) -> str:
    h = hashlib.sha1(str(img.shape).encode())
    h.update(np.ascontiguousarray(img).tobytes())
    return "p" + h.hexdigest()[:30]


class PosteriorCache:
    """Every posterior bought, on disk as response shards keyed by the image's pixel hash.

    Args:
        root: the folder (a :class:`stealer.cache.ResponseCache`; one per victim, defense chain and user).
        meta: what the responses depend on; a folder made with other settings is refused.
        rank: this process (each rank writes its own shard files).

    ``fetch`` sends only the images not yet cached (each distinct image once, even within a batch)
    and counts them in ``spent``; ``received`` counts every posterior handed to the attack.

    Paid once under SIGKILL (issue 13), as the encoder steal's query phase
    (``stealer.steal.run_query_phase``): with a victim whose ``query`` takes an idempotency ``key=``
    (:class:`victims.posterior_api.PosteriorAPI`), each purchase is journaled (fsynced) under a key
    derived from the cache's ``run_id``, the user, the caller's ``tag`` and the image keys, before it
    is paid; the victim commits the charge together with the answer. A run killed after the charge
    and before the cache write gets those answers back on resume (``recovered``: read from the
    victim's ledger, never bought again), and :meth:`finalize` lets the victim forget every kept
    answer that is now cached.
    """

    def __init__(self, root: str | os.PathLike, meta: dict[str, Any], *, rank: int = 0) -> None:
        self.store = ResponseCache(root, rank=rank)
        self.store.check_meta(meta)
        if rank == 0:
            self.store.write_meta(meta)
        self.root = Path(root)
        self.known: dict[str, np.ndarray] = {}
        for tar_path, _ in self.store.complete_shards():
            with tarfile.open(tar_path) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".npy"):
                        data = tar.extractfile(m).read()  # type: ignore[union-attr]
                        self.known[m.name[:-4]] = np.load(io.BytesIO(data), allow_pickle=False)
        self.spent = 0
        self.received = 0
        self.recovered = 0  # posteriors paid by a killed run, read back from the victim, not bought again
        self._paid: dict[str, np.ndarray] | None = None  # those answers, read on the first keyed fetch
        self._victim: tuple[Any, str] | None = None  # (target, user) of the keyed purchases, for finalize

    def __len__(self) -> int:
        return len(self.known)

    def fetch(self, target: PosteriorTarget, images: Tensor, user: str, labels: Sequence[int] | None = None, *,
              tag: str | None = None) -> Tensor:
        """Posteriors ``[N, K]`` (float32, CPU) of uint8 ``images``; pays only for images never bought.

        ``tag`` names the purchase in the run (data-free attacks: ``<kind>/it<iteration>/r<rank>/...``)
        so that a resumed iteration asks under the key it paid under."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W]; got {images.dtype} {list(images.shape)}")
        arr = images.detach().cpu().numpy()
        keys = [_image_key(a) for a in arr]
        new: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in self.known and k not in new:
                new[k] = i
        if new:
            new_keys, idx = list(new), list(new.values())
            keyed = takes_key(target)
            if keyed and self._paid is None:  # answers a killed run paid for and never cached
                self._paid = self.store.recover_paid(target, user, set(self.known))
                self._victim = (target, user)
            got: list[Any] = [(self._paid or {}).pop(k, None) for k in new_keys]
            buy = [j for j, r in enumerate(got) if r is None]
            self.recovered += len(got) - len(buy)
            paid_key = None
            if buy:
                buy_keys = [new_keys[j] for j in buy]
                sub = images[[idx[j] for j in buy]].contiguous()
                if keyed:
                    paid_key = self.store.batch_key(user, buy_keys if tag is None else [f"@{tag}", *buy_keys])
                    self.store.intend(paid_key, buy_keys)  # journaled before anything is paid
                    resp = target.query(sub, user, key=paid_key)  # type: ignore[call-arg]  # charged with its answer kept
                else:
                    resp = target.query(sub, user)  # charged per image
                self.spent += len(buy)
                for j, r in zip(buy, resp.detach().float().cpu().numpy()):
                    got[j] = r
            lab = [int(labels[i]) if labels is not None else -1 for i in idx]
            pngs = [("png", encode_png(np.moveaxis(arr[i], 0, -1))) for i in idx]
            self.store.write_batch(new_keys, pngs, lab, np.stack(got))
            if paid_key is not None:  # cached now: the victim need not keep it
                target.forget(user, [paid_key])  # type: ignore[attr-defined]
            for k, r in zip(new_keys, got):
                self.known[k] = r
        self.received += len(keys)
        return torch.from_numpy(np.stack([self.known[k] for k in keys])).float()

    def finalize(self, source: str) -> dict[str, Any]:
        """Write the manifest that makes the cache a shard folder (one rank, after all are done); the
        victim forgets the answers it kept for purchases now cached, the journal keeps the rest."""
        if self._victim is not None:
            self.store.settle_journal(*self._victim)
        return self.store.finalize(source=source)
