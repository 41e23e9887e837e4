"""The attacker's counter-moves against encoder defenses; each fills a normal response cache.

From the adaptive attacks of B4B (Dubiński et al., "Bucks for Buckets (B4B): Active Defenses
Against Stealing Encoders", NeurIPS'23, code stapaw/b4b-active-encoder-defense @f66dc825: sybil
accounts in ``end2end-stealing/steal_model.py:train`` and ``end2end-stealing/train_mapper.py``) and
Dziedzic et al., ICML'22 (noise defenses, cleverhans-lab/ssl-attacks-defenses @1d3874ff). Each
one's fidelity row is in docs/fidelity.md:

* **repeat-and-average** (:class:`RepeatAverage`): every image is sent ``repeats`` times in one
  request — each copy is charged by the victim, once, under the caller's idempotency key — and the
  answers are averaged (in float64), which divides the variance of independent noise by ``repeats``
  (and is exactly what a similarity detector looks for);
* **coverage control** (:func:`coverage_controlled_queries`): query a narrow subset of the
  query pool, chosen by ``stealer.query_select.select_queries(strategy="coverage")``, so a
  coverage-priced defense (B4B) sees a small footprint;
* **sybils** (:func:`run_sybil_query_phase`): ``S`` accounts split the budget; a small overlap
  set is asked by every account, an affine map from each account's answer space to account 0's
  is fitted on it by ridge least squares (:func:`fit_affine_map`; B4B's ``train_mapper.py``
  trains a linear mapper with MSE — this is its closed form), and every answer, mapped into
  account 0's space, goes into an ordinary :class:`stealer.cache.ResponseCache`, so the normal
  train phase (:func:`stealer.steal.run_train_phase`) trains on it.

Every query goes through the victim's ledger, each sybil's answers are cached under its own
folder before any mapping, and a rerun skips every key already cached: nothing paid for is
lost or paid twice.

Scale (ImageNet: 100k-250k queries, ~110 KB a JPEG): the sybil phase never holds the caches. The
query keys are kept as one fixed-width byte array (``len(key)`` bytes a query); each account's cache is
indexed from its tar headers (:class:`_CacheIndex`: where each key's image, ``cls`` and ``npy`` members
lie, ~70 bytes a key plus the key, one account at a time); the map is fitted on the overlap answers alone
(``overlap x D`` floats), and the merged answers are read, mapped and written ``MERGE_BATCH`` answers
(and at most ``MERGE_BYTES`` of images) per ``write_batch``, in the same order as one write would.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from stealer.cache import ResponseCache
from stealer.data import ShardStream, open_shards
from stealer.steal import QueryTarget, StealConfig, query_preprocessing
from victims.purchase import takes_key

__all__ = ["RepeatAverage", "fit_affine_map", "apply_affine_map", "sybil_users", "run_sybil_query_phase",
           "coverage_controlled_queries"]

# merged sybil answers per write_batch (one tar each), and at most MERGE_BYTES of images in one (a larger image goes
# alone): what the merge holds at once, with ~3 float copies of the batch's answers (1024 x 2048 x 4 B = 8 MiB each)
MERGE_BATCH = 1024
MERGE_BYTES = 32 << 20


class RepeatAverage:
    """A victim wrapper that asks for every image ``repeats`` times and returns the mean answer.

    The ``repeats`` copies travel in one request (``images.repeat_interleave``), so the victim
    charges ``repeats`` queries per image; use it with ``query.num_queries = budget // repeats``.

    Paid once like every other path (issue 13): a caller's idempotency ``key`` becomes the key of the
    one request of ``N x R`` copies (:meth:`copies_key`), which a keyed victim (``victims.purchase``:
    the charge of all ``N x R`` images and their answer in one transaction) answers from its store when
    asked again after a crash, without a second charge; :meth:`answer` and :meth:`forget` let the query
    phase read such a kept answer back (averaged) and release it once cached. The mean is taken in
    float64 and cast back to the answer's dtype, so ``R`` float32 (or bf16) answers are averaged without
    the rounding of a running sum in their own precision.
    """

    def __init__(self, victim: QueryTarget, repeats: int) -> None:
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats={repeats!r} must be an int >= 1 (the number of paid copies per image)")
        self.victim, self.repeats = victim, repeats

    def describe(self) -> dict[str, Any]:
        return self.victim.describe()

    def __getattr__(self, name: str) -> Any:
        """Everything else is the wrapped victim's (``ledger``/``usage``: what the query phase reports as
        spent; ``precision``: what the response cache records)."""
        if name == "victim":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.victim, name)

    def copies_key(self, key: str) -> str:
        """The key of the ``R``-copies request bought for the caller's ``key`` (another question than the
        images asked once, so it never collides with a purchase of them under ``key`` itself)."""
        return f"{key}:x{self.repeats}"

    def _mean(self, reps: torch.Tensor, n: int) -> torch.Tensor:
        return reps.reshape(n, self.repeats, -1).double().mean(dim=1).to(reps.dtype)  # (N * R) x D -> N x D

    def query(self, images: torch.Tensor, user: str, *, key: str | None = None) -> torch.Tensor:
        copies = images.repeat_interleave(self.repeats, dim=0)
        if key is not None and takes_key(self.victim):  # one keyed purchase of all N x R copies
            reps = self.victim.query(copies, user, key=self.copies_key(key))  # type: ignore[call-arg]
        else:
            reps = self.victim.query(copies, user)  # charged per copy
        return self._mean(reps, images.shape[0])

    def answer(self, user: str, key: str) -> torch.Tensor | None:
        """The mean answer paid for under ``key`` (None: nothing kept, or a victim that keeps none)."""
        answer = getattr(self.victim, "answer", None)
        reps = answer(user, self.copies_key(key)) if callable(answer) else None
        return None if reps is None else self._mean(reps, reps.shape[0] // self.repeats)

    def forget(self, user: str, keys: Sequence[str]) -> int:
        """The victim drops the answers it kept for ``keys`` (cached by the caller now); returns how many."""
        forget = getattr(self.victim, "forget", None)
        return forget(user, [self.copies_key(k) for k in keys]) if callable(forget) else 0


def fit_affine_map(src: torch.Tensor, dst: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """``W [D_src + 1, D_dst]`` minimising ``||[src, 1] W - dst||^2 + lam ||W[:-1]||^2``.

    ``lam = ridge * trace(Xc^T Xc) / D_src`` for the centred ``src`` (scale-free); the bias row is
    not penalised (both sides are centred first). Solved in float64 by the normal equations.
    """
    if src.ndim != 2 or dst.ndim != 2 or src.shape[0] != dst.shape[0] or src.shape[0] < 2:
        raise ValueError(f"need paired answers [M, D] with M >= 2; got {list(src.shape)} and {list(dst.shape)}")
    x, y = src.double(), dst.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc  # D_src x D_src
    lam = ridge * float(torch.diagonal(gram).sum()) / x.shape[1]
    a = torch.linalg.solve(gram + lam * torch.eye(x.shape[1], dtype=torch.float64), xc.T @ yc)
    b = my - mx @ a
    return torch.cat([a, b[None]]).float()


def apply_affine_map(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ W[:-1] + W[-1]``."""
    return x.float() @ w[:-1] + w[-1]


