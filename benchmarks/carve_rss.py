#!/usr/bin/env python
"""Peak RSS of eval.validation.carve_validation (the lr-selection validation cut of probe-train), now vs the whole-pool
read it replaced, each in a fresh interpreter (``ru_maxrss``).

Probe-train is a shard folder (``--pool``; default: ``--n`` RGB noise PNGs of ``--side`` px written to a temporary
folder). ``old`` is the carve as it was at 07e757d (``stealer.query_select.read_pool`` of the whole folder, then
``write_shards``); ``new`` is ``carve_validation`` (``scan_pool`` stopping after ``skip + n``, ``copy_samples``).
A third child only imports what both import (the baseline). The two cuts are compared tar by tar.

    python benchmarks/carve_rss.py --n 20000 --skip 500 --cut 500
"""
from __future__ import annotations

import argparse
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


def _old_carve(train_dir: str, out: Path, skip: int, n: int) -> None:
    from stealer.query_select import read_pool
    from stealer.shards import write_shards

    pool = read_pool(train_dir)
    idx = list(range(skip, min(len(pool["keys"]), skip + n)))
    m = pool["manifest"]
    write_shards(((pool["keys"][i], pool["bytes"][i][1], pool["bytes"][i][0], max(int(pool["labels"][i]), 0)) for i in idx),
                 out, source=f"validation: images {skip}..{skip + len(idx)} of {os.path.abspath(train_dir)}",
                 classes=list(m.get("classes") or ["0"]), channels=int(m.get("channels") or 3), image_size=m.get("image_size"))


def _child(a: argparse.Namespace) -> None:
    import stealer.data  # noqa: F401 - what both carves import (torch, PIL, webdataset): the baseline has them too
    import stealer.query_select  # noqa: F401
    from eval.validation import carve_validation

    t0 = time.perf_counter()
    if a.child == "new":
        carve_validation(a.pool, Path(a.out), skip=a.skip, n=a.cut)
    elif a.child == "old":
        _old_carve(a.pool, Path(a.out), a.skip, a.cut)
    print(json.dumps({"wall_s": round(time.perf_counter() - t0, 1),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pool", default=None, help="probe-train shard folder (default: a synthetic one)")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--skip", type=int, default=500)
    p.add_argument("--cut", type=int, default=500)
    p.add_argument("--child", choices=["base", "new", "old"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return _child(a)
    work = Path(tempfile.mkdtemp(prefix="carve_rss_"))
    try:
        if a.pool is None:
            import numpy as np

            from stealer.shards import encode_png, write_shards

            rng = np.random.default_rng(0)
            a.pool = str(work / "pool")
            write_shards(((f"p-{i:06d}", encode_png(rng.integers(0, 256, size=(a.side, a.side, 3), dtype=np.uint8)),
                           "png", i % 10) for i in range(a.n)), a.pool, samples_per_shard=1000, source="noise",
                         classes=[f"c{i}" for i in range(10)], channels=3, image_size=[a.side] * 2)
        mib = sum(f.stat().st_size for f in Path(a.pool).glob("*.tar")) / 2**20
        print(f"probe-train {a.pool}: {mib:.0f} MiB of tars; cut: images {a.skip}..{a.skip + a.cut}")
        print("| carve | wall s | peak RSS MiB |\n|---|---|---|")
        for mode in ("base", "new", "old"):
            cmd = [sys.executable, __file__, "--child", mode, "--pool", a.pool, "--skip", str(a.skip), "--cut",
                   str(a.cut), "--out", str(work / mode)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.strip().splitlines()[-1])
            print(f"| {mode} | {r['wall_s']} | {r['peak_rss_mib']} |")
        same = sorted(f.name for f in (work / "new").glob("*.tar")) == sorted(f.name for f in (work / "old").glob("*.tar")) \
            and all(f.read_bytes() == (work / "old" / f.name).read_bytes() for f in (work / "new").glob("*.tar"))
        print(f"cuts identical tar by tar: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
