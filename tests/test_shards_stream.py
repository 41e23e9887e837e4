"""Folder -> shards lists each class folder as it goes (os.scandir, sorted per folder) and keeps per-file state in
flat arrays: memory per file is a few dozen bytes, and the shards are byte-for-byte what the whole-tree listing wrote.

tests/data/shards_stream_golden.json holds, for the trees below, the sha256 of every tar and of every manifest
(``created`` left out, the tree's path replaced by ROOT) as written by the listing before it was streamed (commit
cf934dd). A Pillow upgrade that changes its JPEG/PNG encoder changes the fake images and the re-encoded samples:
regenerate the digests then with ``python tests/test_shards_stream.py`` at a commit whose output is known good.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "shards_stream_golden.json"
CASES = {  # name -> (source below the tree, make_shards keyword arguments)
    "imagenet_root": ("", dict(samples_per_shard=5)),
    "imagenet_root_split_resize_workers": ("", dict(samples_per_shard=4, splits={"a": 12, "b": 7}, image_size=12, workers=2)),
    "train_keep_order": ("train", dict(samples_per_shard=7, keep_order=True)),
    "flat_val": ("val", dict(samples_per_shard=3)),
}


def _tree(root: Path) -> Path:
    """A fake ImageNet (csv layout, every planted quirk) plus what real trees also hold: nested sub-folders inside a
    class folder (listed after the folder's own files, sorted), hidden files and folders, and non-image files."""
    from stealer.fake_imagenet import make_fake_imagenet

    make_fake_imagenet(root, classes=4, train_per_class=6, val_images=8, longer_side=40, seed=3)
    train = root / "train"
    first, second = sorted(p for p in train.iterdir())[:2]
    jpgs = sorted(first.glob("*.JPEG"))
    for sub, n in (("b_sub", 2), ("a_sub/deeper", 1), ("a_sub", 2)):
        (first / sub).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            shutil.copy(jpgs[j], first / sub / f"z{j}_{jpgs[j].name}")
    shutil.copy(jpgs[-1], first / "0_first.jpeg")  # sorts before the wnid-named files
    (first / ".hidden").mkdir()
    shutil.copy(jpgs[0], first / ".hidden" / "x.JPEG")
    shutil.copy(jpgs[0], second / ".dot.JPEG")
    (second / "notes.txt").write_text("not an image")
    return root


def _digest(tree: Path, out: Path, result: dict[str, dict]) -> dict[str, dict]:
    """Per written folder (relative to ``out``): the manifest's sha256 (``created`` dropped, ``tree`` -> ROOT) and
    every tar's."""
    got = {}
    for folder in sorted(result):
        m = json.loads((Path(folder) / "manifest.json").read_text())
        m.pop("created")
        text = json.dumps(m, sort_keys=True).replace(str(tree), "ROOT")
        got[str(Path(folder).relative_to(out))] = {
            "manifest": hashlib.sha256(text.encode()).hexdigest(), "num_samples": m["num_samples"],
            "tars": {s["name"]: hashlib.sha256((Path(folder) / s["name"]).read_bytes()).hexdigest() for s in m["shards"]}}
    return got


def _run(tmp: Path) -> dict[str, dict]:
    from stealer.make_shards import make_shards

    tree = _tree(tmp / "tree")
    with pytest.warns(Warning) if "pytest" in sys.modules else _nothing():  # the planted quirks warn
        return {name: _digest(tree, tmp / name, make_shards(str(tree / sub), tmp / name, **kw))
                for name, (sub, kw) in CASES.items()}


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_streamed_listing_writes_the_bytes_the_whole_tree_listing_wrote(tmp_path):
    want = json.loads(GOLDEN.read_text())
    got = _run(tmp_path)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], f"{name}: the shards or the manifest differ from the whole-tree listing's"
    assert got["imagenet_root"]["train"]["num_samples"] == 24 + 6 - 5  # 6 nested/extra copies; 5 unreadable (2 planted, 3 copies of one)


def test_listing_order_is_preorder_sorted_per_folder(tmp_path):
    """Files of a class folder (sorted), then each sub-folder (sorted) recursively; hidden entries and other suffixes
    never listed -- the order os.walk(sorted) gave, which fixes every key."""
    from stealer.shards import ImageFolderSource

    tree = _tree(tmp_path / "tree")
    with pytest.warns(Warning):
        src = ImageFolderSource.scan(tree / "train")
    first = sorted((tree / "train").iterdir())[0]
    mine = [str(src.path(i).relative_to(first)) for i in range(len(src)) if src.path(i).is_relative_to(first)]
    assert mine[0] == "0_first.jpeg" and mine[-5:] == [
        "a_sub/z0_" + sorted(first.glob("*.JPEG"))[0].name, "a_sub/z1_" + sorted(first.glob("*.JPEG"))[1].name,
        "a_sub/deeper/z0_" + sorted(first.glob("*.JPEG"))[0].name,
        "b_sub/z0_" + sorted(first.glob("*.JPEG"))[0].name, "b_sub/z1_" + sorted(first.glob("*.JPEG"))[1].name]
    assert not any(".hidden" in m or m.startswith(".") for m in mine)
    assert src.labels.tolist() == sorted(src.labels.tolist())  # class folders in order


def test_listing_memory_per_file_is_flat(tmp_path):
    """The scan's own allocations grow by well under 150 bytes per file (measured ~50; the whole-tree listing held
    ~775: a Path, a tuple and a header tuple per file)."""
    from stealer.shards import ImageFolderSource

    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    peaks = {}
    for n in (500, 4000):  # 100 files per class folder: one folder's names are all the listing holds at once
        root = tmp_path / f"n{n}"
        for c in range(n // 100):
            (root / f"c{c:03d}").mkdir(parents=True)
        for i in range(n):
            (root / f"c{i % (n // 100):03d}" / f"image_{i:07d}.png").write_bytes(buf.getvalue())
    ImageFolderSource.scan(tmp_path / "n4000")  # warm-up: pathlib's interned-name table grows once, then stays
    for n in (500, 4000, 500, 4000):  # the smaller of two peaks: a one-time allocation elsewhere is not the scan's
        tracemalloc.start()
        src = ImageFolderSource.scan(tmp_path / f"n{n}")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        peaks[n] = min(peaks.get(n, peak), peak)
        assert len(src) == n and src.labels.tolist() == sorted(i % (n // 100) for i in range(n))
    per_file = (peaks[4000] - peaks[500]) / 3500
    assert per_file < 150, f"the scan holds {per_file:.0f} bytes per file"  # the whole-tree listing: ~775


if __name__ == "__main__":  # regenerate the golden digests (see the module docstring)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        GOLDEN.write_text(json.dumps(_run(Path(d)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