def sybil_users(user: str, sybils: int) -> list[str]:
    """The account names of ``sybils`` accounts of ``user``."""
    return [f"{user}-sybil{i}" for i in range(sybils)]


def _read_cache(root: Path) -> dict[str, tuple[tuple[str, bytes], int, np.ndarray]]:
    """Every cached response in ``root``: key -> ((ext, image bytes), label, response). Holds every image:
    for small caches and tests; the sybil phase reads through :class:`_CacheIndex`."""
    import tarfile

    out: dict[str, Any] = {}
    for tar_path in sorted(root.glob("resp-*.tar")):
        parts: dict[str, dict[str, Any]] = {}
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                parts.setdefault(key, {})[ext] = data
        for key, p in parts.items():
            img_ext = next(e for e in p if e not in ("cls", "npy"))
            label = int(p["cls"]) if "cls" in p else -1
            out[key] = ((img_ext, p[img_ext]), label, np.load(io.BytesIO(p["npy"]), allow_pickle=False))
    return out


def _key_array(keys: Sequence[str]) -> np.ndarray:
    """``keys`` as one fixed-width byte array (numpy ``S``): ``len(key)`` bytes a key, sortable, no object per key."""
    return np.array([k.encode("utf-8") for k in keys], dtype=bytes) if len(keys) else np.empty(0, dtype="S1")


