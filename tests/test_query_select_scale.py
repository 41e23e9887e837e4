"""Query selection streams the pool: same subsets as the in-memory path, bounded memory, damaged shards included."""
from __future__ import annotations

import gzip
import io
import tarfile
import tracemalloc

import numpy as np
import pytest

from stealer.data import ShardStream, _iter_shard, open_shards
from stealer.query_select import (_located_samples, coverage_order, coverage_stats, pool_features, read_pool, scan_pool, select_indices,
                                  select_queries)
from stealer.shards import encode_png, write_shards

CLASSES = ["a", "b", "c", "d"]


def _read(folder):
    s = ShardStream(open_shards(folder), batch_size=100, shuffle=False, channels=1, image_size=8, keep_bytes=True)
    keys, labels, raw = [], [], []
    for b in s.iter_epoch(0):
        keys += b["key"]
        labels += b["label"].tolist()
        raw += b["bytes"]
    return keys, labels, raw


@pytest.fixture
def damaged_pool(tmp_path):
    """60 grey 8x8 images in 4 shards of 15: one undecodable image (shard 0), shard 2 gzip-compressed (not a plain
    tar: read by webdataset, copied through the spill file), shard 3 cut short (its tail unreadable)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(60, 8, 8), dtype=np.uint8)
    samples = [(f"img-{i:03d}", b"not a png" if i == 7 else encode_png(images[i]), "png", i % 4) for i in range(60)]
    root = tmp_path / "pool"
    write_shards(samples, root, samples_per_shard=15, source="damaged pool", classes=CLASSES, channels=1,
                 image_size=[8, 8])
    shard2 = root / "train-000002.tar"
    shard2.write_bytes(gzip.compress(shard2.read_bytes()))
    shard3 = root / "train-000003.tar"
    data = shard3.read_bytes()
    shard3.write_bytes(data[: len(data) // 2])
    return root


def _reference(pool_dir, n, strategy, seed, features=None, **kw):
    """The old in-memory path: every readable image in memory (read_pool), then the same maths."""
    pool = read_pool(pool_dir)
    feats = None
    if isinstance(features, str):
        feats = pool_features(pool["images"], features, seed)
    idx = select_indices(n, strategy, seed, labels=pool["labels"], feats=feats, classes=CLASSES,
                         pool_size=len(pool["labels"]), **kw)
    return [pool["keys"][i] for i in idx], [pool["bytes"][i][1] for i in idx], [int(pool["labels"][i]) for i in idx]


@pytest.mark.parametrize("strategy,features,kw", [
    ("random", None, {}), ("random", "pixels", {}), ("class_balanced", None, {}),
    ("coverage", "pixels", {"centres": 3, "spread": 0.0}), ("coverage", "pixels", {"centres": 2, "spread": 0.5}),
    ("coverage", "random_encoder", {"centres": 3, "spread": 1.0})])
def test_streamed_selection_equals_the_in_memory_path(damaged_pool, tmp_path, strategy, features, kw):
    scan = scan_pool(damaged_pool)
    # the stream's own numbering: 60 samples - 1 corrupt - the truncated tail of shard 3
    assert len(scan) == len(read_pool(damaged_pool)["keys"]) and 40 < len(scan) < 59
    assert 0 in scan.unreadable and 3 in scan.unreadable and 2 not in scan.unreadable
    keys, raw, labels = _reference(damaged_pool, 12, strategy, 5, features, **kw)
    m = select_queries(damaged_pool, tmp_path / "sel", 12, strategy, seed=5, features=features, **kw)
    got_keys, got_labels, got_raw = _read(tmp_path / "sel")
    assert got_keys == keys and got_labels == labels and [r[1] for r in got_raw] == raw
    sel = m["selection"]
    assert sel["source_samples"] == len(scan) and "approximation" not in sel
    if features is not None:
        pool = read_pool(damaged_pool)
        f = pool_features(pool["images"], features, 5)
        idx = [pool["keys"].index(k) for k in keys]
        assert {k: sel[k] for k in ("coverage_radius", "mean_nn_distance")} == pytest.approx(
            coverage_stats(f, np.array(idx)), rel=1e-12)  # the old path's stats (smaller distance blocks now)
        nn = np.sqrt(((f[:, None, :] - f[idx][None]) ** 2).sum(-1)).min(1)  # and what they measure, brute force
        assert sel["coverage_radius"] == pytest.approx(nn.max(), rel=1e-6)
        assert sel["mean_nn_distance"] == pytest.approx(nn.mean(), rel=1e-6)
    assert not list(tmp_path.glob(".sel*"))  # no temporary folder, feature file or spill left


def test_gzip_shard_goes_through_the_spill_file(damaged_pool, tmp_path, monkeypatch):
    """Chosen samples of a shard that is not a plain tar are copied out as the pass reads them (the spill file)."""
    import stealer.query_select as qs

    opened = []
    real_open = open

    def spy(path, mode="r", *a, **k):
        if str(path).endswith(".spill") and "w" in mode:
            opened.append(str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(qs, "open", spy, raising=False)
    scan = scan_pool(damaged_pool)
    in_gzip = [i for i in range(sum(scan.readable[:2]), sum(scan.readable[:3]))]
    m = qs.copy_samples(scan, np.array(in_gzip[:3] + [0]), tmp_path / "out", tmp_path / "x.spill",
                        source="t", classes=CLASSES)
    assert opened == [str(tmp_path / "x.spill")] and not (tmp_path / "x.spill").exists()
    assert _read(tmp_path / "out")[0] == ["img-030", "img-031", "img-032", "img-000"] and m["num_samples"] == 4


def test_located_samples_are_the_readers_samples(tmp_path):
    """Header-only grouping of a plain tar gives the reader's samples: bytes at each (offset, size) are its bytes,
    a webdataset metadata member is skipped and an upper-case extension is lower-cased as the reader does."""
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [("__meta__", b"x"), ("k1.PNG", b"png1"), ("k1.cls", b"1"), ("k2.png", b"png22"),
                           ("k2.cls", b"0"), ("k3.png", b"p3")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    located = list(_located_samples(str(path), 2))  # the manifest's count caps the samples, as the reader does
    read = [s for s in _iter_shard(str(path), 2)]
    assert [s["__key__"] for s in located] == [s["__key__"] for s in read] == ["k1", "k2"]
    with open(path, "rb") as f:
        for loc, s in zip(located, read):
            assert set(loc) == set(s)
            for ext in ("png", "cls"):
                f.seek(loc[ext][0])
                assert f.read(loc[ext][1]) == s[ext]
    assert _located_samples("http://host/t.tar", 2) is None


def test_selection_memory_stays_below_the_pool(tmp_path):
    """300 noise images of 128 x 128 (~5 MB of PNG): the in-memory path holds them all, the streamed one a few."""
    rng = np.random.default_rng(1)
    samples = ((f"n{i:04d}", encode_png(rng.integers(0, 256, (128, 128), dtype=np.uint8)), "png", i % 4)
               for i in range(300))
    pool = tmp_path / "pool"
    m = write_shards(samples, pool, samples_per_shard=25, source="noise", classes=CLASSES, channels=1,
                     image_size=[128, 128])
    pool_bytes = sum((pool / s["name"]).stat().st_size for s in m["shards"])
    assert pool_bytes > 4_000_000

    def peak(fn):
        tracemalloc.start()
        fn()
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    held = peak(lambda: read_pool(pool))
    streamed = peak(lambda: select_queries(pool, tmp_path / "sel", 150, "class_balanced", seed=0, samples_per_shard=25))
    assert held > pool_bytes  # the meter sees a whole-pool reader
    assert streamed < pool_bytes / 4, (streamed, pool_bytes)  # 150 chosen images (~2.5 MB) are never held either
    assert len(_read_sized(tmp_path / "sel")) == 150


def _read_sized(folder):
    s = ShardStream(open_shards(folder), batch_size=100, shuffle=False, channels=1, image_size=128)
    return [k for b in s.iter_epoch(0) for k in b["key"]]


def test_coverage_beyond_the_feature_budget_runs_on_a_seeded_subsample(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(120, 8, 8), dtype=np.uint8)
    from stealer.shards import array_samples

    write_shards(array_samples(images, np.arange(120) % 4, key_prefix="img"), tmp_path / "pool", samples_per_shard=40,
                 source="t", classes=CLASSES, channels=1, image_size=[8, 8])
    budget = 8 * 64 * 50  # 50 rows of 8 x 8 pixel features
    radius = {}
    for spread in (0.0, 1.0):
        m = select_queries(tmp_path / "pool", tmp_path / f"c{spread}", 10, "coverage", seed=0, spread=spread,
                           feature_budget=budget)
        sel = m["selection"]
        assert sel["approximation"] == {"subsample": 50, "pool": 120, "feature_budget": budget}
        radius[spread] = sel["coverage_radius"]
    # the subsample is seeded and fixed: the broad end is farthest-point sampling over exactly those 50 rows
    pool = read_pool(tmp_path / "pool")
    rows = np.sort(np.random.default_rng([0, 11]).choice(120, 50, replace=False))
    f = pool_features(pool["images"], "pixels", 0)[rows]
    want = [pool["keys"][i] for i in rows[coverage_order(f, 10, centres=3, spread=1.0, seed=0)]]
    assert _read(tmp_path / "c1.0")[0] == want
    assert radius[0.0] > radius[1.0]  # narrow vs broad still ordered
    again = select_queries(tmp_path / "pool", tmp_path / "c1b", 10, "coverage", seed=0, spread=1.0, feature_budget=budget)
    assert _read(tmp_path / "c1b")[0] == want and again["selection"]["coverage_radius"] == radius[1.0]
    with pytest.raises(ValueError, match=r"coverage n=60 needs n candidate rows.*feature_budget=25600 holds 50 rows.*"
                                         r"at least 30720 bytes or lower n"):
        select_queries(tmp_path / "pool", tmp_path / "c60", 60, "coverage", seed=0, feature_budget=budget)
    assert not (tmp_path / "c60").exists() and not list(tmp_path.glob(".c60*"))


def test_cli_feature_budget_too_small_is_one_line(damaged_pool, tmp_path, capsys):
    from launch.select_queries import main

    with pytest.raises(SystemExit) as e:
        main([str(damaged_pool), str(tmp_path / "cli"), "--n", "20", "--strategy", "coverage",
              "--feature-budget-mib", str(8 * 64 * 10 / 2**20)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: coverage n=20 needs n candidate rows") and "holds 10 rows" in err and "\n" not in err
    assert not (tmp_path / "cli").exists() and not list(tmp_path.glob(".cli*"))
    m = main([str(damaged_pool), str(tmp_path / "cli"), "--n", "5", "--strategy", "coverage", "--feature-budget-mib",
              str(8 * 64 * 10 / 2**20)])
    assert m["selection"]["approximation"]["subsample"] == 10 and m["num_samples"] == 5


def _fps_reference(feats, n, centres, spread, seed):
    """coverage_order as it was before the blocked distance update (whole [m, D] temporaries)."""
    from sklearn.cluster import KMeans

    big_n = feats.shape[0]
    d = KMeans(n_clusters=centres, n_init=4, random_state=seed).fit(feats).transform(feats)
    order, seen = [], np.zeros(big_n, dtype=bool)
    for row in np.argsort(d, axis=0, kind="stable"):
        for i in row:
            if not seen[i]:
                seen[i] = True
                order.append(int(i))
    m = min(big_n, n + int(round(spread * (big_n - n))))
    cand = np.asarray(order[:m])
    x = feats[cand]
    picked, dist = [], np.full(m, np.inf)
    for j in range(m):
        if len(picked) == n:
            break
        if j >= min(centres, n):
            j = int(np.argmax(dist))
        picked.append(j)
        dist = np.minimum(dist, ((x - x[j]) ** 2).sum(1))
        dist[j] = -np.inf
    return cand[np.asarray(picked)]


@pytest.mark.parametrize("block", [7, 4096])
def test_blocked_farthest_point_update_is_the_same_order(monkeypatch, block):
    import stealer.query_select as qs

    monkeypatch.setattr(qs, "FPS_ROWS", block)
    rng = np.random.default_rng(3)
    feats = np.concatenate([rng.normal(size=(150, 9)), rng.normal(size=(100, 9)) * 0.1 + 3, np.zeros((5, 9))])
    for n, centres, spread in [(30, 3, 1.0), (20, 2, 0.3), (12, 4, 0.0)]:
        assert coverage_order(feats, n, centres=centres, spread=spread, seed=1).tolist() == \
            _fps_reference(feats, n, centres, spread, 1).tolist()


def test_scale_benchmark_selection_phases(tmp_path):
    """benchmarks/scale.py's select and select_cov phases run on their pool, each in its own process; with a
    feature budget below the pool the coverage phase selects on the subsample (its rows differ from the run's)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    p = subprocess.run([sys.executable, str(repo / "benchmarks" / "scale.py"), "--n", "100,400", "--phases",
                        "select,select_cov", "--cov-n", "20", "--feature-budget-mib", str(8 * 64 * 200 / 2**20),
                        "--work", str(tmp_path / "w"), "--json", str(tmp_path / "s.json")],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((tmp_path / "s.json").read_text())
    assert [(r["phase"], r["n"]) for r in rows] == [(ph, n) for n in (100, 400) for ph in ("select", "select_cov")]
    assert all(r["seconds"] > 0 and r["peak_rss_mib"] > 20 for r in rows)
    sel = {n: json.loads((tmp_path / "w" / f"n{n}" / "selected_cov" / "manifest.json").read_text())["selection"]
           for n in (100, 400)}
    assert sel[100]["n"] == 10 and "approximation" not in sel[100]  # min(cov-n, N/10); 100 rows fit the budget
    assert sel[400]["n"] == 20 and sel[400]["approximation"]["subsample"] == 200


