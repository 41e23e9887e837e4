#!/usr/bin/env python
"""Train a SimSiam victim on shards; writes <out_dir>/<name>/checkpoint.pth.tar (official format).

    python launch/train_victim.py --config launch/configs/demo_victim.yaml epochs=60
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import fail, make_accelerator, parse_job_args  # noqa: E402
from stealer.config import save_config  # noqa: E402
from stealer.pretrain import VictimTrainConfig, train_simsiam_victim  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_job_args(VictimTrainConfig, __doc__, argv)
    acc = make_accelerator(cfg.cpu, cfg.mixed_precision)
    if acc.is_main_process:
        save_config(cfg, cfg.run_dir / "config.yaml")
    try:
        path = train_simsiam_victim(cfg, acc)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e).splitlines()[0])
    if acc.is_main_process:
        print(f"victim checkpoint: {path}")
    acc.end_training()
    return path


if __name__ == "__main__":
    main()