class _CacheIndex:
    """Where every answer of a response-cache folder lives, read from its tar headers (never the bytes).

    Per key: its tar and the ``(offset, size)`` of its image, ``cls`` and ``npy`` members (about 70 bytes
    a key plus the key itself, in numpy arrays). A key cached twice resolves to its copy in the last tar
    (name order) and, within a tar, to its last member of each kind: what a dict built over the folder
    (:func:`_read_cache`) holds.
    """

    COLS = ("tar", "ext", "img_off", "img_len", "cls_off", "cls_len", "npy_off", "npy_len")

    def __init__(self, root: Path) -> None:
        import tarfile
        from array import array

        from stealer.data import _local_tar_members  # the reader's header-only walk of a plain tar

        self.root = Path(root)
        self.files: list[str] = []
        self.exts: list[str] = []
        cols = {c: array("q") for c in self.COLS}
        keys: list[np.ndarray] = []
        for tar_path in sorted(self.root.glob("resp-*.tar")):
            members = _local_tar_members(str(tar_path))
            if members is None:  # pax or GNU headers (a long key): tarfile reads the headers instead
                with tarfile.open(tar_path) as t:
                    members = [(m.name, m.offset_data, m.size) for m in t]
            parts: dict[str, dict[str, tuple[int, int]]] = {}
            for name, off, size in members:
                key, ext = name.split(".", 1)
                parts.setdefault(key, {})[ext] = (off, size)
            if not parts:
                continue
            self.files.append(str(tar_path))
            for p in parts.values():
                img_ext = next(e for e in p if e not in ("cls", "npy"))
                if img_ext not in self.exts:
                    self.exts.append(img_ext)
                cls = p.get("cls", (0, -1))
                for c, v in zip(self.COLS, (len(self.files) - 1, self.exts.index(img_ext), *p[img_ext], *cls, *p["npy"])):
                    cols[c].append(v)
            keys.append(_key_array(list(parts)))
        self.cols = {c: np.frombuffer(a, dtype=np.int64) if len(a) else np.empty(0, np.int64) for c, a in cols.items()}
        allk = np.concatenate(keys) if keys else np.empty(0, dtype="S1")
        self.order = np.argsort(allk, kind="stable")  # equal keys keep file order: the last copy is the last one
        self.sorted = allk[self.order]

    def __len__(self) -> int:
        return len(self.sorted)

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """The row of each of ``keys`` (a key array); ValueError (one line) naming the first one not cached."""
        keys = np.asarray(keys)
        width = self.sorted.dtype.itemsize
        fits = np.char.str_len(keys) <= width if keys.dtype.itemsize > width else np.ones(len(keys), dtype=bool)
        q = keys.astype(self.sorted.dtype)
        pos = np.searchsorted(self.sorted, q, side="right") - 1
        ok = fits & (pos >= 0)
        ok[ok] = self.sorted[pos[ok]] == q[ok]
        if not ok.all():
            miss = keys[~ok]
            raise ValueError(f"response cache {self.root} holds no answer for {len(miss)} of the {len(keys)} query "
                             f"images it was asked (first: {miss[0].decode()!r}): the query set changed since they "
                             "were paid; use a new run name (name=...)")
        return self.order[pos]

    def responses(self, rows: np.ndarray, reader: Any) -> np.ndarray:
        """The cached responses of ``rows``, stacked ``[len(rows), D]`` in their cached dtype."""
        f, off, n = self.cols["tar"], self.cols["npy_off"], self.cols["npy_len"]
        return np.stack([np.load(io.BytesIO(reader.read(self.files[f[r]], int(off[r]), int(n[r]))), allow_pickle=False)
                         for r in rows])

    def samples(self, rows: np.ndarray, reader: Any) -> tuple[list[tuple[str, bytes]], list[int], np.ndarray]:
        """``(ext, image bytes)``, label (-1: none cached) and the stacked responses of ``rows``."""
        c = self.cols
        images, labels = [], []
        for r in rows:
            path = self.files[c["tar"][r]]
            images.append((self.exts[c["ext"][r]], reader.read(path, int(c["img_off"][r]), int(c["img_len"][r]))))
            labels.append(int(reader.read(path, int(c["cls_off"][r]), int(c["cls_len"][r]))) if c["cls_len"][r] >= 0
                          else -1)
        return images, labels, self.responses(rows, reader)

    def batches(self, rows: np.ndarray, max_count: int, max_bytes: int) -> list[slice]:
        """``rows`` cut in order into runs of at most ``max_count`` rows and ``max_bytes`` image bytes."""
        out, lo, size = [], 0, 0
        for i, b in enumerate(self.cols["img_len"][rows]):  # numpy ints one at a time, no list of them
            if i > lo and (i - lo == max_count or size + b > max_bytes):
                out.append(slice(lo, i))
                lo, size = i, 0
            size += b
        if len(rows) > lo:
            out.append(slice(lo, len(rows)))
        return out


