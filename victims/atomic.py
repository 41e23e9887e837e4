"""The one atomic-write helper of the project (standard library only).

Every file the project writes for others to read (checkpoints, ``latest``, manifests, shards,
the response cache's sidecars, configs, reports, victim checkpoints) goes through
:func:`atomic_write` or :func:`atomic_open`: the bytes go to a temp file of *this* process in
the target's folder (``.<name>.<pid>.<random>.tmp``, so two processes writing the same target
never share one), are fsynced, ``os.replace``d onto the target, and the folder is fsynced so the
rename itself survives a power cut. A reader sees the old file or the new one, never a torn one;
a write that fails (a full disk, ``RLIMIT_FSIZE``, a serializer that raises, a kill of the
writer's own thread by an exception) removes its temp file and leaves the old target untouched.

It lives in ``victims/`` because ``victims/`` must never import ``stealer/`` (the server ships
alone) while ``stealer/``, ``eval/`` and ``launch/`` may import ``victims/``: the one place every
package can reach. It depends on nothing but the standard library, so importing it costs nothing.
``stealer.ckpt`` re-exports it (``atomic_write``, ``atomic_write_text``, ``atomic_write_json``).
Pattern as in timm ``timm/utils/checkpoint_saver.py`` (huggingface/pytorch-image-models,
``CheckpointSaver._save``: write ``tmp``, then ``os.replace``), made per-process and fsynced.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

__all__ = ["atomic_write", "atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "create_once", "fsync_dir", "temp_name"]


def temp_name(path: str | os.PathLike) -> Path:
    """A temp path beside ``path`` unique to this process and call: ``.<name>.<pid>.<random>.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder so a rename into it is durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` on a clean exit (flush, fsync, ``os.replace``, fsync
    of the folder) and vanishes on an error, ``path`` untouched -- for writers that stream (a tar)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` atomically: ``write(f)`` into a binary temp file of this process, fsync,
    ``os.replace``, fsync the folder. Errors propagate (the caller words them); no temp is left."""
    with atomic_open(path) as f:
        write(f)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """:func:`atomic_write` of ``obj`` as JSON with a trailing newline (serialized before the temp is opened,
    so an object that does not serialize touches nothing)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def create_once(path: str | os.PathLike, text: str) -> str:
    """Create ``path`` holding ``text`` unless it exists; the first writer wins (``os.link`` of a complete,
    fsynced temp, which fails if the target exists). Returns the file's text as it stands afterwards."""
    path = Path(path)
    if path.is_file():
        have = path.read_text().strip()
        if have:
            return have
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            if not path.read_text().strip():  # an empty leftover of an older, non-atomic writer: replace it
                os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()
