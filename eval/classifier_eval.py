"""Evaluation of classifier stealing under posterior defenses: the defender's utility, the clone's
accuracy and agreement, and the defense-comparison table and plot.

* :func:`posterior_distances` -- the perturbation norms MAD's evaluation logs per query
  (Orekondy et al., *Prediction Poisoning*, ICLR'20, ``tribhuvanesh/prediction-poisoning``
  ``Blackbox.calc_query_distances``): ``||y - y'||_1``, ``||y - y'||_2`` and ``KL(y || y')`` of the
  clean posterior ``y`` and the returned one ``y'``, with mean, std and max over the test set
  (``y'`` clamped at 1e-8 inside the log, so a perturbed zero gives a large but finite KL).
* :func:`defender_utility` -- test accuracy of the *perturbed* posteriors (MAD's ``eval_bbox``), the
  clean accuracy, the fraction of top-1 labels the defense kept, and the norms above.
* :func:`clone_metrics` -- the clone's test accuracy and its top-1 agreement with the victim.
* :func:`write_sweep` -- ``classifier_sweep.md`` / ``.csv`` and ``defense_curves.png`` (clone accuracy
  vs. defender accuracy, a line per defense over its budget -- ε for the budgeted defenses, β for
  Reverse Sigmoid and DCP, τ for Adaptive Misinformation -- the undefended point marked).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = ["posterior_distances", "defender_utility", "clone_metrics", "predict", "load_labelled",
           "SWEEP_COLUMNS", "sweep_markdown", "sweep_csv", "plot_defense_curves", "write_sweep"]

KL_FLOOR = 1e-8


def _check_probs(p: Tensor, name: str) -> Tensor:
    if p.ndim != 2:
        raise ValueError(f"{name} must be [N, K] probabilities; got shape {list(p.shape)}")
    return p.double()


def posterior_distances(clean: Tensor, perturbed: Tensor) -> dict[str, float]:
    """L1, L2 and KL(clean || perturbed) per row; mean, std (population) and max over rows."""
    y, yp = _check_probs(clean, "clean"), _check_probs(perturbed, "perturbed")
    if y.shape != yp.shape:
        raise ValueError(f"clean {list(y.shape)} and perturbed {list(yp.shape)} posteriors differ in shape")
    diff = y - yp
    per = {"l1": diff.abs().sum(1), "l2": diff.pow(2).sum(1).sqrt(),
           "kl": (torch.xlogy(y, y) - y * yp.clamp_min(KL_FLOOR).log()).sum(1).clamp_min(0)}
    out: dict[str, float] = {}
    for k, v in per.items():
        out[f"{k}_mean"] = float(v.mean())
        out[f"{k}_std"] = float(v.std(unbiased=False)) if len(v) > 1 else 0.0
        out[f"{k}_max"] = float(v.max())
    return out


def defender_utility(clean: Tensor, perturbed: Tensor, labels: Tensor) -> dict[str, float]:
    """What the defense costs the defender on a labelled test set (see the module docstring)."""
    labels = labels.reshape(-1).long()
    if len(labels) != len(clean):
        raise ValueError(f"{len(labels)} labels for {len(clean)} posteriors")
    c, p = clean.argmax(1).cpu(), perturbed.argmax(1).cpu()
    return {"victim_acc": float((c == labels).double().mean()), "defended_acc": float((p == labels).double().mean()),
            "top1_kept": float((c == p).double().mean()), **posterior_distances(clean.cpu(), perturbed.cpu())}


def clone_metrics(clone_logits: Tensor, victim_probs: Tensor, labels: Tensor) -> dict[str, float]:
    """The clone's test accuracy and top-1 agreement with the (clean) victim."""
    labels = labels.reshape(-1).long()
    s, v = clone_logits.argmax(1).cpu(), victim_probs.argmax(1).cpu()
    if not (len(s) == len(v) == len(labels)):
        raise ValueError(f"clone ({len(s)}), victim ({len(v)}) and labels ({len(labels)}) differ in length")
    return {"clone_acc": float((s == labels).double().mean()), "agreement": float((s == v).double().mean())}


