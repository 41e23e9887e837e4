"""The victim over HTTP: keys, budgets, rate limits, idempotent retries, persisted defense state.

Most tests talk to the FastAPI app in-process (``TestClient``, through an ``httpx``
transport so the real :class:`stealer.client.HTTPVictim` is used, with failures injected);
the end-to-end tests run the steal's query phase against a real uvicorn server on 127.0.0.1
(a thread; and, marked slow, a ``launch/serve.py`` process killed mid-steal and restarted).
"""
from __future__ import annotations

from conftest import free_port

import io
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from stealer.client import BudgetExceeded, HTTPVictim, VictimHTTPError, load_or_create_nonce
from victims.api import VictimAPI
from victims.defenses import build_defenses
from victims.ledger import QueryLedger
from victims.server import add_user, create_app, revoke_user, start_server_thread, state_paths
from victims.simsiam import random_victim

REPO = Path(__file__).resolve().parents[1]
URL = "http://testserver"


@pytest.fixture(scope="module")
def encoder():
    return random_victim("resnet18", in_chans=1, width=8, stem="small", image_size=16)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8)


def _npy(x) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(x), allow_pickle=False)
    return buf.getvalue()


def _server(state: Path, encoder, *, budget=1000, defenses=(), users=("alice",), **limits):
    keys_db, ledger_db = state_paths(state)
    keys = {u: add_user(keys_db, u, budget) for u in users}
    api = VictimAPI(encoder, QueryLedger(ledger_db), defenses=build_defenses(list(defenses)))
    app = create_app(api, keys_db=keys_db, **limits)
    return SimpleNamespace(api=api, app=app, tc=TestClient(app), keys=keys, keys_db=keys_db)


class Forward(httpx.BaseTransport):
    """Send the client's requests to a TestClient, with scripted failures first.

    Script actions: ``"connect"`` (refused), ``"503"``, ``"drop"`` (the server answers, the
    answer is lost on the way back), ``"pass"``.
    """

    def __init__(self, tc: TestClient, script=()):
        self.tc, self.script, self.log = tc, list(script), []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        action = self.script.pop(0) if self.script else "pass"
        self.log.append((request.method, request.url.path, request.headers.get("idempotency-key"), action))
        if action == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if action == "503":
            return httpx.Response(503, json={"error": "unavailable", "message": "overloaded"})
        r = self.tc.request(request.method, str(request.url), headers=dict(request.headers), content=request.read())
        if action == "drop":
            raise httpx.ReadError("connection reset while reading the answer", request=request)
        headers = [(k, v) for k, v in r.headers.items() if k.lower() != "content-length"]
        return httpx.Response(r.status_code, headers=headers, content=r.content)


def _client(s, user="alice", script=(), **kw) -> tuple[HTTPVictim, Forward]:
    """An HTTPVictim on the app; the script applies after it has read the server's limits."""
    fwd = Forward(s.tc)
    kw = {"backoff_base": 0.01, "backoff_max": 0.05, **kw}
    victim = HTTPVictim(URL, s.keys[user], transport=fwd, **kw)
    victim.limits()
    fwd.script = list(script)
    return victim, fwd


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/x-npy"}


def test_auth_health_describe_usage(tmp_path, encoder):
    s = _server(tmp_path, encoder, budget=50)
    assert s.tc.get("/v1/health").json()["status"] == "ok"
    x = _npy(_images(2))
    r = s.tc.post("/v1/query", content=x)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized" and "Bearer" in r.json()["message"]
    assert s.tc.post("/v1/query", content=x, headers=_auth("sslsteal_0000_nope")).status_code == 401
    wrong_secret = s.keys["alice"].rsplit("_", 1)[0] + "_x"
    assert s.tc.get("/v1/usage", headers=_auth(wrong_secret)).status_code == 401
    assert s.tc.get("/v1/describe").status_code == 401
    assert s.api.ledger.spent("alice") == 0
    # keys are stored hashed: the secret is nowhere in the database file
    assert s.keys["alice"].rsplit("_", 1)[1].encode() not in Path(s.keys_db).read_bytes()
    victim, _ = _client(s)
    assert victim.describe() == s.api.describe()
    assert victim.usage() == {"user": "alice", "spent": 0, "budget": 50, "remaining": 50}
    revoke_user(s.keys_db, "alice")
    with pytest.raises(VictimHTTPError, match="401") as e:
        victim.usage()
    assert "\n" not in str(e.value)


