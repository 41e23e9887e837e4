"""Classifier stealing pays once for every posterior, even when killed between the charge and the cache write.

The crash window of issue 13: ``PosteriorCache.fetch`` used to charge (``PosteriorAPI.query``) and only
then cache; a kill in between paid again on resume, and a run whose budget equals its images could never
finish. Now the purchase is journaled under an idempotency key, charged with its answer in one ledger
transaction, and read back on resume. Each test kills a real run in that window -- a deterministic
stand-in for the kill (the cache write raises) for Knockoff and for DFME, and a real SIGKILL of a
process stopped inside the window -- then resumes with budget == images, and compares with an
uninterrupted run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kill_helpers import alive, kill_tree

REPO = Path(__file__).resolve().parents[1]
SIZES = {"animal_mnist": {"victim_train": 16, "query": 48, "probe_train": 8, "probe_test": 16},
         "digits": {"probe_train": 8, "probe_test": 8}}


class Killed(BaseException):
    """Stands for a SIGKILL: nothing in the run catches it, nothing after it runs."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from stealer.shards import build_default_data
    from victims.classifier import build_classifier, save_classifier

    root = tmp_path_factory.mktemp("payonce_clf")
    build_default_data(root / "data", image_size=16, sizes=SIZES)
    torch.manual_seed(0)
    save_classifier(build_classifier("resnet18", 10, 1, 16, width=4, stem="small").eval(), root / "victim_clf.pt")
    return root


def _argv(root: Path, attack: str) -> list[str]:
    data = root / "data" / "animal_mnist"
    common = [f"victim.checkpoint={root / 'victim_clf.pt'}", f"attack.query_sets=[{data}/query]", "clone.width=4",
              "phases=[query,train]", f"out_dir={root}", "cpu=true"]
    if attack == "knockoff":  # 48 images in 3 purchases of 16; the budget is exactly the images
        return common + ["attack.name=knockoff_random", "budget=48", "attack.batch_size=16", "train.epochs=1",
                         "train.batch_size=16"]
    # DFME: 4 x (1 x 2 + 1) = 12 images per iteration in 2 purchases (base + probe: 8, clone: 4), 4 iterations
    return common + ["attack.name=dfme", "budget=48", "attack.df_batch_size=4", "attack.gen_width=8", "attack.nz=8",
                     "attack.clone_iters=1", "train.ckpt_every=1"]


def _run(root: Path, attack: str, name: str) -> dict:
    from launch.steal_classifier import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([*_argv(root, attack), f"name={name}"])
    finally:
        torch.set_num_threads(threads)


def _ledger(run: Path):
    from victims.ledger import QueryLedger

    return QueryLedger(run / "victim_state" / "ledger.sqlite")


def _posteriors(cache: Path) -> dict[str, torch.Tensor]:
    from stealer.classifier import PosteriorCache

    return {k: torch.from_numpy(v) for k, v in PosteriorCache(cache, json.loads((cache / "cache.json").read_text())).known.items()}


