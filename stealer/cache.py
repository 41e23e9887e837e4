"""The response cache: every paid-for victim response, written back as shards keyed by ``__key__``.

Before a batch is bought, its keys are journaled (``journal-r<rank>.jsonl``, fsynced) under an
idempotency key derived from this cache's ``run_id`` and the image keys; the in-process victim
keeps each answer with its charge under that key, so a run killed between the charge and the
cache write reads the answer back on resume instead of buying it again
(:meth:`ResponseCache.recover_paid`), and a finished phase lets the victim forget what is cached
(:meth:`ResponseCache.settle_journal`); used by ``stealer.steal.run_query_phase`` and the classifier
attacks' ``stealer.classifier.cache.PosteriorCache``.

Each answered query batch becomes one tar (``resp-r<rank>-<seq>.tar``: the query image's
original bytes, its ``cls`` when known, and the response as ``.npy``) plus a JSON sidecar of
its keys. The sidecar is written first and the tar renamed into place last, so a tar that
exists is complete, and a rerun skips every key it holds: **a response is paid for once**.
``finalize`` (rank 0, after all ranks are done) writes ``manifest.json``, which makes the
cache an ordinary shard folder that the training stream reads like any other.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import tarfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stealer.shards import make_manifest, tar_writer, write_manifest
from victims.atomic import atomic_write_json, atomic_write_text, create_once

__all__ = ["CacheWriteError", "ResponseCache"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": np.float32, "float16": np.float16}


def _pre_text(rec: Any) -> str:
    """A recorded victim preprocessing as one phrase (None: the project's own, from the checkpoint's record)."""
    if not rec:
        return "'project' (the checkpoint's own record)"
    from victims.preprocess import Preprocess

    try:
        return repr(Preprocess.from_record(rec).describe())
    except (KeyError, TypeError, ValueError):
        return repr(rec)


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
        self._seq: int | None = None  # this rank's next shard number: one glob per cache object, not one per batch

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
                atomic_write_json(side, meta, indent=None)
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
            if "victim_preprocess" in diff:  # the answers to the same images under other pixels are other answers
                was, now = diff["victim_preprocess"]
                raise ValueError(
                    f"response cache {self.root} holds answers made under victim preprocessing {_pre_text(was)}; this "
                    f"run's victim uses {_pre_text(now)}; set victim.preprocess/mean/std/resize/crop back, or use a new "
                    f"run name (name=...) for answers under the new preprocessing"
                )
            if diff:
                raise ValueError(
                    f"response cache {self.root} was made with other settings {diff}; use a new run name or delete the cache"
                )

    def write_meta(self, meta: dict[str, Any]) -> None:
        path = self.root / "cache.json"
        if not path.is_file():
            atomic_write_json(path, meta, sort_keys=True)

    # -- the purchase journal -----------------------------------------------------------------
    def run_id(self) -> str:
        """This cache's random id (``run_id``, made once, atomically, by whichever rank comes first):
        with the image keys it names a purchase (:meth:`batch_key`), so a new cache buys anew."""
        return create_once(self.root / "run_id", secrets.token_hex(16))

    def batch_key(self, user: str, keys: Sequence[str]) -> str:
        """The idempotency key of buying the answers to ``keys`` for ``user`` in this cache."""
        h = hashlib.sha256(f"{self.run_id()}\n{user}\n".encode())
        h.update("\n".join(keys).encode())
        return "q:" + h.hexdigest()[:40]

    def intend(self, batch_key: str, keys: Sequence[str]) -> None:
        """Journal (appended and fsynced) that the answers to ``keys`` are about to be bought under
        ``batch_key``: after a crash, :meth:`intents` says which purchases to ask the victim for."""
        with open(self.root / f"journal-r{self.rank:03d}.jsonl", "a") as f:
            f.write(json.dumps({"batch": batch_key, "keys": list(keys)}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def intents(self) -> list[tuple[str, list[str]]]:
        """``(batch_key, keys)`` of every journaled purchase (all ranks); a line torn by a crash is skipped."""
        out = []
        for path in sorted(self.root.glob("journal-r*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    out.append((str(rec["batch"]), [str(k) for k in rec["keys"]]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        return out

    def rewrite_journal(self, intents: Sequence[tuple[str, Sequence[str]]]) -> None:
        """Keep only ``intents`` in the journal (one rank, when no other is writing): the
        purchases not yet cached. An empty list removes the journal."""
        keep = self.root / "journal-r000.jsonl"
        if intents:
            atomic_write_text(keep, "".join(json.dumps({"batch": b, "keys": list(k)}) + "\n" for b, k in intents))
        for path in self.root.glob("journal-r*.jsonl"):
            if not intents or path != keep:
                path.unlink(missing_ok=True)

    def recover_paid(self, victim: Any, user: str, done: set[str], per_image: int = 1,
                     raw: bool = True) -> dict[str, np.ndarray]:
        """``{image key: response}`` of every journaled purchase the victim still keeps an answer for
        (a run killed after paying, before caching): read back, never bought again. Empty for a victim
        that keeps none (HTTP: the server answers a repeated key from its own store instead).

        Args:
            victim: the transport; its ``answer(user, key)`` (``victims.api.VictimAPI``,
                ``victims.posterior_api.PosteriorAPI``) returns a kept answer or None.
            done: image keys already cached (their purchases are skipped).
            per_image: answers bought per image (an attack's views), view-major in the kept answer.
            raw: one answer per image (``per_image`` 1); else each image gets its ``[V, D]`` views.
        """
        answer = getattr(victim, "answer", None)
        out: dict[str, np.ndarray] = {}
        if not callable(answer):
            return out
        for paid_key, keys in self.intents():
            if all(k in done for k in keys):
                continue
            reps = answer(user, paid_key)
            if reps is None:  # journaled, never paid (killed before the charge committed)
                continue
            reps = reps.float().numpy()
            if not raw:
                reps = reps.reshape(per_image, len(keys), -1).transpose(1, 0, 2)
            out.update(zip(keys, reps))
        if out:
            log.warning("recovered %d answers paid for by an earlier run but not cached; they are not bought again",
                        len(out))
        return out

    def settle_journal(self, victim: Any, user: str) -> None:
        """After a finished phase (one rank, when no other is buying): the victim forgets the answers it
        kept for purchases now cached (``victim.forget(user, keys)``, where it has one), the journal keeps
        the rest."""
        done = self.done_keys()
        intents = self.intents()
        settled = [b for b, keys in intents if all(k in done for k in keys)]
        forget = getattr(victim, "forget", None)
        if callable(forget) and settled:
            forget(user, settled)
        self.rewrite_journal([(b, keys) for b, keys in intents if b not in set(settled)])

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
        if self._seq is None:  # a glob per batch cost O(shards) each, O(N^2) over a phase (~450 s at 1M queries)
            self._seq = len(list(self.root.glob(f"resp-r{self.rank:03d}-*.tar")))
        seq = self._seq
        name = f"resp-r{self.rank:03d}-{seq:06d}"
        tar_path = self.root / f"{name}.tar"
        side = self.root / f"{name}.json"
        resp = np.asarray(responses).astype(_DTYPES[self.dtype])
        try:
            atomic_write_json(side, {"count": len(keys), "keys": list(keys)}, indent=None)
            with tar_writer(tar_path) as add:  # the shard format's own writer: the tar appears only complete
                for k, (ext, data), lab, r in zip(keys, images, labels, resp):
                    add(f"{k}.{ext}", data)
                    if int(lab) >= 0:
                        add(f"{k}.cls", str(int(lab)).encode())
                    buf = io.BytesIO()
                    np.save(buf, r, allow_pickle=False)
                    add(f"{k}.npy", buf.getvalue())
        except OSError as e:  # a full disk or quota: leave the folder as it was (earlier shards intact)
            side.unlink(missing_ok=True)
            why = os.strerror(e.errno) if e.errno else str(e).splitlines()[0][:100]
            raise CacheWriteError(f"could not cache {len(keys)} answered queries in {self.root} ({why}); they are "
                                  f"charged but not kept, every earlier response is intact; free space and rerun "
                                  f"(a rerun pays only for what is not cached)") from e
        self._seq = seq + 1
        return tar_path

    def finalize(self, source: str = "") -> dict[str, Any]:
        """Write ``manifest.json`` over every complete response shard (call on one rank)."""
        shards = [{"name": tar.name, "count": int(meta["count"])} for tar, meta in self.complete_shards()]
        meta = json.loads((self.root / "cache.json").read_text()) if (self.root / "cache.json").is_file() else {}
        manifest = make_manifest(source=source or f"responses of {meta.get('victim', 'a victim')}",
                                 classes=meta.get("classes", []), channels=meta.get("channels"),
                                 image_size=meta.get("image_size"), image_ext=meta.get("image_ext", "png"), shards=shards,
                                 responses={"dim": meta.get("out_dim"), "dtype": self.dtype})
        write_manifest(self.root, manifest)
        return manifest
