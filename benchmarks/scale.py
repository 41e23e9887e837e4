#!/usr/bin/env python
"""Does time per sample and peak memory stay flat as N grows? Every phase, each in a fresh process.

For each N of ``--n`` (default 10k, 100k, 1M) a preparation process writes synthetic data under
``--work`` (not measured): an image-folder tree and a shard pool of N tiny grey images
(``--size`` px, 10 classes), and N x ``--dim`` synthetic features as feature shards with a fixed
test set of ``--n-test`` rows. Then each phase runs in its own child process, forked from the driver
once the driver has imported every module the phases use (so no phase pays imports, and every
child starts from the same shared pages); the child reports its wall time and the driver reads the
child's own peak RSS from ``os.wait4`` (``ru_maxrss``: the largest resident set of that child and
anything it waited for). The driver holds no data, so the baseline is the same for every N:

  folder      ``stealer.make_shards.make_shards`` (what ``launch/make_shards.py FOLDER OUT`` runs: headers, decode, PNG encode, tars)
  query       ``stealer.steal.run_query_phase`` (shard decode + ledger + tiny victim + response cache)
  train       ``stealer.steal.run_train_phase``, one epoch over the cached answers (tiny student)
  extract     ``eval.feature_shards.write_feature_shards`` (tiny encoder -> feature shards)
  probe       ``eval.stream_probe.train_linear``, one epoch of the streamed head over the features
  knn         ``eval.stream_probe.knn_stream`` (``--n-test`` test rows against the N train rows)
  select      ``stealer.query_select.select_queries`` class_balanced, N/10 of the pool
  select_cov  ``select_queries`` coverage (pixel features, 10 centres, spread 0.5), ``--cov-n`` images: k-means
              and farthest-point sampling over the pool up to ``--feature-budget-mib``, a seeded subsample beyond
  ledger      ``victims.ledger.QueryLedger.charge`` with a receipt per batch of ``--batch``
  cache       ``stealer.cache.ResponseCache``: write N answers in batches, finalize, read ``done_keys``

Prints one row per (phase, N): microseconds per sample, peak RSS (MiB), and both as ratios to the
smallest N. The target is flat: time per sample within +-20 % and peak RSS at the largest N at most
1.2x that at the smallest. ``--json`` writes the rows.

    python benchmarks/scale.py --n 10000,100000 --phases all
    python benchmarks/scale.py --n 10000,100000,1000000 --phases probe,knn,ledger,extract
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = ["folder", "query", "train", "extract", "probe", "knn", "select", "select_cov", "ledger", "cache"]
CLASSES = [f"c{i}" for i in range(10)]
TARGET_TIME, TARGET_RSS = 0.20, 1.2


# ---------------------------------------------------------------------------------------------- data


def _image(i: int, size: int):
    import numpy as np

    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, size=(2, 2), dtype=np.uint8)  # smooth images: realistic PNG sizes
    return np.kron(small, np.ones((size // 2, size // 2), dtype=np.uint8))


def prepare(work: Path, n: int, a: argparse.Namespace) -> None:
    """Synthetic inputs for every phase (streamed: never N images or features in memory at once)."""
    import numpy as np

    from eval.feature_shards import FORMAT, _save_npy
    from stealer.ckpt import atomic_write_json
    from stealer.shards import encode_png, write_shards

    phases = a.phases
    if "folder" in phases:
        folder = work / "folder"
        for c in CLASSES:
            (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (folder / CLASSES[i % 10] / f"{i:07d}.png").write_bytes(encode_png(_image(i, a.size)))
    if {"query", "train", "extract", "select", "select_cov"} & set(phases):
        samples = ((f"s{i:07d}", encode_png(_image(i, a.size)), "png", i % 10) for i in range(n))
        write_shards(samples, work / "pool", samples_per_shard=1000, source="scale benchmark", classes=CLASSES,
                     channels=1, image_size=[a.size, a.size])
    if {"probe", "knn"} & set(phases):
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(10, a.dim)).astype(np.float32)
        for name, count in (("ftrain", n), ("ftest", a.n_test)):
            shards = []
            for i, start in enumerate(range(0, count, a.shard_rows)):
                m = min(a.shard_rows, count - start)
                y = (np.arange(start, start + m) % 10).astype(np.int64)
                x = centres[y] + rng.normal(size=(m, a.dim)).astype(np.float32)
                fx, fy = f"feat-r000-{i:06d}.npy", f"lab-r000-{i:06d}.npy"
                _save_npy(work / name / fx, x)
                _save_npy(work / name / fy, y)
                shards.append({"feat": fx, "label": fy, "count": m})
            atomic_write_json(work / name / "manifest.json", {
                "format": FORMAT, "source": "synthetic", "num_samples": count, "encoder": "synthetic",
                "dtype": "float32", "dim": a.dim, "world": 1, "shard_rows": a.shard_rows, "num_classes": 10,
                "shards": shards})


# ---------------------------------------------------------------------------------------------- phases


def _steal_cfg(work: Path, a: argparse.Namespace):
    from stealer.config import load_config
    from stealer.steal import StealConfig

    return load_config(StealConfig, None, [
        f"out_dir={work}", "name=steal", f"data.query={work / 'pool'}", f"data.image_size={a.size}", "data.channels=1",
        f"query.batch_size={a.batch}", f"train.batch_size={a.batch}", "train.epochs=1", "student.width=8",
        "student.arch=resnet18", "train.augment=false", "train.ckpt_every=1000000", "train.log_every=1000000",
        f"victim.checkpoint={work / 'none.pth.tar'}"])


def _victim(a: argparse.Namespace):
    import torch

    from victims.simsiam import random_victim

    torch.manual_seed(0)
    return random_victim("resnet18", in_chans=1, width=8, stem="small", image_size=a.size)


def run_phase(phase: str, work: Path, n: int, a: argparse.Namespace) -> float:
    """Run one phase; returns its wall seconds (setup that is not the phase is left out)."""
    import torch

    torch.set_num_threads(1)
    if phase == "folder":
        from stealer.make_shards import make_shards

        out = work / "folder_shards"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        make_shards(str(work / "folder"), out, samples_per_shard=1000)
        return time.perf_counter() - t
    if phase == "query":
        from stealer.dist import make_accelerator
        from stealer.steal import run_query_phase
        from victims.api import VictimAPI
        from victims.ledger import QueryLedger

        shutil.rmtree(work / "steal", ignore_errors=True)
        cfg = _steal_cfg(work, a)
        (work / "steal").mkdir(parents=True)
        api = VictimAPI(_victim(a), QueryLedger(work / "steal" / "ledger.sqlite"))
        acc = make_accelerator(cpu=True)
        t = time.perf_counter()
        run_query_phase(cfg, api, acc)
        return time.perf_counter() - t
    if phase == "train":
        from stealer.dist import make_accelerator
        from stealer.steal import run_train_phase

        cfg = _steal_cfg(work, a)
        shutil.rmtree(work / "steal" / "ckpt", ignore_errors=True)
        acc = make_accelerator(cpu=True)
        t = time.perf_counter()
        run_train_phase(cfg, acc)
        return time.perf_counter() - t
    if phase == "extract":
        from eval.feature_shards import write_feature_shards

        enc = _victim(a).eval()
        shutil.rmtree(work / "fext", ignore_errors=True)
        t = time.perf_counter()
        write_feature_shards(enc, str(work / "pool"), work / "fext", encoder="tiny", channels=1, image_size=a.size,
                             batch_size=a.batch, shard_rows=a.shard_rows)
        return time.perf_counter() - t
    if phase == "probe":
        from eval.feature_shards import FeatureShards
        from eval.stream_probe import StreamSettings, feature_source, train_linear

        tr = FeatureShards(work / "ftrain")
        s = StreamSettings(epochs=1, batch_size=a.probe_batch, base_lr=0.1, optimizer="lars", block_rows=a.shard_rows)
        t = time.perf_counter()
        train_linear(feature_source(tr, s), dim=tr.dim, num_classes=10, num_samples=tr.num_samples, settings=s)
        return time.perf_counter() - t
    if phase == "knn":
        from eval.feature_shards import FeatureShards
        from eval.stream_probe import knn_stream

        t = time.perf_counter()
        knn_stream(FeatureShards(work / "ftrain"), FeatureShards(work / "ftest"), k=20, train_rows=a.shard_rows)
        return time.perf_counter() - t
    if phase == "select":
        from stealer.query_select import select_queries

        shutil.rmtree(work / "selected", ignore_errors=True)
        t = time.perf_counter()
        select_queries(work / "pool", work / "selected", max(1, n // 10), "class_balanced", seed=0)
        return time.perf_counter() - t
    if phase == "select_cov":
        from stealer.query_select import select_queries

        shutil.rmtree(work / "selected_cov", ignore_errors=True)
        t = time.perf_counter()
        budget = {} if a.feature_budget_mib is None else {"feature_budget": int(a.feature_budget_mib * 2**20)}
        m = select_queries(work / "pool", work / "selected_cov", min(a.cov_n, n // 10), "coverage", seed=0,
                           centres=10, spread=0.5, **budget)
        assert m["num_samples"] == min(a.cov_n, n // 10)
        return time.perf_counter() - t
    if phase == "ledger":
        from victims.ledger import QueryLedger

        path = work / "ledger.sqlite"
        path.unlink(missing_ok=True)
        led = QueryLedger(path)
        t = time.perf_counter()
        for i, start in enumerate(range(0, n, a.batch)):
            led.charge("attacker", min(a.batch, n - start), receipt=f"batch-{i:08d}")
        assert led.spent("attacker") == n
        return time.perf_counter() - t
    if phase == "cache":
        import numpy as np

        from stealer.cache import ResponseCache
        from stealer.shards import encode_png

        root = work / "rcache"
        shutil.rmtree(root, ignore_errors=True)
        cache = ResponseCache(root)
        img = ("png", encode_png(_image(0, a.size)))
        resp = np.random.default_rng(0).normal(size=(a.batch, a.dim)).astype(np.float32)
        t = time.perf_counter()
        for start in range(0, n, a.batch):
            m = min(a.batch, n - start)
            cache.write_batch([f"k{i:08d}" for i in range(start, start + m)], [img] * m, [0] * m, resp[:m])
        cache.finalize("scale benchmark")
        done = len(cache.done_keys())  # what a resumed query phase reads first
        assert done == n, done
        return time.perf_counter() - t
    if phase == "alloc":  # a deliberately unflat phase (2 MiB per sample held), so the suite can check the meter
        import numpy as np

        t = time.perf_counter()
        held = np.ones((n, 2 << 20), dtype=np.uint8)
        assert int(held[:, -1].sum()) == n
        return time.perf_counter() - t
    raise ValueError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")


# ---------------------------------------------------------------------------------------------- driver


MODULES = {"folder": ["stealer.make_shards"], "query": ["launch.common", "stealer.steal", "victims.api", "victims.simsiam"],
           "train": ["launch.common", "stealer.steal", "victims.simsiam"],
           "extract": ["eval.feature_shards", "victims.simsiam"], "probe": ["eval.stream_probe", "stealer.engine", "timm.optim"],
           "knn": ["eval.stream_probe"], "select": ["stealer.query_select"], "select_cov": ["stealer.query_select", "sklearn.cluster"], "ledger": ["victims.ledger"],
           "cache": ["stealer.cache"], "alloc": []}


def _import_all(phases: list[str]) -> None:
    """What the phases import, loaded once in the driver before it forks: each phase's child starts with
    them (a fresh interpreter per phase would pay seconds of imports per phase on a busy machine)."""
    import importlib

    for name in ["numpy", "torch", "eval.feature_shards", "stealer.shards", "stealer.ckpt"] + [
            m for ph in phases for m in MODULES[ph]]:
        importlib.import_module(name)


def _in_child(fn, *args) -> tuple[object, float]:
    """Run ``fn(*args)`` in a forked child; returns (its result, the child's own peak RSS in MiB from wait4).

    The child is a new process: its peak resident set starts from what it shares with the driver (the
    imported modules, the same for every phase and N) and grows only with what the phase allocates.
    """
    import traceback

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        code = 0
        try:
            msg = {"ok": fn(*args)}
        except BaseException as e:  # noqa: BLE001  (reported to the driver, which fails in one line)
            msg, code = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                         "trace": traceback.format_exc()[-2000:]}, 1
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(msg))
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status, usage = os.wait4(pid, 0)
    msg = json.loads(text) if text else {"error": f"the child died (exit status {status})"}
    if "error" in msg:
        if os.environ.get("SSLSTEAL_DEBUG"):
            print(msg.get("trace", ""), file=sys.stderr)
        raise SystemExit(f"scale benchmark: {getattr(fn, '__name__', fn)}{args[:1]} failed: {msg['error']}")
    return msg["ok"], usage.ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="10000,100000,1000000", help="comma-separated sample counts")
    p.add_argument("--phases", default="all", help=f"comma-separated, from: {', '.join(PHASES)} (or all)")
    p.add_argument("--size", type=int, default=8, help="image side in px (even)")
    p.add_argument("--dim", type=int, default=64, help="feature / response dimension")
    p.add_argument("--n-test", type=int, default=1000, help="kNN test rows (fixed across N)")
    p.add_argument("--batch", type=int, default=256, help="query / train / ledger / cache batch")
    p.add_argument("--probe-batch", type=int, default=1024, help="global batch of the streamed probe")
    p.add_argument("--shard-rows", type=int, default=4096, help="rows per feature shard")
    p.add_argument("--cov-n", type=int, default=1000, help="select_cov: images chosen (at most N/10)")
    p.add_argument("--feature-budget-mib", type=float, default=None,
                   help="select_cov: MiB of features held at once (default: select_queries' own)")
    p.add_argument("--work", default="", help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--json", default="", help="also write the rows here")
    a = p.parse_args(argv)
    a.phases = PHASES if a.phases == "all" else [s.strip() for s in a.phases.split(",") if s.strip()]
    bad = [ph for ph in a.phases if ph not in PHASES + ["alloc"]]
    if bad:
        raise SystemExit(f"--phases: unknown {', '.join(bad)}; choose from {', '.join(PHASES)} or all")
    if "train" in a.phases and "query" not in a.phases:
        raise SystemExit("--phases: train reads the answers the query phase caches; add query")
    try:
        ns = sorted({int(x) for x in a.n.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--n {a.n!r}: give comma-separated sample counts, e.g. 10000,100000") from None
    if not ns or ns[0] < 20 or a.size < 2 or a.size % 2:
        raise SystemExit("--n: every count must be >= 20; --size: an even number >= 2")
    work_root = Path(a.work) if a.work else None
    _import_all(a.phases)
    tmp = None
    if work_root is None:
        tmp = tempfile.mkdtemp(prefix="sslsteal-scale-")
        work_root = Path(tmp)
    rows: list[dict] = []
    try:
        for n in ns:
            work = work_root / f"n{n}"
            work.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            _in_child(prepare, work, n, a)
            print(f"# N={n}: inputs prepared in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            for phase in a.phases:
                sec, rss = _in_child(run_phase, phase, work, n, a)
                rows.append({"phase": phase, "n": n, "seconds": sec, "us_per_sample": 1e6 * sec / n, "peak_rss_mib": rss})
                print(f"# {phase:8s} N={n:>8d}: {sec:.2f} s, peak RSS {rss:.0f} MiB", file=sys.stderr, flush=True)
            if tmp is not None:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    base = {r["phase"]: r for r in rows if r["n"] == ns[0]}
    for r in rows:
        b = base[r["phase"]]
        r["time_ratio"] = r["us_per_sample"] / b["us_per_sample"] if b["us_per_sample"] > 0 else float("nan")
        r["rss_ratio"] = r["peak_rss_mib"] / b["peak_rss_mib"]
        r["flat"] = abs(r["time_ratio"] - 1) <= TARGET_TIME and r["rss_ratio"] <= TARGET_RSS
    print(f"| phase | N | us/sample | peak RSS MiB | time/sample vs N={ns[0]} | peak RSS vs N={ns[0]} | flat |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['phase']} | {r['n']} | {r['us_per_sample']:.1f} | {r['peak_rss_mib']:.0f} | {r['time_ratio']:.2f} | "
              f"{r['rss_ratio']:.2f} | {'yes' if r['flat'] else 'NO'} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
