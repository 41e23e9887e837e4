"""Strict JSON out of results that may hold NaN or infinite floats.

Python's ``json`` writes ``NaN``/``Infinity`` by default, which is not JSON: strict readers (``jq``,
JavaScript's ``JSON.parse``, Go, pandas with ``engine="pyarrow"``) reject the whole file. A kNN
``top5`` with fewer than 5 classes, a ratio over a zero top-1, a diverged loss are NaN in memory;
:func:`finite` turns every non-finite float (Python or NumPy) into ``None`` (JSON ``null``) and
:func:`dumps` writes the result with ``allow_nan=False``, so a non-finite value that slipped
through is an error here, not a file others cannot read. Readers take ``null`` as "not defined".

Example::

    >>> dumps({"top1": 0.5, "top5": float("nan")})
    '{"top1": 0.5, "top5": null}'
"""
from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["finite", "dumps"]


def finite(obj: Any) -> Any:
    """``obj`` with every NaN/±inf float (in dicts, lists, tuples, at any depth) replaced by None."""
    if isinstance(obj, float) or type(obj).__name__ in ("float16", "float32", "float64", "longdouble"):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps(finite(obj), allow_nan=False, **kwargs)``: strict JSON, non-finite floats as ``null``."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
