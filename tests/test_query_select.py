"""Query-set choices: random, class-balanced and coverage-controlled subsets written as shard folders."""
from __future__ import annotations

import numpy as np
import pytest

from stealer.data import ShardStream, open_shards
from stealer.query_select import (class_balanced_order, coverage_order, coverage_stats, photo_patches, select_indices,
                                  select_queries, write_photo_patches)
from stealer.shards import array_samples, read_manifest, write_shards

CLASSES = ["a", "b", "c", "d"]


@pytest.fixture
def pool(tmp_path):
    """40 grey 8x8 images, 10 per class; image i is filled with the value 6 * i (so pixels identify it)."""
    images = np.stack([np.full((8, 8), 6 * i, dtype=np.uint8) for i in range(40)])
    labels = np.arange(40) % 4
    write_shards(array_samples(images, labels, key_prefix="img"), tmp_path / "pool", samples_per_shard=15,
                 source="test pool", classes=CLASSES, channels=1, image_size=[8, 8])
    return tmp_path / "pool"


def _read(folder):
    s = ShardStream(open_shards(folder), batch_size=100, shuffle=False, channels=1, image_size=8, keep_bytes=True)
    keys, labels, values, raw = [], [], [], []
    for b in s.iter_epoch(0):
        keys += b["key"]
        labels += b["label"].tolist()
        values += b["image"][:, 0, 0, 0].tolist()
        raw += b["bytes"]
    return keys, labels, values, raw


def test_random_subset_is_a_seeded_sample_with_the_source_bytes(pool, tmp_path):
    m = select_queries(pool, tmp_path / "r", 12, "random", seed=3)
    keys, labels, values, raw = _read(tmp_path / "r")
    assert m["num_samples"] == 12 and len(set(keys)) == 12
    src_keys, src_labels, src_values, src_raw = _read(pool)
    src = {k: (lab, v, r) for k, lab, v, r in zip(src_keys, src_labels, src_values, src_raw)}
    for k, lab, v, r in zip(keys, labels, values, raw):
        assert src[k] == (lab, v, r)  # same key, label, pixels and encoded bytes as in the pool
    sel = read_manifest(tmp_path / "r")["selection"]
    assert sel["strategy"] == "random" and sel["n"] == 12 and sel["seed"] == 3 and sel["source"] == str(pool.resolve())
    assert sum(sel["class_counts"].values()) == 12 and "select_queries strategy=random" in m["source"]
    again = select_queries(pool, tmp_path / "r2", 12, "random", seed=3)
    assert _read(tmp_path / "r2")[0] == keys and again["selection"]["class_counts"] == sel["class_counts"]
    select_queries(pool, tmp_path / "r3", 12, "random", seed=4)
    assert _read(tmp_path / "r3")[0] != keys  # another seed, another sample
    with pytest.raises(FileExistsError, match="already holds"):
        select_queries(pool, tmp_path / "r", 12, "random", seed=3)


def test_class_balanced_equal_per_class_and_prefix_balanced(pool, tmp_path):
    m = select_queries(pool, tmp_path / "b", 10, "class_balanced", seed=0)
    counts = m["selection"]["class_counts"]
    assert sorted(counts.values()) == [2, 2, 3, 3] and sum(counts.values()) == 10  # 10 = 4 x 2 + 2 extra
    labels = _read(tmp_path / "b")[1]
    first8 = np.bincount(labels[:8], minlength=4)
    assert (first8 == 2).all()  # class-interleaved: every prefix of whole rounds is balanced
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="class 'c'.*has 1.*at most 4"):
        class_balanced_order(np.array([0, 0, 1, 1, 2, 3, 3]), 8, rng, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="needs a class label"):
        class_balanced_order(np.array([0, -1, 1]), 2, rng)


