"""Atomic checkpoints with a ``latest`` pointer, pruning, and torn-file-tolerant ``resume auto``.

A checkpoint is one ``torch.save`` dict written to a temp file of this process (fsync) and renamed
into place (:func:`atomic_write`); only then is ``latest`` (a one-line text file, itself replaced atomically) updated. On
resume every candidate is loaded with ``weights_only=True``; one that fails to load (torn by a
kill, truncated copy) is skipped with a warning and never used.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import torch

from victims.atomic import atomic_write, atomic_write_json, atomic_write_text  # the one atomic-write helper

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "save_checkpoint", "load_checkpoint", "find_latest", "resolve_resume", "atomic_torch_save", "config_diff",
           "describe_diff", "CheckpointWriteError", "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)
FORMAT = "sslsteal-ckpt/1"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, quota, file-size limit); nothing older was touched."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`; a full disk is a one-line :class:`CheckpointWriteError`."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:  # a full disk or quota (torch wraps some write errors in RuntimeError)
        why = os.strerror(e.errno) if getattr(e, "errno", None) else f"the write failed: {str(e).splitlines()[0][:100]}"
        raise CheckpointWriteError(f"could not write checkpoint {path} ({why}); the previous checkpoint in "
                                   f"{path.parent} is still valid; free space and rerun with --resume auto") from e


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as checkpoint ``step``, point ``latest`` at it, keep the newest ``keep``."""
    d = Path(ckpt_dir)
    path = d / f"ckpt-{step:09d}.pt"
    atomic_torch_save({"format": FORMAT, **state}, path)
    atomic_write_text(d / "latest", path.name + "\n")
    if keep > 0:
        for old in sorted(d.glob("ckpt-*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); one-line ValueError if it is not ours."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} not found; pass an existing file or resume=auto")
    from victims.safe_load import load_untrusted

    state = load_untrusted(p)  # one line naming a refused pickled object and the fix, or why it cannot be read
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {p} is not an sslsteal training checkpoint (format {FORMAT}); pass the run's ckpt folder or resume=none")
    return state


def find_latest(ckpt_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint in ``ckpt_dir`` (``latest`` first), or None."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    candidates: list[Path] = []
    pointer = d / "latest"
    if pointer.is_file():
        candidates.append(d / pointer.read_text().strip())
    candidates += sorted(d.glob("ckpt-*.pt"), reverse=True)
    seen = set()
    for c in candidates:
        if c in seen or not c.is_file():
            continue
        seen.add(c)
        try:
            return c, load_checkpoint(c)
        except ValueError as e:
            log.warning("skipping checkpoint: %s", e)
    return None


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """``none`` → None; ``auto`` → newest valid in ckpt_dir (or None); else the given path."""
    if resume in ("", "none", "no", "false"):
        return None
    if resume == "auto":
        return find_latest(ckpt_dir)
    return Path(resume), load_checkpoint(resume)


def config_diff(old: dict[str, Any], new: dict[str, Any], ignore: set[str] = frozenset(), prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (``ignore`` holds dotted keys).

    Keys the old config does not have (added by a later version) are not compared.
    """
    out = []
    for k in sorted(old):
        key = prefix + k
        if key in ignore:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, ignore, key + ".")
        elif a != b:
            out.append(key)
    return out


def describe_diff(old: dict[str, Any], new: dict[str, Any], keys: list[str]) -> str:
    """``train.lr 1.0 -> 0.5, ...`` for dotted ``keys`` of two nested config dicts."""
    def get(d: Any, key: str) -> Any:
        for part in key.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    return ", ".join(f"{k} {get(old, k)!r} -> {get(new, k)!r}" for k in keys)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, CUDA when present) in a weights_only-safe form."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    import numpy as np

    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
