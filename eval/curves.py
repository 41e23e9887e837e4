"""Accuracy-vs-queries curves: flat result records → a table (Markdown + CSV) and a plot (PNG).

Record format
-------------
One JSON object per (encoder, downstream set, evaluation) — a line of a ``results.jsonl``::

    {"attack": "infonce", "defense": "none", "queries": 3000, "encoder": "stolen",
     "set": "animal_mnist", "probe": "linear", "top1": 0.738, "seed": 0, "run": "runs/sweeps/x"}

``attack``
    the stealing method (e.g. a loss name, ``stolenencoder``, ``contsteal``); ``loss`` is read when
    ``attack`` is absent. Required for curve encoders, ignored for reference encoders.
``defense`` (optional)
    the defense the victim ran (``null``, ``""`` and ``"none"`` mean undefended).
``queries``
    victim queries the steal paid for (the ledger's count). Required for curve encoders.
``encoder``
    ``"stolen"`` (the default when absent) is a point of a curve; ``"victim"``, ``"random"``
    (random-init students) and ``"victim_random"`` (a random-init copy of the victim's own
    architecture; the probe's ``control_teacher`` is read as it) are reference rows (queries and
    attack ignored); ``random_<i>`` is read as one seed of ``"random"`` (then pass only these, not
    their mean); any other encoder (``control``, ...) is ignored unless passed in ``encoders``.
``set``
    the downstream set. ``top1``: accuracy as a fraction in [0, 1] (NaN/null records are skipped).
``probe`` (optional, default ``"linear"``)
    the evaluation: ``"linear"`` probe or ``"knn"``; each (set, probe) gets its own table and plot.
``seed``, ``run`` (optional)
    records equal in run, set, probe, encoder, attack, defense, queries and seed are one result
    (the last read wins: a rerun appends); ``run`` defaults to the file the record came from.
    Distinct results of the same (attack, defense, queries) — e.g. several seeds — are averaged;
    the sample std, min and max are kept. Cells read ``mean ± std (n)``; below each table the
    pairs of rows whose difference exceeds seed noise are listed (eval.report.NOISE_RULE:
    |Δ mean| > 2 × pooled sample std, each side ≥ 2 seeds), and, with victim and random
    references, the gain recovered ``(stolen − random) / (victim − random)`` per row and budget.

Any other keys (``fidelity``, ``weight_decay``, ...) are carried along and ignored, so the probe's
own ``results.jsonl`` lines are records once ``attack`` and ``queries`` are added (pass them as
``defaults`` to :func:`load_records`).

Files :func:`load_records` reads: JSON Lines of records (blank lines skipped; a line that is not
JSON — a torn last line of a killed writer — is skipped and reported); or one JSON document that is
a list of records, ``{"records": [...]}``, or a steal report (``report.json`` of
:func:`eval.report.build_report`, which needs an ``attack`` or ``loss`` key and gives one record per
encoder of ``per_set``, its ``queries_spent`` as the stolen encoders' queries).

Outputs of :func:`write_curves` in ``out_dir``: ``curves.md`` (one table per (set, probe): a row
per attack(+defense), a column per query budget, the victim — and random init, when present —
as reference rows), ``curves.csv`` (long form: ``set, probe, encoder, attack, defense, queries,
top1, top1_std, top1_min, top1_max, n``; reference rows have an empty attack and queries) and one
``accuracy_vs_queries_<set>_<probe>.png`` per table (a line per attack, log-scaled queries,
min–max error bars, the victim as a dashed horizontal line).

"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from eval.report import NOISE_RULE, SeedStat, gain_recovered, noise_comparisons

__all__ = ["RecordError", "Stat", "CurveTable", "load_records", "normalize_record", "build_tables",
           "markdown", "noise_lines", "gain_table", "gain_lines", "csv_text", "plot_table", "write_curves", "REFERENCE_ENCODERS", "CSV_COLUMNS"]

REFERENCE_ENCODERS = ("victim", "random", "victim_random")
_REFERENCE_ALIASES = {"control_teacher": "victim_random"}  # eval/run.py's random-init victim
_REFERENCE_LABELS = {"victim": "victim (reference)", "random": "random init (reference)",
                     "victim_random": "random-init victim arch (reference)"}
CSV_COLUMNS = ["set", "probe", "encoder", "attack", "defense", "queries", "top1", "top1_std", "top1_min", "top1_max", "n"]
_NO_DEFENSE = (None, "", "none", "None")


class RecordError(ValueError):
    """A record or results file that cannot be used; the message is one line naming where."""


Stat = SeedStat  # mean, min, max, count and sample std of equal-setting results: one class, eval.report's


@dataclass
class CurveTable:
    """The results of one (set, probe): ``lines[(attack, defense)][queries]`` and reference rows."""

    set: str
    probe: str
    lines: dict[tuple[str, str], dict[float, Stat]] = field(default_factory=dict)
    references: dict[str, Stat] = field(default_factory=dict)  # victim / random

    @property
    def queries(self) -> list[float]:
        return sorted({q for pts in self.lines.values() for q in pts})

    @property
    def has_defense(self) -> bool:
        return any(d != "none" for _, d in self.lines)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def normalize_record(rec: dict[str, Any], *, where: str = "record", encoders: Sequence[str] = ("stolen",)
                     ) -> dict[str, Any] | None:
    """Check one record and fill its defaults; None when it is not used (other encoder, no top-1).

    Raises :class:`RecordError` (one line, naming ``where``) for a curve record without attack,
    queries or set.
    """
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    enc = str(rec.get("encoder", "stolen"))
    enc = _REFERENCE_ALIASES.get(enc, enc)
    m = re.fullmatch(r"random_(\d+)", enc)
    if m and enc not in encoders:  # one random-init seed of the "random" reference
        rec = {**rec, "seed": int(m.group(1)), "random_seed": True}
        enc = "random"
    if enc not in encoders and enc not in REFERENCE_ENCODERS:
        return None
    top1 = _num(rec.get("top1"))
    if top1 is None or math.isnan(top1):
        return None
    if rec.get("set") in (None, ""):
        raise RecordError(f"{where}: record has no 'set' (the downstream set)")
    out = dict(rec)
    out.update(encoder=enc, set=str(rec["set"]), top1=top1, probe=str(rec.get("probe") or "linear"))
    d = rec.get("defense")
    out["defense"] = "none" if d in _NO_DEFENSE else (d if isinstance(d, str) else json.dumps(d, sort_keys=True))
    if enc in REFERENCE_ENCODERS:
        out["attack"], out["queries"] = None, None
        return out
    attack = rec.get("attack", rec.get("loss"))
    if attack in (None, ""):
        raise RecordError(f"{where}: '{enc}' record has no 'attack' (or 'loss')")
    q = _num(rec.get("queries"))
    if q is None or q < 0 or math.isnan(q):
        raise RecordError(f"{where}: '{enc}' record has no numeric 'queries' >= 0 (got {rec.get('queries')!r})")
    out["attack"], out["queries"] = str(attack), q
    return out


def _from_report(rep: dict[str, Any], where: str) -> list[dict[str, Any]]:
    attack = rep.get("attack", rep.get("loss"))
    recs = []
    for enc, sets in (rep.get("per_set") or {}).items():
        for s, top1 in sets.items():
            recs.append({"encoder": enc, "set": s, "top1": top1, "attack": attack, "queries": rep.get("queries_spent"),
                         "defense": rep.get("defense"), "probe": rep.get("probe", "linear"), "seed": rep.get("seed")})
    if not recs and "stolen_top1" in rep:
        s = rep.get("probe_set", "default")
        recs = [{"encoder": "victim", "set": s, "top1": rep.get("victim_top1")},
                {"encoder": "random", "set": s, "top1": rep.get("random_top1")},
                {"encoder": "stolen", "set": s, "top1": rep["stolen_top1"], "attack": attack,
                 "queries": rep.get("queries_spent"), "defense": rep.get("defense"), "seed": rep.get("seed")}]
    if attack in (None, "") and any(r["encoder"] not in REFERENCE_ENCODERS for r in recs):
        raise RecordError(f"{where}: a steal report needs an 'attack' or 'loss' key to be placed on a curve")
    return recs


def load_records(path: str | Path, *, defaults: dict[str, Any] | None = None, encoders: Sequence[str] = ("stolen",),
                 skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Read the records of one file (see the module docstring), normalised.

    ``defaults`` fill keys a record lacks (e.g. ``{"attack": "infonce", "queries": 3000}`` for a
    plain probe ``results.jsonl``). Lines that are not JSON are skipped and, when ``skipped`` is
    given, described there.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise RecordError(f"cannot read results file {p}: {e.strerror or e}") from None
    raw: list[tuple[str, Any]] = []
    stripped = text.strip()
    try:
        doc: Any = json.loads(stripped) if stripped else None  # one JSON document (a list, a report)?
    except ValueError:
        doc = None  # JSON Lines (two or more lines, or a torn one)
    if isinstance(doc, list):
        raw = [(f"{p}[{i}]", r) for i, r in enumerate(doc)]
    elif isinstance(doc, dict) and isinstance(doc.get("records"), list):
        raw = [(f"{p}[{i}]", r) for i, r in enumerate(doc["records"])]
    elif isinstance(doc, dict) and ("per_set" in doc or "stolen_top1" in doc):
        raw = [(f"{p}", r) for r in _from_report(doc, str(p))]
    elif isinstance(doc, dict):
        raw = [(f"{p}:1", doc)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append((f"{p}:{n}", json.loads(line)))
            except ValueError:
                if skipped is not None:
                    skipped.append(f"{p}:{n}: not JSON (skipped)")
    out = []
    for where, rec in raw:
        if isinstance(rec, dict):
            rec = {**(defaults or {}), **rec}
            rec.setdefault("run", str(p))
        r = normalize_record(rec, where=where, encoders=encoders)
        if r is not None:
            out.append(r)
    return out


def _identity(r: dict[str, Any]) -> tuple:
    return (str(r.get("run")), r["set"], r["probe"], r["encoder"], r["attack"], r["defense"], r["queries"],
            json.dumps(r.get("seed")))


def build_tables(records: Iterable[dict[str, Any]], *, sets: Sequence[str] | None = None,
                 probes: Sequence[str] | None = None) -> list[CurveTable]:
    """Group normalised records into one :class:`CurveTable` per (set, probe), in first-seen order.

    Duplicate results (see the module docstring) keep the last one read.
    """
    unique: dict[tuple, dict[str, Any]] = {}
    for r in records:
        unique.pop(_identity(r), None)
        unique[_identity(r)] = r
    tables: dict[tuple[str, str], CurveTable] = {}
    per_seed_random = {(r["set"], r["probe"], str(r.get("run"))) for r in unique.values() if r.get("random_seed")}
    for r in unique.values():
        if r["encoder"] == "random" and not r.get("random_seed") and (r["set"], r["probe"], str(r.get("run"))) in per_seed_random:
            continue  # the probe's mean over random_<i>, which are read one by one
        if (sets and r["set"] not in sets) or (probes and r["probe"] not in probes):
            continue
        t = tables.setdefault((r["set"], r["probe"]), CurveTable(r["set"], r["probe"]))
        if r["encoder"] in REFERENCE_ENCODERS:
            t.references.setdefault(r["encoder"], Stat()).values.append(r["top1"])
        else:
            t.lines.setdefault((r["attack"], r["defense"]), {}).setdefault(r["queries"], Stat()).values.append(r["top1"])
    for t in tables.values():
        t.lines = dict(sorted(t.lines.items(), key=lambda kv: (kv[0][0], kv[0][1] != "none", kv[0][1])))
        t.lines = {k: dict(sorted(v.items())) for k, v in t.lines.items()}
    return list(tables.values())


def _q(q: float) -> str:
    return f"{int(q):,}" if float(q).is_integer() else f"{q:g}"


def _cell(s: Stat | None) -> str:
    if s is None:
        return "—"
    return f"{s.mean:.3f}" if s.n == 1 else f"{s.mean:.3f} ± {s.std:.3f} ({s.n})"


def _line_label(attack: str, defense: str) -> str:
    return attack if defense == "none" else f"{attack} (defense: {defense})"


def markdown(tables: Sequence[CurveTable], *, title: str | None = None, images: dict[tuple[str, str], str] | None = None) -> str:
    """One Markdown table per (set, probe): attacks × query budgets, reference rows last."""
    md = [f"# {title or 'Stolen accuracy vs. queries'}", ""]
    if not tables:
        return "\n".join(md + ["No results.", ""])
    md += ["Top-1 of the downstream classifier on each encoder's frozen features; columns are victim queries "
           "paid. A cell of several results (seeds) reads mean ± sample std (n).", ""]
    for t in tables:
        qs = t.queries
        cols = [_q(q) for q in qs] or ["top-1"]
        head = ["attack"] + (["defense"] if t.has_defense else []) + cols
        md += [f"## `{t.set}` — {t.probe} top-1", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (attack, defense), pts in t.lines.items():
            row = [attack] + ([defense] if t.has_defense else []) + [_cell(pts.get(q)) for q in qs]
            md.append("| " + " | ".join(row) + " |")
        for enc, stat in t.references.items():
            label = _REFERENCE_LABELS.get(enc, enc)
            row = [label] + (["—"] if t.has_defense else []) + [_cell(stat)] * len(cols)
            md.append("| " + " | ".join(row) + " |")
        md += [""] + noise_lines(t) + gain_lines(t)
        if images and (t.set, t.probe) in images:
            md += ["", f"![{t.set} {t.probe}]({images[(t.set, t.probe)]})"]
        md.append("")
    return "\n".join(md)


def noise_lines(t: CurveTable, k: float = 2.0) -> list[str]:
    """Per budget, the pairs of rows (attacks and references) whose difference exceeds seed noise."""
    if not t.lines:
        return []
    out = [f"Seed noise ({NOISE_RULE}):"]
    for q in t.queries:
        cells = {_line_label(a, d): SeedStat(pts[q].values) for (a, d), pts in t.lines.items() if q in pts}
        cells.update({_REFERENCE_LABELS.get(e, e): SeedStat(s.values) for e, s in t.references.items()})
        pairs = noise_comparisons(cells, k)
        yes = [p for p in pairs if p["beyond_noise"]]
        unk = sum(1 for p in pairs if p["beyond_noise"] is None)
        text = "; ".join(f"{p['a']} > {p['b']} (Δ {p['delta']:.3f})" for p in yes) or "none"
        out.append(f"- {_q(q)} queries: beyond noise: {text}. Within noise: {len(pairs) - len(yes) - unk} pairs"
                   + (f"; {unk} not judged (< 2 seeds)" if unk else "") + ".")
    return out + [""]


def gain_table(t: CurveTable, reference: str = "random") -> dict[tuple[str, str], dict[float, SeedStat]]:
    """Per line and budget, the gain recovered ``(stolen − r) / (victim − r)`` of each seed, with ``r`` the mean of
    the ``reference`` row (``random`` or ``victim_random``); {} when the table lacks the victim or the reference."""
    if "victim" not in t.references or reference not in t.references:
        return {}
    v, r = t.references["victim"].mean, t.references[reference].mean
    return {k: {q: SeedStat(gain_recovered(x, v, r) for x in s.values) for q, s in pts.items()}
            for k, pts in t.lines.items()}


def gain_lines(t: CurveTable) -> list[str]:
    """Markdown: gain recovered per line and budget (mean ± std over seeds), vs. each random reference present."""
    out: list[str] = []
    for ref in ("random", "victim_random"):
        g = gain_table(t, ref)
        if not g:
            continue
        qs = t.queries
        gap = t.references["victim"].mean - t.references[ref].mean
        warn = (f" **The victim beats r by only {gap:.3f}: these ratios divide by that gap and say little.**"
                if gap < 0.05 else "")
        out += [f"Gain recovered, (stolen − r) / (victim − r) with r = {_REFERENCE_LABELS[ref]} "
                f"({t.references[ref].mean:.3f}), per seed then mean ± std:{warn}", "",
                "| attack | " + " | ".join(_q(q) for q in qs) + " |", "|" + "---|" * (len(qs) + 1)]
        for key, pts in g.items():
            cells = [_cell(Stat(pts[q].values)) if q in pts else "—" for q in qs]
            out.append(f"| {_line_label(*key)} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def csv_text(tables: Sequence[CurveTable]) -> str:
    """The long-form CSV (``CSV_COLUMNS``): one row per (set, probe, line, queries) and per reference."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)

    def num(x: float) -> str:
        return repr(round(x, 6))

    for t in tables:
        for (attack, defense), pts in t.lines.items():
            for q, s in pts.items():
                w.writerow([t.set, t.probe, "stolen", attack, defense, int(q) if float(q).is_integer() else q,
                            num(s.mean), num(s.std), num(s.min), num(s.max), s.n])
        for enc, s in t.references.items():
            w.writerow([t.set, t.probe, enc, "", "", "", num(s.mean), num(s.std), num(s.min), num(s.max), s.n])
    return buf.getvalue()


