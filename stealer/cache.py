"""The response cache: every paid-for victim response, written back as shards keyed by ``__key__``.

Each answered query batch becomes one tar (``resp-r<rank>-<seq>.tar``: the query image's
original bytes, its ``cls`` when known, and the response as ``.npy``) plus a JSON sidecar of
its keys. The sidecar is written first and the tar renamed into place last, so a tar that
exists is complete, and a rerun skips every key it holds: **a response is paid for once**.
``finalize`` (rank 0, after all ranks are done) writes ``manifest.json``, which makes the
cache an ordinary shard folder that the training stream reads like any other.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["CacheWriteError", "ResponseCache"]

_DTYPES = {"float32": np.float32, "float16": np.float16}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


class CacheWriteError(OSError):
    """A batch of responses could not be written (full disk, quota); the cache folder is as it was."""


class ResponseCache:
    """A folder of response shards for one (victim, user, query set)."""

    def __init__(self, root: str | os.PathLike, *, rank: int = 0, dtype: str = "float32") -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"cache dtype {dtype!r} is not valid; choose one of: {', '.join(_DTYPES)}")
        self.root = Path(root)
        self.rank = rank
        self.dtype = dtype
        self.root.mkdir(parents=True, exist_ok=True)

    # -- what is already paid for -------------------------------------------------------
    def complete_shards(self) -> list[tuple[Path, dict[str, Any]]]:
        """``(tar, {"count", "keys"})`` of every complete response shard (any rank, any earlier run)."""
        out = []
        for tar in sorted(self.root.glob("resp-*.tar")):
            side = tar.with_suffix(".json")
            try:
                out.append((tar, json.loads(side.read_text())))
            except (OSError, json.JSONDecodeError):
                # sidecar lost: rebuild it from the tar itself (the tar is complete by construction)
                with tarfile.open(tar) as t:
                    keys = sorted({m.name.split(".", 1)[0] for m in t.getmembers()})
                meta = {"count": len(keys), "keys": keys}
                side.write_text(json.dumps(meta))
                out.append((tar, meta))
        return out

    def done_keys(self) -> set[str]:
        """Keys whose responses are already cached (by any rank, in any earlier run)."""
        return {k for _, meta in self.complete_shards() for k in meta["keys"]}

    def num_cached(self) -> int:
        return sum(int(meta["count"]) for _, meta in self.complete_shards())

    def check_meta(self, meta: dict[str, Any]) -> None:
        """Refuse to mix responses of another victim/user/representation into this cache."""
        path = self.root / "cache.json"
        if path.is_file():
            old = json.loads(path.read_text())
            # a key an older cache did not record is compatible when it is empty/off now
            diff = {k: (old.get(k), v) for k, v in meta.items()
                    if (old[k] != v if k in old else v not in (None, [], {}, False, ""))}
            if diff:
                raise ValueError(
                    f"response cache {self.root} was made with other settings {diff}; use a new run name or delete the cache"
                )

    def write_meta(self, meta: dict[str, Any]) -> None:
        path = self.root / "cache.json"
        if not path.is_file():
            tmp = path.with_name(f"cache.json.tmp{self.rank}")
            tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
            os.replace(tmp, path)

    # -- writing ----------------------------------------------------------------------------
    def write_batch(
        self,
        keys: Sequence[str],
        images: Sequence[tuple[str, bytes]],
        labels: Sequence[int],
        responses: np.ndarray,
    ) -> Path:
        """Persist one answered batch; returns the tar path."""
        if not (len(keys) == len(images) == len(labels) == len(responses)):
            raise ValueError("keys, images, labels and responses must have the same length")
        seq = len(list(self.root.glob(f"resp-r{self.rank:03d}-*.tar")))
        name = f"resp-r{self.rank:03d}-{seq:06d}"
        tar_path = self.root / f"{name}.tar"
        side = self.root / f"{name}.json"
        tmp = self.root / f"{name}.tar.tmp"
        resp = np.asarray(responses).astype(_DTYPES[self.dtype])
        side_tmp = side.with_name(side.name + ".tmp")
        try:
            side_tmp.write_text(json.dumps({"count": len(keys), "keys": list(keys)}))
            os.replace(side_tmp, side)
            with tarfile.open(tmp, "w") as tar:
                for k, (ext, data), lab, r in zip(keys, images, labels, resp):
                    _add(tar, f"{k}.{ext}", data)
                    if int(lab) >= 0:
                        _add(tar, f"{k}.cls", str(int(lab)).encode())
                    buf = io.BytesIO()
                    np.save(buf, r, allow_pickle=False)
                    _add(tar, f"{k}.npy", buf.getvalue())
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, tar_path)
        except OSError as e:  # a full disk or quota: leave the folder as it was (earlier shards intact)
            for leftover in (tmp, side_tmp, side):
                leftover.unlink(missing_ok=True)
            why = os.strerror(e.errno) if e.errno else str(e).splitlines()[0][:100]
            raise CacheWriteError(f"could not cache {len(keys)} answered queries in {self.root} ({why}); they are "
                                  f"charged but not kept, every earlier response is intact; free space and rerun "
                                  f"(a rerun pays only for what is not cached)") from e
        return tar_path

    def finalize(self, source: str = "") -> dict[str, Any]:
        """Write ``manifest.json`` over every complete response shard (call on one rank)."""
        from stealer.shards import write_manifest

        shards = [{"name": tar.name, "count": int(meta["count"])} for tar, meta in self.complete_shards()]
        meta = json.loads((self.root / "cache.json").read_text()) if (self.root / "cache.json").is_file() else {}
        manifest = {
            "format": "sslsteal-shards/1",
            "source": source or f"responses of {meta.get('victim', 'a victim')}",
            "num_samples": sum(s["count"] for s in shards),
            "classes": meta.get("classes", []),
            "channels": meta.get("channels"),
            "image_size": meta.get("image_size"),
            "image_ext": meta.get("image_ext", "png"),
            "shards": shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "responses": {"dim": meta.get("out_dim"), "dtype": self.dtype},
        }
        write_manifest(self.root, manifest)
        return manifest
