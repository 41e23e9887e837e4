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
frozen file, so that editing the YAML mid-sweep cannot renumber a requeued task's row). A sweep
YAML::

    name: demo_sweep                      # prefix of every run name (default: the file's stem)
    config: launch/configs/demo.yaml      # the steal config every row starts from (optional)
    base: {out_dir: runs/sweeps, train.epochs: 10}   # overrides for every row (dotted or nested)
    grid:                                 # the cartesian product, last key varying fastest
      train.loss: [infonce, mse]
      queries:                            # a label whose values are mappings: keys that move together
        - {query.num_queries: 1000, victim.budget: 1000}
        - {query.num_queries: 3000, victim.budget: 3000}
      seed: [0, 1]
    probe:                                # how slurm/probe_array.sbatch probes each row (optional)
      config: launch/configs/demo_probe.yaml
      base: {train_limit: 500}
    plot: {x: queries, by: [train.loss]}  # optional; these are the defaults here

Each row's run name is deterministic — built from its grid values, e.g.
``demo_sweep_loss-infonce_queries-1000_seed-0`` — so a requeued task finds its own checkpoints.
Every row is validated as a ``StealConfig`` up front; an unknown key fails in one line naming the
row and the key. Sweep outputs (rows, summary) go to ``<out_dir>/<name>.sweep/``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from launch.common import fail  # noqa: E402
from stealer.config import ConfigError, read_yaml_mapping  # noqa: E402

__all__ = ["SweepError", "Row", "load_sweep", "expand", "read_rows", "render_value", "run_name", "collect", "main"]

SWEEP_KEYS = ("name", "config", "base", "grid", "probe", "plot")
PROBE_KEYS = ("config", "base")
PLOT_KEYS = ("x", "by", "set")
QUERY_KEYS = ("query.num_queries", "victim.budget")  # what "queries" on the x axis moves with
MAX_NAME = 120


class SweepError(ValueError):
    """A sweep file or row that cannot be used; the message is one line."""


@dataclass
class Row:
    """One steal of a sweep: its run name and everything an array task needs to run and probe it."""

    index: int
    name: str
    run_dir: str
    params: dict[str, Any]  # grid label → value (what distinguishes this row)
    settings: dict[str, Any]  # config key → value set by the grid (labels with mappings flattened)
    overrides: list[str]  # key=value for steal.py (base, then grid, then name=)
    config: str | None = None
    probe_args: list[str] = field(default_factory=list)
    sweep: dict[str, Any] = field(default_factory=dict)  # name, dir, source, plot

    @property
    def steal_args(self) -> list[str]:
        """The argv for ``launch/steal.py`` (without ``--resume``, which the caller picks)."""
        return (["--config", self.config] if self.config else []) + self.overrides

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "run_dir": self.run_dir, "params": self.params,
                "settings": self.settings, "config": self.config, "overrides": self.overrides,
                "probe_args": self.probe_args, "sweep": self.sweep}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Row":
        return cls(index=int(d["index"]), name=d["name"], run_dir=d["run_dir"], params=d.get("params", {}),
                   settings=d.get("settings", {}), overrides=list(d["overrides"]), config=d.get("config"),
                   probe_args=list(d.get("probe_args", [])), sweep=d.get("sweep", {}))


# ---------------------------------------------------------------------------------------------
# expanding a sweep file

def render_value(v: Any) -> str:
    """A value as the text of a ``key=value`` override that ``apply_overrides`` reads back equal."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return ".nan"
        if math.isinf(v):
            return ".inf" if v > 0 else "-.inf"
        s = repr(v)
        if "e" in s and "." not in s.split("e")[0]:  # PyYAML reads 1e-06 as a string, 1.0e-06 as a float
            s = s.replace("e", ".0e", 1)
        return s
    if isinstance(v, str):
        try:
            same = yaml.safe_load(v) == v if v else False
        except yaml.YAMLError:
            same = False
        return v if same and "\n" not in v else json.dumps(v)
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))  # JSON is YAML flow style
    raise SweepError(f"cannot pass a value of type {type(v).__name__} as an override: {v!r}")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _text(v: Any) -> str:
    if isinstance(v, dict):
        vals: list[str] = []
        for x in v.values():
            t = _text(x)
            if t not in vals:
                vals.append(t)
        return "+".join(vals)
    if isinstance(v, (list, tuple)):
        return "+".join(_text(x) for x in v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    return str(v)


def _sanitize(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", s).strip("-.") or "x"


def _short_labels(labels: Sequence[str]) -> dict[str, str]:
    last = [lab.rsplit(".", 1)[-1] for lab in labels]
    return {lab: (short if last.count(short) == 1 else lab) for lab, short in zip(labels, last)}


def run_name(sweep: str, params: dict[str, Any], short: dict[str, str] | None = None) -> str:
    """``<sweep>_<key>-<value>_...`` from a row's grid values (characters outside ``A-Za-z0-9._+-`` → ``-``)."""
    short = short or _short_labels(list(params))
    parts = [_sanitize(sweep)] + [f"{_sanitize(short[k])}-{_sanitize(_text(v))}" for k, v in params.items()]
    return "_".join(parts)


