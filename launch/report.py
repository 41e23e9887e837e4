#!/usr/bin/env python
"""Accuracy-vs-queries report: result records → curves.md + curves.csv + one PNG per (set, probe).

    python launch/report.py runs/sweeps/demo_sweep.sweep/results.jsonl --out runs/sweeps/report
    python launch/report.py runs/sweeps/ --out report --set animal_mnist --probe linear knn
    python launch/report.py runs/x/probe/results.jsonl --attack infonce --queries 3000 --out report

RESULTS are files (JSON Lines of records, a JSON list of records, or a steal ``report.json``) or
folders (every ``results.jsonl`` below them). A record is one JSON object::

    {"attack": "infonce", "defense": "none", "queries": 3000, "encoder": "stolen",
     "set": "animal_mnist", "probe": "linear", "top1": 0.738, "seed": 0}

(``loss`` is read when ``attack`` is absent; ``encoder`` "victim" / "random" rows are the
reference lines; ``probe`` defaults to "linear"; see eval/curves.py for every rule.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.curves import RecordError, load_records, write_curves  # noqa: E402
from launch.common import fail  # noqa: E402


def _files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for s in paths:
        p = Path(s)
        if p.is_dir():
            found = sorted(p.rglob("results.jsonl"))
            if not found:
                raise RecordError(f"no results.jsonl under {p}")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise RecordError(f"results file {p} does not exist")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results files or folders (every results.jsonl below)")
    ap.add_argument("--out", required=True, help="output folder for curves.md, curves.csv and the PNGs")
    ap.add_argument("--set", dest="sets", nargs="+", help="only these downstream sets")
    ap.add_argument("--probe", dest="probes", nargs="+", help="only these evaluations (linear, knn)")
    ap.add_argument("--encoder", dest="encoders", nargs="+", default=["stolen"],
                    help="encoder names that are curve points (default: stolen); victim/random are references")
    ap.add_argument("--attack", help="attack for records that have none (e.g. a plain probe results.jsonl)")
    ap.add_argument("--queries", type=float, help="queries for records that have none")
    ap.add_argument("--defense", help="defense for records that have none")
    ap.add_argument("--title", help="title of the report and plots")
    a = ap.parse_args(argv)

    defaults = {k: v for k, v in (("attack", a.attack), ("queries", a.queries), ("defense", a.defense)) if v is not None}
    skipped: list[str] = []
    try:
        records = []
        for f in _files(a.results):
            records += load_records(f, defaults=defaults, encoders=a.encoders, skipped=skipped)
        if not records:
            raise RecordError("no usable records in " + ", ".join(a.results))
        res = write_curves(records, a.out, title=a.title, sets=a.sets, probes=a.probes)
    except RecordError as e:
        fail(str(e).splitlines()[0])
    if not res["tables"]:
        fail("no records left after --set/--probe filtering")
    for s in skipped:
        print(f"warning: {s}", file=sys.stderr)
    print(res["markdown"])
    paths = res["paths"]
    print("wrote " + ", ".join(str(p) for p in [paths["md"], paths["csv"], *paths["png"]]))
    return res


if __name__ == "__main__":
    main()
