"""Pay once, always: the in-process victim keeps each answer with its charge (one SQLite
transaction) under an idempotency key, and the query phase reads paid-but-uncached answers back
instead of buying them again — also after SIGKILLs of 1 and 2 processes (benchmarks/chaos_query.py)."""
from __future__ import annotations

from conftest import Died, die_at_cache_write, free_port, tiny_steal_assets

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SIZES = {"animal_mnist": {"victim_train": 16, "query": 96, "probe_train": 8, "probe_test": 8},
         "digits": {"probe_train": 8, "probe_test": 8}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_steal_assets(tmp_path_factory.mktemp("payonce"), SIZES)


def _api(victim: Path, ledger_path: Path, budget: int | None = None):
    from victims.api import VictimAPI
    from victims.ledger import QueryLedger
    from victims.simsiam import load_victim_encoder

    ledger = QueryLedger(ledger_path)
    if budget is not None:
        ledger.set_budget("attacker", budget)
    return VictimAPI(load_victim_encoder(victim), ledger)


def test_keyed_query_is_paid_once_and_answered_the_same(setup, tmp_path):
    from victims.ledger import BudgetExceeded, QueryLedger

    _, victim = setup
    api = _api(victim, tmp_path / "ledger.sqlite", budget=10)
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    calls = []
    forward = api.encoder.forward
    api.encoder.forward = lambda t: (calls.append(len(t)), forward(t))[1]
    a = api.query(x, "attacker", key="k1")
    assert api.ledger.spent("attacker") == 4 and calls == [4]
    b = api.query(x, "attacker", key="k1")  # asked again: the kept answer, no charge, no forward
    assert torch.equal(a, b) and api.ledger.spent("attacker") == 4 and calls == [4]
    # another process (a resumed run) reads it back from the ledger file alone
    other = _api(victim, tmp_path / "ledger.sqlite")
    assert torch.equal(other.answer("attacker", "k1"), a) and other.answer("attacker", "nope") is None
    with pytest.raises(ValueError, match="'k1'.*another question"):
        api.query(x.flip(0), "attacker", key="k1")  # same key, other images: refused, nothing charged
    api.query(x, "attacker", key="k2")
    with pytest.raises(BudgetExceeded, match="8 of 10 spent"):  # refused before the forward
        api.query(x, "attacker", key="k3")
    assert calls == [4, 4] and api.ledger.spent("attacker") == 8
    assert not QueryLedger(tmp_path / "ledger.sqlite").has_receipt("attacker", "k3")
    assert api.forget("attacker", ["k1"]) == 1 and api.answer("attacker", "k1") is None
    assert api.ledger.spent("attacker") == 8  # forgetting keeps the charge


def test_ledger_of_an_older_release_is_migrated(tmp_path):
    from victims.ledger import QueryLedger

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as con:  # the receipts table as released before answers were kept
        con.execute("CREATE TABLE users (user TEXT PRIMARY KEY, budget INTEGER NULL, spent INTEGER NOT NULL DEFAULT 0)")
        con.execute("CREATE TABLE receipts (user TEXT NOT NULL, receipt TEXT NOT NULL, images INTEGER NOT NULL, "
                    "created REAL NOT NULL, PRIMARY KEY (user, receipt))")
        con.execute("INSERT INTO users VALUES ('a', 100, 7)")
        con.execute("INSERT INTO receipts VALUES ('a', 'old', 7, 0.0)")
    ledger = QueryLedger(path)
    assert ledger.spent("a") == 7 and ledger.charge("a", 7, receipt="old") == 7
    assert ledger.charge_answer("a", 2, "new", "fp", b"answer") == b"answer" and ledger.spent("a") == 9
    assert ledger.charge_answer("a", 2, "new", "fp", b"other") == b"answer" and ledger.spent("a") == 9
    with pytest.raises(ValueError, match="without keeping its answer"):
        ledger.answer("a", "old")


def _cfg(root: Path, victim: Path, out: Path, name: str, *extra: str):
    from stealer.config import load_config
    from stealer.steal import StealConfig

    return load_config(StealConfig, None, [f"out_dir={out}", f"name={name}", f"victim.checkpoint={victim}",
                                           f"data.query={root}/data/animal_mnist/query", "data.image_size=16",
                                           "query.batch_size=16", "victim.budget=96", *extra])


def _cache_files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "cache").glob("resp-*"))}