def plot_table(t: CurveTable, path: str | Path, *, title: str | None = None, xlabel: str = "victim queries",
               log_x: bool = True) -> Path:
    """Accuracy vs. queries: a line per attack with min–max bars, the victim dashed, random dotted.

    The x axis is log-scaled (points at 0 are left out) unless ``log_x`` is false; a caller whose x
    is another grid value (a learning rate, a temperature) names it with ``xlabel``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for (attack, defense), pts in t.lines.items():
        xs = [q for q in pts if q > 0 or not log_x]  # log axis: a 0-query point cannot be drawn
        if not xs:
            continue
        ys = [pts[q].mean for q in xs]
        err = [[pts[q].mean - pts[q].min for q in xs], [pts[q].max - pts[q].mean for q in xs]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=_line_label(attack, defense))
    styles = {"victim": dict(color="k", linestyle="--"), "random": dict(color="grey", linestyle=":"),
              "victim_random": dict(color="brown", linestyle=":")}
    for enc, s in t.references.items():
        ax.axhline(s.mean, linewidth=1.2, label=f"{enc} ({s.mean:.3f})", **styles.get(enc, dict(color="C7", linestyle="-.")))
    if log_x:
        ax.set_xscale("log")
    qs = [q for q in t.queries if q > 0 or not log_x]
    if qs:  # label the budgets themselves, not powers of ten
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_xticks(qs)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _q(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{t.probe} top-1 on {t.set}")
    ax.set_title(title or f"stolen accuracy vs. queries — {t.set} ({t.probe})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    from eval.report import save_figure

    return save_figure(fig, path)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "set"


def write_curves(records: Iterable[dict[str, Any]], out_dir: str | Path, *, title: str | None = None,
                 sets: Sequence[str] | None = None, probes: Sequence[str] | None = None) -> dict[str, Any]:
    """Write ``curves.md``, ``curves.csv`` and one PNG per (set, probe) into ``out_dir``.

    Returns ``{"tables", "markdown", "paths": {"md", "csv", "png": [...]}}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(records, sets=sets, probes=probes)
    images: dict[tuple[str, str], str] = {}
    pngs = []
    for t in tables:
        if t.lines or t.references:
            name = f"accuracy_vs_queries_{_slug(t.set)}_{_slug(t.probe)}.png"
            pngs.append(plot_table(t, out / name, title=f"{title}: {t.set} ({t.probe})" if title else None))
            images[(t.set, t.probe)] = name
    md = markdown(tables, title=title, images=images)
    from victims.atomic import atomic_write_text

    atomic_write_text(out / "curves.md", md)
    atomic_write_text(out / "curves.csv", csv_text(tables))
    return {"tables": tables, "markdown": md, "paths": {"md": out / "curves.md", "csv": out / "curves.csv", "png": pngs}}
