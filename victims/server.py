"""The victim as an HTTP service: API keys, budgets, rate limits, idempotent retries, .npy in and out.

:func:`create_app` wraps a :class:`victims.api.VictimAPI` in a FastAPI app (served by
uvicorn, one process: the defenses' per-user state lives in it). Endpoints:

* ``GET /v1/health`` (no key): ``{"status": "ok", "limits": {...}}``;
* ``GET /v1/describe``: the victim's ``describe()`` (what a user may know);
* ``GET /v1/usage``: the caller's ``{"user", "spent", "budget", "remaining"}``;
* ``POST /v1/query``: body = ``.npy`` bytes of a uint8 ``[N, C, H, W]`` array
  (``Content-Type: application/x-npy``; read with ``allow_pickle=False``); answer = ``.npy``
  bytes of float32 (default) or float16 ``[N, D]`` (``?dtype=float16`` or header
  ``X-Response-Dtype``). Every image is charged to the key's user before it is encoded.

Every request but health carries ``Authorization: Bearer <key>``. Errors are JSON
``{"error": code, "message": one line, ...}``:

===== ========================================= ==========================================
code  ``error``                                  when
===== ========================================= ==========================================
400   ``bad_request``                            not ``.npy``, not uint8 ``[N, C, H, W]``, bad
                                                 dtype or idempotency key (message names it)
401   ``unauthorized``                           no, malformed, unknown or revoked key
402   ``budget_exceeded``                        the batch would pass the budget (nothing
                                                 charged); names user, budget, spent
409   ``idempotency_conflict``                   an ``Idempotency-Key`` reused with another body
413   ``request_too_large`` / ``batch_too_large`` body over ``max_request_bytes`` / N over
                                                 ``max_batch``
415   ``unsupported_media_type``                 a content type other than .npy / octet-stream
429   ``rate_limited``                           the user's token bucket is empty;
                                                 ``Retry-After`` (s) + ``retry_after_s``
===== ========================================= ==========================================

**Idempotency.** A query with header ``Idempotency-Key: K`` is stored (answer bytes,
fingerprint = sha256 of body + dtype) under ``(user, K)`` in the same transaction that saves
the defense state; a retry with the same key and body gets the stored bytes back (header
``X-Idempotent-Replay: true``) without being charged or touching the defenses; another
body under the same key is a 409. The store is bounded (``idempotency_ttl_s``,
``idempotency_max_bytes``, oldest evicted first). The ledger lives in its own file; the
charge records the key as a receipt in the ledger's own transaction
(:meth:`victims.ledger.QueryLedger.charge`), so a request charged just before a crash, whose
answer never reached the store, is answered on retry without a second charge (its defense
state was not saved either, so the defenses see it once).

**State.** ``keys_db`` (SQLite, WAL) holds the API keys (salted sha256 of a 256-bit secret,
never the key), the idempotency store and, per (defense, user), the defense's user state
(``torch.save`` bytes, read back with ``weights_only=True``), written after every query and
loaded by :func:`create_app`, so a restart loses nothing. The ledger is the API's own
:class:`victims.ledger.QueryLedger`. Rate-limit buckets are in memory (a restart refills them).

Example::

    >>> key = add_user("state/server.sqlite", "alice", budget=10_000)   # shown once
    >>> app = create_app(VictimAPI(encoder, QueryLedger("state/ledger.sqlite")),
    ...                  keys_db="state/server.sqlite")
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)                   # launch/serve.py
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from victims.api import VictimAPI
from victims.defenses.base import UserStateDefense
from victims.ledger import BudgetExceeded, QueryLedger

__all__ = [
    "KEYS_DB",
    "LEDGER_DB",
    "RESPONSE_DTYPES",
    "TokenBucket",
    "add_user",
    "create_app",
    "list_users",
    "revoke_user",
    "start_server_thread",
    "state_paths",
]

log = logging.getLogger(__name__)

#: File names inside a server state folder (what ``launch/serve.py --state-dir`` uses).
KEYS_DB, LEDGER_DB = "server.sqlite", "ledger.sqlite"
#: Answer dtypes a client may ask for.
RESPONSE_DTYPES = {"float32": np.float32, "float16": np.float16}
NPY_TYPES = ("application/x-npy", "application/octet-stream")
_KEY_PREFIX = "sslsteal"
_NPY_MAGIC = b"\x93NUMPY"
_MAX_IDEM_KEY = 200

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_id TEXT PRIMARY KEY, user TEXT NOT NULL, salt BLOB NOT NULL, digest BLOB NOT NULL,
        created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS idempotency (
        user TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL, body BLOB NOT NULL,
        images INTEGER NOT NULL, created REAL NOT NULL, PRIMARY KEY (user, key))""",
    "CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created)",
    """CREATE TABLE IF NOT EXISTS defense_meta (
        idx INTEGER PRIMARY KEY, name TEXT NOT NULL, header TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS defense_state (
        idx INTEGER NOT NULL, user TEXT NOT NULL, state BLOB NOT NULL, updated REAL NOT NULL,
        PRIMARY KEY (idx, user))""",
)


