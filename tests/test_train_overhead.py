"""The train phase's read of cached answers: ``stealer.data.load_npy`` returns exactly what
``np.load`` returns (it only skips re-parsing a header it has seen), falls back to ``np.load`` for
what it does not know, and a cache stream's responses are bitwise those ``np.load`` reads."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from stealer import data as data_mod
from stealer.data import ShardStream, load_npy, open_shards


def _npy(a: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    if version is None:
        np.save(buf, a, allow_pickle=False)
    else:
        np.lib.format.write_array(buf, a, version=version, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("arr", [
    np.arange(7, dtype=np.float32) - 3.5,
    np.linspace(-2, 2, 12, dtype=np.float16).reshape(3, 4),  # an [V, D] answer of a multi-view attack
    np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),  # Fortran order: np.load's path
    np.array(2.5, dtype=">f8"),  # big-endian 0-d
    np.zeros((0, 5), dtype=np.float32),
])
@pytest.mark.parametrize("version", [None, (2, 0), (3, 0)])
def test_load_npy_equals_np_load(arr, version):
    blob = _npy(arr, version)
    want = np.load(io.BytesIO(blob), allow_pickle=False)
    for _ in range(2):  # the first call parses the header, the second uses the remembered one
        got = load_npy(blob)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes(order="A") == want.tobytes(order="A") and np.array_equal(got, want)


def test_load_npy_remembers_headers_and_refuses_truncated():
    a = np.random.default_rng(0).standard_normal(33).astype(np.float32)
    blob = _npy(a)
    load_npy(blob)
    assert blob[: blob.index(b"\n") + 1] in data_mod._NPY_HEADERS  # the fast path was taken
    with pytest.raises(ValueError):  # a truncated answer fails as np.load fails (a corrupt sample, skipped)
        load_npy(blob[:-4])
    with pytest.raises(ValueError):
        load_npy(b"not an npy file at all")


def _write_cache(root, n: int, dim: int, dtype: str) -> np.ndarray:
    """A response cache written by the query phase's own writer (``ResponseCache``)."""
    from stealer.cache import ResponseCache
    from stealer.shards import encode_png

    rng = np.random.default_rng(1)
    cache = ResponseCache(root, dtype=dtype)
    cache.write_meta({"out_dim": dim})
    answers = rng.standard_normal((n, dim)).astype(np.float32)
    images = [("png", encode_png(rng.integers(0, 256, (8, 8), dtype=np.uint8))) for _ in range(n)]
    for lo in range(0, n, 4):  # a few answered batches, one tar each
        cache.write_batch([f"k{i:04d}" for i in range(lo, min(n, lo + 4))], images[lo:lo + 4], [0] * len(images[lo:lo + 4]),
                          answers[lo:lo + 4])
    cache.finalize(source="test")
    return answers.astype(np.float16).astype(np.float32) if dtype == "float16" else answers


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cache_stream_responses_are_np_load_bitwise(tmp_path, dtype):
    answers = _write_cache(tmp_path, 10, 6, dtype)
    stream = ShardStream(open_shards(tmp_path), batch_size=4, shuffle=False, workers=0, channels=1, image_size=8)
    got = {}
    for batch in stream.iter_epoch(0):
        assert batch["response"].dtype == torch.float32 and batch["response"].shape[1] == 6
        got.update(zip(batch["key"], batch["response"]))
    assert len(got) == 10
    for i, a in enumerate(answers):
        assert torch.equal(got[f"k{i:04d}"], torch.from_numpy(a))


def _samples(url: str, n: int) -> list:
    return [None if s is None else {k: v for k, v in s.items()} for s in data_mod._iter_shard(url, n)]


def _tar(path, members: list[tuple[str, bytes]], fmt=None) -> str:
    import tarfile

    with tarfile.open(path, "w", **({"format": fmt} if fmt is not None else {})) as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return str(path)


def test_local_tar_reader_yields_what_webdataset_yields(tmp_path, monkeypatch):
    """The header reader and webdataset's tarfile stream give the same samples for the shards the
    project writes (query shards, response caches) and for a folder prefix, webdataset metadata files,
    an empty member, a 512-byte-multiple member; pax long names, links and damaged files are left to tarfile."""
    import tarfile

    rng = np.random.default_rng(2)
    blob = lambda n: rng.integers(0, 256, n, dtype=np.uint8).tobytes()  # noqa: E731
    answers = _write_cache(tmp_path / "cache", 9, 5, "float32")
    del answers
    cache_tar = str(sorted((tmp_path / "cache").glob("resp-*.tar"))[0])
    plain = _tar(tmp_path / "plain.tar", [("a/x1.png", blob(700)), ("a/x1.cls", b"3"), ("__meta__", b"m"),
                                          ("x2.png", blob(512)), ("x2.cls", b""), ("x3.jpg", blob(1))])
    long = _tar(tmp_path / "long.tar", [("k" * 120 + ".png", blob(10)), ("k" * 120 + ".cls", b"1")], fmt=tarfile.PAX_FORMAT)
    gnu = _tar(tmp_path / "gnu.tar", [("g" * 120 + ".png", blob(10))], fmt=tarfile.GNU_FORMAT)
    whole = open(plain, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:1500])  # inside the first member's padding
    cut2 = tmp_path / "cut2.tar"
    cut2.write_bytes(whole[:3000])  # inside the fourth member's data
    cases = ((cache_tar, 4, True), (plain, 3, True), (long, 1, False), (gnu, 1, False), (str(cut), 3, False),
             (str(cut2), 3, False))
    for url, n, fast in cases:
        assert (data_mod._local_tar_members(url) is not None) == fast, url
        got = _samples(url, n)
        with monkeypatch.context() as m:
            m.setattr(data_mod, "_local_tar_members", lambda path: None)  # webdataset's reader alone
            want = _samples(url, n)
        assert got == want, url
    assert [s["__key__"] for s in _samples(plain, 3)] == ["a/x1", "x2", "x3"]
