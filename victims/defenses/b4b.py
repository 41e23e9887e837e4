"""B4B: Dubiński, Pawlak, Boenisch, Trzciński, Dziedzic, "Bucks for Buckets (B4B): Active
Defenses Against Stealing Encoders", NeurIPS 2023 (code: stapaw/b4b-active-encoder-defense @f66dc825).

Three blocks, per user:

1. **Coverage** of the embedding space, measured online with locality-sensitive hashing:
   ``n_projections`` independent sets of ``n_bits`` random hyperplanes through the origin
   (Gaussian normals, as ``np.random.randn(dim, num_rvecs)`` in their ``buckets.py``) send a
   representation to a bucket id per set (:func:`lsh_bucket_ids`); a user's coverage is
   the fraction of the ``2**n_bits`` buckets they have occupied, averaged over the sets.
2. **Cost**: Gaussian noise of std ``lam * (exp(ln(alpha / lam) * coverage / beta) - 1)``
   (:func:`b4b_noise_std`) is added to the answers; it is 0 at coverage 0, ``alpha - lam``
   at ``coverage = beta``, and grows exponentially beyond.
3. **Per-user secret transformation** of the noised answers, so representations collected
   by several accounts (sybils) do not line up (:data:`TRANSFORMS`).

Defaults and where they come from (``end2end-stealing/steal_model.py``, ``buckets.py``,
``train_mapper.py`` and ``config/benchmark/embeddings/transform/*.yaml`` of their repo):
``--lam 1e-6``, ``--alpha 0.8``, ``--beta 80`` with coverage in percent (``100 * buckets /
2**num_rvecs``), i.e. ``beta = 0.8`` as a fraction here; ``--num_rvecs 12`` hyperplanes
(4096 buckets); ``proj_count=20`` sets; ``pad_dim`` = the representation dim and
``binary_relative_dim: 2``. Their noise scale was calibrated on ImageNet SimSiam/DINO
features; a victim whose features have another scale needs its own ``alpha``.

What differs from their code, and why: they compute coverage offline (a precomputed
curve, ``buckets.py:compute_buckets_covered``, entry k = the coverage after batch k) —
here it is updated online with every batch of every user. Their stealing loop
(``steal_model.py:get_stdev``) reads that curve through ``np.repeat(buckets_covered, 2)``,
i.e. batch i gets the coverage after batch ``i // 2``; ``noise_index="half"`` reproduces
that exactly. The default ``noise_index="after"`` prices batch i at the coverage *after*
batch i is counted (the paper's cost of the user's coverage, and what the README's B4B
figures were measured with): their repeat-by-2 matches a curve computed at twice the
stealing batch size, which an online defense does not have, and with equal batch sizes it
lags the user's real coverage by half their batches. Their end-to-end ``affine`` is ``x @ A + B`` with ``A, B ~ U(-1, 1)``; their
benchmark ``affine`` is a diagonal scale and shift; here ``A`` is a random orthogonal
matrix (a legitimate user's geometry — distances, angles up to the shift — is kept
exactly) and ``B ~ U(-1, 1)``.

Example::

    >>> b4b = B4B(seed=secret)                       # paper defaults, affine transform
    >>> answer = b4b(reps, images, "alice")
    >>> b4b.coverage("alice")                        # fraction of buckets alice filled
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from victims.defenses.base import UserStateDefense, check_params, generator, is_int, is_number

__all__ = ["TRANSFORMS", "B4B", "b4b_noise_std", "lsh_bucket_ids"]

#: Per-user transformations B4B may apply after the noise (see :class:`B4B`).
TRANSFORMS = ("none", "affine", "pad_shuffle", "affine_pad_shuffle", "binary")
_MAX_BITS = 24  # a user's occupancy is n_projections x 2**n_bits booleans
_NOISE_INDEX = ("after", "half")  # which coverage prices batch i (see B4B)
_CACHE = 8  # per-user transformation parameters kept in memory (recomputable from the seed)


def b4b_noise_std(coverage: float, lam: float, alpha: float, beta: float) -> float:
    """B4B's cost function: ``lam * (exp(ln(alpha / lam) * coverage / beta) - 1)``, at least 0.

    ``coverage`` and ``beta`` in the same unit (fractions here; the repo uses percent).
    """
    return max(lam * (math.exp(math.log(alpha / lam) * coverage / beta) - 1.0), 0.0)


def lsh_bucket_ids(reps: Tensor, planes: Tensor) -> Tensor:
    """Bucket id of each representation under each set of hyperplanes.

    Args:
        reps: ``[N, D]``.
        planes: ``[P, D, B]``: P sets of B hyperplane normals (columns), through the origin.

    Returns:
        ``[P, N]`` int64: ``sum_b [reps_n . planes[p, :, b] > 0] * 2**b`` (bit ``b`` is the
        side of hyperplane ``b``; a point on a hyperplane counts as the negative side).
    """
    bits = torch.einsum("nd,pdb->pnb", reps, planes.to(reps.device, reps.dtype)) > 0  # P x N x B
    weights = 2 ** torch.arange(planes.shape[2], device=reps.device)  # B
    return (bits.long() * weights).sum(dim=2)


class B4B(UserStateDefense):
    """Bucks for Buckets: noise that grows with a user's coverage, then a per-user transform.

    For a batch ``reps [N, D]`` of user ``u``: (1) mark the buckets of every row in ``u``'s
    occupancy, (2) ``c = coverage(u)`` including this batch, (3) add i.i.d.
    ``N(0, b4b_noise_std(c)^2)`` noise drawn from ``(seed, u, batch index)``, (4) apply
    ``u``'s secret transformation:

    * ``none``: nothing;
    * ``affine``: ``y @ Q_u + b_u``, ``Q_u`` random orthogonal ``[D, D]``, ``b_u ~ U(-1, 1)^D``;
    * ``pad_shuffle``: append ``pad_dim`` values ``p_u ~ N(0, 1)`` (fixed per user, as
      their ``PadAndShuffleTransform``) and permute the ``D + pad_dim`` coordinates by a
      per-user permutation; the answer has ``D + pad_dim`` dims;
    * ``affine_pad_shuffle``: ``affine`` then ``pad_shuffle``;
    * ``binary``: their ``BinaryTransform``: ``K = int(binary_factor * D)`` random affine
      hyperplanes, hyperplane ``k`` with normal ``(-tan(a_1), ..., -tan(a_{D-1}), 1)``,
      ``a ~ U(0, 2 pi)``, through a point ``q_k`` drawn uniformly from the grid
      ``{0, 1/999, ..., 1}^D``; the answer is bit ``k`` = ``[y . w_k > w_k . q_k]``
      (0.0 / 1.0), ``K`` dims.

    Each user's transformation is derived from ``(seed, user)`` alone: ``seed`` is the
    server's secret. The LSH hyperplanes are shared by all users (derived from ``seed``).

    Args:
        lam: lambda, the scale of the cost curve (default 1e-6).
        alpha: sets the noise std at ``coverage = beta``, ``alpha - lam`` (default 0.8).
        beta: coverage (fraction) at which the std reaches ``alpha`` (default 0.8 = their 80%).
        n_bits: hyperplanes per set; ``2**n_bits`` buckets (default 12, at most 24).
        n_projections: independent hyperplane sets averaged (default 20).
        transform: one of :data:`TRANSFORMS` (default ``affine``).
        pad_dim: dims appended by ``pad_shuffle`` (default None = D, as their config).
        binary_factor: answer dims per representation dim for ``binary`` (default 2).
        noise_index: ``after`` (default): batch i's noise uses the coverage after batch i;
            ``half``: the coverage after batch ``i // 2`` of that user, as the reference
            loop indexes its curve (``steal_model.py:get_stdev``).
        center: the defender's mean representation (e.g. over its own training data),
            subtracted before hashing only (default None = hash the raw representation, as
            their code does). Post-ReLU features are all non-negative and far from the
            origin, so hyperplanes through the origin barely split them: on the demo victim
            3,000 queries fill 2% of 4,096 buckets raw and 7% centred, 28% vs 75% of 64.
        seed: the secret behind the hyperplanes, the noise and the transformations.
    """

    name = "b4b"

    def __init__(
        self,
        *,
        lam: float = 1e-6,
        alpha: float = 0.8,
        beta: float = 0.8,
        n_bits: int = 12,
        n_projections: int = 20,
        transform: str = "affine",
        pad_dim: int | None = None,
        binary_factor: float = 2.0,
        noise_index: str = "after",
        center: Any = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        lam_ok = is_number(lam) and lam > 0
        check_params(self.name, [
            (lam_ok, "lam", lam, "a number > 0"),
            (is_number(alpha) and lam_ok and alpha > lam, "alpha", alpha, f"a number > lam ({lam})"),
            (is_number(beta) and beta > 0, "beta", beta, "a number > 0 (a coverage fraction)"),
            (is_int(n_bits) and 1 <= n_bits <= _MAX_BITS,
             "n_bits", n_bits, f"an int in [1, {_MAX_BITS}]"),
            (is_int(n_projections) and n_projections >= 1,
             "n_projections", n_projections, "an int >= 1"),
            (transform in TRANSFORMS, "transform", transform, f"one of {', '.join(TRANSFORMS)}"),
            (pad_dim is None or (is_int(pad_dim) and pad_dim >= 0),
             "pad_dim", pad_dim, "None or an int >= 0"),
            (is_number(binary_factor) and binary_factor > 0,
             "binary_factor", binary_factor, "a number > 0"),
            (noise_index in _NOISE_INDEX, "noise_index", noise_index, f"one of {', '.join(_NOISE_INDEX)}"),
            (center is None or (isinstance(center, (list, tuple, Tensor)) and len(center) > 0
                                and all((isinstance(c, Tensor) or is_number(c)) and math.isfinite(float(c)) for c in center)),
             "center", "<vector>" if center is not None else None, "None or a list of finite numbers (the mean representation)"),
            (is_int(seed), "seed", seed, "an int"),
        ])
        self._center = None if center is None else torch.as_tensor([float(c) for c in center], dtype=torch.float32)
        self._config = {
            "lam": float(lam),
            "alpha": float(alpha),
            "beta": float(beta),
            "n_bits": int(n_bits),
            "n_projections": int(n_projections),
            "transform": str(transform),
            "pad_dim": None if pad_dim is None else int(pad_dim),
            "binary_factor": float(binary_factor),
            "center": None if center is None else [float(c) for c in center],
            "seed": int(seed),
        }
        if noise_index != "after":  # only when set: states saved before the option still load
            self._config["noise_index"] = str(noise_index)
        self._planes: dict[int, Tensor] = {}
        self._planes_on: dict[tuple[int, str], Tensor] = {}
        self._secrets: OrderedDict[tuple[str, str, int, str], tuple[Tensor, ...]] = OrderedDict()

    # ------------------------------------------------------------------ coverage
    def _new_user(self) -> dict[str, Any]:
        cfg = self._config
        occupied = torch.zeros(cfg["n_projections"], 2 ** cfg["n_bits"], dtype=torch.bool)
        state: dict[str, Any] = {"batches": 0, "queries": 0, "occupied": occupied}
        if cfg.get("noise_index") == "half":
            state["history"] = []  # history[k] = coverage after the user's batch k
        return state

    def hyperplanes(self, dim: int) -> Tensor:
        """LSH hyperplane normals for ``dim``-dimensional representations: ``[P, dim, n_bits]``."""
        with self._lock:
            if dim not in self._planes:
                g = generator(self._config["seed"], self.name, "lsh", dim)
                shape = (self._config["n_projections"], dim, self._config["n_bits"])
                self._planes[dim] = torch.randn(shape, generator=g)
            return self._planes[dim]

    def _device_planes(self, dim: int, device: torch.device) -> Tensor:
        key = (dim, str(device))
        if key not in self._planes_on:
            self._planes_on[key] = self.hyperplanes(dim).to(device)
        return self._planes_on[key]

    def coverage(self, user: str) -> float:
        """Fraction of the buckets ``user`` has occupied, averaged over the hyperplane sets."""
        with self._lock:
            if user not in self._users:
                return 0.0
            occupied = self._users[user]["occupied"]
            return float(occupied.sum(dim=1).double().mean()) / occupied.shape[1]

    def noise_std(self, user: str) -> float:
        """The std of the noise at ``user``'s current coverage (with ``noise_index="half"``:
        at the coverage the user's next batch is priced at, when already known)."""
        cfg = self._config
        coverage = self.coverage(user)
        with self._lock:
            state = self._users.get(user)
            if state is not None and "history" in state and state["batches"] // 2 < len(state["history"]):
                coverage = state["history"][state["batches"] // 2]
        return b4b_noise_std(coverage, cfg["lam"], cfg["alpha"], cfg["beta"])

    def out_dim(self, dim: int) -> int:
        """Dimension of the answers to ``dim``-dimensional representations."""
        transform = self._config["transform"]
        if transform in ("pad_shuffle", "affine_pad_shuffle"):
            return dim + self._pad_dim(dim)
        if transform == "binary":
            return self._binary_dim(dim)
        return dim

    # ------------------------------------------------------------------ per-user secrets
    def _pad_dim(self, dim: int) -> int:
        pad = self._config["pad_dim"]
        return dim if pad is None else pad

    def _binary_dim(self, dim: int) -> int:
        return max(1, int(dim * self._config["binary_factor"]))

    def _secret(
        self, kind: str, user: str, dim: int, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, ...]:
        """``user``'s parameters of transformation ``kind``, derived from ``(seed, user)``."""
        key = (kind, user, dim, str(device))
        if key in self._secrets:
            self._secrets.move_to_end(key)
            return self._secrets[key]
        g = generator(self._config["seed"], self.name, kind, user, dim)
        params: tuple[Tensor, ...]
        if kind == "affine":
            q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r))  # Haar-distributed orthogonal matrix
            params = (q.float(), torch.rand(dim, generator=g) * 2 - 1)
        elif kind == "pad_shuffle":
            pad = self._pad_dim(dim)
            params = (torch.randn(pad, generator=g), torch.randperm(dim + pad, generator=g))
        else:  # binary
            k = self._binary_dim(dim)
            angles = torch.rand(dim - 1, k, generator=g, dtype=torch.float64) * (2 * math.pi)
            slopes = torch.cat([-torch.tan(angles), torch.ones(1, k, dtype=torch.float64)])  # D x K
            grid = torch.randint(0, 1000, (k, dim), generator=g, dtype=torch.float64)
            points = grid / 999  # K x D, uniform over {0, 1/999, ..., 1}^D
            intercepts = (slopes * points.T).sum(dim=0)  # K
            params = (slopes, intercepts)
        params = tuple(p.to(device) for p in params)
        self._secrets[key] = params
        while len(self._secrets) > _CACHE:
            self._secrets.popitem(last=False)
        return params

    def transform(self, y: Tensor, user: str) -> Tensor:
        """Apply ``user``'s secret transformation to ``y [N, D]`` (no noise, no state change)."""
        with self._lock:
            kind = self._config["transform"]
            dim = y.shape[1]
            if kind in ("affine", "affine_pad_shuffle"):
                q, b = self._secret("affine", user, dim, y.device)
                y = y @ q.to(y.dtype) + b.to(y.dtype)
            if kind in ("pad_shuffle", "affine_pad_shuffle"):
                pad, perm = self._secret("pad_shuffle", user, dim, y.device)
                y = torch.cat([y, pad.to(y.dtype).expand(y.shape[0], -1)], dim=1)[:, perm]
            if kind == "binary":
                slopes, intercepts = self._secret("binary", user, dim, y.device)
                y = (y.double() @ slopes > intercepts).to(y.dtype)  # N x K
            return y

    # ------------------------------------------------------------------ the defense
    def _apply(self, reps: Tensor, user: str, state: dict[str, Any]) -> Tensor:
        cfg = self._config
        if reps.shape[0]:
            planes = self._device_planes(reps.shape[1], reps.device)
            hashed = reps if self._center is None else reps - self._center.to(reps.device, reps.dtype)
            if self._center is not None and self._center.numel() != reps.shape[1]:
                raise ValueError(f"b4b center has {self._center.numel()} dims but the representations have {reps.shape[1]}; "
                                 f"fit the center on this victim's outputs")
            ids = lsh_bucket_ids(hashed, planes).cpu()  # P x N
            rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
            state["occupied"][rows, ids] = True
        coverage = float(state["occupied"].sum(dim=1).double().mean()) / state["occupied"].shape[1]
        if "history" in state and reps.shape[0]:  # noise_index="half": the reference's curve[i // 2]
            state["history"].append(coverage)
            coverage = state["history"][state["batches"] // 2]
        std = b4b_noise_std(coverage, cfg["lam"], cfg["alpha"], cfg["beta"])
        noise = torch.randn(reps.shape, generator=self._generator("noise", user, state)) * std
        return self.transform(reps + noise.to(reps.device), user)
