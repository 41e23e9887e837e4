"""The steal report: one table (JSON + Markdown) from probe results and phase timings."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from stealer.jsonsafe import dumps as json_dumps
from victims.atomic import atomic_write_text

__all__ = ["gain_recovered", "build_report", "write_report", "markdown_table", "save_figure", "SeedStat",
           "NOISE_RULE", "beyond_noise", "seed_cell", "noise_comparisons", "seed_table_markdown", "defense_seed_table"]

NOISE_RULE = ("a difference exceeds seed noise when |Δ mean| > 2 × the pooled sample std of the two cells "
              "(each with ≥ 2 seeds); cells read mean ± sample std (n seeds)")


def save_figure(fig: Any, path: str | Path, dpi: int | None = None) -> Path:
    """Write a matplotlib figure as PNG atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    from victims.atomic import atomic_write

    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def gain_recovered(stolen: float, victim: float, random: float) -> float:
    """(stolen − random) / (victim − random): the share of the victim's gain over random init that the steal recovers."""
    gap = victim - random
    if abs(gap) < 1e-12:
        return float("nan")
    return (stolen - random) / gap


def build_report(results: dict[str, dict[str, Any]], *, primary_set: str, queries_spent: int,
                 seconds: dict[str, float], control: str | None = "control", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summarise ``results[encoder][set] = {'top1': ...}`` into the report dict.

    ``results`` must hold ``victim``, ``stolen`` and ``random`` (the mean over random inits,
    optionally with ``top1_min``/``top1_max``/``seeds``); ``control`` and
    ``control_teacher`` are reported when present.

    Required keys: ``victim_top1``, ``stolen_top1``, ``random_top1`` (fractions), ``ratio``
    (stolen/victim), ``gain_recovered``, ``queries_spent``, ``seconds`` (per phase and total).
    """
    top = {enc: sets[primary_set]["top1"] for enc, sets in results.items() if primary_set in sets}
    v, s, r = top["victim"], top["stolen"], top["random"]
    rep: dict[str, Any] = {
        "probe_set": primary_set,
        "victim_top1": v,
        "stolen_top1": s,
        "random_top1": r,
        "ratio": s / v if v else float("nan"),
        "gain_recovered": gain_recovered(s, v, r),
        "queries_spent": int(queries_spent),
        "seconds": {**{k: round(float(t), 1) for k, t in seconds.items()}, "total": round(float(sum(seconds.values())), 1)},
        "per_set": {enc: {k: round(float(m["top1"]), 4) for k, m in sets.items()} for enc, sets in results.items()
                    if not enc.startswith("random_")},
    }
    rnd = results["random"][primary_set]
    if "top1_min" in rnd:
        rep["random_top1_min"], rep["random_top1_max"], rep["random_seeds"] = rnd["top1_min"], rnd["top1_max"], rnd["seeds"]
    if control and control in top:
        rep["control_top1"] = top[control]
        rep["control_gain_recovered"] = gain_recovered(top[control], v, r)
        if f"{control}_teacher" in top:
            rep["control_teacher_top1"] = top[f"{control}_teacher"]
    if extra:
        rep.update(extra)
    return rep


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3f}"
    return str(x)


def markdown_table(rep: dict[str, Any]) -> str:
    rows = [
        ("victim probe top-1", rep["victim_top1"]),
        ("stolen probe top-1", rep["stolen_top1"]),
        ("stolen / victim", rep["ratio"]),
        ("random-init probe top-1", rep["random_top1"]),
        ("gain recovered (stolen−random)/(victim−random)", rep["gain_recovered"]),
    ]
    if "random_top1_min" in rep:
        rows.insert(4, (f"random-init min / max over {rep['random_seeds']} seeds",
                        f"{rep['random_top1_min']:.3f} / {rep['random_top1_max']:.3f}"))
    if "control_top1" in rep:
        rows += [("control: stolen from a random-init victim, top-1", rep["control_top1"]),
                 ("control: gain recovered", rep["control_gain_recovered"])]
        if "control_teacher_top1" in rep:
            rows.append(("control: its random-init teacher, top-1", rep["control_teacher_top1"]))
    if "fidelity" in rep:
        rows += [(f"stolen vs victim {k}", v) for k, v in rep["fidelity"].items()]
    rows.append(("queries spent", rep["queries_spent"]))
    rows += [(f"seconds: {k}", v) for k, v in rep["seconds"].items()]
    lines = [f"Probe set: {rep['probe_set']}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    sets = sorted({s for d in rep["per_set"].values() for s in d})
    if len(sets) > 1:
        lines += ["", "| encoder | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
        for enc, d in rep["per_set"].items():
            lines.append(f"| {enc} | " + " | ".join(_fmt(d.get(s, float("nan"))) for s in sets) + " |")
    return "\n".join(lines) + "\n"


def write_report(rep: dict[str, Any], run_dir: str | Path) -> str:
    """Write ``report.json`` and ``report.md`` into ``run_dir``; return the Markdown."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / "report.json", json_dumps(rep, indent=1, sort_keys=False))  # strict JSON: NaN (a ratio over 0) is null
    md = markdown_table(rep)
    atomic_write_text(d / "report.md", "# sslsteal report\n\n" + md)
    return md


# ---------------------------------------------------------------------------- seeds
class SeedStat:
    """The values of one cell over seeds: mean, sample std (ddof 1; 0 for one value), min, max, n."""

    def __init__(self, values: Any = ()) -> None:
        self.values: list[float] = [float(v) for v in values]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:
        if self.n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)


