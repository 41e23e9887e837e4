"""Gradient-aware posterior defenses: MAD (Orekondy et al., ICLR'20) and GRAD²
(Mazeika et al., ICML'22). Both reason about the gradient an attacker would take on a
surrogate of its clone, ``G^T y~`` with ``G = d log p(x) / d theta``.

Closed form used here (both papers differentiate the surrogate's last linear layer only in
their fast paths — MAD's ``compute_jacobian_nll`` takes ``params[-2]``, the fc weight): for a
surrogate ``p = softmax(W h + b)``, ``d(-log p_k)/dW = (p - e_k) h^T``, hence for any ``y~``
with ``sum y~ = 1``::

    G^T y~ = (p - y~) (x) h

so MAD's angular objective ``|| G^T y~/|G^T y~| - G^T y/|G^T y| ||^2`` equals
``|| (p - y~)/|p - y~| - (p - y)/|p - y| ||^2`` (``h`` cancels) and GRAD²'s direction
``d <G^T y~, G^T y> / d y~_i`` is ``T h~_i`` up to a per-row constant, with
``T = mean_i (y_i - p_i) h~_i^T`` and ``h~ = [h, 1]``. Everything runs batched, without
autograd; ``jacobian="autograd"`` runs MAD the reference way (per sample, K backward passes
through the fc weight) for cross-checks and for the latency comparison with DCP.

Example::

    >>> mad = MAD(epsilon=0.5, norm="l1", oracle="argmax")
    >>> mad.fit(victim, None)                       # random surrogate of the victim's kind
    >>> probs = mad(victim_probs, images, "alice")
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from victims.defenses.base import check_params, is_int, is_number
from victims.defenses.posterior.base import (PosteriorDefenseBase, distill_surrogate, linesearch, random_surrogate,
                                             renormalise)

__all__ = ["MAD", "GRAD2", "MAD_ORACLES", "mad_objective", "mad_candidates", "mad_perturb", "mad_jacobian",
           "grad2_direction", "grad2_perturb"]

MAD_ORACLES = ("extreme", "argmax", "random", "argmin")
_EXHAUSTIVE_MAX_K = 12  # argmax-preserving oracle: all 2^(K-1) vertices up to here, greedy above (as the repo, >10)
_GREEDY_MAX_ITERS = 1024  # the repo's max_iters of oracle_argmax_preserving_approx


def mad_objective(p: Tensor, cand: Tensor, y: Tensor, objective: str = "angular") -> Tensor:
    """MAD objective of candidate posteriors, batched.

    Args:
        p: surrogate posteriors ``[N, K]``.
        cand: candidates ``[N, V, K]`` (each sums to 1).
        y: the victim's posteriors ``[N, K]``.
        objective: ``"angular"`` — ``||u - v||^2`` of the unit gradients (MAD's
            ``calc_objective``, ``objmax=True``); ``"surrogate"`` — ``||G^T c - G^T y||^2``
            without normalisation (``calc_surrogate_objective``), ``= ||c - y||^2 |h|^2``, whose
            maximiser does not depend on ``h`` (it is returned with ``|h| = 1``).

    Returns:
        ``[N, V]`` objective values (larger = larger deviation of the attacker's gradient).
    """
    if objective == "surrogate":
        return (cand - y[:, None, :]).pow(2).sum(dim=2)
    if objective != "angular":
        raise ValueError(f"unknown MAD objective {objective!r}; valid: angular, surrogate")
    u = F.normalize(p[:, None, :] - cand, dim=2)  # N x V x K
    v = F.normalize(p - y, dim=1)[:, None, :]  # N x 1 x K
    return (u - v).pow(2).sum(dim=2)


def _argmax_vertices(k: int) -> tuple[Tensor, Tensor]:
    """All 0/1 vertices ``[2^K, K]`` and, per class c, the indices of those with bit c set ``[K, 2^(K-1)]``."""
    verts = torch.tensor(list(itertools.product([0.0, 1.0], repeat=k)))
    table = torch.stack([torch.nonzero(verts[:, c] > 0).squeeze(1) for c in range(k)])
    return verts, table


def mad_candidates(y: Tensor, oracle: str, generator: torch.Generator | None = None) -> Tensor:
    """The oracle's candidate targets ``y*`` ``[N, V, K]`` (MAD ``oracle_*``).

    ``extreme``: the K one-hot vertices. ``argmax``: every set S holding the argmax k*, as
    ``1_S / |S|`` with ``1e-5`` extra on k* (exhaustive, 2^(K-1) sets, for K <= 12; larger K
    use :func:`_greedy_argmax` instead, as the repo). ``random``: one random vertex.
    ``argmin``: the vertex of the least likely class.
    """
    n, k = y.shape
    if oracle == "extreme":
        return torch.eye(k, device=y.device).expand(n, k, k)
    if oracle == "argmin":
        return F.one_hot(y.argmin(dim=1), k).float()[:, None, :]
    if oracle == "random":
        j = torch.randint(0, k, (n,), generator=generator).to(y.device)
        return F.one_hot(j, k).float()[:, None, :]
    if oracle == "argmax":
        verts, table = _argmax_vertices(k)
        top = y.argmax(dim=1)
        cand = verts.to(y.device)[table.to(y.device)[top]].clone()  # N x 2^(K-1) x K
        cand.scatter_add_(2, top[:, None, None].expand(n, cand.shape[1], 1), torch.full((n, cand.shape[1], 1), 1e-5, device=y.device))
        return cand / cand.sum(dim=2, keepdim=True)
    raise ValueError(f"unknown MAD oracle {oracle!r}; valid: {', '.join(MAD_ORACLES)}")


def _greedy_argmax(p: Tensor, y: Tensor, objective: str) -> Tensor:
    """Argmax-preserving oracle for large K (MAD ``oracle_argmax_preserving_approx``): grow the
    set from {k*} by the class that maximises the objective; keep the best set seen."""
    n, k = y.shape
    top = y.argmax(dim=1)
    fixed = F.one_hot(top, k).float()
    best = torch.full((n,), float("-inf"), device=y.device)
    best_c = fixed.clone()
    evaluated = 0
    eye = torch.eye(k, device=y.device)
    for _ in range(k - 1):
        cand = (fixed[:, None, :] + eye[None]).clamp(max=1.0)  # N x K x K: fixed + {j}
        cand = cand + 1e-5 * F.one_hot(top, k).float()[:, None, :]
        cand = cand / cand.sum(dim=2, keepdim=True)
        val = mad_objective(p, cand, y, objective).masked_fill(fixed > 0, float("-inf"))  # j already in the set
        v, j = val.max(dim=1)
        c = cand[torch.arange(n), j]
        better = v > best
        best = torch.where(better, v, best)
        best_c = torch.where(better[:, None], c, best_c)
        fixed = fixed.scatter(1, j[:, None], 1.0)
        evaluated += k - 1 - _
        if evaluated >= _GREEDY_MAX_ITERS:
            break
    return best_c


def mad_perturb(y: Tensor, p: Tensor, *, epsilon: float, norm: str = "l1", oracle: str = "extreme",
                objective: str = "angular", generator: torch.Generator | None = None) -> Tensor:
    """MAD (Orekondy et al., ICLR'20, Alg. 1 with ``optim='linesearch'``), batched closed form.

    ``y* = argmax_{c in oracle} objective(c)``, then ``y~ = (1 - a) y + a y*`` with the
    largest ``a`` keeping ``dist(y, y~) <= epsilon`` (:func:`linesearch`).

    Args:
        y: victim posteriors ``[N, K]``. p: the surrogate's posteriors ``[N, K]``.
    """
    if epsilon <= 0:
        return y
    if oracle == "argmax" and y.shape[1] > _EXHAUSTIVE_MAX_K:
        ystar = _greedy_argmax(p, y, objective)
    else:
        cand = mad_candidates(y, oracle, generator)
        idx = mad_objective(p, cand, y, objective).argmax(dim=1)
        ystar = cand[torch.arange(y.shape[0], device=y.device), idx]
    return linesearch(y, ystar, epsilon, norm)


def mad_jacobian(surrogate: nn.Module, images: Tensor) -> Tensor:
    """The reference MAD Jacobian, per sample: ``G[i, k] = d(-log p_k(x_i)) / d W_fc`` flattened
    (``compute_jacobian_nll``), ``[N, K, K * F]``, by K autograd calls per sample."""
    w = surrogate.head.weight.detach().requires_grad_(True)  # the fc weight (the repo's params[-2])
    b = surrogate.head.bias.detach()
    out = []
    for x in images:
        with torch.enable_grad():
            h = surrogate.features(x[None]).detach()
            nll = -torch.log_softmax(F.linear(h, w, b), dim=1)[0]
            rows = [torch.autograd.grad(nll[k], w, retain_graph=True)[0].flatten() for k in range(nll.shape[0])]
        out.append(torch.stack(rows))
    return torch.stack(out)


def _mad_objective_jacobian(G: Tensor, cand: Tensor, y: Tensor, objective: str) -> Tensor:
    """MAD objective from explicit Jacobians ``G [N, K, D]`` (``calc_objective[_surrogate]_batched``)."""
    u = torch.einsum("nkd,nvk->nvd", G, cand)
    v = torch.einsum("nkd,nk->nd", G, y)[:, None, :]
    if objective == "angular":
        u, v = F.normalize(u, dim=2), F.normalize(v, dim=2)
    return (u - v).pow(2).sum(dim=2)


def grad2_direction(p: Tensor, h: Tensor, y: Tensor) -> Tensor:
    """GRAD²'s ``d <G^T y~, G^T y> / d y~`` at ``y~ = y``, up to a per-row constant, for a
    surrogate ``softmax(W h + b)`` and the batch-mean cross-entropy gradient (Mazeika et al.'s
    ``get_Gty`` averages the loss over the batch, so the target couples the batch):
    ``g_i = T [h_i, 1]`` with ``T = mean_i (y_i - p_i) [h_i, 1]^T`` ``[K, F + 1]``."""
    ht = torch.cat([h, torch.ones(h.shape[0], 1, device=h.device, dtype=h.dtype)], dim=1)  # N x (F+1)
    t = (y - p).T @ ht / h.shape[0]  # K x (F+1)
    return ht @ t.T  # N x K


def grad2_perturb(y: Tensor, g: Tensor, epsilon: float) -> Tensor:
    """GRAD² (Mazeika et al., "How to Steer Your Adversary: Targeted and Efficient Model
    Stealing Defenses with Gradient Redirection", ICML'22), ``method_gradient_redirection``:
    the exact minimiser of the linear objective ``<g, y~>`` over ``{y~ in simplex,
    ||y~ - y||_1 <= eps}``: move ``min(1 - y_c, eps/2)`` onto ``c = argmin g``, taken from the
    classes in decreasing order of ``g``; then clamp at 1e-15 and renormalise (as the code's
    ``softmax(log(clamp(., 1e-15, 1)))``). Batched (the reference loops over samples)."""
    n, k = y.shape
    c0 = g.argmin(dim=1)
    give = torch.minimum(1 - y.gather(1, c0[:, None]).squeeze(1), torch.full((n,), epsilon / 2, device=y.device))
    ytake = y.scatter(1, c0[:, None], 0.0)
    order = g.scatter(1, c0[:, None], float("-inf")).argsort(dim=1, descending=True, stable=True)
    ys = ytake.gather(1, order)
    before = ys.cumsum(dim=1) - ys
    take = torch.minimum((give[:, None] - before).clamp_min(0), ys)
    out = y - torch.zeros_like(y).scatter(1, order, take)
    out = out.scatter_add(1, c0[:, None], give[:, None])
    return renormalise(out.clamp_min(1e-15), y)


class _SurrogateDefense(PosteriorDefenseBase):
    """A defense that keeps a surrogate classifier of the victim's kind (random or distilled)."""

    budgeted = True
    needs_fit = True

    def __init__(self) -> None:
        super().__init__()
        self._surrogate: nn.Module | None = None

    def fit(self, victim: nn.Module, fit_data: Tensor | None, device: torch.device | str = "cpu") -> None:
        """``surrogate="random"``: a seeded random copy of the victim's architecture (free);
        ``"distill"``: trained on the victim's posteriors of ``fit_data`` (cost:
        ``surrogate_epochs`` passes of the architecture over ``fit_data``)."""
        c = self._config
        if c["surrogate"] == "distill":
            if fit_data is None or fit_data.shape[0] < 2:
                raise ValueError(f"{self.name} with surrogate=distill needs fit_data (uint8 images the defender owns); "
                                 f"pass fit_data or use surrogate=random")
            net = distill_surrogate(victim, fit_data, epochs=c["surrogate_epochs"], seed=c["seed"], device=device)
        else:
            net = random_surrogate(victim, c["seed"]).to(device).eval().requires_grad_(False)
        self._surrogate = net
        self.fitted = {f"surrogate.{k}": v.detach().clone() for k, v in net.state_dict().items()}
        self._skeleton = victim

    def bind(self, victim: nn.Module) -> None:
        """Rebuild the surrogate module (architecture from ``victim``) from the fitted tensors."""
        self._skeleton = victim
        self._after_load()

    def _after_load(self) -> None:
        victim = getattr(self, "_skeleton", None)
        if victim is None:
            return
        device = next(iter(self.fitted.values())).device
        net = random_surrogate(victim, self._config["seed"])
        net.load_state_dict({k[len("surrogate."):]: v for k, v in self.fitted.items()})
        self._surrogate = net.to(device).eval().requires_grad_(False)

    def _surrogate_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        assert self._surrogate is not None, f"{self.name} is not fitted"
        dev = next(self._surrogate.parameters()).device
        with torch.no_grad():
            h = self._surrogate.features(images.to(dev)).float()
            return h, torch.softmax(self._surrogate.head(h).float(), dim=1)


class MAD(_SurrogateDefense):
    """Prediction poisoning by Maximizing Angular Deviation (Orekondy et al., "Prediction
    Poisoning: Towards Defenses Against DNN Model Stealing Attacks", ICLR'20; code:
    tribhuvanesh/prediction-poisoning @ce041492 ``defenses/victim/bb_mad.py``). See :func:`mad_perturb`.

    Args:
        epsilon: budget (default 0.5; the paper sweeps 0.01-2 in L1).
        norm: ``l1`` (default, the repo's ``ydist``), ``l2`` or ``kl`` (bisection).
        oracle: ``extreme`` (default, the repo's), ``argmax`` (argmax-preserving: MAD-argmax),
            ``random``, ``argmin``.
        objective: ``angular`` (default: the paper's angular deviation, ``objmax=True``) or
            ``surrogate`` (the unnormalised ``||G^T y~ - G^T y||^2``).
        surrogate: ``random`` (default: the defender does not know the attacker's model and
            uses a randomly initialised one of the victim's architecture — no fit cost, one
            extra forward per query) or ``distill``.
        surrogate_epochs: distillation epochs for ``surrogate=distill``.
        jacobian: ``closed_form`` (default, batched) or ``autograd`` (the reference per-sample
            Jacobian of the fc weight; same result, slower — used for the latency comparison).
        seed: surrogate initialisation and the ``random`` oracle.
    """

    name = "mad"

    def __init__(self, *, epsilon: float = 0.5, norm: str = "l1", oracle: str = "extreme", objective: str = "angular",
                 surrogate: str = "random", surrogate_epochs: int = 5, jacobian: str = "closed_form", seed: int = 0) -> None:
        super().__init__()
        check_params(self.name, [
            (is_number(epsilon) and epsilon >= 0, "epsilon", epsilon, "a number >= 0"),
            (norm in ("l1", "l2", "kl"), "norm", norm, "one of l1, l2, kl"),
            (oracle in MAD_ORACLES, "oracle", oracle, f"one of {', '.join(MAD_ORACLES)}"),
            (objective in ("angular", "surrogate"), "objective", objective, "one of angular, surrogate"),
            (surrogate in ("random", "distill"), "surrogate", surrogate, "one of random, distill"),
            (is_int(surrogate_epochs) and surrogate_epochs >= 1, "surrogate_epochs", surrogate_epochs, "an int >= 1"),
            (jacobian in ("closed_form", "autograd"), "jacobian", jacobian, "one of closed_form, autograd"),
            (is_int(seed), "seed", seed, "an int"),
        ])
        self._config = {"epsilon": float(epsilon), "norm": norm, "oracle": oracle, "objective": objective,
                        "surrogate": surrogate, "surrogate_epochs": int(surrogate_epochs), "jacobian": jacobian,
                        "seed": int(seed)}

    @property
    def keeps_top1(self) -> bool:  # type: ignore[override]
        """MAD-argmax keeps the top-1 label; the other oracles do not."""
        return self._config["oracle"] == "argmax"

    def _apply(self, probs: Tensor, user: str, state: dict[str, Any]) -> Tensor:
        assert self._images is not None
        c = self._config
        if probs.shape[0] == 0 or c["epsilon"] <= 0:
            return probs
        g = self._generator("oracle", user, state) if c["oracle"] == "random" else None
        if c["jacobian"] == "autograd":
            assert self._surrogate is not None
            dev = next(self._surrogate.parameters()).device
            G = mad_jacobian(self._surrogate, self._images.to(dev)).to(probs.device)
            if c["oracle"] == "argmax" and probs.shape[1] > _EXHAUSTIVE_MAX_K:
                raise ValueError("mad: jacobian=autograd supports the argmax oracle up to 12 classes; use closed_form")
            cand = mad_candidates(probs, c["oracle"], g)
            idx = _mad_objective_jacobian(G, cand, probs, c["objective"]).argmax(dim=1)
            ystar = cand[torch.arange(probs.shape[0], device=probs.device), idx]
            return linesearch(probs, ystar, c["epsilon"], c["norm"])
        _, p = self._surrogate_outputs(self._images)
        return mad_perturb(probs, p.to(probs.device), epsilon=c["epsilon"], norm=c["norm"], oracle=c["oracle"],
                           objective=c["objective"], generator=g)


class GRAD2(_SurrogateDefense):
    """GRAD² gradient redirection (Mazeika et al., ICML'22; code: mmazeika/model-stealing-defenses
    @fa59df45 ``batch_training/defenses.py:method_gradient_redirection``, as vendored by
    KacemKhaled/defending-extraction @a343cf3a). Untargeted: the perturbation minimises
    the inner product of the attacker's batch gradient with its unperturbed gradient, within
    an L1 ball (see :func:`grad2_direction`, :func:`grad2_perturb`).

    Args:
        epsilon: L1 budget (default 0.5). surrogate, surrogate_epochs, seed: as :class:`MAD`.

    The gradient is taken with respect to the surrogate's last linear layer (W and b), not
    every parameter as in the reference (which backprops the whole student); that keeps it
    batched and autograd-free (the brief's closed form). Not argmax-preserving.
    """

    name = "grad2"

    def __init__(self, *, epsilon: float = 0.5, surrogate: str = "random", surrogate_epochs: int = 5,
                 seed: int = 0) -> None:
        super().__init__()
        check_params(self.name, [
            (is_number(epsilon) and epsilon >= 0, "epsilon", epsilon, "a number >= 0"),
            (surrogate in ("random", "distill"), "surrogate", surrogate, "one of random, distill"),
            (is_int(surrogate_epochs) and surrogate_epochs >= 1, "surrogate_epochs", surrogate_epochs, "an int >= 1"),
            (is_int(seed), "seed", seed, "an int"),
        ])
        self._config = {"epsilon": float(epsilon), "surrogate": surrogate,
                        "surrogate_epochs": int(surrogate_epochs), "seed": int(seed)}

    def _apply(self, probs: Tensor, user: str, state: dict[str, Any]) -> Tensor:
        assert self._images is not None
        if probs.shape[0] == 0 or self._config["epsilon"] <= 0:
            return probs
        h, p = self._surrogate_outputs(self._images)
        g = grad2_direction(p.to(probs.device), h.to(probs.device), probs)
        return grad2_perturb(probs, g, self._config["epsilon"])