def test_query_matches_in_process_and_charges_per_image(tmp_path, encoder):
    s = _server(tmp_path, encoder, max_batch=3)
    x = _images(7)
    want = encoder(x)
    victim, fwd = _client(s)
    got = victim.query(x, "alice")  # over max_batch: split into 3 + 3 + 1
    assert got.dtype == torch.float32 and torch.equal(got, torch.cat([encoder(x[i:i + 3]) for i in (0, 3, 6)]))
    assert torch.allclose(got, want, atol=1e-6)
    assert s.api.ledger.spent("alice") == 7 and [a[1] for a in fwd.log].count("/v1/query") == 3
    half, _ = _client(s, dtype="float16")
    got16 = half.query(x[:3])
    assert got16.dtype == torch.float32 and torch.allclose(got16, want[:3], rtol=2e-3, atol=2e-3)
    assert not torch.equal(got16, want[:3])
    r = s.tc.post("/v1/query", content=_npy(x[:2]), headers={**_auth(s.keys["alice"]), "X-Response-Dtype": "float16"})
    assert r.status_code == 200 and np.load(io.BytesIO(r.content)).dtype == np.float16
    assert r.headers["x-query-spent"] == "12" and r.headers["x-user"] == "alice"
    assert victim.usage()["spent"] == 12 and victim.query(x[:0]).shape == (0, want.shape[1])


def test_bad_requests_are_refused_without_charge(tmp_path, encoder):
    s = _server(tmp_path, encoder, max_request_bytes=4096, max_batch=8)
    h = _auth(s.keys["alice"])

    def post(body, headers=h, **params):
        return s.tc.post("/v1/query", content=body, headers=headers, params=params)

    cases = [
        (post(b"not an array"), 400, "not .npy"),
        (post(_npy(np.zeros((2, 1, 16, 16), np.float32))), 400, "uint8"),
        (post(_npy(np.zeros((2, 3, 16, 16), np.uint8))), 400, "[N, 1, H, W]"),
        (post(_npy(np.zeros((16, 16), np.uint8))), 400, "[N, 1, H, W]"),
        (post(_npy(np.zeros((2, 1, 16, 16), np.uint8))[:-10]), 400, "not a readable .npy"),
        (post(_npy(np.zeros((9, 1, 4, 4), np.uint8))), 413, "limit of 8"),
        (post(_npy(np.zeros((5, 1, 32, 32), np.uint8))), 413, "4096 bytes"),
        (post(_npy(np.zeros((2, 1, 16, 16), np.uint8)), dtype="float64"), 400, "float16"),
        (post(_npy(np.zeros((2, 1, 16, 16), np.uint8)), headers={**h, "Content-Type": "application/json"}), 415, "x-npy"),
    ]
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a pickle inside .npy
    cases.append((post(obj.getvalue()), 400, "pickle"))
    for r, status, words in cases:
        body = r.json()
        assert r.status_code == status and words in body["message"] and "\n" not in body["message"], (status, body)
    assert s.api.ledger.spent("alice") == 0
    victim, _ = _client(s)
    with pytest.raises(ValueError, match="uint8"):
        victim.query(torch.zeros(2, 1, 16, 16))


def test_budget_exhausted(tmp_path, encoder):
    s = _server(tmp_path, encoder, budget=10)
    victim, _ = _client(s)
    victim.query(_images(8))
    with pytest.raises(BudgetExceeded) as e:
        victim.query(_images(4, seed=1), "alice")
    msg = str(e.value)
    assert isinstance(e.value, RuntimeError) and type(e.value).__name__ == "BudgetExceeded"
    assert "'alice'" in msg and "8 of 10 spent" in msg and "\n" not in msg
    assert (e.value.user, e.value.budget, e.value.spent, e.value.requested) == ("alice", 10, 8, 4)
    r = s.tc.post("/v1/query", content=_npy(_images(3)), headers=_auth(s.keys["alice"]))
    assert r.status_code == 402 and r.json()["error"] == "budget_exceeded" and r.json()["remaining"] == 2
    assert s.api.ledger.spent("alice") == 8
    victim.query(_images(2))
    assert victim.usage()["remaining"] == 0