def _digest(overrides: Iterable[str]) -> str:
    return hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:6]


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check the structure of a sweep YAML (not yet the config keys of its rows)."""
    p = Path(path)
    data = read_yaml_mapping(p, "sweep file", SweepError, not_found_hint="")
    if not data:
        raise SweepError(f"sweep file {p} must hold a mapping with keys: {', '.join(SWEEP_KEYS)}")
    for k in data:
        if k not in SWEEP_KEYS:
            raise SweepError(f"sweep file {p}: unknown key '{k}'; valid keys: {', '.join(SWEEP_KEYS)}"
                             " (config keys go under 'base:' or 'grid:')")
    for k in ("base", "grid", "probe", "plot"):
        if data.get(k) is not None and not isinstance(data[k], dict):
            raise SweepError(f"sweep file {p}: '{k}' must be a mapping, got {data[k]!r}")
    grid = data.get("grid") or {}
    for k, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"sweep file {p}: grid '{k}' must be a non-empty list of values, got {values!r}")
        if any(isinstance(v, dict) for v in values) and not all(isinstance(v, dict) and v for v in values):
            raise SweepError(f"sweep file {p}: grid '{k}' mixes mappings and plain values; use one or the other")
    for section, allowed in (("probe", PROBE_KEYS), ("plot", PLOT_KEYS)):
        for k in data.get(section) or {}:
            if k not in allowed:
                raise SweepError(f"sweep file {p}: unknown key '{section}.{k}'; valid keys: {', '.join(allowed)}")
    name = data.get("name", p.stem)
    if not isinstance(name, str) or not _sanitize(name) == name:
        raise SweepError(f"sweep file {p}: name {name!r} must be non-empty and use only A-Z a-z 0-9 . _ + -")
    data["name"] = name
    return data


def _resolve_path(path: str | None, sweep_file: Path) -> str | None:
    """A config path as written (relative to the working directory), else next to the sweep file."""
    if not path:
        return None
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return str(p)
    q = sweep_file.parent / p
    return str(q) if q.is_file() else str(p)


def _check_overrides(cls: type, config: str | None, overrides: list[str], where: str) -> Any:
    from stealer.config import load_config

    try:
        return load_config(cls, config, overrides)
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from None


def expand(path: str | Path) -> list[Row]:
    """The rows of a sweep YAML, each validated as a ``StealConfig`` (and its probe as a ``ProbeConfig``)."""
    p = Path(path)
    data = load_sweep(p)
    sweep = data["name"]
    config = _resolve_path(data.get("config"), p)
    base = _flatten(data.get("base") or {})
    if "name" in base:
        raise SweepError(f"sweep file {p}: base sets 'name'; run names come from the grid (set the sweep's 'name:' instead)")
    grid = data.get("grid") or {}
    labels = list(grid)
    short = _short_labels(labels)
    probe = data.get("probe") or {}
    probe_config = _resolve_path(probe.get("config"), p)
    probe_base = _flatten(probe.get("base") or {})

    rows: list[Row] = []
    for i, combo in enumerate(itertools.product(*(grid[k] for k in labels))):
        params = dict(zip(labels, combo))
        settings: dict[str, Any] = {}
        for k, v in params.items():
            if isinstance(v, dict):
                settings.update(_flatten(v))
            else:
                settings[k] = v
        if "name" in settings:
            raise SweepError(f"sweep file {p}: grid sets 'name'; run names come from the grid values")
        values = {**base, **settings}
        overrides = [f"{k}={render_value(v)}" for k, v in values.items()]
        name = run_name(sweep, params, short) if params else sweep
        rows.append(Row(index=i, name=name, run_dir="", params=params, settings=settings, overrides=overrides,
                        config=config))
    # names must be unique: a clash left by sanitising, or an over-long name, gets a digest of its overrides
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in rows:
        if counts[r.name] > 1 or len(r.name) > MAX_NAME:
            r.name = f"{r.name[:MAX_NAME - 8]}-{_digest(r.overrides)}"
        r.overrides.append(f"name={render_value(r.name)}")

    from stealer.steal import StealConfig

    for r in rows:
        where = f"sweep file {p} row {r.index} ({r.name})"
        cfg = _check_overrides(StealConfig, config, r.overrides, where)
        r.run_dir = str(cfg.run_dir)
        r.probe_args = _probe_args(probe_config, probe_base, r.run_dir, cfg.victim.checkpoint, cfg.data.image_size,
                                   cfg.data.channels)
        if probe:
            from eval.run import ProbeConfig

            _check_overrides(ProbeConfig, probe_config, _strip_config(r.probe_args), where + " probe")
    out_dir0 = Path(rows[0].run_dir).parent if rows else Path("runs")
    meta = {"name": sweep, "dir": str(out_dir0 / f"{sweep}.sweep"), "source": str(p), "plot": data.get("plot") or {}}
    for r in rows:
        r.sweep = meta
    return rows


def _probe_args(config: str | None, base: dict[str, Any], run_dir: str, victim: str, image_size: Any,
                channels: Any) -> list[str]:
    """argv for ``launch/probe.py``: results land in ``<run_dir>/probe/results.jsonl``."""
    values: dict[str, Any] = {}
    if victim:
        values["victim"] = victim
    if image_size is not None:
        values["image_size"] = image_size
    if channels is not None:
        values["channels"] = channels
    values.update(base)
    values.update({"out_dir": run_dir, "name": "probe", "stolen": [f"stolen={run_dir}/student.pt"]})
    return (["--config", config] if config else []) + [f"{k}={render_value(v)}" for k, v in values.items()]


def _strip_config(args: list[str]) -> list[str]:
    return args[2:] if args[:1] == ["--config"] else args


def read_rows(path: str | Path) -> list[Row]:
    """Rows from a sweep YAML (expanded and validated) or from a frozen ``rows.jsonl``."""
    p = Path(path)
    if p.suffix == ".jsonl":
        if not p.is_file():
            raise SweepError(f"rows file {p} not found; write it with: python launch/sweep.py expand SWEEP.yaml")
        rows = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(Row.from_json(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SweepError(f"rows file {p} line {n} is not a sweep row ({type(e).__name__}: {e})") from None
        return rows
    if p.suffix == ".tsv":
        raise SweepError(f"{p} is the human-readable export; pass the sweep YAML or the rows.jsonl next to it")
    return expand(p)


def write_rows(rows: list[Row], out: str | Path) -> list[Path]:
    """Write ``rows.jsonl`` (what tasks read) and ``rows.tsv`` (index, name, run_dir, overrides) next to it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".tsv":
        jsonl, tsv = out.with_suffix(".jsonl"), out
    else:
        jsonl, tsv = out, out.with_suffix(".tsv")
    from victims.atomic import atomic_write_text

    atomic_write_text(jsonl, "".join(json.dumps(r.to_json()) + "\n" for r in rows))
    lines = ["index\tname\trun_dir\toverrides"] + [
        f"{r.index}\t{r.name}\t{r.run_dir}\t{shlex.join(r.overrides)}" for r in rows]
    atomic_write_text(tsv, "\n".join(lines) + "\n")
    return [jsonl, tsv]


