"""The attacker's HTTP transport: a victim server behind retries, backoff and idempotency keys.

:class:`HTTPVictim` has the query-target shape ``stealer.steal.run_query_phase`` needs
(``query(uint8 images [N, C, H, W], user) -> float32 [N, D]`` and ``describe()``), so the
same query loop serves the in-process API and a remote victim (``victims/server.py``,
started with ``python launch/serve.py``). It speaks HTTP only: images go out as ``.npy``
bytes, answers come back as ``.npy`` bytes (float16 or float32), and nothing is pickled.

What it does for the attacker:

* **retries** on 429, 5xx and connection errors/time-outs: exponential backoff with full
  jitter (``uniform(0, min(backoff_max, backoff_base * 2**attempt))``), never sooner than
  the server's ``Retry-After``; ``max_retries`` retries, then a one-line error;
* **no double charge on a retry**: every request carries ``Idempotency-Key =
  sha256(nonce, body hash, dtype, k)`` where ``k`` counts earlier sends of the same body by
  this client, so a retry of a request whose answer was lost is answered from the
  server's store for free, while a deliberate repeat of the same images (averaging out
  noise) is a new, paid query. Pass a ``nonce`` kept on disk (:func:`load_or_create_nonce`)
  and a process that dies after the server charged a batch but before the answer was
  cached gets that batch back for free when it is rerun;
* **splits** a batch over the server's ``max_batch`` and ``max_request_bytes`` (read once
  from ``/v1/health``);
* typed one-line failures: :class:`victims.ledger.BudgetExceeded` (402: user, budget, spent; the in-process ledger's own class),
  :class:`ConnectionError` (unreachable after the retries: names the URL and how to start
  the server), :class:`VictimHTTPError` (any other refusal: status, code, message).

Example::

    >>> victim = HTTPVictim("http://127.0.0.1:8000", open("alice.key").read().strip())
    >>> victim.describe()["out_dim"]
    512
    >>> reps = victim.query(images_uint8)          # float32 [N, 512], charged to alice
    >>> victim.usage()
    {'user': 'alice', 'spent': 256, 'budget': 50000, 'remaining': 49744}
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import torch

from victims.atomic import create_once
from victims.ledger import BudgetExceeded  # the one budget refusal: the HTTP 402 maps to the ledger's class

__all__ = ["BudgetExceeded", "HTTPVictim", "VictimHTTPError", "load_or_create_nonce", "read_api_key"]

log = logging.getLogger(__name__)

_DTYPES = ("float32", "float16")
_NPY_HEADER = 256  # generous bound on an .npy header's size
_START_HINT = ("start it with `python launch/serve.py --checkpoint CKPT --state-dir DIR --port PORT` "
               "(keys: `python launch/serve.py add-user NAME --budget N --state-dir DIR`) or fix victim.url")


class VictimHTTPError(RuntimeError):
    """The victim server refused a request for another reason (or kept failing): one line."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def read_api_key(path: str | os.PathLike[str]) -> str:
    """The API key stored in a file (first non-empty line), with a one-line error if missing."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"no API key file at {p}; create a key with `python launch/serve.py add-user NAME --budget N "
            f"--state-dir DIR > {p}`"
        )
    for line in p.read_text().splitlines():
        if line.strip():
            return line.strip()
    raise ValueError(f"API key file {p} is empty")


def load_or_create_nonce(path: str | os.PathLike[str]) -> str:
    """A client nonce kept in ``path`` (created atomically the first time), for resumable runs."""
    return create_once(path, secrets.token_hex(16))


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


class HTTPVictim:
    """A remote victim behind ``victims/server.py``.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        api_key: the key ``launch/serve.py add-user`` printed (it decides who pays).
        timeout: seconds per request (connect at most 10).
        max_retries: retries after the first try on 429, 5xx and connection errors.
        backoff_base, backoff_max: full-jitter exponential backoff bounds (seconds).
        dtype: answer dtype on the wire, ``float32`` or ``float16`` (halves the bytes;
            answers are returned as float32 either way).
        cache_describe: fetch ``/v1/describe`` once.
        nonce: client nonce of the idempotency keys (default: random per instance; pass
            :func:`load_or_create_nonce` of a file in the run folder to survive restarts).
        transport: an ``httpx`` transport (tests inject failures with one).
        sleep: how to wait between retries (tests may record instead).
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 120.0,
        max_retries: int = 8,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        dtype: str = "float32",
        cache_describe: bool = True,
        nonce: str | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"victim url must start with http:// or https://; got {url!r}")
        if not isinstance(api_key, str) or not api_key.strip():
            raise ValueError("api_key is empty; pass the key printed by `python launch/serve.py add-user`")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not valid; choose one of: {', '.join(_DTYPES)}")
        if max_retries < 0 or backoff_base < 0 or backoff_max < 0 or timeout <= 0:
            raise ValueError("max_retries, backoff_base, backoff_max must be >= 0 and timeout > 0")
        self.url = url.rstrip("/")
        self.dtype = dtype
        self.max_retries, self.backoff_base, self.backoff_max = int(max_retries), float(backoff_base), float(backoff_max)
        self.cache_describe = cache_describe
        self.nonce = nonce or secrets.token_hex(16)
        self._sleep = sleep
        self._rng = random.Random()
        self._client = httpx.Client(
            headers={"Authorization": f"Bearer {api_key.strip()}", "User-Agent": "sslsteal-client/1"},
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            transport=transport,
        )
        self._describe: dict[str, Any] | None = None
        self._limits: dict[str, Any] | None = None
        self._sent: dict[str, int] = {}
        self._lock = threading.Lock()
        self._warned_user = False
        self.retries = 0  # retries made so far (for reports)

    def __repr__(self) -> str:
        return f"HTTPVictim({self.url!r}, dtype={self.dtype!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HTTPVictim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport
    def _backoff(self, attempt: int) -> float:
        return self._rng.uniform(0.0, min(self.backoff_max, self.backoff_base * 2 ** attempt))

    @staticmethod
    def _retry_after(resp: httpx.Response) -> float:
        try:
            body = resp.json()
            if isinstance(body, dict) and isinstance(body.get("retry_after_s"), (int, float)):
                return max(float(body["retry_after_s"]), 0.0)
        except ValueError:
            pass
        value = resp.headers.get("retry-after", "")
        try:
            return max(float(value), 0.0)
        except ValueError:
            return 0.0

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """Send with retries; returns the first response that is neither 429 nor 5xx."""
        last: httpx.Response | Exception | None = None
        tries = self.max_retries + 1
        for attempt in range(tries):
            try:
                resp = self._client.request(method, self.url + path, **kw)
            except httpx.TransportError as e:  # connect/read/write errors and time-outs
                last, wait = e, self._backoff(attempt)
            else:
                if resp.status_code != 429 and resp.status_code < 500:
                    return resp
                if resp.status_code == 429 and self._error_code(resp) == "budget_exceeded":
                    return resp  # a server that signals budgets with 429: not worth retrying
                last, wait = resp, max(self._retry_after(resp), self._backoff(attempt))
            if attempt + 1 < tries:
                self.retries += 1
                log.debug("retrying %s %s in %.2f s after %s", method, path, wait, last)
                self._sleep(wait)
        if isinstance(last, httpx.Response):
            code, msg = self._error_code(last), self._error_message(last)
            raise VictimHTTPError(
                f"victim server {self.url} answered {last.status_code} ({code}) to {method} {path} "
                f"{tries} time(s): {msg}", status=last.status_code, code=code)
        err = _one_line(f"{type(last).__name__}: {last}")
        raise ConnectionError(f"victim server {self.url} unreachable after {tries} tries ({err}); {_START_HINT}")

    @staticmethod
    def _error_code(resp: httpx.Response) -> str:
        try:
            body = resp.json()
            return str(body.get("error", "http_error")) if isinstance(body, dict) else "http_error"
        except ValueError:
            return "http_error"

    @staticmethod
    def _error_message(resp: httpx.Response) -> str:
        try:
            body = resp.json()
            if isinstance(body, dict) and "message" in body:
                return _one_line(body["message"])
        except ValueError:
            pass
        return _one_line(resp.text or resp.reason_phrase)

    def _raise_for(self, resp: httpx.Response, what: str) -> None:
        if resp.status_code < 400:
            return
        code, msg = self._error_code(resp), self._error_message(resp)
        if resp.status_code == 402 or code == "budget_exceeded":
            body = resp.json() if code == "budget_exceeded" else {}
            raise BudgetExceeded(body.get("user"), body.get("budget"), body.get("spent"), body.get("requested"),
                                 message=msg)
        hint = ""
        if resp.status_code == 401:
            hint = "; check victim.api_key_file (create a key with `python launch/serve.py add-user NAME --budget N --state-dir DIR`)"
        raise VictimHTTPError(f"victim server {self.url} refused {what} with {resp.status_code} ({code}): {msg}{hint}",
                              status=resp.status_code, code=code)

    def _get_json(self, path: str) -> dict[str, Any]:
        resp = self._request("GET", path)
        self._raise_for(resp, f"GET {path}")
        return resp.json()

    # ------------------------------------------------------------------ API
    def health(self) -> dict[str, Any]:
        """``/v1/health``: status and the server's limits (no key needed)."""
        return self._get_json("/v1/health")

    def limits(self) -> dict[str, Any]:
        """The server's ``max_batch``, ``max_request_bytes``, rate limit (fetched once)."""
        if self._limits is None:
            self._limits = dict(self.health().get("limits", {}))
        return self._limits

    def describe(self) -> dict[str, Any]:
        """The victim's description (``out_dim``, ``arch``, ``in_chans``, ``image_size``, ...)."""
        if self._describe is None or not self.cache_describe:
            self._describe = self._get_json("/v1/describe")
        return dict(self._describe)

    def usage(self) -> dict[str, Any]:
        """This key's ``{"user", "spent", "budget", "remaining"}`` (budget None = unlimited)."""
        return self._get_json("/v1/usage")

    def _idempotency_key(self, body: bytes, key: str | None = None) -> str:
        digest = hashlib.sha256(body).hexdigest()
        if key is not None:  # the caller names the purchase: the same key and body are the same request
            return hashlib.sha256(f"{self.nonce}:key:{key}:{digest}:{self.dtype}".encode()).hexdigest()[:48]
        with self._lock:
            k = self._sent.get(digest, 0)
            self._sent[digest] = k + 1
        return hashlib.sha256(f"{self.nonce}:{digest}:{self.dtype}:{k}".encode()).hexdigest()[:48]

    def _chunk_size(self, images: np.ndarray) -> int:
        n = images.shape[0]
        lim = self.limits()
        per_image = max(int(np.prod(images.shape[1:])), 1)
        size = min(int(lim.get("max_batch") or n or 1), n or 1)
        max_bytes = lim.get("max_request_bytes")
        if max_bytes:
            fit = (int(max_bytes) - _NPY_HEADER) // per_image
            if fit < 1:
                raise ValueError(
                    f"one image of shape {list(images.shape[1:])} is over the server's request limit of {max_bytes} bytes"
                )
            size = min(size, fit)
        return max(size, 1)

    def query(self, images: torch.Tensor | np.ndarray, user: str | None = None, *, key: str | None = None) -> torch.Tensor:
        """Send uint8 images ``[N, C, H, W]``; returns float32 ``[N, D]`` on the CPU.

        ``user`` is only checked: the API key decides who pays (a different name logs a
        warning once). Batches over the server's limits are split. ``key`` names the purchase
        (the query phase derives it from the run and the image keys): each request's
        Idempotency-Key is then derived from it and the request body instead of a per-process
        count, so a rerun that sends the same batch under the same key, in any process, is
        answered from the server's store without a second charge.

        Raises:
            ValueError: not uint8 ``[N, C, H, W]`` (nothing sent).
            BudgetExceeded: the server refused a batch over the budget. A batch split into
                several requests is checked against ``/v1/usage`` first, so it is refused
                before any chunk is paid (another client of the same key could still race it).
            ConnectionError: the server stayed unreachable through the retries.
            VictimHTTPError: any other refusal.
        """
        arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim != 4:
            raise ValueError(f"query images must be uint8 [N, C, H, W] (0..255); got {arr.dtype} {list(arr.shape)}")
        arr = np.ascontiguousarray(arr)
        if arr.shape[0] == 0:
            return torch.empty(0, int(self.describe()["out_dim"]), dtype=torch.float32)
        size = self._chunk_size(arr)
        if size < arr.shape[0]:  # several requests: do not pay for some chunks and then be refused
            u = self.usage()
            if u.get("remaining") is not None and int(u["remaining"]) < arr.shape[0]:
                raise BudgetExceeded(
                    u.get("user"), u.get("budget"), u.get("spent"), int(arr.shape[0]),
                    message=f"query budget exceeded for user {u.get('user')!r}: a batch of {arr.shape[0]} images "
                    f"(split into {-(-arr.shape[0] // size)} requests) with {u.get('spent')} of {u.get('budget')} "
                    f"spent ({u['remaining']} left); nothing was sent")
        parts = [self._query_chunk(arr[i:i + size], user, key) for i in range(0, arr.shape[0], size)]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return torch.from_numpy(out)

    def _query_chunk(self, arr: np.ndarray, user: str | None, key: str | None = None) -> np.ndarray:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        body = buf.getvalue()
        headers = {"Content-Type": "application/x-npy", "Idempotency-Key": self._idempotency_key(body, key)}
        resp = self._request("POST", "/v1/query", content=body, headers=headers, params={"dtype": self.dtype})
        self._raise_for(resp, f"a batch of {arr.shape[0]} images")
        server_user = resp.headers.get("x-user")
        if user and server_user and server_user != user and not self._warned_user:
            self._warned_user = True
            log.warning("the API key belongs to user %r, not %r: %r pays for the queries", server_user, user, server_user)
        try:
            out = np.load(io.BytesIO(resp.content), allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise VictimHTTPError(f"victim server {self.url} sent an answer that is not .npy ({_one_line(e)})",
                                  status=resp.status_code, code="bad_answer") from None
        if out.ndim != 2 or out.shape[0] != arr.shape[0] or out.dtype.kind != "f":
            raise VictimHTTPError(
                f"victim server {self.url} answered {out.dtype} {list(out.shape)} to {arr.shape[0]} images; "
                f"expected float [N={arr.shape[0]}, D]", status=resp.status_code, code="bad_answer")
        return out.astype(np.float32)
