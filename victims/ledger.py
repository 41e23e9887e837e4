"""Per-user query budgets, persisted in SQLite: every image sent is paid for exactly once.

Table ``users(user TEXT PRIMARY KEY, budget INTEGER NULL, spent INTEGER NOT NULL)``
(``budget`` NULL = unlimited), and ``receipts(user, receipt, images, created, fingerprint, answer)``:
a charge may carry a receipt, written in the charge's own transaction, and a charge whose receipt
is already there is not charged again. :meth:`QueryLedger.charge_answer` also keeps the answer
(bytes) and a fingerprint of the question in that row, so the charge and the answer are committed
together: a caller killed after the commit gets the answer back with :meth:`QueryLedger.answer`,
never pays for it twice, and :meth:`QueryLedger.drop_receipts` forgets it once it is kept elsewhere.
Each call opens its own connection (WAL journal, 30 s busy timeout) and every charge is one
``BEGIN IMMEDIATE`` transaction, so several threads or processes on one machine may share a file
and the budget is never exceeded. The object holds only the path: it pickles, and works after ``fork``/``spawn``.
(SQLite's locking is not reliable on network file systems: keep the file on local disk.)

Example::

    >>> ledger = QueryLedger("runs/ledger.sqlite")
    >>> ledger.set_budget("alice", 1000)
    >>> ledger.charge("alice", 256)
    256
    >>> ledger.remaining("alice")
    744
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing
from typing import Any

__all__ = ["BudgetExceeded", "QueryLedger"]

_SCHEMA = """CREATE TABLE IF NOT EXISTS users (
    user TEXT PRIMARY KEY,
    budget INTEGER NULL,
    spent INTEGER NOT NULL DEFAULT 0
)"""
# a receipt is written in the charge's own transaction: a charge carrying a receipt already
# recorded is not charged again (the server's idempotency keys; see victims/server.py)
_RECEIPTS = """CREATE TABLE IF NOT EXISTS receipts (
    user TEXT NOT NULL,
    receipt TEXT NOT NULL,
    images INTEGER NOT NULL,
    created REAL NOT NULL,
    fingerprint TEXT NULL,
    answer BLOB NULL,
    PRIMARY KEY (user, receipt)
)"""
# columns added to the receipts table after its first release (older ledgers are migrated on open)
_RECEIPT_COLUMNS = {"fingerprint": "TEXT NULL", "answer": "BLOB NULL"}


class BudgetExceeded(RuntimeError):
    """A charge would take a user past their budget; nothing was charged.

    The one budget refusal of the project: the ledger raises it in-process, and
    ``stealer.client.HTTPVictim`` raises the same class for the server's 402 (with the server's
    ``message``), so callers catch it by type whatever the transport. Fields the server did not
    report are None.
    """

    def __init__(self, user: str | None, budget: int | None, spent: int | None, requested: int | None,
                 message: str | None = None) -> None:
        self.user, self.budget, self.spent, self.requested = user, budget, spent, requested
        if message is None:
            left = max(budget - spent, 0) if budget is not None and spent is not None else "?"
            message = (f"query budget exceeded for user {user!r}: asked for {requested} images with "
                       f"{spent} of {budget} spent ({left} left); nothing was charged")
        super().__init__(message)


def _check_user(user: str) -> str:
    if not isinstance(user, str) or not user:
        raise ValueError(f"user must be a non-empty string; got {user!r}")
    return user


def _check_stored(user: str, receipt: str, n: int, fingerprint: str, got: tuple[Any, ...]) -> None:
    """A stored receipt ``(images, fingerprint, answer)`` must be an answered purchase of the same question."""
    images, stored_fp, answer = got
    if answer is None:
        raise ValueError(f"receipt {receipt!r} of user {user!r} was charged without keeping its answer; "
                         f"use a new key for a new request")
    if images != n or stored_fp != fingerprint:
        raise ValueError(f"key {receipt!r} of user {user!r} was paid for another question ({images} images, "
                         f"fingerprint {str(stored_fp)[:12]}); use a new key for a new request")


def _debit(con: sqlite3.Connection, user: str, budget: int | None, spent: int, n: int) -> None:
    """Inside an open write transaction: refuse ``n`` more images over ``budget``, else record them."""
    if budget is not None and spent + n > budget:
        raise BudgetExceeded(user, budget, spent, n)
    con.execute(
        "INSERT INTO users (user, budget, spent) VALUES (?, ?, ?) "
        "ON CONFLICT(user) DO UPDATE SET spent = excluded.spent",
        (user, budget, spent + n),
    )


class QueryLedger:
    """Query counts and budgets per user in an SQLite file.

    Args:
        path: the database file (created, with its folder, if missing).
        default_budget: budget of a user first seen by :meth:`charge` without a
            :meth:`set_budget`; None = unlimited.
    """

    def __init__(self, path: str | os.PathLike[str], *, default_budget: int | None = None) -> None:
        self.path = os.fspath(path)
        if default_budget is not None and default_budget < 0:
            raise ValueError(f"default_budget must be >= 0 or None; got {default_budget}")
        self.default_budget = default_budget
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        # several ranks open a new ledger at once: switching it to WAL needs an exclusive lock and
        # SQLite may answer SQLITE_BUSY at once instead of waiting, so the set-up retries
        for attempt in range(200):
            try:
                with closing(self._connect()) as con:
                    con.execute("PRAGMA journal_mode=WAL")
                    con.execute(_SCHEMA)
                    con.execute(_RECEIPTS)
                    con.execute("BEGIN IMMEDIATE")  # one process migrates; the others then see its columns
                    try:
                        have = {row[1] for row in con.execute("PRAGMA table_info(receipts)")}
                        for col, decl in _RECEIPT_COLUMNS.items():
                            if col not in have:
                                con.execute(f"ALTER TABLE receipts ADD COLUMN {col} {decl}")
                        con.execute("COMMIT")
                    except BaseException:
                        con.execute("ROLLBACK")
                        raise
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or attempt == 199:
                    raise
                time.sleep(0.05)

    def __repr__(self) -> str:
        return f"QueryLedger({self.path!r}, default_budget={self.default_budget})"

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit; transactions are opened explicitly.
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def _row(self, user: str) -> tuple[int | None, int] | None:
        with closing(self._connect()) as con:
            row = con.execute(
                "SELECT budget, spent FROM users WHERE user = ?", (_check_user(user),)
            ).fetchone()
        return None if row is None else (row[0], row[1])

    def set_budget(self, user: str, budget: int | None) -> None:
        """Set ``user``'s budget (None = unlimited); what they already spent is kept."""
        if budget is not None and (not isinstance(budget, int) or budget < 0):
            raise ValueError(f"budget must be an int >= 0 or None; got {budget!r}")
        with closing(self._connect()) as con:
            con.execute(
                "INSERT INTO users (user, budget, spent) VALUES (?, ?, 0) "
                "ON CONFLICT(user) DO UPDATE SET budget = excluded.budget",
                (_check_user(user), budget),
            )

    def spent(self, user: str) -> int:
        """Images charged to ``user`` so far (0 for an unknown user)."""
        row = self._row(user)
        return 0 if row is None else row[1]

    def budget(self, user: str) -> int | None:
        """``user``'s budget; None = unlimited."""
        row = self._row(user)
        return self.default_budget if row is None else row[0]

    def remaining(self, user: str) -> int | None:
        """Images ``user`` may still send; None = unlimited."""
        row = self._row(user)
        budget, spent = (self.default_budget, 0) if row is None else row
        return None if budget is None else max(budget - spent, 0)

    def charge(self, user: str, n: int, *, receipt: str | None = None) -> int:
        """Charge ``n`` images to ``user`` atomically; returns the new total spent.

        ``receipt`` (e.g. a request's idempotency key) is recorded in the same transaction;
        a later charge of ``user`` with the same receipt charges nothing (it returns the total
        spent). A request that was charged but whose answer was lost in a crash is thus paid
        once however often it is retried.

        Raises:
            BudgetExceeded: ``spent + n`` would pass the budget; nothing is charged.
            ValueError: ``receipt`` was recorded for another number of images.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"charge count must be an int >= 0; got {n!r}")
        _check_user(user)
        if receipt is not None and (not isinstance(receipt, str) or not receipt):
            raise ValueError(f"receipt must be a non-empty string or None; got {receipt!r}")
        with closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")  # write lock first: no lost updates across processes
            try:
                row = con.execute(
                    "SELECT budget, spent FROM users WHERE user = ?", (user,)
                ).fetchone()
                budget, spent = (self.default_budget, 0) if row is None else row
                if receipt is not None:
                    got = con.execute("SELECT images FROM receipts WHERE user = ? AND receipt = ?",
                                      (user, receipt)).fetchone()
                    if got is not None:
                        if got[0] != n:
                            raise ValueError(f"receipt {receipt!r} of user {user!r} was charged for {got[0]} images, "
                                             f"not {n}; use a new receipt for a new request")
                        con.execute("ROLLBACK")
                        return spent
                _debit(con, user, budget, spent, n)
                if receipt is not None:
                    con.execute("INSERT INTO receipts (user, receipt, images, created) VALUES (?, ?, ?, ?)",
                                (user, receipt, n, time.time()))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return spent + n

    def charge_answer(self, user: str, n: int, receipt: str, fingerprint: str, answer: bytes) -> bytes:
        """Charge ``n`` images to ``user`` and keep ``answer`` under ``receipt``, in one transaction.

        The idempotent purchase of the in-process victim (:meth:`victims.api.VictimAPI.query` with
        ``key=``): the answer is computed first, then this commits the charge and the answer
        together, so there is no moment at which a charge is on disk without its answer. When
        ``receipt`` already holds an answer (another process asked with the same key first), that
        answer is returned and nothing is charged.

        Args:
            fingerprint: identifies the question (e.g. a hash of the images); a receipt asked
                again with another fingerprint is refused.
            answer: the bytes to return to every later asker of ``receipt``.

        Returns:
            the answer kept under ``receipt`` (``answer`` itself unless it was already there).

        Raises:
            BudgetExceeded: ``spent + n`` would pass the budget; nothing is charged or kept.
            ValueError: ``receipt`` was recorded for another question or number of images, or was
                charged without an answer (by :meth:`charge`).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"charge count must be an int >= 0; got {n!r}")
        _check_user(user)
        if not isinstance(receipt, str) or not receipt:
            raise ValueError(f"receipt must be a non-empty string; got {receipt!r}")
        with closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                got = con.execute("SELECT images, fingerprint, answer FROM receipts WHERE user = ? AND receipt = ?",
                                  (user, receipt)).fetchone()
                if got is not None:
                    _check_stored(user, receipt, n, fingerprint, got)
                    con.execute("ROLLBACK")
                    return bytes(got[2])
                row = con.execute("SELECT budget, spent FROM users WHERE user = ?", (user,)).fetchone()
                budget, spent = (self.default_budget, 0) if row is None else row
                _debit(con, user, budget, spent, n)
                con.execute("INSERT INTO receipts (user, receipt, images, created, fingerprint, answer) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (user, receipt, n, time.time(), fingerprint, answer))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return answer

    def answer(self, user: str, receipt: str, *, n: int | None = None, fingerprint: str | None = None) -> bytes | None:
        """The answer kept by :meth:`charge_answer` under ``receipt`` (None: never paid, or forgotten).

        ``n`` and ``fingerprint``, when given, must match what was paid (else ValueError).
        """
        with closing(self._connect()) as con:
            got = con.execute("SELECT images, fingerprint, answer FROM receipts WHERE user = ? AND receipt = ?",
                              (_check_user(user), receipt)).fetchone()
        if got is None:
            return None
        _check_stored(user, receipt, got[0] if n is None else n, got[1] if fingerprint is None else fingerprint, got)
        return bytes(got[2])

    def has_receipt(self, user: str, receipt: str) -> bool:
        """Whether a charge of ``user`` carried ``receipt``."""
        with closing(self._connect()) as con:
            return con.execute("SELECT 1 FROM receipts WHERE user = ? AND receipt = ?",
                               (_check_user(user), receipt)).fetchone() is not None

    def drop_receipts(self, pairs: list[tuple[str, str]]) -> int:
        """Forget the receipts ``[(user, receipt), ...]``; returns how many there were."""
        if not pairs:
            return 0
        with closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")
            n = sum(con.execute("DELETE FROM receipts WHERE user = ? AND receipt = ?", p).rowcount for p in pairs)
            con.execute("COMMIT")
        return n

    def prune_receipts(self, older_than: float) -> int:
        """Forget receipts recorded before the time ``older_than`` (``time.time()`` scale); returns how many."""
        with closing(self._connect()) as con:
            return con.execute("DELETE FROM receipts WHERE created < ?", (float(older_than),)).rowcount

    def usage(self) -> dict[str, dict[str, Any]]:
        """``{user: {"budget": int | None, "spent": int, "remaining": int | None}}``."""
        with closing(self._connect()) as con:
            rows = con.execute("SELECT user, budget, spent FROM users ORDER BY user").fetchall()
        return {
            u: {"budget": b, "spent": s, "remaining": None if b is None else max(b - s, 0)}
            for u, b, s in rows
        }
