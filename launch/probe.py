#!/usr/bin/env python
"""Linear-probe the victim, stolen encoders and a random-init control on downstream sets.

    python launch/probe.py stolen=[stolen=runs/demo/steal/student.pt] name=probe_demo
    python launch/probe.py ... mode=stream     # features on disk, streamed SGD head + kNN: memory flat in N
    python launch/probe.py ... mode=lincls     # the SimSiam/MoCo v3 linear evaluation (LARS, 90 epochs, batch 4096)
    accelerate launch --config_file launch/accelerate/cpu-2proc.yaml launch/probe.py --config ...
Writes <out_dir>/<name>/results.jsonl (one line per encoder x set).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.run import ProbeConfig, run_probe  # noqa: E402
from launch.common import exit_preempted, fail, make_accelerator, parse_job_args  # noqa: E402
from stealer.config import save_config  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_job_args(ProbeConfig, __doc__, argv)
    acc = make_accelerator(cfg.cpu)
    if acc.is_main_process:
        save_config(cfg, cfg.run_dir / "config.yaml")
    from stealer.preempt import Preempted

    try:
        results = run_probe(cfg, acc)
    except Preempted as e:  # mode=stream/lincls: the head is checkpointed; a rerun (or the requeued job) resumes it
        exit_preempted(acc, e)
    except (FileNotFoundError, ValueError, ImportError, OSError) as e:  # user input: one line, exit 2
        fail(str(e).splitlines()[0])
    if acc.is_main_process:
        summary = {enc: {s: round(m["top1"], 4) for s, m in sets.items()} for enc, sets in results.items()}
        print(json.dumps({"world_size": acc.num_processes, "top1": summary}, indent=1))
    acc.end_training()
    return results


if __name__ == "__main__":
    main()
