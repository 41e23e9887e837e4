"""``torch.load(weights_only=True)`` with one-line errors that name the file, the refused object and the fix.

Files from elsewhere are untrusted (ARCHITECTURE.md, principle 3): every checkpoint is read with
``weights_only=True``, which refuses any pickled global it does not know (a class, a function).
torch words that refusal as a dozen lines with terminal escapes and never says which object it
was; :func:`load_untrusted` turns it into one plain line::

    runs/x/student.pt holds a pickled Python object (__main__.Net) that a safe load refuses ...

Lives in ``victims/`` (the defender's side imports nothing of the attacker's); ``stealer.ckpt``
uses it too.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch

__all__ = ["load_untrusted", "load_error_message", "refused_global"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|Unsupported class)\s+([A-Za-z_][\w.]*)")


def refused_global(exc: BaseException) -> str | None:
    """The dotted name of the global torch's weights-only unpickler refused (``__main__.Net``), if it says."""
    m = _GLOBAL.search(_ANSI.sub("", str(exc)))
    return m.group(1) if m else None


def load_error_message(path: str | os.PathLike[str], exc: BaseException, what: str = "checkpoint") -> str:
    """One line (no terminal escapes) for a failed safe load of ``path``: the refused object and the fix,
    or the first line of any other error."""
    name = refused_global(exc) if isinstance(exc, pickle.UnpicklingError) else None
    if name is not None:
        return (f"{what} {os.fspath(path)} holds a pickled Python object ({name}) that a safe load refuses "
                f"(weights_only=True: a pickle can run code); pass a file written by this project, or re-save it "
                f"from a trusted session as tensors only, e.g. torch.save(model.state_dict(), path)")
    text = " ".join(_ANSI.sub("", str(exc)).split())
    first = text.split(". ")[0][:160] if text else ""
    return (f"{what} {os.fspath(path)} is not a readable torch checkpoint ({type(exc).__name__}: {first}); "
            f"it is torn or not a {what}")


def load_untrusted(path: str | os.PathLike[str], what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; a ValueError of one line when it fails."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not a file we can read safely"
        raise ValueError(load_error_message(path, e, what)) from None