@torch.no_grad()
def predict(fn: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 256) -> Tensor:
    """``fn`` over ``images`` in batches, concatenated on the CPU (float32)."""
    outs = [fn(images[i:i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def load_labelled(path: str, *, channels: int, image_size: int, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """The first ``limit`` images and labels of a shard folder (uint8 [N, C, S, S], long [N])."""
    from stealer.data import ShardStream, open_shards

    stream = ShardStream(open_shards(path), batch_size=512, shuffle=False, channels=channels, image_size=image_size,
                         limit=limit)
    xs, ys = [], []
    for b in stream.iter_epoch(0):
        xs.append(b["image"])
        ys.append(b["label"])
    y = torch.cat(ys)
    if (y < 0).any():
        raise ValueError(f"test set {path} has images without labels; use a labelled split (e.g. animal_mnist/probe_test)")
    return torch.cat(xs), y


# ------------------------------------------------------------------------------------ the sweep
SWEEP_COLUMNS = ("defense", "param", "value", "defended_acc", "victim_acc", "top1_kept", "clone_acc", "agreement",
                 "l1_mean", "l2_mean", "kl_mean", "spent", "ledger_spent", "seconds")


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def sweep_markdown(rows: Sequence[dict[str, Any]], *, title: str = "Defense comparison", notes: Sequence[str] = ()) -> str:
    """The sweep as a Markdown table (one row per defense × budget value)."""
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += ["| " + " | ".join(SWEEP_COLUMNS) + " |", "|" + "---|" * len(SWEEP_COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in SWEEP_COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def sweep_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SWEEP_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in SWEEP_COLUMNS})
    return buf.getvalue()


def plot_defense_curves(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """Clone accuracy (y) vs. defender test accuracy (x): a line per defense through its budget values
    (``row["value"]`` of ``row["param"]``: ε, β or τ; labelled), the undefended run (``defense == "none"``)
    as a black star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.8, 4.6), dpi=100)
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(str(r["defense"]), []).append(r)
    for i, (name, rs) in enumerate(sorted(by.items())):
        if name == "none":
            continue
        rs = sorted(rs, key=lambda r: float(r.get("value") or 0))
        xs, ys = [float(r["defended_acc"]) for r in rs], [float(r["clone_acc"]) for r in rs]
        ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=f"{name} ({rs[0].get('param') or 'ε'})")
        for r, x, y in zip(rs, xs, ys):
            ax.annotate(_fmt(r.get("value")), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                        color=f"C{i % 10}")
    for r in by.get("none", []):
        ax.plot([float(r["defended_acc"])], [float(r["clone_acc"])], marker="*", markersize=14, color="k",
                linestyle="none", label="undefended")
    ax.set_xlabel("defender test accuracy (perturbed posteriors)")
    ax.set_ylabel("clone test accuracy")
    ax.set_title(title or "Knockoff clone accuracy vs. defender utility", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    from eval.report import save_figure

    return save_figure(fig, path)


def write_sweep(rows: Sequence[dict[str, Any]], out_dir: str | Path, *, notes: Sequence[str] = (),
                title: str = "Defense comparison") -> dict[str, Path]:
    """Write ``classifier_sweep.md``, ``classifier_sweep.csv`` and ``defense_curves.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "classifier_sweep.md", "csv": out / "classifier_sweep.csv", "png": out / "defense_curves.png"}
    md = sweep_markdown(rows, title=title, notes=notes) + "\n![clone vs defender accuracy](defense_curves.png)\n"
    from victims.atomic import atomic_write_text

    for key, text in (("md", md), ("csv", sweep_csv(rows))):
        atomic_write_text(paths[key], text)
    plot_defense_curves(rows, paths["png"], title=title)
    return paths
