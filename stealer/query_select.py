"""Query-set choices: which images an attacker sends, written as a new shard folder.

The ICML'22 stealing paper (Dziedzic et al., "On the Difficulty of Defending Self-Supervised
Learning against Model Extraction", ICML 2022, Sec. 5 and Table 3) compares query sets: images of
the victim's own distribution against another dataset, and how many of them. This module cuts a
subset of ``n`` images out of a pool of query images (a shard folder) by one of:

``random``
    ``n`` images drawn uniformly without replacement (``seed``).
``class_balanced``
    ``n // C`` images of each of the ``C`` classes (the remainder to ``n mod C`` classes drawn at
    random), written class-interleaved so every prefix stays balanced. Needs labels; a class with
    too few images is an error naming it.
``coverage``
    coverage-controlled, in a feature space the attacker owns (``features``: ``pixels`` = the
    images average-pooled to at most 16 x 16, or ``random_encoder`` = pooled features of a
    public random-init ResNet-18 of ``victims.backbones`` seeded with ``seed``, rows
    L2-normalised; or an ``[N, D]`` array). ``centres`` k-means centres (scikit-learn,
    ``random_state=seed``) are fitted on the pool; the images are ranked round-robin over the
    centres by distance to each centre (nearest first), and the first
    ``m = n + round(spread * (N - n))`` of that ranking form the candidate set. ``n`` images are
    then taken from it by farthest-point sampling (greedy k-centre; Gonzalez 1985), seeded with
    the candidate nearest to each centre. ``spread = 0`` is the narrow end: exactly the ``n``
    images nearest to the ``centres`` centres (``n / centres`` around each); ``spread = 1`` is
    the broad end: farthest-point sampling over the whole pool (maximal coverage). In between,
    the candidate set widens monotonically.

Every selection records itself in the new folder's ``manifest.json`` under ``"selection"``
(strategy, ``n``, seed, the source folder, class counts, the knobs, and, when features were
computed, ``coverage_radius`` = max and ``mean_nn_distance`` = mean over the pool of the distance
to the nearest selected image: lower is broader coverage). Samples keep their keys and their
encoded bytes (nothing is re-encoded), in selection order: for ``coverage`` that is the
farthest-point order, so any prefix is itself a coverage-controlled subset.

Scale (ImageNet: 1.28 M images, 100k-250k queries). :func:`select_queries` never holds the pool's
images, nor the chosen ones: pass 1 (:func:`scan_pool`) streams every shard through the reader the
stream uses, decodes each image once (a sample the stream would skip -- undecodable, a damaged tail --
is skipped and numbered the same way) and keeps its label (8 bytes an image) and, when asked, its
features in a temporary float32 file; pass 2 (:func:`copy_samples`) finds where each chosen sample lives,
from the 512-byte tar headers alone for a plain local tar (a remote, compressed or damaged shard is
read again and its chosen samples copied to a temporary spill file), and the new set is written in
selection order by reading each chosen image from there. Computed features are held as float64 up to
``feature_budget`` bytes (default 24 MiB: 12k rows of 16 x 16 grey pixels, 4k of RGB, 24k of
``random_encoder``; a 3,000-image pool, as the default data's, fits): a pool within it is selected exactly as before; a larger one is selected on a seeded uniform subsample of that
many rows (``numpy.random.default_rng([seed, 11])``) -- k-means, the candidate ranking and farthest-point
sampling all on the subsample, and ``coverage_radius`` / ``mean_nn_distance`` measured over it -- recorded
as ``"approximation": {"subsample", "pool", "feature_budget"}`` in the selection block. Farthest-point
sampling costs ``n x m x D`` operations, so the budget bounds its time as well as its memory; the peak is
about 2.5 budgets (k-means copies the rows, farthest-point sampling copies its candidates).
:func:`read_pool` still returns a whole (small) pool in memory, for callers that want the images.

``photo_patches`` is a second query *source* for the default data: grey 32 x 32 crops of the two
photographs that ship inside scikit-learn (``sklearn.datasets.load_sample_images``: china.jpg and
flower.jpg), a natural-image domain unlike the victim's animal silhouettes -- the "another
dataset" query set of the paper, without any download.

Example::

    select_queries("runs/demo/data/animal_mnist/query", "runs/q/cov500", 500, "coverage", seed=0, spread=0.0)
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from stealer.shards import MANIFEST_NAME, array_samples, read_manifest, write_manifest, write_shards

__all__ = ["STRATEGIES", "FEATURES", "select_queries", "select_indices", "pool_features", "coverage_order",
           "class_balanced_order", "coverage_stats", "photo_patches", "write_photo_patches", "read_pool", "scan_pool",
           "PoolScan", "copy_samples"]

log = logging.getLogger(__name__)

STRATEGIES = ("random", "class_balanced", "coverage")
FEATURES = ("pixels", "random_encoder")
PHOTO_CLASSES = ["china", "flower"]
FEATURE_BUDGET = 24 << 20  # bytes of float64 features held at once (select_queries feature_budget)
FPS_ROWS = 4096  # rows per block of the farthest-point distance update
STATS_BYTES = 8 << 20  # bytes of one block of distances for the coverage stats (select_queries)


# --------------------------------------------------------------------------- the pool

def read_pool(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """Every readable sample of a shard folder in order: keys, ``(ext, bytes)``, labels, uint8 images [N,C,H,W]."""
    from stealer.data import ShardStream, open_shards

    shards = open_shards(shard_dir)
    m = shards.manifest
    size = (m.get("image_size") or [None])[0]
    stream = ShardStream(shards, batch_size=1000, shuffle=False, channels=int(m.get("channels") or 3),
                         image_size=size, keep_bytes=True)
    keys: list[str] = []
    raw: list[tuple[str, bytes]] = []
    labels: list[int] = []
    images = []
    for b in stream.iter_epoch(0):
        keys += list(b["key"])
        raw += list(b["bytes"])
        labels += b["label"].tolist()
        images.append(b["image"])
    import torch

    return {"keys": keys, "bytes": raw, "labels": np.asarray(labels, dtype=np.int64),
            "images": torch.cat(images) if images else torch.empty(0), "manifest": m, "root": shards.root}


@dataclass
class PoolScan:
    """What one streamed pass over a pool keeps: O(8 bytes) per image, never the images.

    ``labels`` holds the class of every *readable* sample (pool order, ``-1`` when unlabelled): a
    sample's index in the pool is its position among the readable ones, as :func:`read_pool` numbers
    them. ``readable[i]`` counts shard ``i``'s readable samples and ``unreadable[i]`` lists the raw
    positions the reader skipped in it (corrupt images, a truncated tail), so a second pass can number
    the samples again without decoding. When features were asked for, they are in ``feature_file``
    (``float32`` rows of ``dim``, pool order; the features are float32 computations, so nothing is lost).
    """

    shards: Any  # stealer.data.ShardSet
    labels: np.ndarray
    readable: list[int]
    unreadable: dict[int, list[int]]
    feature_file: str | None = None
    dim: int = 0

    @property
    def root(self) -> str:
        return self.shards.root

    @property
    def manifest(self) -> dict[str, Any]:
        return self.shards.manifest

    def __len__(self) -> int:
        return len(self.labels)

    def feature_chunks(self, rows: int) -> Iterator[np.ndarray]:
        """The pool's features in order, ``rows`` at a time, as float64 ``[<=rows, dim]``."""
        if self.feature_file is None:
            raise ValueError("this scan computed no features")
        rows = max(1, int(rows))
        with open(self.feature_file, "rb") as f:
            for _ in range(0, len(self), rows):
                a = np.fromfile(f, dtype=np.float32, count=rows * self.dim)
                yield a.reshape(-1, self.dim).astype(np.float64)

    def feature_rows(self, rows: np.ndarray, max_bytes: int = 4 << 20) -> np.ndarray:
        """Features of the pool rows ``rows`` (any order), float64 ``[len(rows), dim]``, read ``max_bytes`` at a time."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float64)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        chunk = max(1, int(max_bytes // (8 * max(self.dim, 1))))
        for c, block in enumerate(self.feature_chunks(chunk)):
            lo, hi = np.searchsorted(srt, [c * chunk, c * chunk + len(block)])
            out[order[lo:hi]] = block[srt[lo:hi] - c * chunk]
        return out


def _raw_samples(shards: Any, i: int) -> Iterator[dict | None]:
    """Raw samples (dicts of bytes, ``None`` for a damaged tail) of shard ``i``, as ``ShardStream`` reads them."""
    from stealer.data import _iter_shard  # the reader every stream uses: same samples, same damage handling

    return _iter_shard(shards.url(i), shards.counts[i])


def _readable(s: dict | None, channels: int, size: int | None) -> tuple[str, np.ndarray | None] | None:
    """``(ext, decoded image)`` when ``ShardStream`` would keep the sample (stealer.data._collate's test), else None."""
    from stealer.data import IMAGE_EXTS, decode_image, load_npy

    if s is None:
        return None
    ext = next((e for e in IMAGE_EXTS if e in s), None)
    try:
        if ext is None:
            raise ValueError("no image field")
        img = decode_image(s[ext], channels, size)
        if "npy" in s:
            load_npy(s["npy"])
    except Exception as e:  # noqa: BLE001 - a corrupt sample is skipped and counted, as the stream does
        log.warning("skipping corrupt sample %s (%s)", s.get("__key__"), e)
        return None
    return ext, img


class _FeatureWriter:
    """Features of decoded images, computed ``batch_size`` images at a time and appended to a float32 file
    (the chunks :func:`pool_features` would cut out of the whole pool, so the values are the same)."""

    def __init__(self, kind: str, seed: int, path: str, batch_size: int = 256) -> None:
        if kind not in FEATURES:
            raise ValueError(f"features={kind!r} is not valid; choose one of: {', '.join(FEATURES)} (or pass an [N, D] array)")
        self.kind, self.seed, self.path, self.batch_size = kind, seed, path, batch_size
        self.buf: list[np.ndarray] = []
        self.net: Any = None
        self.dim = 0
        self.f = open(path, "wb")

    def add(self, img: np.ndarray) -> None:
        self.buf.append(img)
        if len(self.buf) == self.batch_size:
            self.flush()

    def flush(self) -> None:
        import torch

        from stealer.decode import standard_strides

        if not self.buf:
            return
        if len({b.shape for b in self.buf}) > 1:
            raise ValueError(f"features={self.kind} needs images of one size, but this pool's images differ "
                             f"({sorted({b.shape[:2] for b in self.buf})[:2]} ...) and its manifest has no image_size; "
                             "re-shard with an image size (launch/make_shards.py) or pass an [N, D] features array")
        x = standard_strides(torch.from_numpy(np.stack(self.buf)).permute(0, 3, 1, 2))
        self.buf = []
        if self.kind == "random_encoder" and self.net is None:
            self.net = _random_encoder(x, self.seed)
        f = _features(x, self.kind, self.net)
        self.dim = f.shape[1]
        self.f.write(np.ascontiguousarray(f, dtype=np.float32).tobytes())

    def close(self) -> None:
        self.flush()
        self.f.close()


def scan_pool(shard_dir: str | os.PathLike, features: str | None = None, seed: int = 0,
              feature_file: str | os.PathLike | None = None, limit: int | None = None) -> PoolScan:
    """One streamed pass over a pool: labels of its readable samples, and their ``features`` if asked
    (``pixels`` | ``random_encoder``, written to ``feature_file``). Memory: 8 bytes an image (+ one batch).
    ``limit``: stop after that many readable samples (the scan then covers the pool's first ``limit``)."""
    from array import array

    from stealer.data import open_shards

    shards = open_shards(shard_dir)
    m = shards.manifest
    channels, size = int(m.get("channels") or 3), (m.get("image_size") or [None])[0]
    if features is not None and feature_file is None:
        raise ValueError("scan_pool: features need a feature_file to write them to")
    fw = _FeatureWriter(features, seed, os.fspath(feature_file)) if features is not None else None
    labels = array("q")
    readable: list[int] = []
    unreadable: dict[int, list[int]] = {}
    try:
        for i in range(len(shards.names)):
            if limit is not None and len(labels) >= limit:
                break
            kept = 0
            for j, s in enumerate(_raw_samples(shards, i)):
                if limit is not None and len(labels) >= limit:
                    break
                got = _readable(s, channels, size)
                if got is None:
                    unreadable.setdefault(i, []).append(j)
                    continue
                kept += 1
                labels.append(int(s["cls"]) if "cls" in s else -1)  # type: ignore[index]
                if fw is not None:
                    fw.add(got[1])  # type: ignore[arg-type]
            readable.append(kept)
    finally:
        if fw is not None:
            fw.close()
    if not len(labels):
        raise ValueError(f"shard folder {shards.root} holds no readable images; rebuild it with launch/make_shards.py")
    return PoolScan(shards, np.frombuffer(labels, dtype=np.int64).copy(), readable, unreadable,
                    None if fw is None else os.fspath(feature_file), 0 if fw is None else fw.dim)  # type: ignore[arg-type]


def _located_samples(url: str, count: int) -> Iterator[dict] | None:
    """The samples of a plain local tar as ``_iter_shard`` groups them, with ``(offset, size)`` of each member
    instead of its bytes (read from the 512-byte headers alone); ``None`` for any other shard."""
    from webdataset.tariterators import group_by_keys

    from stealer.data import _TAR_META, _local_tar_members

    members = None if "://" in url or url.startswith("pipe:") else _local_tar_members(url)
    if members is None:
        return None
    files: list[dict] = [{"fname": name, "data": (start, size), "__url__": url} for name, start, size in members
                         if not ("/" not in name and name.startswith("__") and name.endswith("__") or _TAR_META.match(name))]

    def it() -> Iterator[dict]:
        try:
            for n, s in enumerate(group_by_keys(files + [{}])):  # the reader's rule (_read_local_tar + _iter_shard)
                if n >= count:
                    break
                yield s
        except Exception:  # noqa: BLE001 - as _iter_shard: the rest of the shard is unreadable (scan_pool skipped it)
            return

    return it()


class _Reader:
    """Reads ``(file, offset, size)`` byte ranges, keeping at most ``keep`` files open."""

    def __init__(self, keep: int = 32) -> None:
        self.open: dict[str, Any] = {}
        self.keep = keep

    def read(self, path: str, offset: int, size: int) -> bytes:
        f = self.open.pop(path, None) or open(path, "rb")
        self.open[path] = f  # most recent last
        while len(self.open) > self.keep:
            self.open.pop(next(iter(self.open))).close()
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{path} changed while selecting: {size} bytes expected at {offset}, {len(data)} read")
        return data

    def close(self) -> None:
        for f in self.open.values():
            f.close()
        self.open = {}


def copy_samples(scan: PoolScan, idx: np.ndarray, out_dir: str | os.PathLike, spill: str | os.PathLike, *,
                 samples_per_shard: int = 1000, source: str, classes: list[str]) -> dict[str, Any]:
    """Write the pool samples ``idx`` (readable indices, in this order) as a shard set in ``out_dir``.

    A second pass numbers the readable samples again without decoding (``scan.unreadable``) and finds
    where each chosen one lives: in a plain local tar, its ``(offset, size)`` from the tar headers alone
    (no image bytes read); in any other shard (remote, compressed, damaged), its bytes are copied to the
    ``spill`` file as the pass goes. The set is then written in ``idx`` order reading each image from
    there, so memory holds a key and a location per chosen sample, never the images.
    """
    from stealer.data import IMAGE_EXTS
    from stealer.shards import write_shards

    shards, labels = scan.shards, scan.labels
    idx = np.asarray(idx, dtype=np.int64)
    n = len(idx)
    order = np.argsort(idx, kind="stable")
    srt = idx[order]
    files: list[str] = []
    file_of = np.full(n, -1, dtype=np.int32)
    offset = np.zeros(n, dtype=np.int64)
    nbytes = np.zeros(n, dtype=np.int64)
    ext_of = np.zeros(n, dtype=np.uint8)
    keys: list[str] = [""] * n
    spill_path, spill_f, spill_id, spill_at = os.fspath(spill), None, -1, 0
    base = 0
    try:
        for i, r in enumerate(scan.readable):
            lo, hi = (int(v) for v in np.searchsorted(srt, [base, base + r]))
            if lo == hi:
                base += r
                continue
            skip = set(scan.unreadable.get(i, ()))
            located = _located_samples(shards.url(i), shards.counts[i])
            src = located if located is not None else _raw_samples(shards, i)
            if located is not None:
                files.append(shards.url(i))
            g, p = base, lo
            for j, s in enumerate(src):
                if p == hi:
                    break
                if j in skip:
                    continue
                if g == srt[p]:
                    assert s is not None
                    ext = next(e for e in IMAGE_EXTS if e in s)
                    at = int(order[p])
                    keys[at], ext_of[at] = str(s["__key__"]), IMAGE_EXTS.index(ext)
                    if located is not None:
                        file_of[at] = len(files) - 1
                        offset[at], nbytes[at] = s[ext]
                    else:
                        if spill_f is None:
                            spill_f, spill_id = open(spill_path, "wb"), len(files)
                            files.append(spill_path)
                        data = bytes(s[ext])
                        spill_f.write(data)
                        file_of[at], offset[at], nbytes[at] = spill_id, spill_at, len(data)
                        spill_at += len(data)
                    p += 1
                g += 1
            if p != hi:
                raise OSError(f"shard {shards.url(i)} changed while selecting: {hi - p} chosen samples not found again")
            base += r
        if spill_f is not None:
            spill_f.close()
            spill_f = None
        reader = _Reader()
        try:
            samples = ((keys[k], reader.read(files[file_of[k]], int(offset[k]), int(nbytes[k])), IMAGE_EXTS[ext_of[k]],
                        max(int(labels[idx[k]]), 0)) for k in range(n))
            m = scan.manifest
            return write_shards(samples, out_dir, samples_per_shard=samples_per_shard, source=source, classes=classes,
                                channels=int(m.get("channels") or 3), image_size=m.get("image_size"))
        finally:
            reader.close()
    finally:
        if spill_f is not None:
            spill_f.close()
        if os.path.exists(spill_path):
            os.unlink(spill_path)


def _random_encoder(x: Any, seed: int) -> Any:
    """The public random-init ResNet-18 (width 16) of ``victims.backbones``, seeded with ``seed``, for images like ``x``."""
    import torch

    from victims.backbones import build_backbone

    torch.manual_seed(seed)
    stem = "small" if max(x.shape[-2:]) <= 64 else "imagenet"
    net, _ = build_backbone("resnet18", in_chans=x.shape[1], width=16, stem=stem)
    return net.eval()


def _features(images: Any, kind: str, net: Any = None, batch_size: int = 256) -> np.ndarray:
    """``pixels`` or ``random_encoder`` (``net``) features of uint8 images ``[N, C, H, W]``, float64 ``[N, D]``."""
    import torch
    import torch.nn.functional as F

    x = images.float().div(255.0)
    if kind == "pixels":
        side = min(16, x.shape[-1], x.shape[-2])
        return F.adaptive_avg_pool2d(x, side).flatten(1).numpy().astype(np.float64)
    with torch.no_grad():
        f = torch.cat([net((x[i:i + batch_size] - 0.5) / 0.25) for i in range(0, len(x), batch_size)])
    return F.normalize(f, dim=1).numpy().astype(np.float64)


def pool_features(images: Any, kind: str = "pixels", seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """Features the attacker owns for uint8 images ``[N, C, H, W]``: ``pixels`` or ``random_encoder``."""
    if kind not in FEATURES:
        raise ValueError(f"features={kind!r} is not valid; choose one of: {', '.join(FEATURES)} (or pass an [N, D] array)")
    net = _random_encoder(images, seed) if kind == "random_encoder" else None
    return _features(images, kind, net, batch_size)


# --------------------------------------------------------------------------- the strategies

def class_balanced_order(labels: np.ndarray, n: int, rng: np.random.Generator, classes: list[str] | None = None
                         ) -> np.ndarray:
    """Indices of ``n`` images, ``n // C`` per class (+1 for ``n mod C`` random classes), class-interleaved."""
    labels = np.asarray(labels)
    if labels.size == 0 or (labels < 0).any():
        raise ValueError("strategy class_balanced needs a class label for every image; this pool has unlabelled "
                         "samples: use strategy random or coverage")
    present = np.unique(labels)
    c = len(present)
    quota = np.full(c, n // c)
    quota[rng.permutation(c)[: n % c]] += 1
    pools = []
    for cls, q in zip(present, quota):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if len(idx) < q:
            name = classes[cls] if classes and cls < len(classes) else str(cls)
            raise ValueError(f"class_balanced n={n} needs {q} images of class '{name}' but the pool has {len(idx)}; "
                             f"lower n to at most {c * min(int((labels == k).sum()) for k in present)}")
        pools.append(list(idx[:q]))
    order: list[int] = []
    for i in range(int(quota.max(initial=0))):
        order += [int(p[i]) for p in (pools[j] for j in rng.permutation(c)) if i < len(p)]
    return np.asarray(order, dtype=np.int64)


def coverage_order(feats: np.ndarray, n: int, *, centres: int = 3, spread: float = 1.0, seed: int = 0) -> np.ndarray:
    """Coverage-controlled selection (see the module docstring); returns ``n`` indices in FPS order."""
    from sklearn.cluster import KMeans

    feats = np.asarray(feats, dtype=np.float64)
    big_n = feats.shape[0]
    if not 0.0 <= spread <= 1.0:
        raise ValueError(f"spread={spread} is not valid; it goes from 0 (narrow) to 1 (broad)")
    if centres < 1 or centres > big_n:
        raise ValueError(f"centres={centres} is not valid; use 1..{big_n} (the pool size)")
    km = KMeans(n_clusters=centres, n_init=4, random_state=seed).fit(feats)
    d = km.transform(feats)  # N x k distances to the centres
    ranked = np.argsort(d, axis=0, kind="stable")  # column c: images by distance to centre c
    order, seen = [], np.zeros(big_n, dtype=bool)
    for row in ranked:  # round-robin over centres, nearest first
        for i in row:
            if not seen[i]:
                seen[i] = True
                order.append(int(i))
    m = min(big_n, n + int(round(spread * (big_n - n))))
    cand = np.asarray(order[:m])
    x = feats[cand]
    picked: list[int] = []
    dist = np.full(m, np.inf)
    for j in range(m):  # the first candidates are the nearest to each centre; then farthest first
        if len(picked) == n:
            break
        if j >= min(centres, n):
            j = int(np.argmax(dist))
        picked.append(j)
        for a in range(0, m, FPS_ROWS):  # in row blocks: the same per-row sums, no [m, D] temporaries
            np.minimum(dist[a:a + FPS_ROWS], ((x[a:a + FPS_ROWS] - x[j]) ** 2).sum(1), out=dist[a:a + FPS_ROWS])
        dist[j] = -np.inf  # never picked twice (np.minimum keeps it), even among duplicates
    return cand[np.asarray(picked, dtype=np.int64)]


def _nn_distances(feats: np.ndarray, s: np.ndarray, max_bytes: int = 64 << 20) -> np.ndarray:
    """Euclidean distance from each row of ``feats`` to its nearest row of ``s``, by chunked matrix products."""
    s2 = (s * s).sum(1)
    chunk = max(1, int(max_bytes // (8 * max(len(s), 1))))
    nn = []
    for i in range(0, len(feats), chunk):
        a = feats[i:i + chunk]
        d2 = (a * a).sum(1)[:, None] + s2[None, :] - 2.0 * (a @ s.T)
        nn.append(np.sqrt(np.maximum(d2.min(1), 0.0)))
    return np.concatenate(nn) if nn else np.zeros(0)


def coverage_stats(feats: np.ndarray, selected: np.ndarray, max_bytes: int = 64 << 20) -> dict[str, float]:
    """Max and mean over the pool of the Euclidean distance to the nearest selected image.

    Squared distances as ``|a|^2 + |b|^2 - 2 a.b`` by matrix products over row chunks, so memory
    stays at ``max_bytes`` whatever the pool (an ``[N, S, D]`` difference tensor of a 3,000-image
    pool of 1,024 pixels against 3,000 selected images would be 50 GB).
    """
    feats = np.asarray(feats, dtype=np.float64)
    d = _nn_distances(feats, feats[np.asarray(selected)], max_bytes)
    return {"coverage_radius": float(d.max()), "mean_nn_distance": float(d.mean())}


def select_indices(n: int, strategy: str, seed: int = 0, *, labels: np.ndarray | None = None,
                   feats: np.ndarray | None = None, centres: int = 3, spread: float = 1.0,
                   classes: list[str] | None = None, pool_size: int | None = None) -> np.ndarray:
    """Indices into the pool for ``strategy`` (pure: the maths of :func:`select_queries`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not valid; choose one of: {', '.join(STRATEGIES)}")
    size = pool_size if pool_size is not None else len(labels if labels is not None else feats)  # type: ignore[arg-type]
    if not 1 <= n <= size:
        raise ValueError(f"n={n} is not valid for a pool of {size} images; choose 1..{size}")
    rng = np.random.default_rng(seed)
    if strategy == "random":
        return rng.permutation(size)[:n].astype(np.int64)
    if strategy == "class_balanced":
        return class_balanced_order(np.asarray(labels), n, rng, classes)
    if feats is None:
        raise ValueError("strategy coverage needs features (pixels, random_encoder or an [N, D] array)")
    return coverage_order(feats, n, centres=centres, spread=spread, seed=seed)


def select_queries(shard_dir: str | os.PathLike, out_dir: str | os.PathLike, n: int, strategy: str = "random",
                   seed: int = 0, features: str | np.ndarray | None = None, *, centres: int = 3, spread: float = 1.0,
                   samples_per_shard: int = 1000, overwrite: bool = False,
                   feature_budget: int = FEATURE_BUDGET) -> dict[str, Any]:
    """Write the ``n`` images of ``shard_dir`` that ``strategy`` selects as a new shard folder ``out_dir``.

    Streams the pool (module docstring, "Scale"): one pass for labels (and features), a second for
    where the chosen images live; the images are never all in memory.

    Args:
        shard_dir: the pool (any ``sslsteal-shards/1`` folder with labels for ``class_balanced``).
        out_dir: the new folder (written in a hidden temporary folder, then renamed into place).
        n: images to keep; strategy: ``random`` | ``class_balanced`` | ``coverage``; seed: all randomness.
        features: ``coverage`` (or stats for the others): ``pixels`` (default for coverage),
            ``random_encoder``, or an ``[N, D]`` array aligned with the pool's readable samples.
        centres, spread: the coverage knobs (module docstring). overwrite: replace ``out_dir``.
        feature_budget: bytes of float64 features held at once (computed features only); a larger
            pool is selected on a seeded subsample of that many rows (module docstring, "Scale").

    Returns:
        The new manifest, whose ``"selection"`` block records how it was made.
    """
    out = Path(out_dir)
    if (out / MANIFEST_NAME).is_file() and not overwrite:
        raise FileExistsError(f"{out} already holds a shard set; choose another folder or pass overwrite")
    if strategy not in STRATEGIES:  # before the pool is read
        raise ValueError(f"strategy={strategy!r} is not valid; choose one of: {', '.join(STRATEGIES)}")
    if strategy == "coverage" and features is None:
        features = "pixels"
    if isinstance(features, str) and features not in FEATURES:
        raise ValueError(f"features={features!r} is not valid; choose one of: {', '.join(FEATURES)} (or pass an [N, D] array)")
    if int(feature_budget) < 1:
        raise ValueError(f"feature_budget={feature_budget} is not valid; give bytes >= 1 (default {FEATURE_BUDGET})")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.{os.getpid()}"
    tmp, feature_file, spill = Path(f"{work}.tmp"), Path(f"{work}.features"), Path(f"{work}.spill")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        scan = scan_pool(shard_dir, features if isinstance(features, str) else None, seed, feature_file)
        m, labels, big_n = scan.manifest, scan.labels, len(scan)
        if not 1 <= n <= big_n:
            raise ValueError(f"n={n} is not valid for a pool of {big_n} images; choose 1..{big_n}")
        feats, rows, approx = None, None, None
        if isinstance(features, str):
            fit = max(1, int(feature_budget) // (8 * scan.dim))
            rows = np.arange(big_n) if big_n <= fit else np.sort(
                np.random.default_rng([seed, 11]).choice(big_n, fit, replace=False))
            feats = scan.feature_rows(rows)
            if len(rows) < big_n:
                approx = {"subsample": len(rows), "pool": big_n, "feature_budget": int(feature_budget)}
        elif features is not None:
            feats = np.asarray(features, dtype=np.float64)
            if feats.ndim != 2 or feats.shape[0] != big_n:
                raise ValueError(f"features must be an [N, D] array with N = {big_n} (the pool), got {feats.shape}")
        if strategy == "coverage" and approx is not None:
            if n > len(rows):  # type: ignore[arg-type]
                raise ValueError(f"coverage n={n} needs n candidate rows in memory but feature_budget={feature_budget} "
                                 f"holds {len(rows)} rows of {scan.dim} features; raise feature_budget to at least "  # type: ignore[arg-type]
                                 f"{8 * scan.dim * n} bytes or lower n")
            idx = rows[coverage_order(feats, n, centres=centres, spread=spread, seed=seed)]  # type: ignore[index]
        else:
            idx = select_indices(n, strategy, seed, labels=labels, feats=feats if approx is None else None,
                                 centres=centres, spread=spread, classes=m.get("classes"), pool_size=big_n)
        classes = list(m.get("classes") or ["0"])
        counts = np.bincount(labels[idx][labels[idx] >= 0], minlength=len(classes)) if len(classes) else np.zeros(0)
        selection: dict[str, Any] = {
            "strategy": strategy, "n": int(n), "seed": int(seed), "source": os.path.abspath(scan.root),
            "source_samples": big_n, "class_counts": {c: int(k) for c, k in zip(classes, counts)},
            "features": features if isinstance(features, str) else ("array" if features is not None else None)}
        if strategy == "coverage":
            selection.update(centres=int(centres), spread=float(spread))
        if approx is not None:  # the stats too are over the subsample: what the pool-wide ones estimate
            d = np.full(len(rows), np.inf)  # type: ignore[arg-type]
            step = max(1, int(feature_budget) // (8 * scan.dim))
            for i in range(0, len(idx), step):
                d = np.minimum(d, _nn_distances(feats, scan.feature_rows(idx[i:i + step]), STATS_BYTES))  # type: ignore[arg-type]
            selection.update(coverage_radius=float(d.max()), mean_nn_distance=float(d.mean()), approximation=approx)
        elif feats is not None:
            selection.update(coverage_stats(feats, idx, STATS_BYTES))
        feats = None
        manifest = copy_samples(scan, idx, tmp, spill, samples_per_shard=samples_per_shard, classes=classes,
                                source=f"select_queries strategy={strategy} n={n} seed={seed} from {selection['source']}")
        manifest["selection"] = selection
        write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
        return manifest
    finally:
        feature_file.unlink(missing_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- another query source

def photo_patches(n: int, size: int = 32, seed: int = 0, min_side: int = 24, max_side: int = 160
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``n`` grey ``size x size`` crops of scikit-learn's two sample photographs (``uint8 [n, size, size]``).

    Each crop is a random square of side ``min_side..max_side`` pixels at a random position of one
    of the photos (chosen alternately; label 0 = china.jpg, 1 = flower.jpg), resized with PIL
    bilinear. Deterministic in ``seed``.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(im).convert("L") for im in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % len(photos)
    for i in range(n):
        im = photos[labels[i]]
        side = int(rng.integers(min_side, min(max_side, *im.size) + 1))
        x0, y0 = int(rng.integers(0, im.size[0] - side + 1)), int(rng.integers(0, im.size[1] - side + 1))
        out[i] = np.asarray(im.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.BILINEAR))
    return out, labels, list(PHOTO_CLASSES)


def write_photo_patches(out_dir: str | os.PathLike, n: int = 3000, size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Write :func:`photo_patches` as a shard folder (skipped when it already holds ``n`` images)."""
    out = Path(out_dir)
    if (out / MANIFEST_NAME).is_file():
        m = read_manifest(out)
        if m.get("num_samples") == n:
            return m
    images, labels, classes = photo_patches(n, size, seed)
    return write_shards(array_samples(images, labels, key_prefix="photo_patches"), out, overwrite=True,
                        source=f"photo_patches n={n} size={size} seed={seed} (sklearn sample images)",
                        classes=classes, channels=1, image_size=[size, size])
