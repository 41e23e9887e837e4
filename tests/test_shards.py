"""Tests for stealer.datasets, stealer.shards and launch/make_shards.py (small data, a few seconds)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from launch.make_shards import main as make_shards_main
from stealer import datasets
from stealer.datasets import (
    ANIMAL_MNIST_CLASSES,
    BUILTIN_DATASETS,
    DEFAULT_SPLITS,
    load_animal_mnist,
    load_builtin,
    load_digits,
    load_numpy_pickle,
    split_indices,
)
from stealer.shards import (
    FORMAT,
    ShardWarning,
    array_samples,
    build_default_data,
    encode_png,
    read_manifest,
    write_shards,
)

__all__: list[str] = []


# --------------------------------------------------------------------------- helpers


def _read_set(folder: Path) -> tuple[dict, list[dict]]:
    """Read every sample of a shard folder with webdataset, in manifest shard order."""
    manifest = read_manifest(folder)
    urls = [str(folder / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    return manifest, samples


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def _tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def _all_keys(folder: Path) -> list[str]:
    return [s["__key__"] for s in _read_set(folder)[1]]


# --------------------------------------------------------------------------- npz -> shards


@pytest.mark.parametrize("rgb", [False, True])
def test_npz_round_trip(tmp_path: Path, rgb: bool) -> None:
    rng = np.random.default_rng(0)
    n = 23
    shape = (n, 7, 5, 3) if rgb else (n, 7, 5)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    labels = rng.integers(0, 3, size=n)
    npz = tmp_path / "toy.npz"
    np.savez(npz, images=images, labels=labels, classes=np.array(["a", "b", "c"]))
    out = tmp_path / "shards"
    assert make_shards_main([str(npz), str(out), "--samples-per-shard", "5"]) == 0

    manifest, samples = _read_set(out)
    assert manifest["format"] == FORMAT
    assert manifest["num_samples"] == n
    assert sum(s["count"] for s in manifest["shards"]) == n
    assert [s["name"] for s in manifest["shards"]] == [f"train-{i:06d}.tar" for i in range(5)]
    assert manifest["classes"] == ["a", "b", "c"]
    assert manifest["channels"] == (3 if rgb else 1)
    assert manifest["image_size"] == [7, 5]
    assert manifest["image_ext"] == "png"
    assert manifest["skipped"] == 0
    for shard in manifest["shards"]:
        members = _tar_members(out / shard["name"])
        assert len(members) == 2 * shard["count"]
        assert {m.rsplit(".", 1)[1] for m in members} == {"png", "cls"}

    keys = [s["__key__"] for s in samples]
    assert len(keys) == n and len(set(keys)) == n
    seen = set()
    for s in samples:
        idx = int(s["__key__"].rsplit("-", 1)[1])
        seen.add(idx)
        pixels = _decode(s["png"])
        np.testing.assert_array_equal(pixels, images[idx])
        assert int(s["cls"].decode("ascii")) == labels[idx]
    assert seen == set(range(n))


def test_tar_file_expander_reads_shards(tmp_path: Path) -> None:
    images = np.arange(6 * 4 * 4, dtype=np.uint8).reshape(6, 4, 4)
    labels = np.array([0, 1, 0, 1, 0, 1])
    write_shards(
        array_samples(images, labels, key_prefix="toy"), tmp_path, samples_per_shard=4,
        source="test", classes=["x", "y"], channels=1, image_size=[4, 4],
    )
    streams = [{"url": str(p), "stream": open(p, "rb")} for p in sorted(tmp_path.glob("train-*.tar"))]
    try:
        files = [f for f in wds.tariterators.tar_file_expander(streams) if f]  # {} marks the end of a shard
    finally:
        for s in streams:
            s["stream"].close()
    assert sorted(f["fname"] for f in files) == sorted(
        [f"toy-{i:06d}.png" for i in range(6)] + [f"toy-{i:06d}.cls" for i in range(6)]
    )


def test_shard_bytes_are_deterministic(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, size=(9, 6, 6), dtype=np.uint8)
    labels = np.arange(9) % 2
    digests = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        write_shards(
            array_samples(images, labels, key_prefix="d"), out, samples_per_shard=4,
            source="test", classes=["0", "1"], channels=1, image_size=[6, 6],
        )
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))])
    assert digests[0] == digests[1]
    with tarfile.open(tmp_path / "run0" / "train-000000.tar") as tar:
        info = tar.getmembers()[0]
        assert (info.mtime, info.uid, info.gid, info.uname) == (0, 0, 0, "")


def test_write_shards_rejects_bad_input(tmp_path: Path) -> None:
    png = encode_png(np.zeros((2, 2), np.uint8))
    kw = dict(source="t", classes=["a"], channels=1, image_size=[2, 2])
    with pytest.raises(ValueError, match="duplicate"):
        write_shards([("k", png, "png", 0), ("k", png, "png", 0)], tmp_path / "a", **kw)
    with pytest.raises(ValueError, match="bad sample key"):
        write_shards([("a.b", png, "png", 0)], tmp_path / "b", **kw)
    with pytest.raises(ValueError, match="class index"):
        write_shards([("k", png, "png", 1)], tmp_path / "c", **kw)
    with pytest.raises(ValueError, match="one extension"):
        write_shards([("k1", png, "png", 0), ("k2", png, "jpg", 0)], tmp_path / "d", **kw)
    with pytest.raises(ValueError, match="no samples"):
        write_shards([], tmp_path / "e", **kw)
    for sub in "abcde":  # a failed write leaves no manifest and no temporary files
        folder = tmp_path / sub
        assert not (folder / "manifest.json").exists()
        assert not list(folder.glob(".*tmp"))
    write_shards([("k", png, "png", 0)], tmp_path / "f", **kw)
    with pytest.raises(FileExistsError):
        write_shards([("k", png, "png", 0)], tmp_path / "f", **kw)
    write_shards([("k", png, "png", 0)], tmp_path / "f", overwrite=True, **kw)


def test_read_manifest_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        read_manifest(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"no manifest.json in {tmp_path}: not a shard folder" in msg
    assert "python launch/make_shards.py" in msg


# --------------------------------------------------------------------------- image folders


def _save(path: Path, array: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def test_image_folder_with_corrupt_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(2)
    src = tmp_path / "pets"
    originals: dict[tuple[str, str], np.ndarray] = {}
    for cls in ("dog", "cat"):
        for i in range(3):
            arr = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
            _save(src / cls / f"img{i}.png", arr, "PNG")
            originals[(cls, f"img{i}.png")] = arr
    (src / "cat" / "garbage.png").write_bytes(b"this is not an image")
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(good, format="PNG")
    (src / "dog" / "truncated.png").write_bytes(good.getvalue()[:200])  # header fine, pixels cut off
    (src / "dog" / "notes.txt").write_text("ignored")

    out = tmp_path / "out"
    assert make_shards_main([str(src), str(out), "--keep-order"]) == 0
    err = capsys.readouterr().err
    assert "garbage.png" in err and "truncated.png" in err

    manifest, samples = _read_set(out)
    assert manifest["classes"] == ["cat", "dog"]
    assert manifest["num_samples"] == 6
    assert manifest["skipped"] == 2
    assert manifest["channels"] == 3
    assert manifest["image_size"] is None  # the truncated file is 64x64, the others 6x8
    assert manifest["image_ext"] == "png"
    assert len({s["__key__"] for s in samples}) == 6
    got = sorted((int(s["cls"]), _decode(s["png"]).tobytes()) for s in samples)
    want = sorted((["cat", "dog"].index(c), a.tobytes()) for (c, _), a in originals.items())
    assert got == want


def test_image_folder_skips_are_warned_by_library(tmp_path: Path) -> None:
    from stealer.shards import ImageFolderSource, SkipCounter

    src = tmp_path / "src"
    _save(src / "a" / "x.png", np.zeros((4, 4), np.uint8), "PNG")
    _save(src / "b" / "y.png", np.full((4, 4), 7, np.uint8), "PNG")
    (src / "b" / "bad.jpg").write_bytes(b"\xff\xd8 nope")
    with pytest.warns(ShardWarning, match="bad.jpg"):
        folder = ImageFolderSource.scan(src)
    counter = SkipCounter()
    samples = list(folder.samples(skipped=counter))
    assert len(samples) == 2 and counter.n == 1
    assert [cls for *_, cls in samples] == [0, 1]
    assert folder.channels == 1 and folder.native_size == [4, 4]


def test_image_folder_jpeg_copied_unless_resized(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    src = tmp_path / "jpegs"
    for cls in ("a", "b"):
        for i in range(2):
            _save(src / cls / f"{i}.jpg", rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8), "JPEG")
    originals = {p.read_bytes() for p in src.rglob("*.jpg")}

    out = tmp_path / "copied"
    assert make_shards_main([str(src), str(out)]) == 0
    manifest, samples = _read_set(out)
    assert manifest["image_ext"] == "jpg" and manifest["image_size"] == [10, 12]
    assert {s["jpg"] for s in samples} == originals

    out2 = tmp_path / "resized"
    assert make_shards_main([str(src), str(out2), "--image-size", "5"]) == 0
    manifest2, samples2 = _read_set(out2)
    assert manifest2["image_ext"] == "png" and manifest2["image_size"] == [5, 5]
    assert all(_decode(s["png"]).shape == (5, 5, 3) for s in samples2)


def test_image_folder_parallel_workers_write_the_same_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--workers N (threads for headers, processes for encoding) changes nothing in the output."""
    rng = np.random.default_rng(5)
    src = tmp_path / "mixed"
    for c, cls in enumerate(("ant", "bee", "cow")):
        for i in range(14):
            arr = rng.integers(0, 256, size=(9 + i % 3, 11, 3), dtype=np.uint8)
            _save(src / cls / f"{i:02d}.{'jpg' if i % 2 else 'png'}", arr, "JPEG" if i % 2 else "PNG")
    (src / "bee" / "05b.png").write_bytes(b"not an image")  # bad header: found by the scan
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(good, format="PNG")
    (src / "cow" / "07b.png").write_bytes(good.getvalue()[:150])  # header fine, pixels cut: found when encoding
    outs, errs = {}, {}
    for w in (1, 3):
        out = tmp_path / f"w{w}"
        argv = [str(src), str(out), "--image-size", "8", "--samples-per-shard", "7", "--split", "a=20", "--split", "b=15",
                "--workers", str(w)]
        assert make_shards_main(argv) == 0
        errs[w] = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        outs[w] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.tar"))}
        for split in ("a", "b"):
            m = read_manifest(out / split)
            outs[w][Path(split) / "counts"] = json.dumps([m["num_samples"], m["skipped"], m["shards"]]).encode()
    assert len(outs[1]) > 4 and outs[1] == outs[3]  # every tar byte for byte, the same counts
    assert errs[1] == errs[3] and any("05b.png" in e for e in errs[1]) and any("07b.png" in e for e in errs[1])
    assert make_shards_main([str(src), str(tmp_path / "x"), "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- splits


def test_split_indices_disjoint_stratified_deterministic() -> None:
    labels = np.repeat(np.arange(4), [30, 30, 20, 20])
    sizes = {"a": 50, "b": 25, "c": 10}
    out = split_indices(labels, sizes, seed=5)
    assert {k: len(v) for k, v in out.items()} == sizes
    allidx = np.concatenate(list(out.values()))
    assert len(np.unique(allidx)) == len(allidx)
    for name, idx in out.items():
        counts = np.bincount(labels[idx], minlength=4)
        expected = sizes[name] * np.array([0.3, 0.3, 0.2, 0.2])
        assert np.all(np.abs(counts - expected) <= 1), (name, counts)
    again = split_indices(labels, sizes, seed=5)
    assert all(np.array_equal(out[k], again[k]) for k in sizes)
    other = split_indices(labels, sizes, seed=6)
    assert not all(np.array_equal(out[k], other[k]) for k in sizes)
    with pytest.raises(ValueError, match="only 100 samples"):
        split_indices(labels, {"a": 60, "b": 41}, seed=0)
    full = split_indices(labels, {"x": 100}, seed=0)["x"]
    assert sorted(full.tolist()) == list(range(100))


def test_cli_split_option(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(3), 20)
    images = rng.integers(0, 256, size=(60, 4, 4), dtype=np.uint8)
    npz = tmp_path / "d.npz"
    np.savez(npz, images=images, labels=labels)
    out = tmp_path / "splits"
    rc = make_shards_main([str(npz), str(out), "--split", "train=30", "--split", "test=15", "--samples-per-shard", "7"])
    assert rc == 0
    keys: dict[str, set[str]] = {}
    for name, size in (("train", 30), ("test", 15)):
        manifest, samples = _read_set(out / name)
        assert manifest["num_samples"] == size
        assert Counter(int(s["cls"]) for s in samples) == {c: size // 3 for c in range(3)}
        keys[name] = {s["__key__"] for s in samples}
        assert len(keys[name]) == size
    assert not keys["train"] & keys["test"]
    assert not (out / "manifest.json").exists()


# --------------------------------------------------------------------------- CLI errors


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert make_shards_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("make_shards: error:")
    return err


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "does not exist" in _cli_error([str(tmp_path / "nope"), str(tmp_path / "o")], capsys)

    bad = tmp_path / "bad.npz"
    np.savez(bad, pictures=np.zeros((2, 3, 3), np.uint8))
    err = _cli_error([str(bad), str(tmp_path / "o")], capsys)
    assert "images / labels" in err and "np.savez" in err

    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    assert "no images" in _cli_error([str(empty), str(tmp_path / "o")], capsys)
    flat = tmp_path / "flat"
    flat.mkdir()
    assert "no class sub-folders" in _cli_error([str(flat), str(tmp_path / "o")], capsys)

    err = _cli_error(["builtin:imagenet", str(tmp_path / "o")], capsys)
    assert "builtin:animal_mnist" in err and "builtin:digits" in err

    good = tmp_path / "good.npz"
    np.savez(good, images=np.zeros((4, 2, 2), np.uint8), labels=np.array([0, 1, 0, 1]))
    assert make_shards_main([str(good), str(tmp_path / "set")]) == 0
    capsys.readouterr()
    assert "--overwrite" in _cli_error([str(good), str(tmp_path / "set")], capsys)
    assert make_shards_main([str(good), str(tmp_path / "set"), "--overwrite"]) == 0
    assert "only 4 samples" in _cli_error([str(good), str(tmp_path / "s2"), "--split", "a=3", "--split", "b=2"], capsys)


# --------------------------------------------------------------------------- built-in datasets


def test_animal_mnist_loader() -> None:
    images, labels, classes = load_animal_mnist()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10
    assert classes == ANIMAL_MNIST_CLASSES and len(classes) == 10
    assert images.max() == 255
    assert "animal_mnist" not in sys.modules  # read as data files, never imported (it needs tensorflow)
    assert "tensorflow" not in sys.modules


def test_digits_loader() -> None:
    from sklearn.datasets import load_digits as sk_digits

    images, labels, classes = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    assert labels.dtype == np.int64 and sorted(set(labels.tolist())) == list(range(10))
    assert classes == [str(i) for i in range(10)]
    np.testing.assert_array_equal(images, np.rint(sk_digits().images * 255 / 16).astype(np.uint8))


def test_load_builtin_unknown_name() -> None:
    with pytest.raises(ValueError) as info:
        load_builtin("cifar10")
    assert "animal_mnist" in str(info.value) and "digits" in str(info.value)
    assert set(BUILTIN_DATASETS) == {"animal_mnist", "digits"}
    assert sum(DEFAULT_SPLITS["animal_mnist"].values()) <= 10000
    assert sum(DEFAULT_SPLITS["digits"].values()) <= 1797


def test_missing_packages_name_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = datasets.importlib.util.find_spec
    monkeypatch.setattr(
        datasets.importlib.util, "find_spec", lambda name, *a: None if name == "animal_mnist" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps animal-mnist==0\.4"):
        load_builtin("animal_mnist")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_builtin("digits")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(marker))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_numpy_pickle(evil)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_numpy_pickle(gzip.compress(evil))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        load_numpy_pickle(pickle.dumps(np.array([1, "x"], dtype=object)))
    with pytest.raises(pickle.UnpicklingError):
        load_numpy_pickle(pickle.dumps({"a": 1}))
    arr = np.arange(12, dtype=np.int64).reshape(3, 4)
    np.testing.assert_array_equal(load_numpy_pickle(pickle.dumps(arr, protocol=4)), arr)
    np.testing.assert_array_equal(load_numpy_pickle(gzip.compress(pickle.dumps(arr.astype(np.uint8)))), arr)


# --------------------------------------------------------------------------- default data


def test_build_default_data_small(tmp_path: Path) -> None:
    sizes = {
        "animal_mnist": {"victim_train": 40, "query": 30, "probe_train": 20, "probe_test": 10},
        "digits": {"probe_train": 20, "probe_test": 10},
    }
    paths = build_default_data(tmp_path, seed=0, image_size=16, samples_per_shard=15, sizes=sizes)
    assert set(paths) == {f"{d}/{s}" for d, splits in sizes.items() for s in splits}
    all_keys: list[str] = []
    for name, folder in paths.items():
        dataset, split = name.split("/")
        assert folder == tmp_path / dataset / split
        manifest, samples = _read_set(folder)
        assert manifest["num_samples"] == sizes[dataset][split] == len(samples)
        assert manifest["channels"] == 1 and manifest["image_size"] == [16, 16]
        assert all(_decode(s["png"]).shape == (16, 16) for s in samples)
        if dataset == "animal_mnist":
            assert Counter(int(s["cls"]) for s in samples) == {c: sizes[dataset][split] // 10 for c in range(10)}
        all_keys += [s["__key__"] for s in samples]
    assert len(all_keys) == len(set(all_keys))
    assert not list(tmp_path.rglob(".*tmp"))

    # a second call leaves finished splits alone and rebuilds a missing one
    stamp = {n: (p / "manifest.json").stat().st_mtime_ns for n, p in paths.items()}
    (paths["digits/probe_test"] / "manifest.json").unlink()
    build_default_data(tmp_path, seed=0, image_size=16, samples_per_shard=15, sizes=sizes)
    for name, folder in paths.items():
        same = (folder / "manifest.json").stat().st_mtime_ns == stamp[name]
        assert same == (name != "digits/probe_test")
    assert json.loads((paths["digits/probe_test"] / "manifest.json").read_text())["num_samples"] == 10


def test_cli_runs_as_script() -> None:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "launch/make_shards.py", "--help"], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ("--samples-per-shard", "--image-size", "--split", "--seed", "--prefix", "builtin:default"):
        assert flag in proc.stdout
