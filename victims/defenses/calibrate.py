"""Fit a defense's free parameters to the defender's own data: the similarity threshold and B4B's centre.

Pure functions of the representations the victim serves for the defender's own images
(``features [N, D]``, in stream order); reading those images is the caller's job (it must decode
them as the service does, see :mod:`victims.preprocess`), so this module imports nothing of the
attacker's nor of ``eval/``. A chain spec may say ``threshold: calibrate`` (``similarity_noise``)
or ``center: calibrate`` (``b4b``); :func:`calibrate_chain` fills those in and
:func:`placeholder_chain` gives a spec that builds without the data, to check a chain before
anything is paid for.

Neither parameter is fitted in the reference code, which fixes both:

* ``similarity_noise``: cleverhans-lab/ssl-attacks-defenses @1d3874ff (Dziedzic et al., ICML'22),
  ``simclr.py`` (the "first type of perturbation defence" in the stealing loop) thresholds
  ``(cos + 1) / 2 > 0.8``, i.e. ``cos > 0.6``. Post-ReLU backbone features have pairwise cosines far
  above 0.6, so the fixed value replaces almost every answer; here the threshold is the
  ``quantile`` of the statistic :class:`~victims.defenses.SimilarityNoise` computes, so that share
  of an in-distribution stream is answered unchanged.
* ``b4b``: stapaw/b4b-active-encoder-defense @f66dc825 (Dubiński et al., NeurIPS'23) hashes raw
  representations with hyperplanes through the origin; post-ReLU features all lie in one orthant,
  where such hyperplanes barely split them. Centring them on the defender's mean representation
  is our departure (``center`` of :class:`~victims.defenses.B4B`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["CALIBRATE", "similarity_threshold", "mean_center", "calibrate_chain", "placeholder_chain", "needs_calibration"]

CALIBRATE = "calibrate"
#: (defense name, parameter) pairs that may read ``calibrate``
_FITTED = {("similarity_noise", "threshold"), ("b4b", "center")}


def similarity_threshold(features: torch.Tensor, quantile: float) -> float:
    """The ``quantile`` of ``s_i = max_{j<i} cos(f_i, f_j)`` over a stream of ``features`` (row order).

    ``s_i`` is what :class:`~victims.defenses.SimilarityNoise` with unlimited memory compares with its
    threshold for one user streaming these images; the first row has no earlier one and is left out.
    Computed in float64. Example: rows ``[1, 0], [1, 1], [0, 1]`` give ``s = [0.7071, 0.7071]``.
    """
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"similarity calibration needs >= 2 representations [N, D]; got shape {list(features.shape)}")
    if not 0 < quantile <= 1:
        raise ValueError(f"calibration quantile={quantile} must be in (0, 1]")
    z = torch.nn.functional.normalize(features.double(), dim=1)
    sim = (z @ z.T).tril(-1)
    sim = sim + torch.triu(torch.full_like(sim, -2.0))  # only earlier images count
    return float(torch.quantile(sim.amax(dim=1)[1:], quantile))


def mean_center(features: torch.Tensor) -> list[float]:
    """The defender's mean representation (float64 mean, returned as floats): B4B's ``center``."""
    if features.ndim != 2 or len(features) < 1:
        raise ValueError(f"B4B centre calibration needs representations [N, D]; got shape {list(features.shape)}")
    return features.double().mean(dim=0).float().tolist()


def needs_calibration(chain: list[dict[str, Any]]) -> bool:
    """Whether any spec of ``chain`` has a parameter set to ``calibrate``."""
    return any(v == CALIBRATE for spec in chain for v in spec.values())


def _check(spec: dict[str, Any]) -> None:
    for k, v in spec.items():
        if v == CALIBRATE and (spec.get("name"), k) not in _FITTED:
            allowed = ", ".join(f"{n}.{p}" for n, p in sorted(_FITTED))
            raise ValueError(f"defense {spec.get('name')!r}: {k}=calibrate cannot be fitted; only {allowed} can")


def placeholder_chain(chain: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``chain`` with each ``calibrate`` replaced by a value of the right kind (threshold 0.5, no centre),
    so :func:`victims.defenses.build_defenses` can check every other parameter before any data are read."""
    out = []
    for spec in chain:
        _check(spec)
        out.append({k: (None if k == "center" else 0.5) if v == CALIBRATE else v for k, v in spec.items()})
    return out


def calibrate_chain(chain: list[dict[str, Any]], features: Callable[[], torch.Tensor], *,
                    quantile: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``chain`` with every ``calibrate`` value fitted, and the fitted values ``{'threshold'?, 'center'?}``.

    ``features()`` returns the defender's own representations; it is called only when some value needs
    fitting (and by callers that cache it, once for every chain).
    """
    fitted: dict[str, Any] = {}
    out = []
    for spec in chain:
        _check(spec)
        spec = dict(spec)
        if spec.get("threshold") == CALIBRATE:
            spec["threshold"] = fitted["threshold"] = similarity_threshold(features(), quantile)
        if spec.get("center") == CALIBRATE:
            spec["center"] = fitted["center"] = mean_center(features())
        out.append(spec)
    return out, fitted
