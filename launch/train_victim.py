#!/usr/bin/env python
"""Train a victim on shards.

--task simsiam (default): a SimSiam encoder; writes <out_dir>/<name>/checkpoint.pth.tar (official format).
--task classify: a supervised classifier; writes <out_dir>/<name>/classifier.pt (+ result.json with the
test accuracy when test_data is set).

    python launch/train_victim.py --config launch/configs/demo_victim.yaml epochs=60
    python launch/train_victim.py --task classify --config launch/configs/demo_classifier.yaml
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import exit_preempted, fail, make_accelerator, parse_job_args  # noqa: E402
from stealer.config import save_config  # noqa: E402

TASKS = ("simsiam", "classify")


def _split_task(argv: list[str]) -> tuple[str, list[str]]:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--task", default="simsiam")
    known, rest = p.parse_known_args(argv)
    if known.task not in TASKS:
        fail(f"--task {known.task!r} is not valid; choose one of: {', '.join(TASKS)}")
    return known.task, rest


def main(argv: list[str] | None = None) -> Path:
    task, rest = _split_task(list(sys.argv[1:] if argv is None else argv))
    if task == "classify":
        from stealer.train_classifier import ClassifierTrainConfig, train_classifier

        cfg = parse_job_args(ClassifierTrainConfig, __doc__, rest)
        train = train_classifier
    else:
        from stealer.pretrain import VictimTrainConfig, train_simsiam_victim

        cfg = parse_job_args(VictimTrainConfig, __doc__, rest)
        train = train_simsiam_victim
    acc = make_accelerator(cfg.cpu, cfg.mixed_precision)
    if acc.is_main_process:
        save_config(cfg, cfg.run_dir / "config.yaml")
    from stealer.preempt import Preempted

    try:
        path = train(cfg, acc)
    except Preempted as e:  # checkpointed; a requeued job resumes with --resume auto
        exit_preempted(acc, e)
    except (FileNotFoundError, ValueError, ImportError, OSError) as e:  # user input: one line, exit 2
        fail(str(e).splitlines()[0])
    if acc.is_main_process:
        print(f"victim {'classifier' if task == 'classify' else 'checkpoint'}: {path}")
    acc.end_training()
    return path


if __name__ == "__main__":
    main()
