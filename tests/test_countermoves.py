"""The attacker's counter-moves: repeat-and-average, sybils with fitted maps, coverage control."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from stealer.countermoves import (RepeatAverage, apply_affine_map, coverage_controlled_queries, fit_affine_map,
                                  run_sybil_query_phase, sybil_users)

SIZES = {"animal_mnist": {"victim_train": 32, "query": 200, "probe_train": 32, "probe_test": 32},
         "digits": {"probe_train": 32, "probe_test": 32}}


def test_fit_affine_map_hand_computed_and_exact_recovery():
    w = fit_affine_map(torch.tensor([[0.0], [1.0], [2.0]]), torch.tensor([[1.0], [3.0], [5.0]]), ridge=0.0)
    assert torch.allclose(w, torch.tensor([[2.0], [1.0]]), atol=1e-5)  # y = 2x + 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g)
    a, b = torch.randn(8, 5, generator=g), torch.randn(5, generator=g)
    w = fit_affine_map(x, x @ a + b, ridge=0.0)
    assert torch.allclose(w[:-1], a, atol=1e-4) and torch.allclose(w[-1], b, atol=1e-4)
    assert torch.allclose(apply_affine_map(w, x[:3]), x[:3] @ a + b, atol=1e-4)
    with pytest.raises(ValueError, match="paired answers"):
        fit_affine_map(x, x[:10])


def _api(tmp_path, defenses):
    from victims.api import VictimAPI
    from victims.ledger import QueryLedger
    from victims.simsiam import random_victim

    enc = random_victim("resnet18", in_chans=1, width=8, stem="small", image_size=16, seed=0)
    return VictimAPI(enc, QueryLedger(tmp_path / "ledger.sqlite"), defenses=defenses)


def test_repeat_average_pays_every_copy_and_divides_the_noise_variance(tmp_path):
    from victims.defenses import GaussianNoise

    api = _api(tmp_path, [GaussianNoise(sigma=1.0, seed=1)])
    images = torch.randint(0, 256, (100, 1, 16, 16), dtype=torch.uint8)
    clean = api.encoder(images)
    avg = RepeatAverage(api, 4).query(images, "eve")
    assert api.ledger.spent("eve") == 400  # four paid copies per image
    assert avg.shape == clean.shape and RepeatAverage(api, 4).describe() == api.describe()
    var = (avg - clean).var().item()
    assert var == pytest.approx(1 / 4, rel=0.1)  # sigma^2 / R
    with pytest.raises(ValueError, match="repeats"):
        RepeatAverage(api, 0)


class _Float32Victim:
    """Answers of a large dynamic range (float32), where a float32 mean of R copies rounds."""

    def __init__(self):
        self.calls = []

    def describe(self):
        return {"out_dim": 16}

    def query(self, images, user):
        self.calls.append(len(images))
        g = torch.Generator().manual_seed(len(self.calls))
        return torch.randn(len(images), 16, generator=g) * 1e4


def test_repeat_average_means_in_float64_and_casts_back():
    victim = _Float32Victim()
    images = torch.zeros(64, 1, 4, 4, dtype=torch.uint8)
    got = RepeatAverage(victim, 8).query(images, "eve")
    raw = torch.randn(64 * 8, 16, generator=torch.Generator().manual_seed(1)) * 1e4  # what the victim answered
    ref = raw.reshape(64, 8, 16).double().mean(1)
    assert got.dtype == torch.float32 and torch.equal(got, ref.float())
    assert not torch.equal(raw.reshape(64, 8, 16).mean(1), ref.float())  # a float32 mean would round differently
    assert victim.calls == [64 * 8]  # one request of all copies, no key: the plain victim charges per copy


_KILLED_CHILD = """
import sys, time, torch
from stealer.countermoves import RepeatAverage
from victims.api import VictimAPI
from victims.defenses import GaussianNoise
from victims.ledger import QueryLedger
from victims.simsiam import random_victim
enc = random_victim("resnet18", in_chans=1, width=8, stem="small", image_size=16, seed=0)
api = VictimAPI(enc, QueryLedger(sys.argv[1]), defenses=[GaussianNoise(sigma=1.0, seed=1)])
images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
avg = RepeatAverage(api, 3).query(images, "eve", key="run1:batch0")
torch.save(avg, sys.argv[2])
open(sys.argv[3], "w").write("paid")
time.sleep(120)  # killed here: paid, the answer never reached the caller's cache
"""


def test_repeat_average_killed_after_paying_is_not_charged_again_on_retry(tmp_path):
    """A process buys 6 images x 3 copies under a key and is SIGKILLed before caching; the retry under the
    same key (another process's view of the ledger) gets the same mean back and pays nothing more."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from victims.defenses import GaussianNoise

    ledger, saved, paid = tmp_path / "ledger.sqlite", tmp_path / "avg.pt", tmp_path / "paid"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(ledger), str(saved), str(paid)], env=env)
    try:
        deadline = time.time() + 120
        while not paid.exists():
            assert child.poll() is None and time.time() < deadline, "the child died before paying"
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL  # really killed, not finished
    finally:
        if child.poll() is None:
            child.kill()
    api = _api(tmp_path, [GaussianNoise(sigma=1.0, seed=5)])  # a new process: other noise, same ledger file
    assert api.ledger.spent("eve") == 18  # 6 images x 3 copies, charged once
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    wrapper = RepeatAverage(api, 3)
    killed_answer = torch.load(saved, weights_only=True)
    assert torch.equal(wrapper.answer("eve", "run1:batch0"), killed_answer)  # what recover_paid reads back
    again = wrapper.query(images, "eve", key="run1:batch0")
    assert torch.equal(again, killed_answer) and api.ledger.spent("eve") == 18  # the kept answer, no second charge
    # the key is what protects it: without one the same images are bought again (with fresh noise)
    fresh = wrapper.query(images, "eve")
    assert api.ledger.spent("eve") == 36 and not torch.equal(fresh, killed_answer)
    assert wrapper.forget("eve", ["run1:batch0"]) == 1 and wrapper.answer("eve", "run1:batch0") is None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from stealer.shards import build_default_data

    root = tmp_path_factory.mktemp("cm")
    build_default_data(root / "data", image_size=16, sizes=SIZES)
    return root / "data"