def test_scan_features_file_reads_back_in_any_chunking(damaged_pool, tmp_path):
    scan = scan_pool(damaged_pool, "pixels", 0, tmp_path / "f.bin")
    want = pool_features(read_pool(damaged_pool)["images"], "pixels", 0)
    assert scan.dim == 64 and (tmp_path / "f.bin").stat().st_size == 4 * 64 * len(scan)
    rows = np.random.default_rng(0).permutation(len(scan))[:17]
    for max_bytes in (1, 8 * 64 * 5, 4 << 20):  # a row, 5 rows, everything per read
        assert np.array_equal(scan.feature_rows(rows, max_bytes=max_bytes), want[rows])
    assert np.array_equal(np.concatenate(list(scan.feature_chunks(7))), want)


def test_a_plain_tar_the_reader_gives_up_on_is_located_up_to_the_same_sample(tmp_path):
    """A duplicate member in a plain tar stops the reader there (the rest counts as corrupt); the header-only
    pass stops at the same sample instead of raising."""
    from stealer.shards import array_samples

    images = np.random.default_rng(4).integers(0, 256, size=(20, 8, 8), dtype=np.uint8)
    root = tmp_path / "pool"
    write_shards(array_samples(images, np.arange(20) % 4, key_prefix="img"), root, samples_per_shard=10, source="t",
                 classes=CLASSES, channels=1, image_size=[8, 8])
    shard = root / "train-000001.tar"
    with tarfile.open(shard) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    dup = next(i for i, (name, _) in enumerate(members) if name.endswith(".png") and "13" in name)
    members.insert(dup + 1, members[dup])
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    scan = scan_pool(root)
    assert len(scan) == 13 and scan.unreadable == {1: list(range(3, 10))}
    assert [s["__key__"] for s in _located_samples(str(shard), 10)] == [s["__key__"] for s in
                                                                        _iter_shard(str(shard), 10) if s]
    keys, raw, labels = _reference(root, 12, "random", 0)
    select_queries(root, tmp_path / "sel", 12, "random", seed=0)
    got_keys, got_labels, got_raw = _read(tmp_path / "sel")
    assert got_keys == keys and got_labels == labels and [r[1] for r in got_raw] == raw
