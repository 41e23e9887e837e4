#!/usr/bin/env python
"""Peak RSS of the sybil query phase's merge (stealer.countermoves.run_sybil_query_phase), now and at a git revision.

Writes a query set of ``--n`` RGB noise PNGs of ``--side`` px (~12 KB each at 64 px: realistic bytes per image,
cheap to decode), pays for it once with ``--sybils`` accounts and ``--overlap`` shared images against a fake
victim (a fixed random projection to ``--dim`` floats; nothing to train), then, each in a fresh interpreter,
reruns the phase with the merged cache removed -- every answer is cached, so the rerun buys nothing: it streams
the query keys and merges -- with the current code and with ``stealer/countermoves.py`` as it was at ``--old-ref``
(default 07e757d, before the cache index). Each child prints its wall time and its own peak RSS
(``ru_maxrss``); a child that only imports gives the baseline. The merged caches of both are compared member
by member in write order (the new one is cut in MERGE_BATCH-answer tars, the old one wrote one per account).

    python benchmarks/sybil_rss.py --n 20000
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class FakeVictim:
    """A fixed random projection of the pixels to ``dim`` floats (no model, no ledger): the phase's own costs."""

    def __init__(self, in_dim: int, dim: int) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(in_dim, dim, generator=g) / in_dim ** 0.5
        self.dim = dim

    def describe(self) -> dict:
        return {"arch": "fake-projection", "out_dim": self.dim}

    def query(self, images, user: str):
        return (images.flatten(1).float() / 255.0) @ self.w


def _cfg(work: Path, a: argparse.Namespace):
    from stealer.config import load_config
    from stealer.steal import StealConfig

    return load_config(StealConfig, None, [f"out_dir={work}", "name=syb", "cpu=true", f"data.query={work / 'query'}",
                                           "data.channels=3", f"data.image_size={a.side}", f"query.batch_size={a.batch}"])


def _child(a: argparse.Namespace) -> None:
    work = Path(a.work)
    if a.child == "old":
        import importlib.util

        spec = importlib.util.spec_from_file_location("old_countermoves", work / "old_countermoves.py")
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        phase = mod.run_sybil_query_phase
    else:
        import stealer.countermoves as cm

        cm.MERGE_BATCH = a.merge_batch or cm.MERGE_BATCH
        phase = cm.run_sybil_query_phase
    cfg = _cfg(work, a)
    victim = FakeVictim(3 * a.side * a.side, a.dim)
    t0 = time.perf_counter()
    out = None if a.child == "base" else phase(cfg, victim, sybils=a.sybils, overlap=a.overlap)  # base: victim built
    wall = time.perf_counter() - t0
    print(json.dumps({"child": a.child, "wall_s": round(wall, 1), "peak_rss_mib": round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "queries_sent": None if out is None else out["queries_sent"], "cached": None if out is None else out["cached"]}))


def _run(mode: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--work", a.work, "--n", str(a.n), "--side", str(a.side),
           "--sybils", str(a.sybils), "--overlap", str(a.overlap), "--dim", str(a.dim), "--batch", str(a.batch),
           "--merge-batch", str(a.merge_batch)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(res.stdout.strip().splitlines()[-1])


def _members(folder: Path):
    """``(name, bytes)`` of every member of the folder's response tars, tars in name order (write order)."""
    import tarfile

    for tar in sorted(folder.glob("resp-*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                yield m.name, t.extractfile(m).read()  # type: ignore[union-attr]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--sybils", type=int, default=2)
    p.add_argument("--overlap", type=int, default=1000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=256, help="query.batch_size")
    p.add_argument("--merge-batch", type=int, default=0, help="stealer.countermoves.MERGE_BATCH (0: its own, 1024)")
    p.add_argument("--old-ref", default="07e757d", help="git revision of stealer/countermoves.py to compare with")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--child", choices=["base", "new", "old"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return _child(a)
    import numpy as np

    from stealer.shards import encode_png, write_shards

    keep = a.work is not None
    a.work = a.work or tempfile.mkdtemp(prefix="sybil_rss_")
    work = Path(a.work)
    try:
        old_src = subprocess.run(["git", "-C", str(REPO), "show", f"{a.old_ref}:stealer/countermoves.py"], check=True,
                                 capture_output=True, text=True).stdout
        (work / "old_countermoves.py").write_text(old_src)
        t0 = time.perf_counter()
        if not (work / "query" / "manifest.json").is_file():
            rng = np.random.default_rng(0)
            write_shards(((f"q-{i:06d}", encode_png(rng.integers(0, 256, size=(a.side, a.side, 3), dtype=np.uint8)),
                           "png", i % 10) for i in range(a.n)), work / "query", samples_per_shard=1000,
                         source="noise", classes=[f"c{i}" for i in range(10)], channels=3, image_size=[a.side] * 2)
        print(f"query set: {a.n} images, {sum(f.stat().st_size for f in (work / 'query').glob('*.tar')) / 2**20:.0f} MiB "
              f"of tars ({time.perf_counter() - t0:.0f} s)")
        for old in ("syb", "merged_new", "merged_old"):  # a kept --work reuses its query set only
            shutil.rmtree(work / old, ignore_errors=True)
        rows = [_run("base", a), _run("new", a)]  # the second pays for every answer (new code)
        syb = work / "syb" / "sybils"
        cache_mib = sum(f.stat().st_size for f in syb.rglob("resp-*.tar")) / 2**20
        print(f"sybil caches: {cache_mib:.0f} MiB of tars")
        for mode in ("new", "old"):
            shutil.rmtree(work / "syb" / "cache")
            rows.append(_run(mode, a))
            shutil.copytree(work / "syb" / "cache", work / f"merged_{mode}")
        print("| run | wall s | peak RSS MiB | queries sent | cached |")
        print("|---|---|---|---|---|")
        names = ["baseline (imports)", "new, paying", "new, merge only", f"old ({a.old_ref}), merge only"]
        for name, r in zip(names, rows):
            print(f"| {name} | {r['wall_s']} | {r['peak_rss_mib']} | {r['queries_sent']} | {r['cached']} |")
        same = all(x == y for x, y in itertools.zip_longest(_members(work / "merged_new"), _members(work / "merged_old")))
        print(f"merged answers identical (every tar member's name and bytes, in write order): {same}; "
              f"tars: new {len(list((work / 'merged_new').glob('*.tar')))}, old {len(list((work / 'merged_old').glob('*.tar')))}")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