def test_repeat_average_query_phase_dies_after_paying_and_resumes_without_repaying(tmp_path, data, monkeypatch):
    """The steal's query phase through RepeatAverage: its batches are journaled and bought under keys; the
    process 'dies' after batch 3 is paid and before it is cached; the rerun reads that mean back
    (ResponseCache.recover_paid through RepeatAverage.answer), pays exactly R x images in all, and its cache is
    byte-equal to an uninterrupted run's."""
    from conftest import Died, die_at_cache_write

    from stealer.config import load_config
    from stealer.steal import StealConfig, run_query_phase

    def cfg(name):
        return load_config(StealConfig, None, [f"out_dir={tmp_path}", f"name={name}", f"data.query={data}/animal_mnist/query",
                                               "data.image_size=16", "query.num_queries=64", "query.batch_size=16"])

    ref_api = _api(tmp_path / "ref_state", [])
    ref = run_query_phase(cfg("ref"), RepeatAverage(ref_api, 2), None)
    assert ref["queries_sent"] == 64 and ref_api.ledger.spent("attacker") == 128  # images sent, copies charged

    api = _api(tmp_path / "cut_state", [])
    die_at_cache_write(monkeypatch, 2)  # batch 3 is paid, its cache write never happens
    with pytest.raises(Died):
        run_query_phase(cfg("cut"), RepeatAverage(api, 2), None)
    monkeypatch.undo()
    paid = api.ledger.spent("attacker")
    assert paid >= 3 * 16 * 2 and len(list((tmp_path / "cut" / "cache").glob("resp-*.tar"))) == 2  # batch 3 paid, not cached
    out = run_query_phase(cfg("cut"), RepeatAverage(api, 2), None)
    assert out["answers_recovered"] == paid // 2 - 32 and out["ledger_spent"] == 128 and out["cached"] == 64  # 0 re-paid

    def files(run):
        return {p.name: p.read_bytes() for p in sorted((tmp_path / run / "cache").glob("resp-*"))}

    assert files("cut") == files("ref")
    assert not list((tmp_path / "cut" / "cache").glob("journal-*"))  # settled: the journal is gone ...
    with sqlite3.connect(tmp_path / "cut_state" / "ledger.sqlite") as con:  # ... and the victim forgot the kept answers
        assert con.execute("SELECT COUNT(*) FROM receipts WHERE answer IS NOT NULL").fetchone()[0] == 0


