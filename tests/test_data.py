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


def _jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_device_decode_matches_the_cpu_path_and_drops_corrupt_samples(tmp_path):
    """data.decode=device: JPEGs decoded in one batched torchvision call (nvJPEG on a GPU; here the CPU),
    resized and centre-cropped on the device; pixels close to PIL's, corrupt samples dropped with their
    response, PNGs decoded by PIL; keys, labels and order as the CPU path."""
    import torch

    from stealer.device_decode import decode_batch

    # smooth photo-like images (JPEG is lossy on noise), 48 x 64, some grey-scale conversions ahead
    yy, xx = np.mgrid[0:48, 0:64]
    arrs = [np.stack([(np.sin(xx / (5 + i) + i) * 100 + 128), (np.cos(yy / (7 + i)) * 100 + 128),
                      (xx + yy + 20 * i) % 256], -1).astype(np.uint8) for i in range(10)]
    samples = []
    for i, a in enumerate(arrs):
        data, ext = (_jpeg(a), "jpg") if i % 3 else (encode_png(a), "png")
        samples.append((f"k{i:03d}", data, ext, i % 2))
    samples[4] = ("k004", b"\xff\xd8\xff\xe0 not really a jpeg", "jpg", 0)
    # one shard set per extension (a set has one extension): JPEGs incl. the corrupt one, then PNGs
    jpg = [s for s in samples if s[2] == "jpg"]
    write_shards(jpg, tmp_path / "j", samples_per_shard=4, source="t", classes=["a", "b"], channels=3,
                 image_size=None)
    for ch in (3, 1):
        cpu = list(ShardStream(open_shards(tmp_path / "j"), batch_size=8, shuffle=False, channels=ch,
                               image_size=24).iter_epoch(0))
        dev = list(ShardStream(open_shards(tmp_path / "j"), batch_size=8, shuffle=False, channels=ch, image_size=24,
                               decode_device="cpu").iter_epoch(0))
        assert [b["key"] for b in cpu] == [b["key"] for b in dev] and "k004" not in sum((b["key"] for b in dev), [])
        assert [b["corrupt"] for b in cpu] == [b["corrupt"] for b in dev] and sum(b["corrupt"] for b in dev) == 1
        for b, d in zip(cpu, dev):
            assert d["image"].shape == b["image"].shape == (len(b["key"]), ch, 24, 24) and d["image"].dtype == torch.uint8
            assert torch.equal(b["label"], d["label"]) and "bytes" not in d
            diff = (b["image"].float() - d["image"].float()).abs()
            assert diff.mean() < 4.0, diff.mean()  # PIL draft+bilinear vs decode+antialiased bilinear
    # mixed formats and a corrupt JPEG in one call: PNG via PIL, the corrupt one reported, not raised
    raw = [(ext, data) for _, data, ext, _ in samples]
    images, ok = decode_batch(raw, 3, 16, "cpu")
    assert ok == [i != 4 for i in range(10)] and images.shape == (9, 3, 16, 16)
    png0 = torch.from_numpy(arrs[0]).permute(2, 0, 1)
    from stealer.device_decode import resize_center_crop

    assert torch.equal(images[0], resize_center_crop(png0, 16))  # the PNG is lossless: exact pixels, same geometry


def test_device_decode_keeps_responses_aligned(tmp_path):
    import torch

    from stealer.device_decode import decode_batch_on_device

    batch = {"index": 0, "key": ["a", "b", "c"], "label": torch.tensor([0, 1, 2]), "corrupt": 0,
             "bytes": [("jpg", _jpeg(np.full((8, 8, 3), 50, np.uint8))), ("jpg", b"broken"),
                       ("jpg", _jpeg(np.full((8, 8, 3), 200, np.uint8)))],
             "response": torch.tensor([[1.0], [2.0], [3.0]]), "image": torch.empty(0, 3, 0, 0, dtype=torch.uint8)}
    out = decode_batch_on_device(batch, 3, 8, "cpu")
    assert out["key"] == ["a", "c"] and out["label"].tolist() == [0, 2] and out["corrupt"] == 1
    assert out["response"].tolist() == [[1.0], [3.0]] and len(out["bytes"]) == 2
    assert out["image"].shape == (2, 3, 8, 8) and abs(float(out["image"][0].float().mean()) - 50) < 3
    assert abs(float(out["image"][1].float().mean()) - 200) < 3


def test_steal_with_device_decode_equals_the_cpu_path_on_native_size_pngs(tmp_path):
    """Query and train phases with data.decode=device (here on the CPU device): the default data are PNGs
    at the model's size, so every pixel equals the CPU path's and the stolen student is bitwise the same.
    The cache records the decode path and refuses the other one."""
    import torch
    from conftest import tiny_steal_assets

    from launch.common import build_victim_api, make_accelerator
    from stealer.config import load_config
    from stealer.steal import StealConfig, run_query_phase, run_train_phase

    sizes = {"animal_mnist": {"victim_train": 16, "query": 64, "probe_train": 8, "probe_test": 8},
             "digits": {"probe_train": 8, "probe_test": 8}}
    root, victim = tiny_steal_assets(tmp_path, sizes)
    acc = make_accelerator(cpu=True)
    students = {}
    for decode in ("cpu", "device"):
        cfg = load_config(StealConfig, None, [f"out_dir={tmp_path}", f"name={decode}", f"victim.checkpoint={victim}",
                                              f"data.query={root}/data/animal_mnist/query", "data.image_size=16",
                                              f"data.decode={decode}", "query.batch_size=32", "student.width=8",
                                              "train.batch_size=32", "train.epochs=2", "train.augment=false"])
        run_query_phase(cfg, build_victim_api(cfg.victim, cfg.run_dir), acc)
        run_train_phase(cfg, acc)
        students[decode] = torch.load(cfg.run_dir / "student.pt", weights_only=True)
    sd_cpu, sd_dev = (students[k]["state_dict"] for k in ("cpu", "device"))
    assert sd_cpu.keys() == sd_dev.keys() and all(torch.equal(sd_cpu[k], sd_dev[k]) for k in sd_cpu)
    other = load_config(StealConfig, None, [f"out_dir={tmp_path}", "name=device", f"victim.checkpoint={victim}",
                                            f"data.query={root}/data/animal_mnist/query", "data.image_size=16",
                                            "data.decode=cpu"])
    with pytest.raises(ValueError, match=r"other settings \{'decode': \('device', None\)\}"):
        run_query_phase(other, build_victim_api(other.victim, other.run_dir), acc)


def test_stream_batches_have_row_major_strides(tmp_path):
    """A single-channel batch permuted from HWC had strides (S*S, 1, S, 1): "contiguous" and "channels_last"
    at once, which made oneDNN's CPU conv backward corrupt the heap (torch 2.14.1). Every decoded batch is
    row-major now, 1 and 3 channels alike, with the same pixels."""
    shards = _make_set(tmp_path / "s", n=20)
    for channels in (1, 3):
        s = ShardStream(shards, batch_size=8, rank=0, world=1, seed=5, workers=0, channels=channels, image_size=8,
                        shuffle=False)
        for b in s.iter_epoch(0):
            img = b["image"]
            n = img.shape[0]
            assert img.shape == (n, channels, 8, 8)
            assert img.stride() == (channels * 64, 64, 8, 1), img.stride()