def get_row(rows: list[Row], index: int, source: str | Path) -> Row:
    if not rows:
        raise SweepError(f"sweep {source} has no rows")
    if not 0 <= index < len(rows):
        raise SweepError(f"row {index} is out of range: sweep {source} has {len(rows)} rows (0-{len(rows) - 1})")
    return rows[index]


# ---------------------------------------------------------------------------------------------
# collecting results

def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_probe(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """``(encoder, set) → metrics``; the last line wins (a rerun of the probe appends)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            d = json.loads(line)
            out[(str(d["encoder"]), str(d["set"]))] = d
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a killed probe
    return out


def _queries(steal: dict[str, Any] | None, settings: dict[str, Any]) -> Any:
    q = (steal or {}).get("query") or {}
    for k in ("cached", "ledger_spent"):
        if isinstance(q.get(k), (int, float)):
            return q[k]
    return settings.get("query.num_queries", settings.get("victim.budget"))


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v.is_integer() and abs(v) >= 1:
            return str(int(v))
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return _text(v)


def _default_axes(rows: list[Row], x: str | None, by: Sequence[str] | None) -> tuple[str, list[str]]:
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
                out |= set(_flatten(v)) if isinstance(v, dict) else {label}
            return out

        def moves_x(label: str) -> bool:
            ks = keys(label)
            return label == x or x in ks or (x == "queries" and bool(ks & set(QUERY_KEYS)))

        by = [lab for lab in labels if lab != "seed" and not moves_x(lab)]
    return x, list(by)


def collect(rows: list[Row], out_dir: str | Path | None = None, *, x: str | None = None,
            by: Sequence[str] | None = None, probe_set: str | None = None, encoder: str = "stolen") -> dict[str, Any]:
    """Gather every row's ``steal.json`` and probe ``results.jsonl`` → summary.md, summary.csv, summary.png.

    Rows without results are listed as missing, never fatal. Returns the table rows, the missing
    rows, the plotted points and the paths written.
    """
    if not rows:
        raise SweepError("the sweep has no rows")
    out = Path(out_dir or rows[0].sweep.get("dir") or Path(rows[0].run_dir).parent / "sweep")
    x, by = _default_axes(rows, x, by)
    labels = list(rows[0].params)
    records: list[dict[str, Any]] = []
    sets: list[str] = []
    missing: list[str] = []
    for r in rows:
        run = Path(r.run_dir)
        steal = _read_json(run / "steal.json")
        probe = _read_probe(run / "probe" / "results.jsonl")
        for (_, s) in probe:
            if s not in sets:
                sets.append(s)
        rec: dict[str, Any] = {"row": r.index, "name": r.name}
        for lab in labels:
            rec[lab] = _text(r.params.get(lab))
        train = (steal or {}).get("train") or {}
        rec["queries"] = _queries(steal, r.settings)
        rec["steps"] = train.get("steps")
        rec["final_loss"] = _num(train.get("final_loss"))
        rec["train_seconds"] = _num(train.get("seconds"))
        rec["_probe"] = probe
        if steal is None:
            rec["status"] = "missing"
            missing.append(f"row {r.index} {r.name}: no {run / 'steal.json'}")
        elif not any(e == encoder for e, _ in probe):
            rec["status"] = "no probe"
            missing.append(f"row {r.index} {r.name}: no probe of '{encoder}' in {run / 'probe' / 'results.jsonl'}")
        else:
            rec["status"] = "ok"
        records.append(rec)
    primary = probe_set or (sets[0] if sets else None)
    if probe_set and probe_set not in sets and sets:
        raise SweepError(f"probe set '{probe_set}' not in the results; sets found: {', '.join(sets)}")
    for rec in records:
        probe = rec.pop("_probe")
        for s in sets:
            rec[f"{encoder}_top1:{s}"] = _num((probe.get((encoder, s)) or {}).get("top1"))
        for other in ("victim", "random"):
            for s in sets:
                rec[f"{other}_top1:{s}"] = _num((probe.get((other, s)) or {}).get("top1"))
    columns = ["row", "name"] + labels + ["status", "queries", "steps", "final_loss", "train_seconds"]
    columns += [f"{e}_top1:{s}" for e in (encoder, "victim", "random") for s in sets]

    # the plotted points: mean (and spread) of the primary set's top-1 per (line, x)
    groups: dict[tuple[str, ...], dict[float, list[float]]] = {}
    ref: dict[str, list[float]] = {"victim": [], "random": []}
    for rec, r in zip(records, rows):
        if primary is None:
            break
        y = rec.get(f"{encoder}_top1:{primary}")
        xv = rec["queries"] if x == "queries" else r.settings.get(x, r.params.get(x))
        if isinstance(xv, dict):  # a label of linked keys: its first number
            xv = next((v for v in _flatten(xv).values() if _num(v) is not None), None)
        if y is None or _num(xv) is None:
            continue
        key = tuple(f"{b.rsplit('.', 1)[-1]}={_text(r.params.get(b, r.settings.get(b)))}" for b in by)
        groups.setdefault(key, {}).setdefault(float(xv), []).append(y)
        for other in ref:
            v = rec.get(f"{other}_top1:{primary}")
            if v is not None:
                ref[other].append(v)
    points = []
    for key, by_x in sorted(groups.items()):
        for xv, ys in sorted(by_x.items()):
            points.append({"line": ", ".join(key) or encoder, "x": xv, "mean": sum(ys) / len(ys), "min": min(ys),
                           "max": max(ys), "n": len(ys)})

    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "summary.csv", "md": out / "summary.md", "png": out / "summary.png"}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for rec in records:
        w.writerow(["" if rec.get(c) is None else rec.get(c) for c in columns])
    paths["csv"].write_text(buf.getvalue())

    sweep_name = rows[0].sweep.get("name", "sweep")
    done = sum(rec["status"] == "ok" for rec in records)
    md = [f"# Sweep `{sweep_name}`", "", f"{len(rows)} rows, {done} complete (steal + probe), {len(missing)} incomplete.", ""]
    md += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for rec in records:
        md.append("| " + " | ".join(_fmt(rec.get(c)) for c in columns) + " |")
    if points:
        xl = "queries paid (cached responses)" if x == "queries" else x
        md += ["", f"## {encoder} top-1 on `{primary}` by {xl} (mean over rows; min–max)", "",
               f"| line | {x} | mean top-1 | min | max | rows |", "|---|---|---|---|---|---|"]
        for pt in points:
            md.append(f"| {pt['line']} | {_fmt(pt['x'])} | {pt['mean']:.4f} | {pt['min']:.4f} | {pt['max']:.4f} | {pt['n']} |")
    if missing:
        md += ["", "## Missing", ""] + [f"- {m}" for m in missing]
    if points:
        _plot(points, ref, paths["png"], title=f"{sweep_name}: {encoder} encoder, linear probe on {primary}",
              xlabel="queries paid (cached responses)" if x == "queries" else x)
        md += ["", f"![plot]({paths['png'].name})"]
    else:
        paths["png"].unlink(missing_ok=True)
        del paths["png"]
        md += ["", "No plot: no row has both a probe result and a numeric x value yet."]
    paths["md"].write_text("\n".join(md) + "\n")
    return {"records": records, "columns": columns, "missing": missing, "points": points, "paths": paths,
            "x": x, "by": by, "set": primary}


def _plot(points: list[dict[str, Any]], ref: dict[str, list[float]], path: Path, *, title: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    lines: dict[str, list[dict[str, Any]]] = {}
    for pt in points:
        lines.setdefault(pt["line"], []).append(pt)
    for name, pts in lines.items():
        xs = [p["x"] for p in pts]
        ys = [p["mean"] for p in pts]
        err = [[p["mean"] - p["min"] for p in pts], [p["max"] - p["mean"] for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
    styles = {"victim": ("k", "--"), "random": ("grey", ":")}
    for other, vals in ref.items():
        if vals:
            c, ls = styles[other]
            ax.axhline(sum(vals) / len(vals), color=c, linestyle=ls, linewidth=1, label=f"{other} (mean)")
    xs_all = [p["x"] for p in points]
    if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 20:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("linear-probe top-1")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from eval.report import save_figure

    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# command line

def _shell(row: Row) -> str:
    def arr(a: list[str]) -> str:
        return "(" + " ".join(shlex.quote(x) for x in a) + ")"

    return "\n".join([f"ROW_INDEX={row.index}", f"ROW_NAME={shlex.quote(row.name)}",
                      f"RUN_DIR={shlex.quote(row.run_dir)}", f"STEAL_ARGS={arr(row.steal_args)}",
                      f"PROBE_ARGS={arr(row.probe_args)}"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    k.add_argument("--strict", action="store_true", help="exit 1 when a row is incomplete")
    d = sub.add_parser("run-dir", help="the run directory of one steal: [--config FILE] [key=value ...]")
    d.add_argument("--config")
    d.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)

    try:
        if a.cmd == "run-dir":
            from stealer.steal import StealConfig

            print(_check_overrides(StealConfig, a.config, a.overrides, "config").run_dir)
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
            res = collect(rows, a.out, x=a.x, by=a.by, probe_set=a.probe_set)
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