def test_sybils_map_b4b_spaces_and_feed_the_normal_train_phase(tmp_path, data):
    from launch.common import make_accelerator
    from stealer.config import load_config
    from stealer.data import ShardStream, open_shards
    from stealer.steal import StealConfig, run_train_phase
    from victims.defenses import B4B

    b4b = B4B(seed=7, transform="affine")  # default cost curve: no noise at this coverage, per-user rotations
    api = _api(tmp_path, [b4b])
    cfg = load_config(StealConfig, None, [f"out_dir={tmp_path}", "name=syb", "cpu=true", f"data.query={data}/animal_mnist/query",
                                          "data.image_size=16", "query.num_queries=180", "query.batch_size=64",
                                          "student.width=8", "train.epochs=1", "train.batch_size=64"])
    users = sybil_users("attacker", 2)
    out = run_sybil_query_phase(cfg, api, sybils=2, overlap=80)
    # 2 x 80 overlap + 100 own images: every image paid, the overlap by both accounts
    assert out["queries_sent"] == 260 and [api.ledger.spent(u) for u in users] == [80 + 50, 80 + 50]
    assert out["cached"] == 180
    # the mapped answers of account 1 land in account 0's space: compare with what account 0 would get
    stream = ShardStream(open_shards(tmp_path / "syb" / "cache"), batch_size=200, shuffle=False, channels=1, image_size=16)
    from stealer.countermoves import _read_cache

    cached = _read_cache(tmp_path / "syb" / "cache")
    keys = sorted(cached)
    ys = torch.stack([torch.from_numpy(cached[k][2]) for k in keys])
    batch = next(stream.iter_epoch(0))
    imgs = {k: batch["image"][i] for i, k in enumerate(batch["key"])}
    want = b4b.transform(api.encoder(torch.stack([imgs[k] for k in keys])), users[0])
    rel = ((ys - want).norm(dim=1) / (want - want.mean(0)).norm(dim=1).mean()).mean().item()
    assert rel < 0.05, rel  # the raw answers of account 1 are a different rotation: far from this
    raw1 = b4b.transform(api.encoder(torch.stack([imgs[k] for k in keys])), users[1])
    assert ((raw1 - want).norm(dim=1) / (want - want.mean(0)).norm(dim=1).mean()).mean().item() > 0.5
    assert out["map_residual"][users[1]] < 0.05
    # a rerun pays nothing; the normal train phase trains on the mapped cache
    again = run_sybil_query_phase(cfg, api, sybils=2, overlap=80)
    assert again["queries_sent"] == 0 and sum(api.ledger.spent(u) for u in users) == 260
    # caches made before the sybil phase recorded victim_preprocess apart (the victim's preprocess inside
    # "victim"): a victim without a geometry decoded the same pixels, so they stay valid, nothing re-bought
    for meta_path in (tmp_path / "syb").rglob("cache.json"):
        meta = json.loads(meta_path.read_text())
        assert meta.pop("victim_preprocess") is None and "preprocess" not in meta["victim"]
        meta["victim"]["preprocess"] = api.describe()["preprocess"]
        meta_path.write_text(json.dumps(meta))
    legacy = run_sybil_query_phase(cfg, api, sybils=2, overlap=80)
    assert legacy["queries_sent"] == 0 and legacy["cached"] == 180 and sum(api.ledger.spent(u) for u in users) == 260
    res = run_train_phase(cfg, make_accelerator(cpu=True))
    assert res["samples"] == 180 and res["steps"] == 3
    assert json.loads((tmp_path / "syb" / "query_phase.json").read_text())["sybils"] == 2
    with pytest.raises(ValueError, match="overlap"):
        run_sybil_query_phase(cfg, api, sybils=2, overlap=180)


def test_coverage_control_uses_the_query_selector(tmp_path, data):
    pytest.importorskip("stealer.query_select", reason="stealer/query_select.py (select_queries) is another helper's")
    from stealer.config import load_config
    from stealer.data import open_shards
    from stealer.steal import StealConfig

    cfg = load_config(StealConfig, None, [f"data.query={data}/animal_mnist/query", "data.image_size=16"])
    sel = coverage_controlled_queries(cfg, 50, tmp_path / "sel")
    assert open_shards(sel).num_samples == 50
    assert coverage_controlled_queries(cfg, 50, tmp_path / "sel") == sel  # reused, not re-selected
    # narrow by default: the pool is covered worse than by the broad (farthest-point) subset
    broad = coverage_controlled_queries(cfg, 50, tmp_path / "broad", spread=1.0)
    narrow_s, broad_s = (json.loads((Path(p) / "manifest.json").read_text())["selection"] for p in (sel, broad))
    assert narrow_s["spread"] == 0.0 and broad_s["spread"] == 1.0
    assert narrow_s["mean_nn_distance"] > broad_s["mean_nn_distance"]
    assert narrow_s["coverage_radius"] > broad_s["coverage_radius"]
