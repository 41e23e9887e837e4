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
