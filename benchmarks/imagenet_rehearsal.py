#!/usr/bin/env python
"""The ImageNet path rehearsed on a fake ImageNet: time and peak memory of every phase.

Runs, each as its own process (the commands a user types):

    generate     launch/make_fake_imagenet.py ROOT (train/<wnid>/, flat val/ + LOC_val_solution.csv, the quirks)
    victim       a random SimSiam ResNet-50 in the official checkpoint layout (stealer.fake_imagenet)
    make_shards  launch/make_shards.py ROOT DATA --split query=Q --split probe_train=P --workers W
    query        launch/steal.py --config launch/configs/icml22_imagenet_infonce_t0.1.yaml phases=[query] + counts/paths
    train        the same, phases=[train]
    probe        launch/probe.py --config launch/configs/icml22_imagenet_probe.yaml + counts/paths

and prints, per phase, wall and CPU seconds, images per second and the peak RSS of the phase's
largest process (``os.wait4`` rusage of the phase's process, which covers the descendants it waited
for; run the script from a small parent -- a child forked from a parent that holds torch reports at
least the parent's RSS). Writes ``report.json`` into the work folder.
The paper configs run unmodified except for counts and paths (``key=value`` overrides).

    python benchmarks/imagenet_rehearsal.py --classes 10 --train-per-class 30 --val-images 50 --query 200 --probe-train 80
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "launch" / "configs"
STEAL_CONFIG = CONFIGS / "icml22_imagenet_infonce_t0.1.yaml"
PROBE_CONFIG = CONFIGS / "icml22_imagenet_probe.yaml"


def run_phase(name: str, argv: list[str], logs: Path) -> dict:
    """Run ``argv`` as a child; return its wall time and peak RSS; exit 1 naming the log if it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        sys.exit(f"imagenet_rehearsal: phase {name} failed (exit {proc.returncode}); see {log}:\n" + "\n".join(tail))
    return {"seconds": round(seconds, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def rehearse(args: argparse.Namespace, work: Path) -> dict:
    """Every phase in order; returns ``{"phases": {name: {...}}, "paths": {...}, "settings": {...}}``."""
    py = sys.executable
    fake, data, runs, logs = work / "imagenet", work / "data", work / "runs", work / "logs"
    victim = work / "simsiam_r50" / "checkpoint_0099.pth.tar"
    phases: dict[str, dict] = {}
    n_train = args.classes * args.train_per_class
    phases["generate"] = run_phase("generate", [
        py, "launch/make_fake_imagenet.py", str(fake), "--classes", str(args.classes),
        "--train-per-class", str(args.train_per_class), "--val-images", str(args.val_images), "--seed", str(args.seed),
    ], logs) | {"images": n_train + args.val_images}
    phases["victim"] = run_phase("victim", [
        py, "-c", f"from stealer.fake_imagenet import write_official_simsiam as w; w({str(victim)!r}, seed={args.seed})",
    ], logs) | {"images": 0}
    phases["make_shards"] = run_phase("make_shards", [
        py, "launch/make_shards.py", str(fake), str(data), "--split", f"query={args.query}",
        "--split", f"probe_train={args.probe_train}", "--workers", str(args.workers),
        "--samples-per-shard", str(args.samples_per_shard),
    ], logs) | {"images": args.query + args.probe_train + args.val_images}
    n_query = json.loads((data / "query" / "manifest.json").read_text())["num_samples"]  # quirky files skipped
    steal = [py, "launch/steal.py", "--config", str(STEAL_CONFIG), f"out_dir={runs}", f"data.query={data / 'query'}",
             f"victim.checkpoint={victim}", f"query.num_queries={n_query}", f"victim.budget={n_query}",
             f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"query.batch_size={args.batch_size}",
             f"data.workers={args.loader_workers}", "cpu=true"]
    phases["query"] = run_phase("query", steal + ["phases=[query]"], logs) | {"images": n_query}
    phases["train"] = run_phase("train", steal + ["phases=[train]"], logs) | {"images": n_query * args.epochs}
    run_dir = runs / STEAL_CONFIG.stem
    n_probe = sum(json.loads((data / s / "manifest.json").read_text())["num_samples"] for s in ("probe_train", "val"))
    phases["probe"] = run_phase("probe", [
        py, "launch/probe.py", "--config", str(PROBE_CONFIG), f"out_dir={runs}", f"victim={victim}",
        f"stolen=[stolen={run_dir / 'student.pt'}]", f"sets=[imagenet:{data / 'probe_train'}:{data / 'val'}]",
        f"knn_k={args.knn_k}", f"steps={args.probe_steps}", "cpu=true",
    ], logs) | {"images": n_probe * 3}  # victim, stolen, random-init: each sees every probe image once
    for p in phases.values():
        p["images_per_s"] = round(p["images"] / p["seconds"], 2) if p["images"] else None
    return {
        "phases": phases,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "keep")},
        "paths": {"fake": str(fake), "data": str(data), "victim": str(victim), "steal_run": str(run_dir),
                  "probe_run": str(runs / PROBE_CONFIG.stem), "logs": str(logs)},
    }


def table(report: dict) -> str:
    """The phases as a Markdown table."""
    lines = ["| phase | images | wall s | CPU s | images/s (wall) | peak RSS (MiB) |", "|---|---:|---:|---:|---:|---:|"]
    for name, p in report["phases"].items():
        ips = f"{p['images_per_s']:.2f}" if p["images_per_s"] else "-"
        lines.append(f"| {name} | {p['images']} | {p['seconds']:.1f} | {p['cpu_seconds']:.1f} | {ips} | "
                     f"{p['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=30)
    ap.add_argument("--val-images", type=int, default=50)
    ap.add_argument("--query", type=int, default=200, help="train images split off as queries")
    ap.add_argument("--probe-train", type=int, default=80, help="train images split off for the probe")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16, help="train.batch_size and query.batch_size")
    ap.add_argument("--workers", type=int, default=2, help="make_shards --workers")
    ap.add_argument("--loader-workers", type=int, default=0, help="data.workers of the steal")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--probe-steps", type=int, default=300)
    ap.add_argument("--knn-k", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    args = ap.parse_args(argv)
    if args.query + args.probe_train > args.classes * args.train_per_class:
        ap.error(f"--query + --probe-train = {args.query + args.probe_train} exceeds the "
                 f"{args.classes * args.train_per_class} train images; raise --train-per-class")
    if args.out:
        work = Path(args.out)
        report = rehearse(args, work)
    else:
        tmp = tempfile.mkdtemp(prefix="imagenet_rehearsal_")
        report = rehearse(args, Path(tmp))
        if not args.keep:
            import shutil

            shutil.rmtree(tmp)
    work = Path(report["paths"]["logs"]).parent
    if work.exists():
        (work / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(json.dumps(report["phases"]))
    return report


if __name__ == "__main__":
    main()
