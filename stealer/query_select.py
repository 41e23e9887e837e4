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

``photo_patches`` is a second query *source* for the default data: grey 32 x 32 crops of the two
photographs that ship inside scikit-learn (``sklearn.datasets.load_sample_images``: china.jpg and
flower.jpg), a natural-image domain unlike the victim's animal silhouettes -- the "another
dataset" query set of the paper, without any download.

Example::

    select_queries("runs/demo/data/animal_mnist/query", "runs/q/cov500", 500, "coverage", seed=0, spread=0.0)
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from stealer.shards import MANIFEST_NAME, array_samples, read_manifest, write_manifest, write_shards

__all__ = ["STRATEGIES", "FEATURES", "select_queries", "select_indices", "pool_features", "coverage_order",
           "class_balanced_order", "coverage_stats", "photo_patches", "write_photo_patches", "read_pool"]

STRATEGIES = ("random", "class_balanced", "coverage")
FEATURES = ("pixels", "random_encoder")
PHOTO_CLASSES = ["china", "flower"]


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


def pool_features(images: Any, kind: str = "pixels", seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """Features the attacker owns for uint8 images ``[N, C, H, W]``: ``pixels`` or ``random_encoder``."""
    import torch
    import torch.nn.functional as F

    if kind not in FEATURES:
        raise ValueError(f"features={kind!r} is not valid; choose one of: {', '.join(FEATURES)} (or pass an [N, D] array)")
    x = images.float().div(255.0)
    if kind == "pixels":
        side = min(16, x.shape[-1], x.shape[-2])
        return F.adaptive_avg_pool2d(x, side).flatten(1).numpy().astype(np.float64)
    from victims.backbones import build_backbone

    torch.manual_seed(seed)
    stem = "small" if max(x.shape[-2:]) <= 64 else "imagenet"
    net, _ = build_backbone("resnet18", in_chans=x.shape[1], width=16, stem=stem)
    net.eval()
    with torch.no_grad():
        f = torch.cat([net((x[i:i + batch_size] - 0.5) / 0.25) for i in range(0, len(x), batch_size)])
    return F.normalize(f, dim=1).numpy().astype(np.float64)


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
        dist = np.minimum(dist, ((x - x[j]) ** 2).sum(1))
        dist[j] = -np.inf  # never picked twice (np.minimum keeps it), even among duplicates
    return cand[np.asarray(picked, dtype=np.int64)]


def coverage_stats(feats: np.ndarray, selected: np.ndarray, max_bytes: int = 64 << 20) -> dict[str, float]:
    """Max and mean over the pool of the Euclidean distance to the nearest selected image.

    Squared distances as ``|a|^2 + |b|^2 - 2 a.b`` by matrix products over row chunks, so memory
    stays at ``max_bytes`` whatever the pool (an ``[N, S, D]`` difference tensor of a 3,000-image
    pool of 1,024 pixels against 3,000 selected images would be 50 GB).
    """
    feats = np.asarray(feats, dtype=np.float64)
    s = feats[np.asarray(selected)]
    s2 = (s * s).sum(1)
    chunk = max(1, int(max_bytes // (8 * max(len(s), 1))))
    nn = []
    for i in range(0, len(feats), chunk):
        a = feats[i:i + chunk]
        d2 = (a * a).sum(1)[:, None] + s2[None, :] - 2.0 * (a @ s.T)
        nn.append(np.sqrt(np.maximum(d2.min(1), 0.0)))
    d = np.concatenate(nn) if nn else np.zeros(0)
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
                   samples_per_shard: int = 1000, overwrite: bool = False) -> dict[str, Any]:
    """Write the ``n`` images of ``shard_dir`` that ``strategy`` selects as a new shard folder ``out_dir``.

    Args:
        shard_dir: the pool (any ``sslsteal-shards/1`` folder with labels for ``class_balanced``).
        out_dir: the new folder (written in a hidden temporary folder, then renamed into place).
        n: images to keep; strategy: ``random`` | ``class_balanced`` | ``coverage``; seed: all randomness.
        features: ``coverage`` (or stats for the others): ``pixels`` (default for coverage),
            ``random_encoder``, or an ``[N, D]`` array aligned with the pool's readable samples.
        centres, spread: the coverage knobs (module docstring). overwrite: replace ``out_dir``.

    Returns:
        The new manifest, whose ``"selection"`` block records how it was made.
    """
    out = Path(out_dir)
    if (out / MANIFEST_NAME).is_file() and not overwrite:
        raise FileExistsError(f"{out} already holds a shard set; choose another folder or pass overwrite")
    pool = read_pool(shard_dir)
    m, labels = pool["manifest"], pool["labels"]
    if strategy == "coverage" and features is None:
        features = "pixels"
    feats = None
    if isinstance(features, str):
        feats = pool_features(pool["images"], features, seed)
    elif features is not None:
        feats = np.asarray(features, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] != len(labels):
            raise ValueError(f"features must be an [N, D] array with N = {len(labels)} (the pool), got {feats.shape}")
    idx = select_indices(n, strategy, seed, labels=labels, feats=feats, centres=centres, spread=spread,
                         classes=m.get("classes"), pool_size=len(labels))
    classes = list(m.get("classes") or ["0"])
    counts = np.bincount(labels[idx][labels[idx] >= 0], minlength=len(classes)) if len(classes) else np.zeros(0)
    selection: dict[str, Any] = {
        "strategy": strategy, "n": int(n), "seed": int(seed), "source": os.path.abspath(pool["root"]),
        "source_samples": len(labels), "class_counts": {c: int(k) for c, k in zip(classes, counts)},
        "features": features if isinstance(features, str) else ("array" if features is not None else None)}
    if strategy == "coverage":
        selection.update(centres=int(centres), spread=float(spread))
    if feats is not None:
        selection.update(coverage_stats(feats, idx))
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    samples = ((pool["keys"][i], pool["bytes"][i][1], pool["bytes"][i][0], max(int(labels[i]), 0)) for i in idx)
    manifest = write_shards(samples, tmp, samples_per_shard=samples_per_shard,
                            source=f"select_queries strategy={strategy} n={n} seed={seed} from {selection['source']}",
                            classes=classes, channels=int(m.get("channels") or 3), image_size=m.get("image_size"))
    manifest["selection"] = selection
    write_manifest(tmp, manifest)
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return manifest


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
