"""Output perturbation defenses of Dziedzic et al., ICML'22, "On the Difficulty of Defending
Self-Supervised Learning against Model Extraction" (code: cleverhans-lab/ssl-attacks-defenses
@1d3874ff; fidelity rows in docs/fidelity.md).

Their ``--defence True`` has two branches (``simclr.py:SimCLR.steal``, ``legitimate.py``):

* "second type": add ``N(mu, sigma^2)`` noise to every representation → :class:`GaussianNoise`;
* "first type": compare each query with the earlier queries of the batch and, when the
  cosine similarity is high, return a vector of ``N(1000, sigma^2)`` noise instead of the
  representation ("instead of adding, completely change the representation") →
  :class:`SimilarityNoise`.

Example::

    >>> noise = GaussianNoise(sigma=0.5, seed=1)
    >>> noisy = noise(reps, images, "alice")            # reps + N(0, 0.25)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from victims.defenses.base import UserStateDefense, check_params, is_int, is_number

__all__ = ["GaussianNoise", "SimilarityNoise"]


class GaussianNoise(UserStateDefense):
    """Add i.i.d. Gaussian noise ``N(mean, sigma^2)`` to every coordinate of every answer.

    Dziedzic et al., ICML'22, the "second type of perturbation defence" of
    ``ssl-attacks-defenses/simclr.py``: ``query_features += normal_(mean=mu, std=sigma)``.

    Args:
        sigma: standard deviation (default 0.5: the repo's ``--sigma`` default).
        mean: mean of the noise (default 0.0, the usual N(0, sigma^2) defense and what the
            repo's ``stealhead.py`` adds; its ``steal.py``/``legitimate.py`` default
            ``--mu 5`` shifts every coordinate by 5, which an attacker removes by centring).
        seed: the noise of a user's k-th batch is drawn from ``(seed, user, k)``.
    """

    name = "noise"

    def __init__(self, *, sigma: float = 0.5, mean: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        check_params(self.name, [
            (is_number(sigma) and sigma >= 0, "sigma", sigma, "a number >= 0"),
            (is_number(mean), "mean", mean, "a finite number"),
            (is_int(seed), "seed", seed, "an int"),
        ])
        self._config = {"sigma": float(sigma), "mean": float(mean), "seed": int(seed)}

    def _apply(self, reps: Tensor, user: str, state: dict[str, Any]) -> Tensor:
        g = self._generator("noise", user, state)
        noise = torch.randn(reps.shape, generator=g) * self._config["sigma"] + self._config["mean"]
        return reps + noise.to(reps.device)


class SimilarityNoise(UserStateDefense):
    """Answer pure noise to queries too similar to that user's earlier queries.

    Dziedzic et al., ICML'22, the "first type of perturbation defence"
    (``ssl-attacks-defenses/simclr.py``): for each query ``i`` the cosine similarity to
    every earlier query is computed; if the largest exceeds the threshold the answer is
    replaced by a fresh vector ``N(mean, sigma^2)^D`` (mean 1000 in the repo, so a flagged
    answer is unmistakably useless rather than subtly wrong).

    Exactly what is returned, for a batch ``reps [N, D]`` of user ``u``:

    * ``z_i = reps_i / ||reps_i||``; past = the last ``memory`` ``z`` of ``u``'s earlier
      batches; ``s_i = max(max_j z_i . past_j, max_{j<i} z_i . z_j)`` (``-inf`` if none);
    * row ``i`` is ``reps_i`` unchanged if ``s_i <= threshold``, else a vector of i.i.d.
      ``N(mean, sigma^2)`` (drawn from ``(seed, u, batch index)``);
    * every ``z_i``, flagged or not, then joins ``u``'s memory (oldest dropped first), as
      the repo appends every query to ``all_reps``.

    Departures from the repo, which it could not avoid or which the brief asks: the repo
    compares *projector* outputs of the victim (``victim_head``) and forgets everything
    between batches; here the defense sees only what it is given (put it first in the
    chain to compare raw encoder outputs) and remembers up to ``memory`` past queries per
    user (``memory=0`` is the repo's within-batch behaviour). The repo thresholds
    ``(cos + 1) / 2 > 0.8``, i.e. ``cos > 0.6``: the default below. Calibrate it on the
    representations actually served: pooled backbone features after a ReLU are
    non-negative, so any two have cosine >= 0 and often far above 0.6 (on a random
    ResNet every pair does), and the default then replaces nearly every answer.

    Args:
        threshold: cosine similarity above which an answer is replaced (default 0.6).
        sigma: std of the replacement noise (default 0.5, the repo's ``--sigma``).
        mean: mean of the replacement noise (default 1000.0, as in the repo).
        memory: past query representations remembered per user (default 4096; ours).
        seed: seeds the replacement noise.
    """

    name = "similarity_noise"

    def __init__(
        self,
        *,
        threshold: float = 0.6,
        sigma: float = 0.5,
        mean: float = 1000.0,
        memory: int = 4096,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_params(self.name, [
            (is_number(threshold) and -1 <= threshold <= 1, "threshold", threshold, "in [-1, 1]"),
            (is_number(sigma) and sigma >= 0, "sigma", sigma, "a number >= 0"),
            (is_number(mean), "mean", mean, "a finite number"),
            (is_int(memory) and memory >= 0, "memory", memory, "an int >= 0"),
            (is_int(seed), "seed", seed, "an int"),
        ])
        self._config = {
            "threshold": float(threshold),
            "sigma": float(sigma),
            "mean": float(mean),
            "memory": int(memory),
            "seed": int(seed),
        }

    def _new_user(self) -> dict[str, Any]:
        return {"batches": 0, "queries": 0, "flagged": 0, "bank": torch.empty(0, 0)}

    def flagged(self, user: str) -> int:
        """How many of ``user``'s answers were replaced by noise so far."""
        with self._lock:
            return int(self._users[user]["flagged"]) if user in self._users else 0

    def similarity(self, reps: Tensor, user: str) -> Tensor:
        """``s_i`` for a prospective batch, without answering it or changing any state."""
        with self._lock:
            state = self._users.get(user) or self._new_user()
            return self._max_similarity(F.normalize(reps.detach().float(), dim=1), state["bank"])

    @staticmethod
    def _max_similarity(z: Tensor, bank: Tensor) -> Tensor:
        n = z.shape[0]
        best = torch.full((n,), float("-inf"), device=z.device)
        if bank.numel():
            if bank.shape[1] != z.shape[1]:
                raise ValueError(
                    f"similarity_noise: representations of dim {z.shape[1]} after earlier ones of "
                    f"dim {bank.shape[1]} for the same user"
                )
            best = (z @ bank.to(z.device).T).amax(dim=1)  # N x M -> N
        if n > 1:
            within = z @ z.T  # N x N
            earlier = torch.ones(n, n, dtype=torch.bool, device=z.device).tril(-1)
            within = within.masked_fill(~earlier, float("-inf")).amax(dim=1)
            best = torch.maximum(best, within)
        return best

    def _apply(self, reps: Tensor, user: str, state: dict[str, Any]) -> Tensor:
        if reps.shape[0] == 0:
            return reps
        cfg = self._config
        z = F.normalize(reps, dim=1)  # N x D, zero rows stay zero (similarity 0)
        flag = self._max_similarity(z, state["bank"]) > cfg["threshold"]  # N
        g = self._generator("replace", user, state)
        noise = torch.randn(reps.shape, generator=g) * cfg["sigma"] + cfg["mean"]
        out = torch.where(flag[:, None], noise.to(reps.device), reps)
        if cfg["memory"]:
            bank = state["bank"].to(z.device) if state["bank"].numel() else z[:0]
            state["bank"] = torch.cat([bank, z])[-cfg["memory"]:]
        state["flagged"] += int(flag.sum())
        return out
