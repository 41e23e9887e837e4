#!/usr/bin/env python
"""Folder → shards conversion: ``--workers N`` against one worker, same folder, one run.

Writes N photo-like JPEGs (crops of scikit-learn's two sample photographs, at ``--src-size``) as
an ImageFolder tree, then converts it with ``stealer.make_shards`` (what ``launch/make_shards.py`` runs; resize to ``--size``, PNG)
once with 1 worker and once with ``--workers``, checks the two outputs are byte-for-byte equal,
and prints images/s and the ratio (ideal: close to the number of cores for a CPU-bound resize;
more where the header scan waits on a network file system).

    python benchmarks/make_shards.py --n 2000 --src-size 256 --size 64 --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stealer.make_shards import make_shards  # noqa: E402


def _photo_folder(root: Path, n: int, size: int, classes: int = 10) -> None:
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    for i in range(n):
        ph = photos[i % len(photos)]
        side = int(rng.integers(size // 2, min(ph.shape[:2])))
        y, x = (int(rng.integers(0, d - side + 1)) for d in ph.shape[:2])
        img = Image.fromarray(ph[y:y + side, x:x + side]).resize((size, size), Image.Resampling.BILINEAR)
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i:06d}.jpg", format="JPEG", quality=90)


def _tars(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--src-size", type=int, default=256)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _photo_folder(root / "src", a.n, a.src_size)
        secs = {}
        for w in (1, a.workers):
            t0 = time.perf_counter()
            make_shards(str(root / "src"), root / f"w{w}", image_size=a.size, workers=w)
            secs[w] = time.perf_counter() - t0
        same = _tars(root / "w1") == _tars(root / f"w{a.workers}")
    out = {"images": a.n, "workers": a.workers, "img_per_s_1": a.n / secs[1],
           f"img_per_s_{a.workers}": a.n / secs[a.workers], "ratio": secs[1] / secs[a.workers], "identical": same}
    print(json.dumps(out, indent=1))
    print(f"folder -> shards, {a.n} JPEGs {a.src_size}px -> {a.size}px PNG: 1 worker {a.n / secs[1]:.0f} img/s, "
          f"{a.workers} workers {a.n / secs[a.workers]:.0f} img/s = {secs[1] / secs[a.workers]:.2f}x; "
          f"outputs {'byte-for-byte equal' if same else 'DIFFER'}")
    if not same:
        raise SystemExit(1)
    return out


if __name__ == "__main__":
    main()
