"""carve_validation streams probe-train (all of ImageNet train at scale): the same bytes as the whole-pool read,
a scan that stops after the cut, and memory well below the pool's images."""
from __future__ import annotations

import gzip
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import stealer.data
from eval.validation import carve_validation
from stealer.query_select import read_pool
from stealer.shards import encode_png, read_manifest, write_manifest, write_shards

CLASSES = ["a", "b", "c"]
CORRUPT = (4, 27)  # undecodable images: one before the cut, one inside it


def _pool(root: Path, n: int = 60, side: int = 8, damage: bool = True) -> Path:
    """``n`` RGB noise images in shards of 15; images CORRUPT are undecodable; with ``damage``, shard 2 is
    gzip-compressed (not a plain tar: copied through the spill file) and the last shard is cut short."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    samples = [(f"img-{i:03d}", b"not a png" if i in CORRUPT else encode_png(images[i]), "png", i % 3)
               for i in range(n)]
    write_shards(samples, root, samples_per_shard=15, source="probe-train", classes=CLASSES, channels=3,
                 image_size=[side, side])
    if damage:
        s2 = root / "train-000002.tar"
        s2.write_bytes(gzip.compress(s2.read_bytes()))
        last = root / f"train-{n // 15 - 1:06d}.tar"
        data = last.read_bytes()
        last.write_bytes(data[: len(data) // 2])
    return root


def _old_carve(train_dir, out_dir, *, skip: int, n: int) -> dict:
    """The carve as it was before streaming (eval/validation.py @07e757d): the whole pool in memory."""
    out = Path(out_dir)
    want = {"source": os.path.abspath(train_dir), "skip": int(skip), "n": int(n)}
    pool = read_pool(train_dir)
    total = len(pool["keys"])
    idx = list(range(skip, min(total, skip + n)))
    assert idx
    m = pool["manifest"]
    samples = ((pool["keys"][i], pool["bytes"][i][1], pool["bytes"][i][0], max(int(pool["labels"][i]), 0)) for i in idx)
    manifest = write_shards(samples, out, source=f"validation: images {skip}..{skip + len(idx)} of {want['source']}",
                            classes=list(m.get("classes") or ["0"]), channels=int(m.get("channels") or 3),
                            image_size=m.get("image_size"))
    manifest["validation"] = {**want, "kept": len(idx), "keys": [pool["keys"][i] for i in idx][:3]}
    write_manifest(out, manifest)
    return manifest


def _same_folders(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        if p.name != "manifest.json":
            assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    ma, mb = read_manifest(a), read_manifest(b)
    ma.pop("created"), mb.pop("created")
    assert ma == mb


@pytest.mark.parametrize("skip,n", [(10, 20), (10, 1000), (0, 3), (20, 16)])
def test_streamed_carve_is_byte_identical_to_the_whole_pool_read(tmp_path, skip, n):
    train = _pool(tmp_path / "train")
    old, new = _old_carve(train, tmp_path / "old", skip=skip, n=n), carve_validation(train, tmp_path / "new", skip=skip, n=n)
    _same_folders(tmp_path / "old", tmp_path / "new")
    keys = read_pool(tmp_path / "new")["keys"]
    assert old["validation"] == new["validation"] and new["validation"]["keys"] == keys[:3]
    all_keys = read_pool(train)["keys"]  # the reader's numbering: corrupt images and the cut tail are not counted
    assert "img-004" not in all_keys and "img-027" not in all_keys and len(all_keys) < 60 - 2
    assert keys == all_keys[skip:skip + n]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no tmp folder or spill file left


def test_carve_stops_reading_after_the_cut(tmp_path, monkeypatch):
    """The scan decodes the first skip + n readable images (and the undecodable ones among them), not the pool."""
    train = _pool(tmp_path / "train", damage=False)
    calls: list[int] = []
    real = stealer.data.decode_image
    monkeypatch.setattr(stealer.data, "decode_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    carve_validation(train, tmp_path / "val", skip=10, n=8)
    assert len(calls) == 10 + 8 + 1  # 18 readable + img-004; images 19..59 never decoded
    calls.clear()
    read_pool(train)
    assert len(calls) == 60  # the old path decoded the whole pool


def test_carve_errors_are_one_line(tmp_path):
    train = _pool(tmp_path / "train", damage=False)
    with pytest.raises(ValueError, match=r"holds 58 images, none after the probe's first 58 \(train_limit\)"):
        carve_validation(train, tmp_path / "v", skip=58, n=5)
    with pytest.raises(ValueError, match="need skip >= 0 and n >= 1"):
        carve_validation(train, tmp_path / "v", skip=3, n=0)
    assert not (tmp_path / "v").exists()


def test_carve_memory_stays_below_the_pool_images(tmp_path):
    """Peak traced Python memory of a carve of most of the pool: a small fraction of its image bytes (the old
    whole-pool read held every image's bytes and its decoded pixels)."""
    train = _pool(tmp_path / "train", n=150, side=96, damage=False)
    image_bytes = sum(p.stat().st_size for p in train.glob("*.tar"))
    carve_validation(train, tmp_path / "warm", skip=0, n=2)  # imports and first-use caches outside the measure

    def peak(fn) -> int:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    new = peak(lambda: carve_validation(train, tmp_path / "new", skip=2, n=140))
    old = peak(lambda: _old_carve(train, tmp_path / "old", skip=2, n=140))
    _same_folders(tmp_path / "old", tmp_path / "new")
    assert image_bytes > 4_000_000
    assert old > image_bytes  # the check can fail: the whole-pool read is above the line
    assert new < image_bytes / 10, (new, image_bytes)  # ~0.3 MB (one image, tar buffers) of 4.3 MB
    shutil.rmtree(tmp_path / "old")
