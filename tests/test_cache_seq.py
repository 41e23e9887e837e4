"""The response cache numbers its shards from one folder listing per cache object, not one per batch
(a glob before every batch made a query phase O(N^2) in its shard count: ~450 s at 1M queries)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stealer.cache import ResponseCache


def _batch(cache: ResponseCache, start: int, n: int = 4) -> Path:
    keys = [f"k{start + i:06d}" for i in range(n)]
    return cache.write_batch(keys, [("png", b"x%d" % (start + i)) for i in range(n)], [i % 3 for i in range(n)],
                             np.full((n, 5), float(start), dtype=np.float32))


def test_shard_numbers_continue_across_objects_and_ranks(tmp_path):
    a = ResponseCache(tmp_path / "c", rank=0)
    names = [_batch(a, 4 * i).name for i in range(3)]
    other = ResponseCache(tmp_path / "c", rank=1)
    names.append(_batch(other, 100).name)
    b = ResponseCache(tmp_path / "c", rank=0)  # a resumed run: continues after what is on disk
    names.append(_batch(b, 200).name)
    assert names == ["resp-r000-000000.tar", "resp-r000-000001.tar", "resp-r000-000002.tar",
                     "resp-r001-000000.tar", "resp-r000-000003.tar"]
    assert len(b.done_keys()) == 20 and b.num_cached() == 20


def test_one_listing_per_cache_object_not_per_batch(tmp_path, monkeypatch):
    cache = ResponseCache(tmp_path / "c")
    calls = []
    real = Path.glob

    def counting(self, pattern, *a, **k):
        calls.append(pattern)
        return real(self, pattern, *a, **k)

    monkeypatch.setattr(Path, "glob", counting)
    for i in range(30):
        _batch(cache, 4 * i)
    assert calls.count("resp-r000-*.tar") == 1, calls  # was 30: one per batch
    monkeypatch.undo()
    assert len(list((tmp_path / "c").glob("resp-r000-*.tar"))) == 30


def test_failed_write_keeps_the_number_free(tmp_path, monkeypatch):
    cache = ResponseCache(tmp_path / "c")
    _batch(cache, 0)
    import stealer.cache as mod

    def full_disk(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mod, "tar_writer", full_disk)
    try:
        _batch(cache, 4)
    except mod.CacheWriteError:
        pass
    else:
        raise AssertionError("the simulated full disk did not fail the write")
    monkeypatch.undo()
    assert _batch(cache, 8).name == "resp-r000-000001.tar"  # no gap: the failed batch left no shard
