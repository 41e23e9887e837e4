"""Collect a sweep: every row's ``steal.json`` and probe ``results.jsonl`` → ``summary.md``,
``summary.csv`` and ``summary.png`` in ``<out_dir>/<name>.sweep/``.

Built on :mod:`eval.curves`: a row's probe results are read by :func:`eval.curves.load_records`
(a torn last line is skipped; ``random_<i>`` lines are the seeds of the random reference) and
grouped by :func:`eval.curves.build_tables` (a rerun's appended line wins); only the chosen
evaluation (``probe``, default ``"linear"``; the probe also writes ``"knn"`` lines) is read. The
plotted points are one :class:`eval.curves.CurveTable` over the rows — a line per value of the
``by`` grid keys, x from each row, mean, min, max and sample std over the rows that share both —
drawn by :func:`eval.curves.plot_table`, with its seed-noise and gain-recovered lines below the
table when x is the queries paid.

``summary.csv`` (and the first table of ``summary.md``) has a row per sweep row: ``row, name``,
the grid labels, ``status`` (``ok``, ``no probe``, ``missing``), ``queries`` (cached responses
from ``steal.json``, else the grid's ``query.num_queries``/``victim.budget``), ``steps,
final_loss, train_seconds`` and ``<encoder>_top1:<set>``, ``victim_top1:<set>``,
``random_top1:<set>`` per downstream set. Rows without results are listed as missing, never fatal.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

from eval.curves import REFERENCE_ENCODERS, CurveTable, RecordError, build_tables, gain_lines, load_records, noise_lines, plot_table
from stealer.sweep import QUERY_KEYS, Row, SweepError, flatten_keys, value_text
from victims.atomic import atomic_write_text

__all__ = ["collect", "default_axes"]

QUERIES_LABEL = "queries paid (cached responses)"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v.is_integer() and abs(v) >= 1:
            return str(int(v))
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return value_text(v)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _queries(steal: dict[str, Any] | None, settings: dict[str, Any]) -> Any:
    q = (steal or {}).get("query") or {}
    for k in ("cached", "ledger_spent"):
        if isinstance(q.get(k), (int, float)):
            return q[k]
    return settings.get("query.num_queries", settings.get("victim.budget"))


def default_axes(rows: Sequence[Row], x: str | None, by: Sequence[str] | None) -> tuple[str, list[str]]:
    """The x axis (default: the sweep's ``plot.x``, else ``queries``) and the grid labels that make
    separate lines (default: ``plot.by``, else every label but ``seed`` and those that move x)."""
    plot = rows[0].sweep.get("plot", {}) if rows else {}
    x = x or plot.get("x") or "queries"
    labels = list(rows[0].params) if rows else []
    if by is None:
        by = plot.get("by")
        if isinstance(by, str):
            by = [by]
    if by is None:
        def keys(label: str) -> set[str]:
            out: set[str] = set()
            for r in rows:
                v = r.params.get(label)
                out |= set(flatten_keys(v)) if isinstance(v, dict) else {label}
            return out

        def moves_x(label: str) -> bool:
            ks = keys(label)
            return label == x or x in ks or (x == "queries" and bool(ks & set(QUERY_KEYS)))

        by = [lab for lab in labels if lab != "seed" and not moves_x(lab)]
    return x, list(by)


def _x_value(row: Row, x: str, queries: Any) -> float | None:
    xv = queries if x == "queries" else row.settings.get(x, row.params.get(x))
    if isinstance(xv, dict):  # a label of linked keys: its first number
        xv = next((v for v in flatten_keys(xv).values() if _num(v) is not None), None)
    return _num(xv)


def _row_records(path: Path, *, encoder: str, probe: str, line: str, x: float | None,
                 skipped: list[str]) -> list[dict[str, Any]]:
    """The row's records of one evaluation, its ``encoder`` placed on curve ``line`` at ``x`` (0 when x is not a number)."""
    if not path.is_file():
        return []
    recs = load_records(path, defaults={"attack": line, "queries": 0}, encoders=(encoder,), skipped=skipped)
    return [{**r, "attack": line, "queries": x or 0.0} if r["encoder"] == encoder else r
            for r in recs if r["probe"] == probe]


def _single(t: CurveTable | None, encoder: str) -> float | None:
    """The row's value of ``encoder`` in its own table (one line at one x; the last line read wins)."""
    if t is None:
        return None
    if encoder in REFERENCE_ENCODERS:
        stat = t.references.get(encoder)
    else:
        stat = next((s for pts in t.lines.values() for s in pts.values()), None)
    return stat.mean if stat else None


def collect(rows: list[Row], out_dir: str | Path | None = None, *, x: str | None = None,
            by: Sequence[str] | None = None, probe_set: str | None = None, encoder: str = "stolen",
            probe: str = "linear") -> dict[str, Any]:
    """Gather every row's results → summary.md, summary.csv, summary.png (see the module docstring).

    Returns the table rows (``records``), ``columns``, the ``missing`` rows, the plotted ``points``,
    the curve ``table``, the ``paths`` written, ``x``, ``by``, the plotted ``set``, and the
    ``skipped`` lines of results files that were not JSON.
    """
    if not rows:
        raise SweepError("the sweep has no rows")
    out = Path(out_dir or rows[0].sweep.get("dir") or Path(rows[0].run_dir).parent / "sweep")
    x, by = default_axes(rows, x, by)
    labels = list(rows[0].params)
    records: list[dict[str, Any]] = []
    per_row: list[tuple[dict[str, CurveTable], list[dict[str, Any]], float | None]] = []
    sets: list[str] = []
    missing: list[str] = []
    skipped: list[str] = []
    for r in rows:
        run = Path(r.run_dir)
        steal = _read_json(run / "steal.json")
        train = (steal or {}).get("train") or {}
        rec: dict[str, Any] = {"row": r.index, "name": r.name, **{lab: value_text(r.params.get(lab)) for lab in labels}}
        rec.update(queries=_queries(steal, r.settings), steps=train.get("steps"), final_loss=_num(train.get("final_loss")),
                   train_seconds=_num(train.get("seconds")))
        line = ", ".join(f"{b.rsplit('.', 1)[-1]}={value_text(r.params.get(b, r.settings.get(b)))}" for b in by) or encoder
        xv = _x_value(r, x, rec["queries"])
        results = run / "probe" / "results.jsonl"
        try:
            recs = _row_records(results, encoder=encoder, probe=probe, line=line, x=xv, skipped=skipped)
            problem = f"no probe of '{encoder}' ({probe}) in {results}"
        except RecordError as e:
            recs, problem = [], f"no probe: {e}"
        tables = {t.set: t for t in build_tables(recs)}
        sets += [s for s in tables if s not in sets]
        if steal is None:
            rec["status"] = "missing"
            missing.append(f"row {r.index} {r.name}: no {run / 'steal.json'}")
        elif not any(t.lines for t in tables.values()):
            rec["status"] = "no probe"
            missing.append(f"row {r.index} {r.name}: {problem}")
        else:
            rec["status"] = "ok"
        records.append(rec)
        per_row.append((tables, recs, xv))
    if probe_set and probe_set not in sets and sets:
        raise SweepError(f"probe set '{probe_set}' not in the results; sets found: {', '.join(sets)}")
    primary = probe_set or (sets[0] if sets else None)
    curve: list[dict[str, Any]] = []  # the records of every row with a value at x, for the curve table
    for rec, (tables, recs, xv) in zip(records, per_row):
        for e in (encoder, "victim", "random"):
            for s in sets:
                rec[f"{e}_top1:{s}"] = _single(tables.get(s), e)
        if primary is not None and rec[f"{encoder}_top1:{primary}"] is not None and xv is not None:
            curve += [c for c in recs if c["set"] == primary]
    columns = ["row", "name"] + labels + ["status", "queries", "steps", "final_loss", "train_seconds"]
    columns += [f"{e}_top1:{s}" for e in (encoder, "victim", "random") for s in sets]
    table = next(iter(build_tables(curve, sets=[primary], probes=[probe])), None) if primary else None
    points = [{"line": attack, "x": q, "mean": s.mean, "min": s.min, "max": s.max, "std": s.std, "n": s.n}
              for (attack, _), pts in (table.lines.items() if table else ()) for q, s in pts.items()]

    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "summary.csv", "md": out / "summary.md", "png": out / "summary.png"}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for rec in records:
        w.writerow(["" if rec.get(c) is None else rec.get(c) for c in columns])
    atomic_write_text(paths["csv"], buf.getvalue())

    sweep_name = rows[0].sweep.get("name", "sweep")
    done = sum(rec["status"] == "ok" for rec in records)
    md = [f"# Sweep `{sweep_name}`", "", f"{len(rows)} rows, {done} complete (steal + probe), {len(missing)} incomplete.", ""]
    md += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(_fmt(rec.get(c)) for c in columns) + " |" for rec in records]
    xl = QUERIES_LABEL if x == "queries" else x
    if table is not None and points:
        md += ["", f"## {encoder} {probe} top-1 on `{primary}` by {xl} (mean over rows; min–max; sample std)", "",
               f"| line | {x} | mean top-1 | min | max | rows | std |", "|---|---|---|---|---|---|---|"]
        md += [f"| {p['line']} | {_fmt(p['x'])} | {p['mean']:.4f} | {p['min']:.4f} | {p['max']:.4f} | {p['n']} | {p['std']:.4f} |"
               for p in points]
        if x == "queries":
            md += [""] + noise_lines(table) + gain_lines(table)
    if missing:
        md += ["", "## Missing", ""] + [f"- {m}" for m in missing]
    if table is not None and points:
        xs = [p["x"] for p in points]
        plot_table(table, paths["png"], title=f"{sweep_name}: {encoder} encoder, {probe} probe on {primary}", xlabel=xl,
                   log_x=min(xs) > 0 and max(xs) / min(xs) >= 20)
        md += ["", f"![plot]({paths['png'].name})"]
    else:
        paths["png"].unlink(missing_ok=True)
        del paths["png"]
        md += ["", "No plot: no row has both a probe result and a numeric x value yet."]
    atomic_write_text(paths["md"], "\n".join(md) + "\n")
    return {"records": records, "columns": columns, "missing": missing, "points": points, "table": table,
            "paths": paths, "x": x, "by": by, "set": primary, "skipped": skipped}