def test_split_batch_over_budget_pays_nothing(tmp_path, encoder):
    s = _server(tmp_path, encoder, budget=10, max_batch=4)
    victim, fwd = _client(s)
    with pytest.raises(BudgetExceeded, match="split into 3 requests") as e:
        victim.query(_images(11))  # 4 + 4 + 3: the first two chunks would have been paid, then refused
    assert "nothing was sent" in str(e.value) and "\n" not in str(e.value) and e.value.requested == 11
    assert s.api.ledger.spent("alice") == 0 and not [p for p in fwd.log if p[1] == "/v1/query"]
    out = victim.query(_images(10))  # fits: sent as 4 + 4 + 2
    assert out.shape[0] == 10 and s.api.ledger.spent("alice") == 10
    assert len([p for p in fwd.log if p[1] == "/v1/query"]) == 3


def test_idempotent_retries_are_not_charged_twice(tmp_path, encoder):
    s = _server(tmp_path, encoder, defenses=[{"name": "noise", "sigma": 0.5, "seed": 3}], users=("alice", "bob"))
    x, y = _npy(_images(4)), _npy(_images(4, seed=1))
    h = {**_auth(s.keys["alice"]), "Idempotency-Key": "k1"}
    first = s.tc.post("/v1/query", content=x, headers=h)
    again = s.tc.post("/v1/query", content=x, headers=h)
    assert first.status_code == again.status_code == 200 and first.content == again.content
    assert again.headers["x-idempotent-replay"] == "true" and s.api.ledger.spent("alice") == 4
    conflict = s.tc.post("/v1/query", content=y, headers=h)
    assert conflict.status_code == 409 and conflict.json()["error"] == "idempotency_conflict"
    assert s.tc.post("/v1/query", content=x, headers=h, params={"dtype": "float16"}).status_code == 409
    # keys are per user: bob's "k1" is his own request
    bob = s.tc.post("/v1/query", content=x, headers={**_auth(s.keys["bob"]), "Idempotency-Key": "k1"})
    assert bob.status_code == 200 and "x-idempotent-replay" not in bob.headers and s.api.ledger.spent("bob") == 4
    # the client: the answer is lost after the server charged; the retry carries the same key
    victim, fwd = _client(s, script=["drop"])
    a = victim.query(_images(5, seed=2))
    posts = [entry for entry in fwd.log if entry[1] == "/v1/query"]
    assert [p[3] for p in posts] == ["drop", "pass"] and posts[0][2] == posts[1][2]
    assert s.api.ledger.spent("alice") == 4 + 5 and victim.retries == 1
    # a deliberate repeat of the same images is a new query: new key, charged, fresh noise
    b = victim.query(_images(5, seed=2))
    assert s.api.ledger.spent("alice") == 14 and not torch.equal(a, b)
    # the same nonce (a rerun of a crashed job) gets the stored answer back for free
    nonce = load_or_create_nonce(tmp_path / "run" / "client_nonce")
    assert load_or_create_nonce(tmp_path / "run" / "client_nonce") == nonce
    crashed, _ = _client(s, nonce=nonce)
    c = crashed.query(_images(3, seed=9))
    rerun, _ = _client(s, nonce=nonce)
    assert torch.equal(rerun.query(_images(3, seed=9)), c) and s.api.ledger.spent("alice") == 17


