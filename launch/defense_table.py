#!/usr/bin/env python
"""The defense x attack table: every defense against every attack at one query budget.

    python launch/defense_table.py --config launch/configs/defense_table.yaml [key=value ...]

Per defense (a chain of ``victims/defenses`` specs, or the watermarked victim) and attack
(``direct``, ``repeat_average``, ``coverage_control``, ``sybils``; :mod:`stealer.countermoves`),
at ``budget`` queries per attack:

* **stolen top-1**: the stolen encoder (trained on the cached answers by the normal train phase)
  under a linear probe of its output on the probe set (as ``launch/probe.py``);
* **honest utility** (once per defense): an honest user queries ``honest.n_train + honest.n_test``
  images of a downstream set (a narrow task, as B4B's legitimate users) through the same defended
  API; a linear probe is trained and scored on those *defended* answers. The perturbation is the
  mean L2 distance of the defended answers to the undefended ones, each passed through the user's
  secret transformation when the defense has one (B4B), so it measures the noise, not the isometry;
* **coverage** (B4B rows): the fraction of LSH buckets the attacker's account(s) and the honest
  user filled (Dubiński et al., NeurIPS'23);
* **watermark** (the ``watermark`` row): the stolen encoder is tested with the watermarked
  victim's rotation head (:mod:`eval.watermark`) against a null of independent encoders — the
  copies stolen from the other victim in the ``none`` row plus ``watermark.random_nulls``
  random-init encoders — at false-positive rate ``watermark.alpha``.

Writes ``<out_dir>/<name>/defense_table.md``, ``.csv``, ``utility_vs_stolen.png`` and
``results.jsonl``. Every query is charged by a per-defense ledger and cached; defense state is
saved after every query phase; a rerun resumes where it stopped and pays nothing twice.

This file only composes: the config, rows and cells are ``stealer/defense_table.py``, the probes,
honest utility and watermark verdicts ``eval/defense_probe.py``, the outputs ``eval/defense_report.py``
(over seeds: ``eval.report.defense_seed_table``), the ``calibrate`` values ``victims/defenses/calibrate.py``.
The victim is loaded with the steal's ``victim.*`` preprocessing keys (``steal_config`` and ``steal``), and
the honest user's, the calibration and the victim probe's images are decoded as the query phase decodes them.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import fail, make_accelerator, parse_job_args  # noqa: E402
from stealer.config import ConfigError, save_config, to_dict  # noqa: E402
from stealer.defense_table import (  # noqa: E402
    PROBE_ATTACKS, WATERMARK, DefenseRow, DefenseTableConfig, ensure_watermarked_victim, load_table_victim, query_decoder,
    random_students, run_cell, steal_cfg
)
from victims.atomic import atomic_write_text  # noqa: E402
from victims.ledger import BudgetExceeded  # noqa: E402

__all__ = ["DefenseTableConfig", "PROBE_ATTACKS", "run_table", "run_seeds", "main"]


def run_table(cfg: DefenseTableConfig, acc: Any) -> list[dict[str, Any]]:
    """Every (defense, attack) cell; returns the rows and writes the table files."""
    from eval.defense_probe import honest_utility, probe_encoder, probe_student, watermark_verdicts
    from eval.defense_report import write_outputs
    from eval.features import extract_features
    from stealer.student import load_student
    from victims.defenses import build_defenses
    from victims.defenses.calibrate import calibrate_chain, placeholder_chain

    t0 = time.time()
    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    if "coverage_control" in cfg.attacks:
        try:
            import stealer.query_select  # noqa: F401
        except ImportError:
            raise ValueError("attack coverage_control needs stealer/query_select.py; drop it with "
                             "attacks=[direct,repeat_average,sybils]") from None
    for chain in cfg.defenses.values():  # every chain is checked before anything is paid for
        build_defenses(placeholder_chain(chain))
    encoder = load_table_victim(cfg, cfg.victim)
    kw = dict(channels=cfg.channels, image_size=cfg.image_size)
    decoder = query_decoder(cfg, {"preprocess": encoder.preprocessing.record()})  # as the query phase decodes
    c = cfg.calibration
    own = cache(lambda: extract_features(encoder, c.data, limit=c.n, decoder=decoder, **kw)[0])  # the defender's data
    specs, fitted = {}, {}
    for name, chain in cfg.defenses.items():
        specs[name], got = calibrate_chain(chain, own, quantile=c.quantile)
        fitted.update(got)
    rows_spec: list[tuple[str, str, Any, list[dict[str, Any]]]] = [(r, cfg.victim, encoder, s) for r, s in specs.items()]
    if cfg.watermark.enabled:  # trained after the other rows are done (it is the slowest step)
        rows_spec.append((WATERMARK, cfg.watermark.victim, None, []))
    wm: tuple[Path, Any] | None = None
    probe = lambda path: probe_student(path, cfg.probe, seed=cfg.seed, **kw)  # noqa: E731
    rows: list[dict[str, Any]] = []
    honest: dict[str, dict[str, Any]] = {}
    for name, ckpt, enc, chain in rows_spec:
        if name == WATERMARK:
            wm_ckpt = ensure_watermarked_victim(cfg, acc)
            ckpt, enc = str(wm_ckpt), load_table_victim(cfg, wm_ckpt)
            wm = (wm_ckpt, enc)
        row = DefenseRow(cfg, name, ckpt, enc, chain)
        honest[name] = honest_utility(row, cfg.honest, seed=cfg.seed, **kw)
        for attack in cfg.attacks:
            cell = run_cell(cfg, row, attack, acc, probe)
            rows.append({**cell, **honest[name]})
            print(json.dumps({k: cell[k] for k in ("defense", "attack", "queries_spent", "stolen_top1")}
                             | {"honest_top1": honest[name]["honest_top1"]}), flush=True)
    base = {r["attack"]: r["stolen_top1"] for r in rows if r["defense"] == "none"}
    for r in rows:
        r["stolen_drop"] = base[r["attack"]] - r["stolen_top1"] if r["attack"] in base else None
        r["utility_drop"] = honest["none"]["honest_top1"] - r["honest_top1"]
    extra: dict[str, Any] = {"similarity_threshold": fitted.get("threshold"), "honest_none": honest["none"]["honest_top1"]}
    if wm is not None:
        students = {d: {r["attack"]: load_student(run / d / r["attack"] / "student.pt") for r in rows if r["defense"] == d}
                    for d in ("none", WATERMARK)}
        wmx = watermark_verdicts(*wm, students[WATERMARK], {f"none/{a}": m for a, m in students["none"].items()},
                                 lambda dim: random_students(cfg, dim, cfg.watermark.random_nulls),
                                 alpha=cfg.watermark.alpha, seed=cfg.watermark.seed, **kw)
        for r in rows:
            v = wmx["verdicts"].get(r["attack"]) if r["defense"] == WATERMARK else None
            if v:
                r.update(wm_accuracy=v["accuracy"], wm_p_binomial=v["p_binomial"], wm_p_null=v["p_null"],
                         wm_stolen=v["stolen"])
        extra["watermark"] = wmx
    sc = steal_cfg(cfg, "none", "direct", [])
    victim_top1 = probe_encoder(encoder, cfg.probe, seed=cfg.seed, decoder=decoder, **kw)
    rnd = [probe_student(m, cfg.probe, seed=cfg.seed, **kw) for m in random_students(cfg, encoder.out_dim, 2)]
    extra.update(victim_top1=victim_top1, random_top1=sum(rnd) / len(rnd), random_each=rnd,
                 seconds=time.time() - t0, student=to_dict(sc.student), epochs=sc.train.epochs)
    write_outputs(cfg, rows, extra)
    return rows


def run_seeds(cfg: DefenseTableConfig, acc: Any) -> list[dict[str, Any]]:
    """The table once per seed of ``cfg.seeds`` (``<name>/seed<S>``; finished cells reused), then the seed table
    ``<name>/defense_table_seeds.md`` (eval.report.defense_seed_table). Returns every cell row with its ``seed``."""
    from eval.report import defense_seed_table

    per_seed: dict[int, list[dict[str, Any]]] = {}
    for s in cfg.seeds:
        per_seed[s] = [{**r, "seed": s} for r in run_table(dataclasses.replace(cfg, seed=s, seeds=[], name=f"{cfg.name}/seed{s}"), acc)]
    atomic_write_text(cfg.run_dir / "defense_table_seeds.md", defense_seed_table(per_seed, title=f"Defense x attack table ({cfg.name})"))
    return [r for rows in per_seed.values() for r in rows]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    cfg = parse_job_args(DefenseTableConfig, __doc__, argv)
    acc = make_accelerator(cfg.cpu, "no")
    if acc.num_processes > 1:
        fail("launch/defense_table.py runs in one process (its cells are small); run it with python, not accelerate/torchrun")
    try:
        rows = run_seeds(cfg, acc) if cfg.seeds else run_table(cfg, acc)
    except (FileNotFoundError, ValueError, ImportError, ConfigError) as e:
        fail(str(e).splitlines()[0])
    except BudgetExceeded as e:
        fail(f"{e}; raise budget or lower the attack's queries")
    runs = [cfg.run_dir / f"seed{s}" for s in cfg.seeds] or [cfg.run_dir]
    print("wrote " + ", ".join(str(d / f) for d in runs for f in ("defense_table.md", "defense_table.csv", "utility_vs_stolen.png"))
          + (f", {cfg.run_dir / 'defense_table_seeds.md'}" if cfg.seeds else ""))
    return rows


if __name__ == "__main__":
    main()
