#!/usr/bin/env python
"""Accuracy vs. victim queries for every attack: ``python launch/attack_curves.py --config FILE [key=value ...]``.

Parses the config and runs :func:`eval.attack_curves.run_curves` (plan, check, steal, probe, report; resumable);
``--help`` shows the full description and every key.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval.attack_curves as curves  # noqa: E402
from eval.attack_curves import (  # noqa: E402,F401  (re-exported: the names tests and scripts import from here)
    AttackRow, CurvesConfig, QuerySpec, Row, plan_rows, registered_attacks, run_curves
)
from eval.curves import RecordError  # noqa: E402
from launch.common import fail, parse_job_args  # noqa: E402
from stealer.config import ConfigError  # noqa: E402

__all__ = ["CurvesConfig", "QuerySpec", "AttackRow", "Row", "plan_rows", "registered_attacks", "run_curves", "main"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_job_args(CurvesConfig, curves.__doc__ or "", argv)
    try:
        summary = run_curves(cfg)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, RuntimeError, RecordError, ImportError) as e:
        fail(str(e).splitlines()[0])
    print(f"curves: {summary['rows']} steals, {summary['stolen']} run now, {summary['probed']} probe runs, "
          f"{summary['wall_seconds'] / 60:.1f} min wall, {summary['cpu_seconds'] / 60:.1f} CPU min → {summary['report']['md']}")
    return summary


if __name__ == "__main__":
    main()