def test_crash_between_charge_and_store_is_not_charged_twice(tmp_path, encoder, monkeypatch):
    """The server dies after the ledger's commit and before the answer is stored: the retry is free."""
    import victims.server as server

    noise = [{"name": "noise", "sigma": 0.5, "seed": 3}]
    s = _server(tmp_path / "state", encoder, defenses=noise)
    x, h = _npy(_images(4)), {**_auth(s.keys["alice"]), "Idempotency-Key": "k1"}
    persist = server._Service._persist

    def crash(self, *a, **kw):
        raise RuntimeError("killed between the ledger commit and the store commit")

    monkeypatch.setattr(server._Service, "_persist", crash)
    assert TestClient(s.app, raise_server_exceptions=False).post("/v1/query", content=x, headers=h).status_code == 500
    assert s.api.ledger.spent("alice") == 4  # charged, no answer stored, defense state not saved
    monkeypatch.setattr(server._Service, "_persist", persist)
    # restart: a new app, API and defenses over the same state folder
    keys_db, ledger_db = state_paths(tmp_path / "state")
    api = VictimAPI(encoder, QueryLedger(ledger_db), defenses=build_defenses(noise))
    tc = TestClient(create_app(api, keys_db=keys_db))
    retry = tc.post("/v1/query", content=x, headers=h)
    assert retry.status_code == 200 and "x-idempotent-replay" not in retry.headers
    assert api.ledger.spent("alice") == 4  # the receipt says it was paid
    # the answer is what a server that never crashed gives (the defenses saw the request once)
    ref = _server(tmp_path / "ref", encoder, defenses=noise)
    assert ref.tc.post("/v1/query", content=x, headers=_auth(ref.keys["alice"])).content == retry.content
    replay = tc.post("/v1/query", content=x, headers=h)
    assert replay.headers["x-idempotent-replay"] == "true" and replay.content == retry.content
    assert api.ledger.spent("alice") == 4
    # a new request (another body) is charged, whatever key it reuses after the store is gone
    other = tc.post("/v1/query", content=_npy(_images(4, seed=1)), headers={**h, "Idempotency-Key": "k2"})
    assert other.status_code == 200 and api.ledger.spent("alice") == 8


def test_idempotency_store_is_bounded(tmp_path, encoder):
    s = _server(tmp_path, encoder, idempotency_max_bytes=3000)  # about two answers of 4 x 64 float32
    h = _auth(s.keys["alice"])
    for i in range(5):
        s.tc.post("/v1/query", content=_npy(_images(4, seed=i)), headers={**h, "Idempotency-Key": f"k{i}"})
    import sqlite3

    with sqlite3.connect(s.keys_db) as con:
        keys = [k for (k,) in con.execute("SELECT key FROM idempotency ORDER BY created")]
    assert keys == ["k3", "k4"]
    r = s.tc.post("/v1/query", content=_npy(_images(4, seed=0)), headers={**h, "Idempotency-Key": "k0"})
    assert "x-idempotent-replay" not in r.headers and s.api.ledger.spent("alice") == 24  # evicted: charged again


def test_rate_limit_429_and_client_waits(tmp_path, encoder):
    s = _server(tmp_path, encoder, rate_limit_per_s=4.0, burst=1)
    h = _auth(s.keys["alice"])
    assert s.tc.post("/v1/query", content=_npy(_images(1)), headers=h).status_code == 200
    r = s.tc.post("/v1/query", content=_npy(_images(1)), headers=h)
    assert r.status_code == 429 and r.json()["error"] == "rate_limited"
    assert r.headers["retry-after"] == "1" and 0 < r.json()["retry_after_s"] <= 0.25
    assert s.api.ledger.spent("alice") == 1
    waits = []
    victim, fwd = _client(s, sleep=lambda t: (waits.append(t), time.sleep(t)))
    t0 = time.monotonic()
    for i in range(3):
        victim.query(_images(2, seed=i))
    assert s.api.ledger.spent("alice") == 7 and victim.retries >= 2
    assert max(waits) >= 0.1 and time.monotonic() - t0 >= 0.4  # 3 requests at 4/s after an empty bucket


def test_client_retries_5xx_and_connection_errors(tmp_path, encoder):
    s = _server(tmp_path, encoder)
    victim, fwd = _client(s, script=["connect", "503", "connect", "pass"])
    assert victim.query(_images(3)).shape == (3, 64)
    assert victim.retries == 3 and s.api.ledger.spent("alice") == 3
    keys = {k for m, p, k, _ in fwd.log if p == "/v1/query"}
    assert len(keys) == 1  # every retry of one request carries one idempotency key
    down, _ = _client(s, script=["503"] * 3, max_retries=2)
    with pytest.raises(VictimHTTPError, match="503") as e:
        down.usage()
    assert "3 time(s)" in str(e.value) and "\n" not in str(e.value)


def test_unreachable_server_is_one_line_connection_error():
    with socket.socket() as sock:  # a port with nothing listening on 127.0.0.1
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    victim = HTTPVictim(url, "sslsteal_x_y", max_retries=2, backoff_base=0.01, timeout=5)
    with pytest.raises(ConnectionError) as e:
        victim.query(_images(1))
    msg = str(e.value)
    assert url in msg and "after 3 tries" in msg and "python launch/serve.py" in msg and "\n" not in msg


