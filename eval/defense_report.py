"""The defense x attack table's outputs (``launch/defense_table.py``): Markdown, CSV, ``results.jsonl`` and the
utility-vs-stolen plot of one run. The table over seeds is :func:`eval.report.defense_seed_table`."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from eval.report import save_figure
from victims.atomic import atomic_write_text

__all__ = ["write_outputs"]


def _f(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{100 * x:.1f}" if pct else (f"{x:.3g}" if abs(x) < 0.01 and x != 0 else f"{x:.3f}")
    return str(x)


def write_outputs(cfg: Any, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    """``<run_dir>/defense_table.md``, ``.csv``, ``results.jsonl`` (rows, then ``{"summary": extra}``) and
    ``utility_vs_stolen.png`` of one table run (``cfg``: its ``DefenseTableConfig``), written atomically."""
    out = cfg.run_dir
    cols = ["defense", "attack", "queries_spent", "distinct_images", "stolen_top1", "stolen_drop", "honest_top1",
            "utility_drop", "perturbation_l2", "perturbation_rel", "attacker_coverage", "honest_coverage",
            "sybil_map_residual", "wm_accuracy", "wm_p_binomial", "wm_p_null", "wm_stolen", "seconds_query", "seconds_train"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in cols})
    atomic_write_text(out / "defense_table.csv", buf.getvalue())
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in [*rows, {"summary": extra}]))

    attacks = [a for a in cfg.attacks]
    defs = list(dict.fromkeys(r["defense"] for r in rows))
    cell = {(r["defense"], r["attack"]): r for r in rows}
    lines = [f"# Defense x attack table ({cfg.name})", "",
             f"Budget {cfg.budget} queries per attack; victim `{cfg.victim}`; stolen top-1 = linear probe of the stolen "
             f"encoder's output on `{cfg.probe.test}` (trained on {cfg.probe.n_train or 'all'} images of `{cfg.probe.train}`); "
             f"honest utility = linear probe on the defended answers of {cfg.honest.n_train}+{cfg.honest.n_test} images of "
             f"`{cfg.honest.train}` / `{cfg.honest.test}` queried by user `{cfg.honest.user}`. Accuracies in %.", "",
             f"References: victim {_f(extra['victim_top1'], True)}, random-init encoders {_f(extra['random_top1'], True)} "
             f"(mean of {len(extra['random_each'])}), honest user on the undefended victim {_f(extra['honest_none'], True)}.", "",
             "## Stolen top-1 (defense x attack)", "",
             "| defense | honest utility | perturbation L2 (rel.) | " + " | ".join(attacks) + " |",
             "|---|---|---|" + "---|" * len(attacks)]
    for d in defs:
        any_r = next(r for r in rows if r["defense"] == d)
        vals = [_f(cell[(d, a)]["stolen_top1"], True) if (d, a) in cell else "–" for a in attacks]
        lines.append(f"| {d} | {_f(any_r['honest_top1'], True)} | {_f(any_r['perturbation_l2'])} "
                     f"({_f(any_r['perturbation_rel'])}) | " + " | ".join(vals) + " |")
    lines += ["", "## Every cell", "",
              "| defense | attack | spent | images | stolen | Δ stolen vs none | honest | Δ utility | att. coverage | "
              "honest coverage | sybil map err | watermark acc / p_bin / p_null / stolen? |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wm = (f"{_f(r['wm_accuracy'], True)} / {r['wm_p_binomial']:.2g} / {r['wm_p_null']:.2g} / "
              f"{'yes' if r['wm_stolen'] else 'no'}") if r.get("wm_accuracy") is not None else "–"
        lines.append(f"| {r['defense']} | {r['attack']} | {r['queries_spent']} | {_f(r.get('distinct_images'))} | "
                     f"{_f(r['stolen_top1'], True)} | {_f(r.get('stolen_drop'), True)} | {_f(r['honest_top1'], True)} | "
                     f"{_f(r.get('utility_drop'), True)} | {_f(r.get('attacker_coverage'))} | {_f(r.get('honest_coverage'))} | "
                     f"{_f(r.get('sybil_map_residual'))} | {wm} |")
    wmx = extra.get("watermark")
    if wmx:
        nulls = ", ".join(f"{k} {100 * v:.1f}" for k, v in wmx["null_accuracies"].items())
        lines += ["", "## Watermark verification", "",
                  f"Rotation accuracy (%) of the watermarked victim's own head on its encoder: "
                  f"{_f(wmx['victim_accuracy'], True)} over {wmx['n']} trials (chance 25.0). Null encoders: {nulls}. "
                  f"Decision: stolen when the exact binomial p and the null-prediction p are both < alpha = {wmx['alpha']}; "
                  f"leave-one-out false positives among the null encoders: {wmx['null_leave_one_out_false_positives']}."]
    if extra.get("similarity_threshold") is not None:
        lines += ["", f"similarity_noise threshold calibrated to {extra['similarity_threshold']:.4f} "
                      f"(quantile {cfg.calibration.quantile} over {cfg.calibration.n} images of `{cfg.calibration.data}`)."]
    lines += ["", f"Total wall time {extra['seconds']:.0f} s.", ""]
    atomic_write_text(out / "defense_table.md", "\n".join(lines))
    _plot(rows, extra, out / "utility_vs_stolen.png")


def _plot(rows: list[dict[str, Any]], extra: dict[str, Any], path: Path) -> None:
    """Honest utility (x) against stolen top-1 (y): a colour per defense, a marker per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"direct": "o", "repeat_average": "s", "coverage_control": "^", "sybils": "D"}
    defs = list(dict.fromkeys(r["defense"] for r in rows))
    colours = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(defs)}
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        ax.scatter(100 * r["honest_top1"], 100 * r["stolen_top1"], color=colours[r["defense"]],
                   marker=markers.get(r["attack"], "x"), s=50)
    for d in defs:
        ax.scatter([], [], color=colours[d], marker="o", label=d)
    for a, m in markers.items():
        if any(r["attack"] == a for r in rows):
            ax.scatter([], [], color="grey", marker=m, label=a)
    ax.axhline(100 * extra["random_top1"], color="grey", ls=":", lw=1, label="random-init encoder")
    ax.set_xlabel("honest user's utility: probe top-1 on defended answers (%)")
    ax.set_ylabel("stolen encoder probe top-1 (%)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
