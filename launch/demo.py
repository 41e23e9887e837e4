#!/usr/bin/env python
"""The demo steal, end to end on the default data (CPU is enough): `make demo`.

1. converts the embedded datasets to shards (animal-mnist splits: victim-train / query /
   probe-train / probe-test, all disjoint; sklearn digits as a second probe domain);
2. trains a small SimSiam victim (or reuses runs/demo/victim/checkpoint.pth.tar);
3. steals it: 3,000 queries, each paid once and cached, then InfoNCE + LARS on the cache;
4. the skeptic's control: the same steal from a random-init victim;
5. linear-probes victim, stolen, random-init and control encoders; writes runs/demo/report.{json,md}.

Rerunning reuses every finished phase (checkpoints, caches, the ledger): no query is paid twice.
Extra ``key=value`` arguments override the steal config (e.g. ``train.loss=mse``).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eval.report import build_report, write_report  # noqa: E402
from eval.run import ProbeConfig, run_probe  # noqa: E402
from launch.common import build_victim_api, fail, make_accelerator, queries_spent  # noqa: E402
from stealer.config import ConfigError, load_config, save_config  # noqa: E402
from stealer.pretrain import VictimTrainConfig, train_simsiam_victim  # noqa: E402
from stealer.shards import build_default_data  # noqa: E402
from stealer.steal import StealConfig, run_query_phase, run_train_phase  # noqa: E402

CONFIGS = REPO / "launch" / "configs"


def steal(cfg: StealConfig, acc) -> tuple[int, dict[str, float], int]:
    """Query + train phases; returns (queries spent by the user, seconds per phase, corrupt images skipped)."""
    save_config(cfg, cfg.run_dir / "config.yaml")
    t0 = time.time()
    api = build_victim_api(cfg.victim, cfg.run_dir, device=acc.device)
    q = run_query_phase(cfg, api, acc)
    t1 = time.time()
    tr = run_train_phase(cfg, acc)
    spent = queries_spent(api, cfg.victim.user)
    print(f"[{cfg.name}] queries sent this run {q['queries_sent']}, spent in total {spent}; "
          f"query {t1 - t0:.0f}s, train {time.time() - t1:.0f}s", flush=True)
    return spent, {"query": t1 - t0, "train": time.time() - t1}, q["corrupt_skipped"] + tr["corrupt_skipped"]


def main(argv: list[str] | None = None) -> dict:
    os.chdir(REPO)
    overrides = list(sys.argv[1:] if argv is None else argv)
    root = Path("runs/demo")
    seconds: dict[str, float] = {}
    acc = make_accelerator(cpu=False)

    t = time.time()
    build_default_data(root / "data", seed=0, image_size=32)
    seconds["data"] = time.time() - t
    print(f"[data] default shards ready under {root / 'data'} ({seconds['data']:.0f}s)", flush=True)

    t = time.time()
    vcfg = load_config(VictimTrainConfig, CONFIGS / "demo_victim.yaml")
    victim_ckpt = vcfg.run_dir / "checkpoint.pth.tar"
    if victim_ckpt.is_file():
        print(f"[victim] reusing {victim_ckpt}", flush=True)
    else:
        save_config(vcfg, vcfg.run_dir / "config.yaml")
        train_simsiam_victim(vcfg, acc)
    seconds["victim_train"] = time.time() - t

    try:
        scfg = load_config(StealConfig, CONFIGS / "demo.yaml", overrides)
        ccfg = load_config(StealConfig, CONFIGS / "demo.yaml", overrides + ["name=control", "victim.random_init=true"])
    except ConfigError as e:
        fail(str(e))
    spent, sec, corrupt = steal(scfg, acc)
    seconds.update({f"steal_{k}": v for k, v in sec.items()})
    _, sec, _ = steal(ccfg, acc)
    seconds.update({f"control_{k}": v for k, v in sec.items()})

    t = time.time()
    pcfg = load_config(ProbeConfig, CONFIGS / "demo_probe.yaml",
                       [f"stolen=[stolen={scfg.run_dir / 'student.pt'},control={ccfg.run_dir / 'student.pt'}]"])
    (pcfg.run_dir / "results.jsonl").unlink(missing_ok=True)
    results = run_probe(pcfg, acc)
    seconds["probe"] = time.time() - t

    primary = "animal_mnist"
    fid = results["stolen"][primary].get("fidelity", {})
    rep = build_report(results, primary_set=primary, queries_spent=spent, seconds=seconds,
                       extra={"fidelity": fid, "loss": scfg.train.loss, "corrupt_images_skipped": corrupt,
                              "query_images": scfg.query.num_queries or 3000})
    md = write_report(rep, root)
    print("\n" + md)
    print(f"report: {root / 'report.json'}  {root / 'report.md'}")
    return rep


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:
        fail(str(e).splitlines()[0])