def test_coverage_hand_computed_narrow_and_broad():
    # 1-D pool; one k-means centre = the mean 7.375. Ranked by distance to it: 10, 11, 3, 12, 2, 1, 0, 20.
    x = np.array([0, 1, 2, 3, 10, 11, 12, 20], dtype=float)[:, None]
    # broad (spread 1): farthest-point sampling over all, from the image nearest the centre (10):
    # then 0 (distance 10, first of the tie with 20 in ranked order), then 20, then 3 (3 from 0, 7 from 10)
    assert x[coverage_order(x, 4, centres=1, spread=1.0), 0].tolist() == [10, 0, 20, 3]
    # narrow (spread 0): exactly the 3 images nearest the centre, in farthest-point order
    assert x[coverage_order(x, 3, centres=1, spread=0.0), 0].tolist() == [10, 3, 11]
    # two tight clusters + outliers, 2 centres, narrow: 2 images around each centre
    y = np.array([0.0, 0.1, 0.2, 50, 100.0, 100.1, 100.2, 150])[:, None]
    got = sorted(y[coverage_order(y, 4, centres=2, spread=0.0, seed=0), 0].tolist())
    assert got in ([0.0, 0.1, 100.0, 100.1], [0.0, 0.1, 100.1, 100.2], [0.1, 0.2, 100.0, 100.1], [0.1, 0.2, 100.1, 100.2])
    # selected {10, 0, 20}: distances 0,1,2,3,0,1,2,0 -> radius 3, mean 9 / 8
    assert coverage_stats(x, np.array([4, 0, 7])) == pytest.approx({"coverage_radius": 3.0, "mean_nn_distance": 1.125})
    with pytest.raises(ValueError, match="spread=1.5"):
        coverage_order(x, 3, spread=1.5)


def test_coverage_stats_chunked_equals_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 7))
    sel = rng.choice(300, 40, replace=False)
    nn = np.sqrt(((x[:, None, :] - x[sel][None]) ** 2).sum(-1)).min(1)
    for max_bytes in (1, 8 * 40 * 7, 64 << 20):  # one row per chunk, 7 rows, everything at once
        got = coverage_stats(x, sel, max_bytes=max_bytes)
        assert got["coverage_radius"] == pytest.approx(nn.max(), rel=1e-9)
        assert got["mean_nn_distance"] == pytest.approx(nn.mean(), rel=1e-9)


def test_coverage_spread_widens_the_set(pool, tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 5))
    radius = []
    for spread in (0.0, 0.5, 1.0):
        m = select_queries(pool, tmp_path / f"c{spread}", 8, "coverage", seed=0, features=feats, centres=2, spread=spread)
        sel = m["selection"]
        assert sel["spread"] == spread and sel["centres"] == 2 and sel["features"] == "array"
        radius.append(sel["coverage_radius"])
    assert radius[0] > radius[2] and radius[1] >= radius[2]  # broad covers the pool best
    # pixel features by default; image i has value 6 i: broad = evenly spread values, narrow = pairs around 3 centres
    m = select_queries(pool, tmp_path / "px", 6, "coverage", seed=0, spread=1.0)
    broad = np.diff(sorted(_read(tmp_path / "px")[2]))
    select_queries(pool, tmp_path / "px0", 6, "coverage", seed=0, spread=0.0)
    narrow = np.diff(sorted(_read(tmp_path / "px0")[2]))
    assert m["selection"]["features"] == "pixels" and broad.min() >= 30 and narrow.min() == 6
    with pytest.raises(ValueError, match="n=41 is not valid for a pool of 40"):
        select_indices(41, "random", pool_size=40)
    with pytest.raises(ValueError, match="strategy='best' is not valid; choose one of: random, class_balanced, coverage"):
        select_indices(3, "best", pool_size=40)


def test_photo_patches_are_another_deterministic_source(tmp_path):
    a, labels, classes = photo_patches(6, size=16, seed=1)
    b, _, _ = photo_patches(6, size=16, seed=1)
    assert a.shape == (6, 16, 16) and a.dtype == np.uint8 and (a == b).all()
    assert labels.tolist() == [0, 1, 0, 1, 0, 1] and classes == ["china", "flower"] and a.std() > 5
    m = write_photo_patches(tmp_path / "photo", n=20, size=16)
    assert m["num_samples"] == 20 and m["channels"] == 1 and m["image_size"] == [16, 16]
    assert write_photo_patches(tmp_path / "photo", n=20, size=16)["created"] == m["created"]  # kept, not rewritten


def test_cli_writes_and_fails_in_one_line(pool, tmp_path, capsys):
    from launch.select_queries import main

    main([str(pool), str(tmp_path / "cli"), "--n", "8", "--strategy", "class_balanced"])
    assert read_manifest(tmp_path / "cli")["selection"]["class_counts"] == {c: 2 for c in CLASSES}
    with pytest.raises(SystemExit) as e:
        main([str(pool), str(tmp_path / "cli2"), "--n", "99"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: n=99 is not valid for a pool of 40 images; choose 1..40"
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope"), str(tmp_path / "cli3"), "--n", "2"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: shard folder") and "does not exist" in err and "\n" not in err
