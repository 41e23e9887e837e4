"""The sweep library: a sweep YAML → validated rows (one steal each), frozen as ``rows.jsonl``.

A sweep YAML::

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
    plot: {x: queries, by: [train.loss]}  # optional; read by eval/sweep_report.py

Each row's run name is deterministic — built from its grid values, e.g.
``demo_sweep_loss-infonce_queries-1000_seed-0`` — so a requeued task finds its own checkpoints.
Every row is validated as a ``StealConfig`` up front (and its probe arguments as the probe config
class the caller hands in: ``stealer/`` never imports ``eval/``, so ``launch/sweep.py`` passes
``eval.run.ProbeConfig``); an unknown key fails in one line naming the row and the key. Sweep
outputs (rows, summary) go to ``<out_dir>/<name>.sweep/``. The command line is ``launch/sweep.py``;
collecting results is ``eval/sweep_report.py``.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from stealer.config import ConfigError, load_config, read_yaml_mapping

__all__ = ["SweepError", "Row", "load_sweep", "expand", "read_rows", "write_rows", "get_row", "render_value",
           "run_name", "value_text", "flatten_keys", "check_config", "SWEEP_KEYS", "QUERY_KEYS", "MAX_NAME"]

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


def flatten_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings → dotted keys (``{"a": {"b": 1}}`` → ``{"a.b": 1}``); an empty mapping stays a value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_keys(v, key + "."))
        else:
            out[key] = v
    return out


def value_text(v: Any) -> str:
    """A grid value as short text for names and tables (a mapping of linked keys: its distinct values joined by +)."""
    if isinstance(v, dict):
        vals: list[str] = []
        for x in v.values():
            t = value_text(x)
            if t not in vals:
                vals.append(t)
        return "+".join(vals)
    if isinstance(v, (list, tuple)):
        return "+".join(value_text(x) for x in v)
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
    parts = [_sanitize(sweep)] + [f"{_sanitize(short[k])}-{_sanitize(value_text(v))}" for k, v in params.items()]
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


def check_config(cls: type, config: str | None, overrides: list[str], where: str) -> Any:
    """``load_config(cls, config, overrides)``, its :class:`ConfigError` as a :class:`SweepError` naming ``where``."""
    try:
        return load_config(cls, config, overrides)
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from None


def expand(path: str | Path, probe_cls: type | None = None) -> list[Row]:
    """The rows of a sweep YAML, each validated as a ``StealConfig``.

    ``probe_cls`` (``eval.run.ProbeConfig``, handed in by ``launch/sweep.py``) validates each row's
    probe arguments when the sweep has a ``probe:`` section; None leaves them unchecked.
    """
    p = Path(path)
    data = load_sweep(p)
    sweep = data["name"]
    config = _resolve_path(data.get("config"), p)
    base = flatten_keys(data.get("base") or {})
    if "name" in base:
        raise SweepError(f"sweep file {p}: base sets 'name'; run names come from the grid (set the sweep's 'name:' instead)")
    grid = data.get("grid") or {}
    labels = list(grid)
    short = _short_labels(labels)
    probe = data.get("probe") or {}
    probe_config = _resolve_path(probe.get("config"), p)
    probe_base = flatten_keys(probe.get("base") or {})

    rows: list[Row] = []
    for i, combo in enumerate(itertools.product(*(grid[k] for k in labels))):
        params = dict(zip(labels, combo))
        settings: dict[str, Any] = {}
        for k, v in params.items():
            if isinstance(v, dict):
                settings.update(flatten_keys(v))
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
        cfg = check_config(StealConfig, config, r.overrides, where)
        r.run_dir = str(cfg.run_dir)
        r.probe_args = _probe_args(probe_config, probe_base, r.run_dir, cfg.victim.checkpoint, cfg.data.image_size,
                                   cfg.data.channels)
        if probe and probe_cls is not None:
            check_config(probe_cls, probe_config, _strip_config(r.probe_args), where + " probe")
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


def read_rows(path: str | Path, probe_cls: type | None = None) -> list[Row]:
    """Rows from a sweep YAML (expanded and validated, see :func:`expand`) or from a frozen ``rows.jsonl``."""
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
    return expand(p, probe_cls)


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
    """Row ``index`` of ``rows`` (read from ``source``), or a one-line :class:`SweepError` giving the valid range."""
    if not rows:
        raise SweepError(f"sweep {source} has no rows")
    if not 0 <= index < len(rows):
        raise SweepError(f"row {index} is out of range: sweep {source} has {len(rows)} rows (0-{len(rows) - 1})")
    return rows[index]