def _legacy_victim(run: Path, users: list[str], desc: dict[str, Any], served: dict[str, Any] | None,
                   decoder: Any) -> dict[str, Any]:
    """The ``victim`` record to check the sybil caches against: ``desc``, or, for caches made before the sybil
    phase recorded ``victim_preprocess`` apart (its ``victim`` held ``preprocess``), their own form when the
    victim has no geometry (the same pixels: those paid answers stay valid). With a geometry their answers are
    about the full centre square, not the victim's view: refused, in one line."""
    paths = [run / "sybils" / u / "cache.json" for u in users] + [run / "cache" / "cache.json"]
    for path in paths:
        if not path.is_file():
            continue
        old = json.loads(path.read_text())
        if "victim_preprocess" in old or old.get("victim") != json.loads(json.dumps({**desc, "preprocess": served})):
            return desc  # today's form, or another victim: check_meta says which
        if decoder is not None and served is not None:
            raise ValueError(f"response cache {path.parent} was made before the sybil phase decoded with the victim's "
                             f"geometry (its answers are about the full centre square, not {served.get('preset')} "
                             f"Resize {served.get('resize')} + CenterCrop {served.get('crop')}); use a new run name (name=...)")
        return old["victim"]
    return desc


def run_sybil_query_phase(cfg: StealConfig, victim: QueryTarget, *, sybils: int, overlap: int,
                          ridge: float = 1e-3) -> dict[str, Any]:
    """Query the first ``query.num_queries`` images of the query set with ``sybils`` accounts, map
    every account's answers into account 0's space, and write them to ``<run>/cache``.

    Image ``i`` of the set (in its order) is asked by every account when ``i < overlap``, else by
    account ``(i - overlap) % sybils`` only. The accounts are ``sybil_users(cfg.victim.user, S)``;
    each one's raw answers are cached in ``<run>/sybils/<account>/``. The map of account ``s`` is
    fitted on the overlap answers (:func:`fit_affine_map`); overlap images keep account 0's
    answer. Spent: ``S * overlap + (n - overlap)`` queries. Single process (rank 0). The images are
    decoded, and the caches record the victim's preprocessing, as in the main query phase
    (:func:`stealer.steal.query_preprocessing`), so the train phase decodes the view it answered about.

    Returns:
        counts (``queries_sent``, ``cached``, per-account ``spent``) and, per account, the
        relative error of its map on held-out overlap images (``map_residual``: fitted on the first 80%
        of the overlap, ``||mapped - y0|| / ||y0 - mean(y0)||`` on the rest; 0 is perfect, 1 is no better
        than predicting the mean).
    """
    if not isinstance(sybils, int) or sybils < 1:
        raise ValueError(f"sybils={sybils!r} must be an int >= 1")
    shards = open_shards(cfg.data.query)
    n = shards.num_samples if cfg.query.num_queries is None else min(cfg.query.num_queries, shards.num_samples)
    if not 2 <= overlap <= n or (sybils > 1 and overlap >= n):
        raise ValueError(f"sybil overlap={overlap} must be in [2, {n - 1}] (the first n={n} query images are used)")
    users = sybil_users(cfg.victim.user, sybils)
    run = cfg.run_dir
    # as the main query phase (stealer.steal.query_preprocessing): every account's images are decoded with the
    # victim's declared geometry, and every cache records it, so the train phase reads the view it answered about
    desc, pre_record, decoder, served = query_preprocessing(cfg, victim.describe())
    caches = [ResponseCache(run / "sybils" / u, dtype="float32") for u in users]
    desc = _legacy_victim(run, users, desc, served, decoder)
    meta = {"victim": desc, "victim_preprocess": pre_record, "user": cfg.victim.user,
            "query_set": os.path.abspath(cfg.data.query), "sybils": sybils, "overlap": overlap, "out_dim": desc.get("out_dim"), "channels": cfg.data.channels,
            "image_size": [cfg.data.image_size] * 2, "classes": shards.manifest.get("classes", []),
            "image_ext": shards.manifest.get("image_ext", "png"), "defenses": cfg.victim.defenses,
            # answers at another precision are other answers; fp32 (None) leaves older caches valid
            "victim_precision": None if getattr(victim, "precision", "fp32") == "fp32" else victim.precision}
    for c in caches:
        c.check_meta(meta)
        c.write_meta(meta)
    done = [c.done_keys() for c in caches]
    stream = ShardStream(shards, batch_size=cfg.query.batch_size, shuffle=False, channels=cfg.data.channels,
                         image_size=cfg.data.image_size, limit=n, keep_bytes=True, decoder=decoder)
    sent = [0] * sybils
    parts: list[np.ndarray] = []  # the query keys in order, one fixed-width byte array per batch
    seen = 0
    for batch in stream.iter_epoch(0):
        idx = torch.arange(seen, seen + len(batch["key"]))
        seen += len(batch["key"])
        parts.append(_key_array(batch["key"]))
        for s, (u, cache) in enumerate(zip(users, caches)):
            mine = (idx < overlap) | ((idx - overlap) % sybils == s)
            todo = [i for i in torch.nonzero(mine).flatten().tolist() if batch["key"][i] not in done[s]]
            if not todo:
                continue
            sel = torch.tensor(todo)
            reps = victim.query(batch["image"][sel], u)  # charged by the victim, per image
            sent[s] += len(todo)
            cache.write_batch([batch["key"][i] for i in todo], [batch["bytes"][i] for i in todo],
                              batch["label"][sel].tolist(), reps.detach().float().cpu().numpy())
    batch = None  # the last batch's images are not kept through the merge
    keys = np.concatenate(parts) if parts else np.empty(0, dtype="S1")
    del parts
    over = keys[:overlap]
    from stealer.query_select import _Reader  # byte ranges of the cache tars, a few files kept open

    reader = _Reader()
    try:
        index = _CacheIndex(run / "sybils" / users[0])  # one account's index at a time
        y0 = torch.from_numpy(index.responses(index.rows(over), reader)).float()
        out = ResponseCache(run / "cache", dtype=cfg.query.dtype)
        out_meta = {**meta, "out_dim": int(y0.shape[1])}
        out.check_meta(out_meta)
        out.write_meta(out_meta)
        have = _key_array(sorted(out.done_keys()))
        residuals: dict[str, float] = {}
        for s, u in enumerate(users):
            w = None
            if s:
                index = _CacheIndex(run / "sybils" / u)
                ys = torch.from_numpy(index.responses(index.rows(over), reader)).float()
                cut = max(2, int(0.8 * overlap))  # held-out check of the map on the last fifth of the overlap
                if overlap - cut >= 1:
                    w = fit_affine_map(ys[:cut], y0[:cut], ridge)
                    err, ref = apply_affine_map(w, ys[cut:]) - y0[cut:], y0[cut:] - y0[:cut].mean(0)
                    residuals[u] = float(err.norm() / ref.norm().clamp_min(1e-12))
                w = fit_affine_map(ys, y0, ridge)
                del ys
            mine = keys[overlap + s::sybils]
            if s == 0:
                mine = np.concatenate([over, mine])
            if len(have):
                mine = mine[~np.isin(mine, have)]
            if not len(mine):
                continue
            rows = index.rows(mine)
            for part in index.batches(rows, MERGE_BATCH, MERGE_BYTES):  # the order one write_batch would take
                images, labels, resp = index.samples(rows[part], reader)
                r = torch.from_numpy(resp).float()
                r = apply_affine_map(w, r) if w is not None else r
                out.write_batch([k.decode("utf-8") for k in mine[part]], images, labels, r.numpy())
    finally:
        reader.close()
    manifest = out.finalize(source=f"sybil-mapped responses of {desc.get('arch', 'victim')} to {cfg.data.query}")
    stats = {"queries_sent": sum(sent), "sent_per_account": dict(zip(users, sent)), "cached": manifest["num_samples"],
             "query_set_size": n, "overlap": overlap, "sybils": sybils, "map_residual": residuals,
             "victim_preprocess": served}
    (run / "query_phase.json").write_text(json.dumps(stats, indent=1))
    return stats


def coverage_controlled_queries(cfg: StealConfig, n: int, out_dir: str | os.PathLike[str], *, spread: float = 0.0,
                                **kwargs: Any) -> str:
    """A narrow subset of ``n`` images of the query pool, chosen to keep the embedding coverage low.

    Delegates to ``stealer.query_select.select_queries(strategy="coverage", spread=spread)``:
    ``spread`` 0 (default) takes the ``n`` images nearest to a few k-means centres, 1 would be
    farthest-point sampling over the pool (the broadest set, the opposite of this attack).
    Returns the new shard folder (use it as ``data.query``); an existing selection is reused.
    ``n`` must be below the pool size for the subset to be narrower than the pool.
    """
    try:
        from stealer.query_select import select_queries
    except ImportError as e:  # the selector ships separately
        raise ImportError(f"coverage control needs stealer/query_select.py (select_queries); {e}") from None
    out = Path(out_dir)
    if not (out / "manifest.json").is_file():
        select_queries(cfg.data.query, str(out), n, "coverage", cfg.seed, spread=spread, **kwargs)
    return str(out)
