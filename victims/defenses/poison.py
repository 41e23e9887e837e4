"""Prediction poisoning for representations.

Prediction poisoning (Orekondy, Schiele, Fritz, ICLR'20, "Prediction Poisoning: Towards
Defenses Against DNN Model Stealing Attacks") perturbs each answer within a budget so the
attacker's training signal points the wrong way. Dziedzic et al., ICML'22, "On the
Difficulty of Defending Self-Supervised Learning against Model Extraction", discuss such
defenses for encoders, but their code (cleverhans-lab/ssl-attacks-defenses) implements
none: its ``--defence`` is the additive noise and the similarity replacement of
:mod:`victims.defenses.noise`. Orekondy's MAD needs a surrogate's gradient per query and a
probability simplex, neither of which an encoder API has. :class:`Poison` is therefore our
representation analogue, built from the two mechanisms the poisoning literature uses and
that need no surrogate:

* **wrong pairings**: a fraction of answers are the (clean) representations of *other*
  inputs of the same user — a stolen encoder trained on them learns wrong targets, while
  a legitimate downstream model trained on mostly-correct pairs barely moves;
* **targeted perturbation**: every answer is pushed by ``epsilon * ||y||`` along the part
  of a secret per-user direction ``t_u`` orthogonal to it, so the error is consistent
  (biased toward ``t_u``) rather than zero-mean noise that averages out.

Example::

    >>> poison = Poison(fraction=0.1, epsilon=0.1, seed=secret)
    >>> answers = poison(reps, images, "alice")
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from victims.defenses.base import UserStateDefense, check_params, generator, is_int, is_number

__all__ = ["Poison"]


class Poison(UserStateDefense):
    """Swap a fraction of answers for other inputs' answers; tilt all toward a secret direction.

    For a batch ``reps [N, D]`` of user ``u`` whose memory holds ``M`` past clean
    representations ``bank``, with ``pool = cat(bank, reps)`` (``M + N`` rows), and random
    numbers drawn from ``(seed, u, batch index)``:

    1. row ``i`` is *swapped* with probability ``fraction``: it becomes ``pool[j]`` with
       ``j`` uniform over the pool rows other than ``i`` itself (``M + i``); if the pool
       has no other row (a user's first, single-image query) nothing is swapped;
    2. if ``epsilon > 0``, every row ``y`` (swapped or not) becomes
       ``y + epsilon * ||y|| * unit(t_u - (t_u . y_hat) y_hat)``, ``t_u`` a unit vector
       derived from ``(seed, u)`` (rows parallel to ``t_u`` or zero are left as they are);
    3. the batch's *clean* ``reps`` join the memory, which keeps the last ``memory``.

    Args:
        fraction: probability that an answer is another input's representation (default 0.1).
        epsilon: size of the targeted perturbation relative to ``||y||`` (default 0.1).
        memory: past representations kept per user as swap candidates (default 1024).
        seed: the secret behind the swaps and the per-user directions.

    The defaults are ours (no published setting exists for this defense).
    """

    name = "poison"

    def __init__(
        self, *, fraction: float = 0.1, epsilon: float = 0.1, memory: int = 1024, seed: int = 0
    ) -> None:
        super().__init__()
        check_params(self.name, [
            (is_number(fraction) and 0 <= fraction <= 1, "fraction", fraction, "in [0, 1]"),
            (is_number(epsilon) and epsilon >= 0, "epsilon", epsilon, "a number >= 0"),
            (is_int(memory) and memory >= 0, "memory", memory, "an int >= 0"),
            (is_int(seed), "seed", seed, "an int"),
        ])
        self._config = {
            "fraction": float(fraction),
            "epsilon": float(epsilon),
            "memory": int(memory),
            "seed": int(seed),
        }

    def _new_user(self) -> dict[str, Any]:
        return {"batches": 0, "queries": 0, "swapped": 0, "bank": torch.empty(0, 0)}

    def direction(self, user: str, dim: int) -> Tensor:
        """The secret unit direction ``t_u`` toward which ``user``'s answers are tilted."""
        g = generator(self._config["seed"], self.name, "direction", user, dim)
        return F.normalize(torch.randn(dim, generator=g), dim=0)

    def _apply(self, reps: Tensor, user: str, state: dict[str, Any]) -> Tensor:
        n, dim = reps.shape
        if n == 0:
            return reps
        cfg = self._config
        bank = state["bank"].to(reps.device) if state["bank"].numel() else reps[:0]
        if bank.shape[1] != dim:
            raise ValueError(
                f"poison: representations of dim {dim} after earlier ones of dim {bank.shape[1]}"
            )
        pool = torch.cat([bank, reps])  # (M + N) x D
        m = bank.shape[0]
        g = self._generator("swap", user, state)
        swap = torch.rand(n, generator=g) < cfg["fraction"]  # N
        others = m + n - 1
        pick = torch.randint(0, max(others, 1), (n,), generator=g)  # N, over pool minus self
        pick = pick + (pick >= m + torch.arange(n)).long()  # skip row M + i
        if others == 0:
            swap[:] = False
        out = reps.clone()
        out[swap.to(reps.device)] = pool[pick[swap].to(reps.device)]
        if cfg["epsilon"] > 0:
            t = self.direction(user, dim).to(reps.device)  # D
            y_hat = F.normalize(out, dim=1)  # N x D
            perp = t[None, :] - (y_hat @ t)[:, None] * y_hat  # N x D, orthogonal to each row
            size = perp.norm(dim=1, keepdim=True)  # N x 1
            unit = torch.where(size > 1e-6, perp / size.clamp_min(1e-12), torch.zeros_like(perp))
            out = out + cfg["epsilon"] * out.norm(dim=1, keepdim=True) * unit
        if cfg["memory"]:
            state["bank"] = pool[-cfg["memory"]:].clone()
        state["swapped"] += int(swap.sum())
        return out