def beyond_noise(a: SeedStat, b: SeedStat, k: float = 2.0) -> bool | None:
    """Whether ``a`` and ``b`` differ by more than seed noise (:data:`NOISE_RULE`): ``|Δ mean| > k × s_pooled``,
    ``s_pooled = sqrt(((n_a − 1) s_a² + (n_b − 1) s_b²) / (n_a + n_b − 2))``. None when either cell has < 2 seeds
    (no noise estimate). With k = 2 and 3 seeds a side this is a two-sided t-test at p ≈ 0.07."""
    if a.n < 2 or b.n < 2:
        return None
    pooled = math.sqrt(((a.n - 1) * a.std ** 2 + (b.n - 1) * b.std ** 2) / (a.n + b.n - 2))
    return abs(a.mean - b.mean) > k * pooled


def seed_cell(s: SeedStat | None, pct: bool = False, digits: int = 3) -> str:
    """``mean ± std (n)``; one value alone; ``—`` for no cell."""
    if s is None or s.n == 0:
        return "—"
    f = 100.0 if pct else 1.0
    d = 1 if pct else digits
    return f"{f * s.mean:.{d}f}" if s.n == 1 else f"{f * s.mean:.{d}f} ± {f * s.std:.{d}f} ({s.n})"


def noise_comparisons(cells: dict[str, SeedStat], k: float = 2.0) -> list[dict[str, Any]]:
    """Every pair of ``cells`` (label → stat) with both means, ordered higher first: ``{'a', 'b', 'delta',
    'beyond_noise'}`` (``beyond_noise`` None when a side has < 2 seeds)."""
    out = []
    labels = [lab for lab, s in cells.items() if s is not None and s.n]
    for i, x in enumerate(labels):
        for y in labels[i + 1:]:
            a, b = (x, y) if cells[x].mean >= cells[y].mean else (y, x)
            out.append({"a": a, "b": b, "delta": cells[a].mean - cells[b].mean,
                        "beyond_noise": beyond_noise(cells[a], cells[b], k)})
    return out


def seed_table_markdown(table: dict[str, dict[str, SeedStat]], columns: list[str], *, row_header: str = "row",
                        pct: bool = False, k: float = 2.0) -> list[str]:
    """A Markdown table (rows × columns of :class:`SeedStat`) and, below it, per column the pairs of rows whose
    difference exceeds seed noise (:func:`beyond_noise`) and how many pairs do not. In each column the highest
    mean is **bold** and a cell within noise of it is marked ≈."""
    md = ["| " + " | ".join([row_header] + columns) + " |", "|" + "---|" * (len(columns) + 1)]
    best: dict[str, str] = {}
    for c in columns:
        have = {r: cols[c] for r, cols in table.items() if c in cols and cols[c].n}
        if have:
            best[c] = max(have, key=lambda r: have[r].mean)
    for r, cols in table.items():
        cells = []
        for c in columns:
            s = cols.get(c)
            text = seed_cell(s, pct)
            if s is not None and s.n and c in best:
                if best[c] == r:
                    text = f"**{text}**"
                elif beyond_noise(s, table[best[c]][c], k) is False:
                    text += " ≈"
            cells.append(text)
        md.append("| " + " | ".join([r] + cells) + " |")
    md += ["", f"Seed noise: {NOISE_RULE}; **bold** = the column's highest mean, ≈ = within noise of it.", ""]
    for c in columns:
        pairs = noise_comparisons({r: cols[c] for r, cols in table.items() if c in cols}, k)
        yes = [p for p in pairs if p["beyond_noise"]]
        unk = sum(1 for p in pairs if p["beyond_noise"] is None)
        f = 100.0 if pct else 1.0
        text = "; ".join(f"{p['a']} > {p['b']} (Δ {f * p['delta']:.{1 if pct else 3}f})" for p in yes) or "none"
        md.append(f"- `{c}`: beyond noise: {text}. Within noise: {len(pairs) - len(yes) - unk} pairs"
                  + (f"; {unk} pairs with < 2 seeds not judged" if unk else "") + ".")
    md.append("")
    return md


def defense_seed_table(per_seed: dict[int, list[dict[str, Any]]], *, title: str = "Defense x attack table",
                       k: float = 2.0) -> str:
    """Markdown of a defense table run once per seed (``per_seed[seed]`` = that run's cell rows, each with
    ``defense``, ``attack``, ``stolen_top1`` and ``honest_top1``): stolen top-1 (%) per defense x attack and the
    honest user's top-1 per defense as mean ± sample std over seeds, with the pairs beyond seed noise
    (:data:`NOISE_RULE`) per attack column."""
    stolen: dict[str, dict[str, SeedStat]] = {}
    honest: dict[str, dict[str, SeedStat]] = {}
    attacks: list[str] = []
    for rows in per_seed.values():
        for r in rows:
            if r["attack"] not in attacks:
                attacks.append(r["attack"])
            if r.get("stolen_top1") is not None:
                stolen.setdefault(r["defense"], {}).setdefault(r["attack"], SeedStat()).values.append(r["stolen_top1"])
    for rows in per_seed.values():
        for d in dict.fromkeys(r["defense"] for r in rows):
            h = next(r.get("honest_top1") for r in rows if r["defense"] == d)
            if h is not None:
                honest.setdefault(d, {}).setdefault("honest utility", SeedStat()).values.append(h)
    seeds = sorted(per_seed)
    md = [f"# {title}: {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
          "Each seed is a full run of the table (the steal's seed and the probe's); accuracies in %.", "",
          "## Stolen top-1 (defense x attack)", ""]
    md += seed_table_markdown(stolen, attacks, row_header="defense", pct=True, k=k)
    md += ["## Honest user's top-1 (defense)", ""]
    md += seed_table_markdown(honest, ["honest utility"], row_header="defense", pct=True, k=k)
    return "\n".join(md)