@pytest.mark.parametrize("attack", ["direct", "contsteal"])
def test_answers_paid_but_not_cached_are_read_back_not_bought(setup, tmp_path, monkeypatch, attack):
    """The window the SIGKILLs hit, made deterministic: batch 3's charge commits, its cache write
    never happens (the process 'dies'); the rerun buys nothing twice and the cache is byte-equal."""
    from launch.common import build_victim_api
    from stealer.steal import run_query_phase

    root, victim = setup
    views = ["attack.name=contsteal", "attack.views=2"] if attack == "contsteal" else []
    budget = 96 * (2 if views else 1)
    ref = _cfg(root, victim, tmp_path, "ref", *views, f"victim.budget={budget}")
    assert run_query_phase(ref, build_victim_api(ref.victim, ref.run_dir), None)["queries_sent"] == budget

    cfg = _cfg(root, victim, tmp_path, "cut", *views, f"victim.budget={budget}")
    api = build_victim_api(cfg.victim, cfg.run_dir)
    die_at_cache_write(monkeypatch, 2)  # batch 3's charge commits, its cache write never happens
    with pytest.raises(Died):
        run_query_phase(cfg, api, None)
    monkeypatch.undo()
    per = budget // 96
    paid, cached = api.ledger.spent("attacker"), len(_cache_files(cfg.run_dir)) // 2
    assert cached == 2 and paid >= 3 * 16 * per  # really partial: batch 3 (at least) paid and not cached
    intents = json.loads((cfg.run_dir / "cache" / "journal-r000.jsonl").read_text().splitlines()[2])
    assert api.answer("attacker", intents["batch"]) is not None  # its answer is kept with its charge

    out = run_query_phase(cfg, build_victim_api(cfg.victim, cfg.run_dir), None)  # budget == images: finishes
    assert out["answers_recovered"] == paid // per - 32 and out["queries_sent"] == budget - paid
    assert out["ledger_spent"] == budget and out["cached"] == 96  # 0 re-paid
    assert _cache_files(cfg.run_dir) == _cache_files(ref.run_dir)  # every shard and sidecar byte-equal
    assert not list((cfg.run_dir / "cache").glob("journal-*"))  # settled: the journal is gone
    with sqlite3.connect(cfg.run_dir / "victim_state" / "ledger.sqlite") as con:  # and so are the kept answers
        assert con.execute("SELECT COUNT(*) FROM receipts WHERE answer IS NOT NULL").fetchone()[0] == 0


@pytest.mark.slow
@pytest.mark.parametrize("nproc,kills", [(1, 5), (2, 2)])
def test_chaos_kills_of_the_query_phase_repay_nothing(setup, tmp_path, nproc, kills):
    """SIGKILLs of the real CLI at random moments of its query phase (5 at 1 process, 2 at 2 processes
    under torchrun, workers included), each proven by the script (launcher alive before, exit -9
    after, every worker PID gone, the cache partial), then 0 images re-paid, the ledger == the
    images (= the budget: every resume finished) and the cache byte-equal to an uninterrupted run's."""
    root, victim = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "chaos_query.py"), "--work", str(tmp_path),
                        "--data", str(root / "data" / "animal_mnist" / "query"), "--victim", str(victim),
                        "--images", "96", "--batch", "8", "--kills", str(kills), "--nproc", str(nproc), "--seed", "3"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    row = json.loads(r.stdout[r.stdout.index("{"):r.stdout.index("\n}") + 2])["runs"][str(nproc)]
    assert row["kills"] == row["kills_proven"] == kills and row["kills_sent"] >= kills, row
    assert row["images_repaid"] == 0 and row["ledger_spent"] == row["images"] == 96, row
    assert row["cache_byte_equal"] and row["finished"], row
    if nproc == 2:  # the workers were found and killed by PID, not only torchrun
        assert row["workers_killed"] >= 2 * row["kills_sent"], row
    # every kill shows in the script's log: the launcher exited -9 and its descendants were gone
    assert r.stderr.count("exit -9") == row["kills_sent"], r.stderr[-3000:]