def test_restart_keeps_ledger_and_defense_state(tmp_path, encoder):
    chain = [{"name": "b4b", "seed": 7, "n_bits": 6, "n_projections": 4}, {"name": "noise", "sigma": 0.1, "seed": 1}]
    batches = [_images(6, seed=i) for i in range(3)]
    ref = VictimAPI(encoder, QueryLedger(tmp_path / "ref.sqlite"), defenses=build_defenses(chain))
    want = [ref.query(b, "alice") for b in batches]  # one server that never restarts

    first = _server(tmp_path / "state", encoder, defenses=chain)
    victim, _ = _client(first)
    for b, w in zip(batches[:2], want[:2]):
        assert torch.allclose(victim.query(b), w, atol=1e-6)
    coverage = first.api.defenses[0].coverage("alice")
    assert 0 < coverage == ref.defenses[0].coverage("alice")

    keys_db, ledger_db = state_paths(tmp_path / "state")
    api = VictimAPI(encoder, QueryLedger(ledger_db), defenses=build_defenses(chain))
    app = create_app(api, keys_db=keys_db)  # the restart: fresh objects, same state folder
    assert api.defenses[0].coverage("alice") == coverage and api.ledger.spent("alice") == 12
    assert api.defenses[1].state_dict()["users"]["alice"]["batches"] == 2
    restarted = SimpleNamespace(tc=TestClient(app), keys=first.keys, api=api)
    victim, _ = _client(restarted)
    assert torch.allclose(victim.query(batches[2]), want[2], atol=1e-6)  # the noise stream goes on
    assert api.defenses[0].coverage("alice") == ref.defenses[0].coverage("alice")
    assert victim.usage()["spent"] == 18
    # a server started with other defense parameters refuses the stored state in one line
    other = VictimAPI(encoder, QueryLedger(ledger_db), defenses=build_defenses([{**chain[0], "seed": 8}, chain[1]]))
    with pytest.raises(ValueError, match="defense #0 state was saved") as e:
        create_app(other, keys_db=keys_db)
    assert "\n" not in str(e.value) and "--state-dir" in str(e.value)


# ---------------------------------------------------------------------------- end to end
SIZES = {"animal_mnist": {"victim_train": 10, "query": 64, "probe_train": 10, "probe_test": 10},
         "digits": {"probe_train": 10, "probe_test": 10}}


@pytest.fixture(scope="module")
def query_shards(tmp_path_factory):
    from stealer.shards import build_default_data

    root = tmp_path_factory.mktemp("srvdata")
    build_default_data(root, image_size=16, sizes=SIZES)
    return root / "animal_mnist" / "query"


def _steal_cfg(out: Path, shards: Path, *extra: str):
    from stealer.config import load_config
    from stealer.steal import StealConfig

    return load_config(StealConfig, None, [f"out_dir={out}", "name=s", f"data.query={shards}", "data.image_size=16",
                                           "query.batch_size=16", "victim.user=attacker", *extra])


def test_query_phase_over_uvicorn_resumes_without_recharge(tmp_path, encoder, query_shards):
    from stealer.cache import ResponseCache
    from stealer.steal import run_query_phase

    state = tmp_path / "state"
    keys_db, ledger_db = state_paths(state)
    key = add_user(keys_db, "attacker", 40)

    def start():
        api = VictimAPI(encoder, QueryLedger(ledger_db))
        return start_server_thread(create_app(api, keys_db=keys_db, max_batch=16))

    server, thread, url = start()
    assert url.startswith("http://127.0.0.1:")
    cfg = _steal_cfg(tmp_path, query_shards)
    victim = HTTPVictim(url, key, backoff_base=0.01)
    with pytest.raises(BudgetExceeded, match="'attacker'.*32 of 40 spent"):
        run_query_phase(cfg, victim, accelerator=None)
    assert len(ResponseCache(tmp_path / "s" / "cache").done_keys()) == 32
    server.should_exit = True
    thread.join(10)

    QueryLedger(ledger_db).set_budget("attacker", 64)  # the defender raises the budget; server restarts
    server, thread, url = start()
    try:
        victim = HTTPVictim(url, key, backoff_base=0.01)
        out = run_query_phase(cfg, victim, accelerator=None)
        assert out["queries_sent"] == 32 and out["cached"] == 64 and victim.usage()["spent"] == 64
        again = run_query_phase(cfg, victim, accelerator=None)
        assert again["queries_sent"] == 0 and victim.usage()["spent"] == 64
        # what was cached is what the victim answers
        from stealer.data import ShardStream, open_shards

        batch = next(iter(ShardStream(open_shards(tmp_path / "s" / "cache"), batch_size=8, channels=1,
                                      image_size=16).iter_epoch(0)))
        assert torch.allclose(batch["response"], encoder(batch["image"]), atol=1e-5)
    finally:
        server.should_exit = True
        thread.join(10)




