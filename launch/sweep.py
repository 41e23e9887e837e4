#!/usr/bin/env python
"""Sweeps of steals: expand a sweep YAML into rows, hand one row to each SLURM array task, and
collect every row's results into one table (Markdown + CSV) and a plot (PNG).

    python launch/sweep.py expand launch/configs/sweep_demo.yaml      # validate, freeze rows.jsonl + rows.tsv
    python launch/sweep.py count  SWEEP                                # number of rows (for --array=0-N-1)
    python launch/sweep.py row    SWEEP N                              # row N's key=value overrides, one a line
    python launch/sweep.py row    SWEEP N --shell                      # NAME=, RUN_DIR=, STEAL_ARGS=(...), PROBE_ARGS=(...)
    python launch/sweep.py collect SWEEP [--x queries] [--by train.loss]  # summary.md, summary.csv, summary.png
    python launch/sweep.py run-dir [--config FILE] [key=value ...]     # where a single steal writes

SWEEP is a sweep YAML or the ``rows.jsonl`` that ``expand`` froze (array tasks should read the
frozen file, so that editing the YAML mid-sweep cannot renumber a requeued task's row). The
format of a sweep YAML (``--help`` shows it) is in ``stealer/sweep.py``, the row library;
collecting is ``eval/sweep_report.py``, built on ``eval/curves``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.sweep_report import collect  # noqa: E402
from launch.common import fail  # noqa: E402
from stealer import sweep as _lib  # noqa: E402
from stealer.sweep import MAX_NAME, Row, SweepError, get_row, load_sweep, render_value, run_name, write_rows  # noqa: E402

__all__ = ["SweepError", "Row", "load_sweep", "expand", "read_rows", "write_rows", "get_row", "render_value",
           "run_name", "collect", "main", "MAX_NAME"]


def _probe_cls() -> type:
    from eval.run import ProbeConfig

    return ProbeConfig


def expand(path: str | Path) -> list[Row]:
    """:func:`stealer.sweep.expand` with each row's probe validated as ``eval.run.ProbeConfig``."""
    return _lib.expand(path, _probe_cls())


def read_rows(path: str | Path) -> list[Row]:
    """:func:`stealer.sweep.read_rows` with each row's probe validated as ``eval.run.ProbeConfig``."""
    return _lib.read_rows(path, _probe_cls())


def _shell(row: Row) -> str:
    def arr(a: list[str]) -> str:
        return "(" + " ".join(shlex.quote(x) for x in a) + ")"

    return "\n".join([f"ROW_INDEX={row.index}", f"ROW_NAME={shlex.quote(row.name)}",
                      f"RUN_DIR={shlex.quote(row.run_dir)}", f"STEAL_ARGS={arr(row.steal_args)}",
                      f"PROBE_ARGS={arr(row.probe_args)}"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=f"{__doc__}\n{_lib.__doc__}", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("expand", help="validate every row; write rows.jsonl (+ rows.tsv); print the rows")
    e.add_argument("sweep")
    e.add_argument("--out", help="rows file (.jsonl, a .tsv is written beside it); default <out_dir>/<name>.sweep/rows.jsonl")
    e.add_argument("--quiet", action="store_true", help="print only the path of the rows.jsonl written")
    c = sub.add_parser("count", help="number of rows")
    c.add_argument("sweep")
    r = sub.add_parser("row", help="row N: its key=value overrides for launch/steal.py, one a line")
    r.add_argument("sweep")
    r.add_argument("index", type=int)
    g = r.add_mutually_exclusive_group()
    g.add_argument("--argv", action="store_true", help="the whole argv of launch/steal.py (with --config), one a line")
    g.add_argument("--probe-argv", action="store_true", help="the argv of launch/probe.py for this row, one a line")
    g.add_argument("--name", action="store_true", help="the run name only")
    g.add_argument("--run-dir", action="store_true", help="the run directory only")
    g.add_argument("--shell", action="store_true", help="bash assignments: ROW_NAME, RUN_DIR, STEAL_ARGS=(...), PROBE_ARGS=(...)")
    g.add_argument("--json", action="store_true", help="the row as JSON")
    k = sub.add_parser("collect", help="gather steal.json + probe results of every row → summary.{md,csv,png}")
    k.add_argument("sweep")
    k.add_argument("--out", help="output folder (default <out_dir>/<name>.sweep/)")
    k.add_argument("--x", help="x axis: 'queries' (responses paid for, from steal.json) or a grid key")
    k.add_argument("--by", action="append", help="grid key(s) that make separate lines (repeatable)")
    k.add_argument("--set", dest="probe_set", help="probe set to plot (default: the first one)")
    k.add_argument("--probe", default="linear", choices=["linear", "knn"], help="which evaluation to read (default linear)")
    k.add_argument("--strict", action="store_true", help="exit 1 when a row is incomplete")
    d = sub.add_parser("run-dir", help="the run directory of one steal: [--config FILE] [key=value ...]")
    d.add_argument("--config")
    d.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)

    try:
        if a.cmd == "run-dir":
            from stealer.steal import StealConfig

            print(_lib.check_config(StealConfig, a.config, a.overrides, "config").run_dir)
            return 0
        if a.cmd == "expand":
            rows = expand(a.sweep)
            target = Path(a.out) if a.out else Path(rows[0].sweep["dir"]) / "rows.jsonl"
            written = write_rows(rows, target)
            jsonl = next(w for w in written if w.suffix == ".jsonl")
            if a.quiet:
                print(jsonl)
            else:
                for row in rows:
                    print(f"{row.index}\t{row.name}\t{' '.join(row.overrides[:-1])}")
                print(f"{len(rows)} rows → {jsonl} (+ {jsonl.with_suffix('.tsv').name}); "
                      f"submit: sbatch --array=0-{len(rows) - 1} slurm/steal_array.sbatch {jsonl}", file=sys.stderr)
            return 0
        rows = read_rows(a.sweep)
        if a.cmd == "count":
            print(len(rows))
            return 0
        if a.cmd == "row":
            row = get_row(rows, a.index, a.sweep)
            if a.name:
                print(row.name)
            elif a.run_dir:
                print(row.run_dir)
            elif a.shell:
                sys.stdout.write(_shell(row))
            elif a.json:
                print(json.dumps(row.to_json(), indent=1))
            else:
                lines = row.steal_args if a.argv else row.probe_args if a.probe_argv else row.overrides
                sys.stdout.write("".join(x + "\n" for x in lines))
            return 0
        if a.cmd == "collect":
            res = collect(rows, a.out, x=a.x, by=a.by, probe_set=a.probe_set, probe=a.probe)
            for m in res["skipped"]:
                print(f"warning: {m}", file=sys.stderr)
            ok = len(rows) - len(res["missing"])
            print(f"{ok}/{len(rows)} rows complete; " + ", ".join(str(v) for v in res["paths"].values()))
            for m in res["missing"]:
                print(f"missing: {m}", file=sys.stderr)
            return 1 if a.strict and res["missing"] else 0
    except SweepError as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