# ---------------------------------------------------------------------------- storage
def state_paths(state_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(keys_db, ledger_db)`` inside a server state folder."""
    root = Path(state_dir)
    return root / KEYS_DB, root / LEDGER_DB


def _connect(db: str | os.PathLike[str]) -> sqlite3.Connection:
    return sqlite3.connect(os.fspath(db), timeout=30, isolation_level=None)


def _init_db(db: str | os.PathLike[str]) -> None:
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    with closing(_connect(db)) as con:
        con.execute("PRAGMA journal_mode=WAL")
        for stmt in _SCHEMA:
            con.execute(stmt)


@contextmanager
def _transaction(db: str | os.PathLike[str]) -> Iterator[sqlite3.Connection]:
    with closing(_connect(db)) as con:
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8")).digest()


def add_user(
    db: str | os.PathLike[str],
    user: str,
    budget: int | None,
    *,
    ledger: QueryLedger | str | os.PathLike[str] | None = None,
    replace: bool = False,
) -> str:
    """Create an API key for ``user`` and set their budget; returns the key (store it: only
    its salted hash is kept).

    Args:
        db: the server's keys database (``<state_dir>/server.sqlite``).
        user: the account name the key charges.
        budget: images ``user`` may query in all (None = unlimited); replaces the stored
            budget, keeps what was spent.
        ledger: the ledger (or its path) whose budget is set; default
            ``<folder of db>/ledger.sqlite``, the layout of :func:`state_paths`.
        replace: revoke ``user``'s earlier keys (otherwise they stay valid).
    """
    if not isinstance(user, str) or not user or not user.isprintable():
        raise ValueError(f"user must be a non-empty printable string; got {user!r}")
    _init_db(db)
    if not isinstance(ledger, QueryLedger):
        ledger = QueryLedger(ledger if ledger is not None else Path(db).with_name(LEDGER_DB))
    ledger.set_budget(user, budget)
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_bytes(16)
    with _transaction(db) as con:
        if replace:
            con.execute("UPDATE api_keys SET revoked = 1 WHERE user = ?", (user,))
        con.execute(
            "INSERT INTO api_keys (key_id, user, salt, digest, created) VALUES (?, ?, ?, ?, ?)",
            (key_id, user, salt, _digest(salt, secret), time.time()),
        )
    return f"{_KEY_PREFIX}_{key_id}_{secret}"


def revoke_user(db: str | os.PathLike[str], user: str) -> int:
    """Revoke every key of ``user``; returns how many were active."""
    _init_db(db)
    with _transaction(db) as con:
        return con.execute(
            "UPDATE api_keys SET revoked = 1 WHERE user = ? AND revoked = 0", (user,)
        ).rowcount


def list_users(db: str | os.PathLike[str]) -> dict[str, int]:
    """``{user: number of active keys}``."""
    _init_db(db)
    with closing(_connect(db)) as con:
        rows = con.execute(
            "SELECT user, SUM(1 - revoked) FROM api_keys GROUP BY user ORDER BY user"
        ).fetchall()
    return {u: int(n) for u, n in rows}


def _check_key(db: str | os.PathLike[str], key: str) -> str | None:
    """The user a presented key belongs to, or None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != _KEY_PREFIX:
        return None
    with closing(_connect(db)) as con:
        row = con.execute(
            "SELECT user, salt, digest FROM api_keys WHERE key_id = ? AND revoked = 0", (parts[1],)
        ).fetchone()
    if row is None or not hmac.compare_digest(_digest(row[1], parts[2]), row[2]):
        return None
    return str(row[0])


# ---------------------------------------------------------------------------- defense state
def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _persistable(defense: Any) -> bool:
    return isinstance(defense, UserStateDefense) or (
        callable(getattr(defense, "state_dict", None))
        and callable(getattr(defense, "load_state_dict", None))
    )


def _header(defense: Any) -> str:
    """What must match for stored state to be loaded: the defense's name, version, config."""
    state = defense.state_dict()
    head = {k: v for k, v in state.items() if k != "users"} if isinstance(state, Mapping) else {}
    head.setdefault("name", getattr(defense, "name", type(defense).__name__))
    return json.dumps(head, sort_keys=True, default=str)


def _user_blob(defense: Any, user: str) -> tuple[str, bytes] | None:
    """(row user, bytes) to persist after ``user``'s query; '' = the defense's whole state."""
    if isinstance(defense, UserStateDefense):
        with defense._lock:  # the base class keeps per-user state in _users
            state = defense._users.get(user)
            return None if state is None else (user, _dumps(state))
    return "", _dumps(defense.state_dict())


def _load_defense_state(db: str | os.PathLike[str], defenses: Sequence[Any]) -> dict[int, int]:
    """Load every persisted defense state into ``defenses``; returns {index: users loaded}.

    Raises:
        ValueError: state was saved for another chain or other parameters (one line naming
            the defense and the difference), so it is never silently dropped or misapplied.
    """
    heads = [_header(d) if _persistable(d) else "" for d in defenses]  # before any user is loaded
    with closing(_connect(db)) as con:
        meta = {i: (n, h) for i, n, h in con.execute("SELECT idx, name, header FROM defense_meta")}
        rows = con.execute("SELECT idx, user, state FROM defense_state ORDER BY idx").fetchall()
    by_idx: dict[int, list[tuple[str, bytes]]] = {}
    for idx, user, blob in rows:
        by_idx.setdefault(int(idx), []).append((str(user), bytes(blob)))
    hint = "start with the same --defense list, or use a new --state-dir"
    extra = sorted(set(by_idx) - set(range(len(defenses))))
    if extra:
        raise ValueError(
            f"{db} holds state of defense #{extra[0]} ({meta.get(extra[0], ('?',))[0]}) but the chain "
            f"has {len(defenses)} defense(s); {hint}"
        )
    loaded = {}
    for idx, defense in enumerate(defenses):
        if idx not in by_idx or not _persistable(defense):
            continue
        saved_head = meta.get(idx, ("?", "{}"))[1]
        if saved_head != heads[idx]:
            raise ValueError(
                f"{db}: defense #{idx} state was saved as {saved_head}, this server has {heads[idx]}; {hint}"
            )
        entries = by_idx[idx]
        if isinstance(defense, UserStateDefense):
            state = {**json.loads(heads[idx]), "users": {u: _loads(b) for u, b in entries if u}}
            defense.load_state_dict(state)
        else:
            whole = [b for u, b in entries if not u]
            if whole:
                defense.load_state_dict(_loads(whole[-1]))
        loaded[idx] = len(entries)
    with _transaction(db) as con:
        for idx, defense in enumerate(defenses):
            if _persistable(defense):
                con.execute(
                    "INSERT INTO defense_meta (idx, name, header) VALUES (?, ?, ?) ON CONFLICT(idx) "
                    "DO UPDATE SET name = excluded.name, header = excluded.header",
                    (idx, getattr(defense, "name", type(defense).__name__), heads[idx]),
                )
    return loaded


# ---------------------------------------------------------------------------- rate limit
class TokenBucket:
    """Per-user token buckets: ``rate`` tokens per second, at most ``burst`` banked.

    ``take(user)`` returns 0.0 and spends a token when one is there, else the seconds until
    one will be (and spends nothing). ``rate == 0`` disables the limit; a negative rate is refused
    (it once meant "no limit" silently).
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"rate limit {rate} is not valid; pass a number of requests per second >= 0 (0 = no limit)")
        if rate > 0 and burst < 1:
            raise ValueError(f"burst must be >= 1 with a rate limit; got {burst}")
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, user: str, cost: float = 1.0) -> float:
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = self.clock()
            tokens, last = self._state.get(user, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= cost:
                self._state[user] = (tokens - cost, now)
                return 0.0
            self._state[user] = (tokens, now)
            return (cost - tokens) / self.rate


# ---------------------------------------------------------------------------- the app
class _HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, " ".join(message.split())
        self.headers, self.extra = headers or {}, extra

    def response(self) -> JSONResponse:
        body = {"error": self.code, "message": self.message, **self.extra}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _parse_images(body: bytes, in_chans: int, max_batch: int) -> np.ndarray:
    """``.npy`` bytes → a writable, C-contiguous uint8 ``[N, in_chans, H, W]`` array (no pickle)."""
    want = f"uint8 [N, {in_chans}, H, W]"
    if not body.startswith(_NPY_MAGIC):
        raise _HTTPError(400, "bad_request", f"body is not .npy bytes (no \\x93NUMPY magic); send np.save of a {want} array")
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the client's payload
        msg = (str(e).strip().splitlines() or ["unreadable"])[0][:200]
        raise _HTTPError(400, "bad_request", f"body is not a readable .npy array ({msg}); send a {want} array") from None
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1] != in_chans:
        got = f"{arr.dtype} {list(arr.shape)}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise _HTTPError(400, "bad_request", f"images must be {want}; got {got}")
    if arr.shape[0] > max_batch:
        raise _HTTPError(413, "batch_too_large", f"batch of {arr.shape[0]} images is over the limit of {max_batch}; split it")
    if min(arr.shape[2:]) < 1:
        raise _HTTPError(400, "bad_request", f"images must be {want} with H, W >= 1; got {list(arr.shape)}")
    return np.array(arr, dtype=np.uint8, order="C", copy=True)


def _receipt(idem_key: str, fingerprint: str) -> str:
    """The ledger receipt of a request: its idempotency key and body fingerprint."""
    return f"idem:{idem_key}:{fingerprint}"


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class _Service:
    """The app's state and the synchronous work of each request (run in a thread pool)."""

    def __init__(self, api: VictimAPI, keys_db: str | os.PathLike[str], *, max_batch: int, response_dtype: str,
                 idempotency_ttl_s: float, idempotency_max_bytes: int) -> None:
        self.api, self.db, self.max_batch = api, os.fspath(keys_db), int(max_batch)
        self.response_dtype = response_dtype
        self.idem_ttl, self.idem_max_bytes = float(idempotency_ttl_s), int(idempotency_max_bytes)
        # bytes stored, tracked so that the store is scanned only when it may be over a bound
        self._idem_bytes, self._last_prune = self._stored_bytes(), 0.0
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def user_lock(self, user: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(user, threading.Lock())

    def usage(self, user: str) -> dict[str, Any]:
        led = self.api.ledger
        return {"user": user, "spent": led.spent(user), "budget": led.budget(user),
                "remaining": led.remaining(user)}

    def _usage_headers(self, user: str) -> dict[str, str]:
        u = self.usage(user)
        return {"X-User": user, "X-Query-Spent": str(u["spent"]),
                "X-Query-Budget": "unlimited" if u["budget"] is None else str(u["budget"])}

    def query(self, user: str, body: bytes, dtype: str, idem_key: str | None) -> Response:
        images = _parse_images(body, self.api.encoder.in_chans, self.max_batch)
        fingerprint = f"{hashlib.sha256(body).hexdigest()}:{dtype}"
        with self.user_lock(user):  # one request of a user at a time: defense state stays ordered
            if idem_key is not None:
                with closing(_connect(self.db)) as con:
                    row = con.execute("SELECT fingerprint, body FROM idempotency WHERE user = ? AND key = ?",
                                      (user, idem_key)).fetchone()
                if row is not None:
                    if row[0] != fingerprint:
                        raise _HTTPError(409, "idempotency_conflict",
                                         f"Idempotency-Key {idem_key!r} was used for another request body or dtype; "
                                         f"use a new key for a new request")
                    headers = {**self._usage_headers(user), "X-Idempotent-Replay": "true"}
                    return Response(bytes(row[1]), media_type="application/x-npy", headers=headers)
            try:
                receipt = None if idem_key is None else _receipt(idem_key, fingerprint)
                reps = self.api.query(torch.from_numpy(images), user, receipt=receipt)  # charged here, once per key
            except BudgetExceeded as e:
                raise _HTTPError(402, "budget_exceeded", str(e), user=e.user, budget=e.budget, spent=e.spent,
                                 requested=e.requested, remaining=max(e.budget - e.spent, 0)) from None
            except ValueError as e:
                raise _HTTPError(400, "bad_request", str(e)) from None
            out = _npy(reps.detach().cpu().numpy().astype(RESPONSE_DTYPES[dtype], copy=False))
            self._persist(user, idem_key, fingerprint, out, int(images.shape[0]))
        return Response(out, media_type="application/x-npy", headers=self._usage_headers(user))

    def _persist(self, user: str, idem_key: str | None, fingerprint: str, out: bytes, n: int) -> None:
        """Store the answer under its idempotency key and the user's defense state, atomically."""
        blobs = []
        for idx, defense in enumerate(self.api.defenses):
            if _persistable(defense):
                got = _user_blob(defense, user)
                if got is not None:
                    blobs.append((idx, got[0], got[1]))
        if idem_key is None and not blobs:
            return
        now = time.time()
        with _transaction(self.db) as con:
            for idx, row_user, blob in blobs:
                con.execute(
                    "INSERT INTO defense_state (idx, user, state, updated) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(idx, user) DO UPDATE SET state = excluded.state, updated = excluded.updated",
                    (idx, row_user, blob, now),
                )
            if idem_key is not None:
                con.execute(
                    "INSERT OR REPLACE INTO idempotency (user, key, fingerprint, body, images, created) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (user, idem_key, fingerprint, out, n, now))
                self._prune(con, now, len(out))

    def _stored_bytes(self, con: sqlite3.Connection | None = None) -> int:
        if con is None:
            with closing(_connect(self.db)) as con:
                return self._stored_bytes(con)
        return int(con.execute("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM idempotency").fetchone()[0])

    def _prune(self, con: sqlite3.Connection, now: float, added: int) -> None:
        """Evict expired answers (checked at most every minute), then the oldest while over the size bound."""
        self._idem_bytes += added
        if self._idem_bytes <= self.idem_max_bytes and now - self._last_prune < min(60.0, self.idem_ttl):
            return
        self._last_prune = now
        # an evicted answer takes its ledger receipt along: a receipt outlives its answer only in
        # the crash window, so an old key cannot buy fresh (re-noised) answers for free
        con.execute("DELETE FROM idempotency WHERE created < ?", (now - self.idem_ttl,))
        self.api.ledger.prune_receipts(now - self.idem_ttl)
        total = self._stored_bytes(con)
        if total > self.idem_max_bytes:
            dropped = []
            for rowid, user, key, fp, size in con.execute(
                    "SELECT rowid, user, key, fingerprint, LENGTH(body) FROM idempotency ORDER BY created").fetchall():
                if total <= self.idem_max_bytes:
                    break
                con.execute("DELETE FROM idempotency WHERE rowid = ?", (rowid,))
                dropped.append((user, _receipt(key, fp)))
                total -= size
            self.api.ledger.drop_receipts(dropped)
        self._idem_bytes = total


def create_app(
    api: VictimAPI,
    *,
    keys_db: str | os.PathLike[str],
    rate_limit_per_s: float = 20.0,
    burst: int = 40,
    max_request_bytes: int = 64 << 20,
    max_batch: int = 1024,
    response_dtype: str = "float32",
    idempotency_ttl_s: float = 24 * 3600.0,
    idempotency_max_bytes: int = 512 << 20,
) -> FastAPI:
    """The HTTP service over ``api`` (see the module docstring for the endpoints).

    Loads the defenses' persisted per-user state from ``keys_db`` into ``api.defenses``.

    Args:
        api: the victim, its ledger and its defense chain.
        keys_db: SQLite file of API keys, the idempotency store and the defense state.
        rate_limit_per_s: query requests per second per user (token bucket; <= 0 = none).
        burst: requests a user may send at once after being idle.
        max_request_bytes: larger bodies get 413.
        max_batch: larger batches get 413.
        response_dtype: default answer dtype, ``float32`` or ``float16``.
        idempotency_ttl_s, idempotency_max_bytes: bounds of the stored answers.

    Raises:
        ValueError: a bad setting, or stored defense state that does not fit the chain.
    """
    if response_dtype not in RESPONSE_DTYPES:
        raise ValueError(f"response_dtype {response_dtype!r} is not valid; choose one of: {', '.join(RESPONSE_DTYPES)}")
    if max_request_bytes < 1024 or max_batch < 1:
        raise ValueError(f"max_request_bytes must be >= 1024 and max_batch >= 1; got {max_request_bytes}, {max_batch}")
    _init_db(keys_db)
    loaded = _load_defense_state(keys_db, api.defenses)
    if loaded:
        log.info("loaded defense state: %s", ", ".join(f"#{i}: {n} user(s)" for i, n in loaded.items()))
    svc = _Service(api, keys_db, max_batch=max_batch, response_dtype=response_dtype,
                   idempotency_ttl_s=idempotency_ttl_s, idempotency_max_bytes=idempotency_max_bytes)
    bucket = TokenBucket(rate_limit_per_s, burst)
    limits = {"max_batch": int(max_batch), "max_request_bytes": int(max_request_bytes),
              "rate_limit_per_s": float(rate_limit_per_s), "burst": int(burst),
              "response_dtypes": list(RESPONSE_DTYPES), "default_dtype": response_dtype}

    app = FastAPI(title="sslsteal victim", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.limits = svc, limits

    @app.exception_handler(_HTTPError)
    async def _on_http_error(request: Request, exc: _HTTPError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error serving %s", request.url.path)
        msg = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        return JSONResponse({"error": "internal", "message": f"internal server error ({msg})"}, status_code=500)

    async def authenticate(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise _HTTPError(401, "unauthorized", "missing API key: send the header 'Authorization: Bearer <key>' "
                             "(create a key with python launch/serve.py add-user NAME --budget N --state-dir DIR)",
                             headers={"WWW-Authenticate": "Bearer"})
        user = await run_in_threadpool(_check_key, svc.db, key.strip())
        if user is None:
            raise _HTTPError(401, "unauthorized", "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        return user

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "limits": limits}

    @app.get("/v1/describe")
    async def describe(request: Request) -> dict[str, Any]:
        await authenticate(request)
        return api.describe()

    @app.get("/v1/usage")
    async def usage(request: Request) -> dict[str, Any]:
        user = await authenticate(request)
        return await run_in_threadpool(svc.usage, user)

    @app.post("/v1/query")
    async def query(request: Request) -> Response:
        user = await authenticate(request)
        wait = bucket.take(user)
        if wait > 0:
            raise _HTTPError(429, "rate_limited",
                             f"rate limit of {rate_limit_per_s:g} requests/s (burst {burst}) for user {user!r}; "
                             f"retry in {wait:.2f} s", headers={"Retry-After": str(max(1, math.ceil(wait)))},
                             retry_after_s=math.ceil(wait * 1000) / 1000)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and ctype not in NPY_TYPES:
            raise _HTTPError(415, "unsupported_media_type",
                             f"content type {ctype!r} is not accepted; send .npy bytes as application/x-npy")
        dtype = request.query_params.get("dtype") or request.headers.get("x-response-dtype") or response_dtype
        if dtype not in RESPONSE_DTYPES:
            raise _HTTPError(400, "bad_request", f"dtype {dtype!r} is not valid; choose one of: {', '.join(RESPONSE_DTYPES)}")
        idem = request.headers.get("idempotency-key")
        if idem is not None and not (0 < len(idem) <= _MAX_IDEM_KEY and idem.isprintable()):
            raise _HTTPError(400, "bad_request", f"Idempotency-Key must be 1..{_MAX_IDEM_KEY} printable characters")
        too_big = _HTTPError(413, "request_too_large",
                             f"request body is over the limit of {max_request_bytes} bytes; send fewer images per request")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                raise too_big
        return await run_in_threadpool(svc.query, user, bytes(body), dtype, idem)

    return app


# ---------------------------------------------------------------------------- running it
def start_server_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *,
                        log_level: str = "warning", timeout: float = 30.0) -> tuple[Any, threading.Thread, str]:
    """Serve ``app`` with uvicorn in a daemon thread; returns ``(server, thread, url)``.

    ``port=0`` lets the OS pick a free port. Stop with ``server.should_exit = True;
    thread.join()``. For tests, notebooks and sweeps; ``launch/serve.py`` runs uvicorn itself.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False))
    thread = threading.Thread(target=server.run, name="victim-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"victim server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://{host}:{bound}"
