#!/usr/bin/env python
"""Steal an encoder: query the victim once per image (cached), then train the stolen encoder.

    python launch/steal.py --config launch/configs/demo.yaml name=my_run train.loss=mse
    accelerate launch --config_file launch/accelerate/cpu-2proc.yaml launch/steal.py --config ... --resume auto
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import build_victim_api, exit_preempted, fail, make_accelerator, parse_job_args, queries_spent  # noqa: E402
from stealer.config import save_config  # noqa: E402
from stealer.preflight import check_inputs  # noqa: E402
from stealer.preempt import Preempted  # noqa: E402
from stealer.steal import StealConfig, run_query_phase, run_train_phase  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(StealConfig, __doc__, argv)
    acc = make_accelerator(cfg.cpu, cfg.train.mixed_precision)
    if acc.is_main_process:
        save_config(cfg, cfg.run_dir / "config.yaml")
    out: dict = {"world_size": acc.num_processes}
    try:
        # missing shards / checkpoint / too small a budget / train settings these processes refuse: one line, before anything is paid
        check_inputs(cfg, acc.num_processes, acc.device.type)
        if "query" in cfg.phases:
            t0 = time.time()
            api = build_victim_api(cfg.victim, cfg.run_dir, device=acc.device)
            out["query"] = run_query_phase(cfg, api, acc)
            out["query"]["ledger_spent"] = queries_spent(api, cfg.victim.user)
            out["query"]["wall_seconds"] = time.time() - t0
        if "train" in cfg.phases:
            out["train"] = run_train_phase(cfg, acc)
    except Preempted as e:
        exit_preempted(acc, e)
    except (FileNotFoundError, ValueError, ImportError, ConnectionError, OSError) as e:
        fail(str(e).splitlines()[0])
    except RuntimeError as e:
        from stealer.client import VictimHTTPError
        from victims.ledger import BudgetExceeded  # the one class, raised in-process and for HTTP's 402

        if isinstance(e, BudgetExceeded):
            cached = cfg.run_dir / "cache"
            fail(f"{e}; every response paid for so far is kept in {cached}; raise victim.budget or lower query.num_queries and rerun")
        if isinstance(e, VictimHTTPError):
            fail(str(e).splitlines()[0])
        raise
    if acc.is_main_process:
        from stealer.jsonsafe import dumps as json_dumps  # strict JSON: a diverged (NaN) final_loss is null

        from victims.atomic import atomic_write_text

        atomic_write_text(cfg.run_dir / "steal.json", json_dumps(out, indent=1))
        print(json_dumps(out, indent=1))
    acc.end_training()
    return out


if __name__ == "__main__":
    main()
