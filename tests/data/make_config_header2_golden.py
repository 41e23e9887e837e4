"""Writes tests/data/config_header2_golden.json: the resolved configs (``to_dict``, key order kept) and the
``--help`` key lines of the steal and victim-trainer jobs, as the code of the current checkout resolves them.

tests/test_config_header2.py compares today's code against the file written before the steal and victim jobs
took the shared header pieces (at c754b0e, recorded in ``written_at``): a checkpoint stores its resolved config and a resume compares
it, so every key, value and their order must stay. Rerun only to record a deliberate change of the configs::

    python tests/data/make_config_header2_golden.py
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

#: (job, config file under launch/configs or None for the defaults)
CASES = [("steal", None), ("steal", "demo.yaml"), ("steal", "icml22_imagenet_infonce_t0.1.yaml"),
         ("steal", "icml22_imagenet_infonce_t0.25_aug.yaml"), ("steal", "attack_rda.yaml"),
         ("victim", None), ("victim", "demo_victim.yaml"), ("classify", None), ("classify", "demo_classifier.yaml")]


def jobs() -> dict[str, type]:
    from stealer.pretrain import VictimTrainConfig
    from stealer.steal import StealConfig
    from stealer.train_classifier import ClassifierTrainConfig

    return {"steal": StealConfig, "victim": VictimTrainConfig, "classify": ClassifierTrainConfig}


def resolve(job: str, config: str | None) -> dict:
    from stealer.config import load_config, to_dict

    return to_dict(load_config(jobs()[job], ROOT / "launch" / "configs" / config if config else None))


def help_keys(job: str) -> list[str]:
    """Each ``--help`` key line up to its help text (``  key = default  (range)``)."""
    from launch.common import config_help

    return [line.split("  -- ")[0] for line in config_help(jobs()[job])]


def main() -> None:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {"written_at": rev,
           "resolved": [{"job": j, "config": c, "dict": resolve(j, c)} for j, c in CASES],
           "help": {j: help_keys(j) for j in jobs()}}
    path = Path(__file__).with_name("config_header2_golden.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({len(CASES)} resolved configs) at {rev}")


if __name__ == "__main__":
    main()
