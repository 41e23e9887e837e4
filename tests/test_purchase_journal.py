"""The pay-once journal is the response cache's public behaviour (ResponseCache.recover_paid /
settle_journal), ``takes_key`` the purchase side's (victims.purchase): the encoder steal and the
classifier attacks use the same owner, not each other's private helpers."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


class _KeyedVictim:
    """A victim with the in-process keyed purchase (victims.purchase on a real ledger): answer = 2 x mean pixel."""

    def __init__(self, ledger):
        self.ledger = ledger

    def query(self, images, user, *, key=None):
        from victims.purchase import query_once

        def answer(x):
            return x.float().flatten(1).mean(1, keepdim=True).repeat(1, 2) * torch.tensor([1.0, 2.0])

        return query_once(self.ledger, user, key, images, answer, device="cpu", width=2)

    def answer(self, user, key):
        from victims.purchase import kept_answer

        return kept_answer(self.ledger, user, key)

    def forget(self, user, keys):
        from victims.purchase import forget

        return forget(self.ledger, user, keys)


def _images(n, seed):
    return torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_recover_paid_reads_back_paid_uncached_answers_and_settle_forgets_the_cached(tmp_path):
    from stealer.cache import ResponseCache
    from victims.ledger import QueryLedger

    ledger = QueryLedger(tmp_path / "ledger.sqlite")
    victim = _KeyedVictim(ledger)
    cache = ResponseCache(tmp_path / "cache")
    a, b, c = ["a0", "a1"], ["b0", "b1"], ["c0", "c1"]
    ka, kb, kc = (cache.batch_key("u", k) for k in (a, b, c))
    for k, keys, seed in ((ka, a, 0), (kb, b, 1)):  # two purchases paid ...
        cache.intend(k, keys)
        victim.query(_images(2, seed), "u", key=k)
    cache.intend(kc, c)  # ... and one journaled, killed before its charge
    want_b = victim.answer("u", kb).numpy()
    cache.write_batch(a, [("png", b"x"), ("png", b"y")], [-1, -1], victim.answer("u", ka).numpy())  # only a cached
    assert ledger.spent("u") == 4

    got = cache.recover_paid(victim, "u", cache.done_keys())
    assert sorted(got) == b and np.array_equal(np.stack([got[k] for k in b]), want_b)  # a is cached, c never paid
    assert cache.recover_paid(object(), "u", set()) == {}  # a victim that keeps no answers (HTTP) recovers nothing
    # two views per image, bought view-major ([v0 of d0, v0 of d1, v1 of d0, v1 of d1]): each image gets its [V, D]
    multi = ResponseCache(tmp_path / "views")
    kd = multi.batch_key("u", ["d0", "d1"])
    multi.intend(kd, ["d0", "d1"])
    kept = victim.query(_images(4, 2), "u", key=kd).numpy()
    views = multi.recover_paid(victim, "u", set(), per_image=2, raw=False)
    assert np.array_equal(views["d0"], kept[[0, 2]]) and np.array_equal(views["d1"], kept[[1, 3]])
    assert ledger.spent("u") == 8

    cache.settle_journal(victim, "u")
    assert victim.answer("u", ka) is None  # cached: forgotten by the victim
    assert victim.answer("u", kb) is not None  # paid, not cached: still kept
    assert sorted(b for b, _ in cache.intents()) == sorted([kb, kc])  # the journal keeps what is not cached
    assert ledger.spent("u") == 8  # forgetting charges nothing and refunds nothing


def test_takes_key_is_the_purchase_sides():
    from victims.purchase import takes_key

    class Plain:
        def query(self, images, user):
            return images

    assert takes_key(_KeyedVictim(None)) and not takes_key(Plain()) and not takes_key(object())
    from stealer.client import HTTPVictim
    from victims.api import VictimAPI
    from victims.posterior_api import PosteriorAPI

    for cls in (HTTPVictim, VictimAPI, PosteriorAPI):
        assert takes_key(cls.__new__(cls)), cls


def test_no_module_imports_the_steals_private_journal_helpers():
    for path in [*ROOT.glob("stealer/**/*.py"), *ROOT.glob("launch/*.py"), *ROOT.glob("eval/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "stealer.steal":
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from stealer.steal"