def _same_outcome(ref: Path, run: Path) -> None:
    a = torch.load(ref / "clone.pt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(run / "clone.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the clone differs from an uninterrupted run's"
    pa, pb = _posteriors(ref / "cache"), _posteriors(run / "cache")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("attack, die_at", [("knockoff", 2), ("dfme", 6)])
def test_killed_between_charge_and_cache_write_pays_nothing_again(assets, monkeypatch, attack, die_at):
    """Knockoff: the 2nd of 3 purchases; DFME: the 6th (iteration 3's clone images; iteration 2 is checkpointed)."""
    from stealer.cache import ResponseCache

    root = assets
    ref = _run(root, attack, f"{attack}_ref")
    assert ref["query"]["ledger_spent"] == ref["query"]["spent"] == 48

    real, calls = ResponseCache.write_batch, {"n": 0}

    def dies(self, keys, *a, **kw):
        calls["n"] += 1
        if calls["n"] == die_at:
            raise Killed(f"killed before caching {len(keys)} paid posteriors")
        return real(self, keys, *a, **kw)

    run = root / attack
    monkeypatch.setattr(ResponseCache, "write_batch", dies)
    with pytest.raises(Killed) as e:
        _run(root, attack, attack)
    monkeypatch.undo()
    in_flight = int(str(e.value).split()[3])
    cached = sum(json.loads(p.read_text())["count"] for p in (run / "cache").glob("resp-*.json"))
    paid = _ledger(run).spent("attacker")
    # the kill landed in the window: the batch in flight is charged (with its answer kept), not cached
    assert in_flight > 0 and paid == cached + in_flight < 48, (paid, cached, in_flight)
    assert not (run / "clone.pt").exists()

    out = _run(root, attack, attack)  # budget == images: the resumed run must finish without paying again
    q = out["query"]
    assert q["recovered"] == in_flight and q["spent"] == 48 - paid, q
    assert q["ledger_spent"] == 48 and q["cached"] == 48, q
    _same_outcome(root / f"{attack}_ref", run)
    # settled: the victim forgot the answers it kept for the killed run (cached now), the journal is empty
    assert not list((run / "cache").glob("journal-r*.jsonl"))
    with _ledger_con(run) as con:
        assert con.execute("SELECT COUNT(*) FROM receipts WHERE answer IS NOT NULL").fetchone()[0] == 0


def _ledger_con(run: Path):
    import sqlite3
    from contextlib import closing

    return closing(sqlite3.connect(run / "victim_state" / "ledger.sqlite"))


KILLED_SCRIPT = r'''
import sys, time
from pathlib import Path
from stealer.cache import ResponseCache
marker, die_at = Path(sys.argv[1]), int(sys.argv[2])
real, calls = ResponseCache.write_batch, [0]
def stops(self, keys, *a, **kw):  # paid, not yet cached: wait here for the SIGKILL
    calls[0] += 1
    if calls[0] == die_at:
        marker.write_text(str(len(keys)))
        time.sleep(600)
    return real(self, keys, *a, **kw)
ResponseCache.write_batch = stops
from launch.steal_classifier import main
main(sys.argv[3:])
'''


def test_sigkill_between_charge_and_cache_write_then_budget_equal_to_images_finishes(assets, tmp_path):
    root = assets
    ref = root / "knockoff_ref"
    if not (ref / "clone.pt").exists():
        _run(root, "knockoff", "knockoff_ref")
    script, marker = tmp_path / "killed.py", tmp_path / "in_window"
    script.write_text(KILLED_SCRIPT)
    run = root / "knockoff_sigkill"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, str(script), str(marker), "2", *_argv(root, "knockoff"), "name=knockoff_sigkill"],
                             env=env, stdout=out, stderr=subprocess.STDOUT)
        t0 = time.time()
        while not marker.exists():
            assert p.poll() is None, log.read_text()[-3000:]
            assert time.time() - t0 < 120, "the run never reached its second purchase"
            time.sleep(0.05)
        pids = kill_tree(p)
    assert p.returncode == -9 and not any(alive(x) for x in pids), "the kill did not land"
    assert not (run / "clone.pt").exists() and not (run / "steal_classifier.json").exists(), "the run had finished"
    in_flight = int(marker.read_text())
    cached = sum(json.loads(s.read_text())["count"] for s in (run / "cache").glob("resp-*.json"))
    paid = _ledger(run).spent("attacker")
    assert cached == 16 and in_flight == 16 and paid == 32, (cached, in_flight, paid)  # ledger partial, one batch in flight

    q = _run(root, "knockoff", "knockoff_sigkill")["query"]
    assert (q["recovered"], q["spent"], q["ledger_spent"], q["cached"]) == (16, 16, 48, 48), q
    _same_outcome(ref, run)
