"""The shard stream: exactly once per epoch over ranks x workers, equal batch counts, resume, corrupt data."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

from stealer.data import ShardStream, epoch_batches, open_shards
from stealer.shards import encode_png, write_shards


def _make_set(path, n=103, per_shard=10, corrupt=()):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        img = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
        data = b"not a png at all" if i in corrupt else encode_png(img)
        samples.append((f"s-{i:05d}", data, "png", i % 3))
    write_shards(samples, path, samples_per_shard=per_shard, source="test", classes=["a", "b", "c"],
                 channels=1, image_size=[8, 8])
    return open_shards(path)


def _epoch(shards, world, workers, epoch=0, batch=8, start=0, **kw):
    out = []
    for rank in range(world):
        s = ShardStream(shards, batch_size=batch, rank=rank, world=world, seed=5, workers=workers,
                        channels=1, image_size=8, shuffle_buffer=16, **kw)
        out.append((len(s), [b for b in s.iter_epoch(epoch, start)]))
    return out


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (3, 0)])
def test_every_sample_exactly_once_equal_batches(tmp_path, world, workers):
    shards = _make_set(tmp_path / "s")
    per_rank = _epoch(shards, world, workers)
    counts = {len(batches) for _, batches in per_rank}
    assert len(counts) == 1 and counts == {per_rank[0][0]}, "every rank must run the same number of steps"
    keys = Counter(k for _, batches in per_rank for b in batches for k in b["key"])
    assert len(keys) == 103 and set(keys.values()) == {1}
    for _, batches in per_rank:
        assert [b["index"] for b in batches] == list(range(len(batches)))
        assert all(0 < len(b["key"]) <= 8 for b in batches)
        assert all(b["image"].shape[1:] == (1, 8, 8) for b in batches)
        assert all(b["label"].tolist() == [int(k[2:]) % 3 for k in b["key"]] for b in batches)


def test_epochs_are_deterministic_and_differ(tmp_path):
    shards = _make_set(tmp_path / "s")
    a = [b["key"] for b in _epoch(shards, 2, 0, epoch=1)[0][1]]
    b = [b["key"] for b in _epoch(shards, 2, 0, epoch=1)[0][1]]
    c = [b["key"] for b in _epoch(shards, 2, 0, epoch=2)[0][1]]
    assert a == b and a != c


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_yields_the_same_tail(tmp_path, workers):
    shards = _make_set(tmp_path / "s")
    full = _epoch(shards, 2, workers, epoch=3)
    tail = _epoch(shards, 2, workers, epoch=3, start=4)
    for (_, f), (_, t) in zip(full, tail):
        assert [b["key"] for b in f[4:]] == [b["key"] for b in t]
        assert [b["index"] for b in t] == list(range(4, len(f)))


def test_worker_processes_match_in_process_streams(tmp_path):
    shards = _make_set(tmp_path / "s")
    # the same number of streams read in-process or by two DataLoader workers gives the same batches
    s = ShardStream(shards, batch_size=8, rank=0, world=1, seed=5, workers=2, channels=1, image_size=8, shuffle_buffer=16)
    from stealer.data import _stream_batches, _round_robin, _chunks

    spec = s._spec(0, 0)
    by_stream = [list(_stream_batches(spec, w)) for w in range(2)]
    expected = sorted((b for bs in by_stream for b in bs), key=lambda b: b["index"])
    got = list(s.iter_epoch(0))
    assert [b["key"] for b in got] == [b["key"] for b in expected]
    assert len(_round_robin([b - a for a, b in _chunks(len(s), 2)])) == len(s)


def test_drop_last_and_limit(tmp_path):
    shards = _make_set(tmp_path / "s")
    per_rank = _epoch(shards, 2, 0, drop_last=True)
    assert all(len(b["key"]) == 8 for _, bs in per_rank for b in bs)
    assert sum(len(b["key"]) for _, bs in per_rank for b in bs) == 96  # 103 // 16 * 16
    limited = _epoch(shards, 1, 0, limit=20)
    assert sum(len(b["key"]) for _, bs in limited for b in bs) == 20


def test_epoch_batches_sizes():
    sizes = epoch_batches(103, world=2, batch_size=8)
    assert sum(sizes) == 103 and len(sizes) % 2 == 0 and max(sizes) <= 8 and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="cannot fill one batch"):
        epoch_batches(10, world=2, batch_size=8, drop_last=True)


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    shards = _make_set(tmp_path / "s", n=30, corrupt={3, 17})
    (_, batches), = _epoch(shards, 1, 0)
    assert sum(b["corrupt"] for b in batches) == 2
    assert sum(len(b["key"]) for b in batches) == 28


def test_truncated_shard_counts_its_tail_as_corrupt(tmp_path):
    shards = _make_set(tmp_path / "s", n=30, per_shard=10)
    victim = os.path.join(shards.root, shards.names[1])
    data = open(victim, "rb").read()
    with open(victim, "wb") as f:
        f.write(data[: len(data) // 2])
    (_, batches), = _epoch(shards, 1, 0)
    got = sum(len(b["key"]) for b in batches)
    assert 20 <= got < 30 and got + sum(b["corrupt"] for b in batches) == 30


def test_missing_folder_and_missing_shard_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_shards.py"):
        open_shards(tmp_path / "nope")
    shards = _make_set(tmp_path / "s", n=30)
    os.remove(os.path.join(shards.root, shards.names[0]))
    with pytest.raises(FileNotFoundError, match="listed in the manifest is missing"):
        open_shards(tmp_path / "s")