@pytest.mark.slow
def test_query_phase_preemption_counts_every_ranks_queries(setup, tmp_path):
    """2 processes under torchrun, the preemption flag touched once buying has begun: the workers
    exit 3, and the message counts the queries of both ranks (= the ledger), every one cached."""
    import re

    from stealer.cache import ResponseCache

    root, victim = setup
    run = tmp_path / "pre2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "launch" / "steal.py"), f"out_dir={tmp_path}", "name=pre2", "cpu=true", "phases=[query]",
           f"victim.checkpoint={victim}", f"data.query={root}/data/animal_mnist/query", "data.image_size=16",
           "query.batch_size=4", "victim.budget=96"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list((run / "cache").glob("journal-r*.jsonl")):  # the query phase is buying
        assert p.poll() is None and time.time() - t0 < 300, "the run ended before it could be preempted"
        time.sleep(0.005)
    (run / "PREEMPT").touch()
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1 and "exitcode  : 3" in err, err[-3000:]  # torchrun: 1; its workers: 3
    got = re.search(r"preempted in the query phase after (\d+) queries \(all ranks\)", out)
    assert got, out[-2000:]
    with sqlite3.connect(run / "victim_state" / "ledger.sqlite") as con:
        spent = con.execute("SELECT spent FROM users WHERE user = 'attacker'").fetchone()[0]
    cached = len(ResponseCache(run / "cache").done_keys())
    assert int(got.group(1)) == spent == cached < 96  # both ranks' queries (not rank 0's), all cached, cut short
    assert {t.name[:9] for t in (run / "cache").glob("resp-*.tar")} == {"resp-r000", "resp-r001"}  # both ranks bought


def test_http_victim_keyed_purchase_is_replayed_for_a_new_process(setup, tmp_path):
    """Over HTTP the batch key names the request: a new client process (same run nonce) sending the
    batch whose answer was lost gets the server's stored answer, uncharged; another key is a new purchase."""
    import httpx
    from fastapi.testclient import TestClient

    from stealer.client import HTTPVictim
    from victims.api import VictimAPI
    from victims.ledger import QueryLedger
    from victims.server import add_user, create_app, state_paths
    from victims.simsiam import load_victim_encoder

    _, victim = setup
    keys_db, ledger_db = state_paths(tmp_path / "state")
    key = add_user(keys_db, "alice", 100)
    tc = TestClient(create_app(VictimAPI(load_victim_encoder(victim), QueryLedger(ledger_db)), keys_db=keys_db))

    class Lossy(httpx.BaseTransport):  # forwards to the app; loses the answer of the first query
        def __init__(self, lose: bool):
            self.lose, self.keys = lose, []

        def handle_request(self, request):
            r = tc.request(request.method, str(request.url), headers=dict(request.headers), content=request.read())
            if request.method == "POST":
                self.keys.append(request.headers["idempotency-key"])
                if self.lose:
                    raise httpx.ReadError("the process died before the answer arrived", request=request)
            return httpx.Response(r.status_code, headers=[(k, v) for k, v in r.headers.items()
                                                          if k.lower() != "content-length"], content=r.content)

    x = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    first = Lossy(lose=True)
    with pytest.raises(ConnectionError):
        HTTPVictim("http://testserver", key, nonce="run-nonce", transport=first, max_retries=0).query(x, key="q:batch1")
    assert QueryLedger(ledger_db).spent("alice") == 6  # charged, answer lost
    again = Lossy(lose=False)  # the resumed run: a new process, the same nonce and batch key
    client = HTTPVictim("http://testserver", key, nonce="run-nonce", transport=again)
    a = client.query(x, key="q:batch1")
    assert again.keys == first.keys and QueryLedger(ledger_db).spent("alice") == 6  # replayed, not re-paid
    b = client.query(x, key="q:batch2")  # the same images under another key: a new, paid purchase
    assert torch.equal(a, b) and QueryLedger(ledger_db).spent("alice") == 12