class KillAfter(httpx.BaseTransport):
    """Real HTTP; after the n-th query's answer arrives, kill the server and lose that answer."""

    def __init__(self, n: int, kill):
        self.inner, self.n, self.kill, self.posts = httpx.HTTPTransport(), n, kill, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self.inner.handle_request(request)
        if request.method == "POST" and resp.status_code == 200:
            self.posts += 1
            if self.posts == self.n:
                resp.read()
                resp.close()
                self.kill()
                raise httpx.ReadError("server died before the answer arrived", request=request)
        return resp

    def close(self) -> None:
        self.inner.close()


@pytest.mark.slow
def test_serve_cli_killed_mid_steal_and_restarted(tmp_path, query_shards, capsys):
    """launch/serve.py for real: add-user, serve, SIGKILL mid-steal, restart; nothing paid twice."""
    from launch.serve import main as serve_main
    from stealer.steal import run_query_phase
    from victims.simsiam import SimSiam, save_simsiam_checkpoint

    torch.manual_seed(0)
    model = SimSiam("resnet18", dim=16, pred_dim=8, in_chans=1, width=8, stem="small")
    ckpt = tmp_path / "victim" / "checkpoint.pth.tar"
    save_simsiam_checkpoint(model, ckpt, epoch=0, arch="resnet18", extra={"image_size": 16})
    state = tmp_path / "state"
    serve_main(["add-user", "attacker", "--budget", "1000", "--state-dir", str(state)])
    key = capsys.readouterr().out.strip()
    assert key.startswith("sslsteal_") and len(key.splitlines()) == 1

    port = free_port()
    cmd = [sys.executable, str(REPO / "launch" / "serve.py"), "--checkpoint", str(ckpt), "--state-dir", str(state),
           "--port", str(port), "--log-level", "warning", "--defense", '{"name": "b4b", "seed": 5, "n_bits": 6}']
    log = open(tmp_path / "server.log", "ab")
    procs = [subprocess.Popen(cmd, stdout=log, stderr=log, cwd=REPO)]
    restarted = threading.Event()

    def kill_and_restart():
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait(10)

        def later():
            time.sleep(0.3)
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, cwd=REPO))
            restarted.set()

        threading.Thread(target=later, daemon=True).start()

    try:
        victim = HTTPVictim(f"http://127.0.0.1:{port}", key, max_retries=60, backoff_base=0.2, backoff_max=1.0,
                            transport=KillAfter(2, kill_and_restart))
        cfg = _steal_cfg(tmp_path, query_shards, f"victim.checkpoint={ckpt}")
        out = run_query_phase(cfg, victim, accelerator=None)
        assert restarted.is_set() and len(procs) == 2 and victim.retries > 0
        assert procs[0].returncode == -signal.SIGKILL  # the first server (no child processes) died by the kill
        assert out["queries_sent"] == 64 and out["cached"] == 64
        # the batch whose answer was lost was answered from the persisted idempotency store
        assert victim.usage() == {"user": "attacker", "spent": 64, "budget": 1000, "remaining": 936}
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(20)
        log.close()
    assert QueryLedger(state_paths(state)[1]).spent("attacker") == 64
    serve_main(["usage", "--state-dir", str(state)])
    assert '"spent": 64' in capsys.readouterr().out
    assert "Traceback" not in (tmp_path / "server.log").read_text(), (tmp_path / "server.log").read_text()[-2000:]
