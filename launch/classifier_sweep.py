#!/usr/bin/env python
"""The defense comparison in one command: Knockoff (random) against no defense and each posterior
defense at several budgets, then a table, a plot and the DCP-vs-MAD latency ratio.

    python launch/classifier_sweep.py --config launch/configs/classifier_sweep.yaml
    python launch/classifier_sweep.py --config launch/configs/classifier_sweep.yaml steal.budget=2000 name=big

Trains the classifier victim with ``victim_config`` when ``steal.victim.checkpoint`` does not exist
(else reuses it), then runs one steal per row (``launch/steal_classifier.py``'s ``run_steal``, in
this process: victim, query pool, defender data and test set loaded once), each in its own run
folder with its own ledger and posterior cache. A row whose ``steal_classifier.json`` records the
same config is reused, so a rerun pays for nothing and retrains nothing. Writes into
``<out_dir>/<name>/``: ``classifier_sweep.md``, ``classifier_sweep.csv``, ``defense_curves.png``
(clone accuracy vs. defender accuracy per defense) and ``sweep.json`` (rows, latency, wall time).

The latency of DCP and MAD is measured in the same run on the same test images (median of
``latency_repeats`` calls on a batch of ``latency_images`` posteriors, reported per posterior):
MAD with its batched closed-form Jacobian, and with the reference per-sample autograd Jacobian
(the implementation the DCP paper compares with, claiming ~37x; timed on
``latency_autograd_images`` because it is slow).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

from launch.common import fail, make_accelerator, parse_job_args  # noqa: E402
from stealer.config import ConfigError, JobHeader, PositiveInt, load_config, own_default, save_config, to_dict  # noqa: E402

__all__ = ["ClassifierSweepConfig", "row_overrides", "measure_latency", "run_sweep", "main"]

DEFAULT_DEFENSES: list[dict[str, Any]] = [
    {"name": "mad", "param": "epsilon", "values": [0.25, 0.5, 1.0]},
    {"name": "reverse_sigmoid", "param": "beta", "values": [0.05, 0.2, 0.5]},
    {"name": "am", "param": "tau", "values": [0.5, 0.8, 0.95]},
    {"name": "noise", "param": "epsilon", "values": [0.25, 0.5, 1.0]},
    {"name": "grad2", "param": "epsilon", "values": [0.25, 0.5, 1.0]},
    {"name": "dcp", "param": "beta", "values": [0.5, 0.8, 0.95]},
    {"name": "emma", "param": "epsilon", "values": [0.25, 0.5, 1.0], "params": {"steps": 100}},
]


@dataclass
class ClassifierSweepConfig(JobHeader):
    """The sweep: the shared header (``name``, ``out_dir``, ``seed``, ``cpu``: :class:`stealer.config.JobHeader`;
    every row's steal inherits seed and cpu), the victim, the rows and the latency measurement."""

    name: str = own_default("name", "classifier_sweep")
    out_dir: str = own_default("out_dir", "runs/demo")
    victim_config: str = "launch/configs/demo_classifier.yaml"  # trains the victim if steal.victim.checkpoint is missing
    steal: Any = field(default_factory=dict)  # ClassifierStealConfig keys for every row (nested or dotted)
    # one entry per defense: {name, param (the budget swept: epsilon | beta | tau), values: [...], params: {...}}
    defenses: list[Any] = field(default_factory=lambda: [dict(d) for d in DEFAULT_DEFENSES])
    include_undefended: bool = True
    latency_images: PositiveInt = 256  # batch of posteriors timed for DCP and MAD (closed form)
    latency_autograd_images: PositiveInt = 16  # MAD's reference autograd Jacobian is slow: timed on fewer, reported per image
    latency_repeats: PositiveInt = 5
    reuse: bool = True  # reuse rows whose steal_classifier.json records the same config

    def validate(self) -> None:
        if not isinstance(self.steal, dict):
            raise ConfigError(f"steal must be a mapping of steal_classifier keys (e.g. {{budget: 1000}}), got {self.steal!r}")
        for d in self.defenses:
            if not isinstance(d, dict) or "name" not in d or "param" not in d or not d.get("values"):
                raise ConfigError(f"defenses entry {d!r} needs name, param and values (e.g. {{name: mad, param: epsilon, "
                                  f"values: [0.25, 0.5, 1.0]}})")
            extra = set(d) - {"name", "param", "values", "params"}
            if extra:
                raise ConfigError(f"defenses entry for {d['name']} has unknown keys {sorted(extra)}; valid: name, param, values, params")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d["values"]):
                raise ConfigError(f"defenses entry for {d['name']}: values must be numbers, got {d['values']!r}")


def _flat(prefix: str, value: Any) -> list[str]:
    if isinstance(value, dict) and prefix not in ("defenses",):
        return [o for k, v in value.items() for o in _flat(f"{prefix}.{k}" if prefix else str(k), v)]
    return [f"{prefix}={yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix('...').strip()}"]


def row_overrides(cfg: ClassifierSweepConfig, defense: dict[str, Any] | None, value: float | None) -> tuple[str, list[str]]:
    """The run name and ``key=value`` overrides of one row (``defense=None``: undefended)."""
    if defense is None:
        name, specs = "none", []
    else:
        v = float(value)  # type: ignore[arg-type]
        name = f"{defense['name']}_{defense['param']}-{v:g}"
        specs = [{"name": defense["name"], **(defense.get("params") or {}), defense["param"]: v}]
    over = _flat("", cfg.steal)
    over += [f"name={name}", f"out_dir={cfg.run_dir / 'runs'}", f"seed={cfg.seed}", f"cpu={str(cfg.cpu).lower()}",
             "defenses=" + yaml.safe_dump(specs, default_flow_style=True, width=10_000).strip()]
    return name, over


def measure_latency(defense: Callable, probs: torch.Tensor, images: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``defense(probs, images, user)`` over ``repeats`` calls (after a 2-image warm-up call)."""
    defense(probs[:2], images[:2], "latency")
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        defense(probs, images, "latency")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ensure_victim(cfg: ClassifierSweepConfig, acc: Any, say: Callable[[str], None]) -> str:
    ckpt = str((cfg.steal.get("victim") or {}).get("checkpoint") or cfg.steal.get("victim.checkpoint") or "")
    if ckpt and Path(ckpt).is_file():
        return ckpt
    from stealer.train_classifier import ClassifierTrainConfig, train_classifier

    tcfg = load_config(ClassifierTrainConfig, cfg.victim_config, [f"cpu={str(cfg.cpu).lower()}"])
    say(f"victim {ckpt or '(none given)'} not found: training it with {cfg.victim_config}")
    path = str(train_classifier(tcfg, acc))
    if ckpt and Path(path).resolve() != Path(ckpt).resolve():
        say(f"warning: the victim was written to {path}, not {ckpt}; the sweep uses {path}")
    return path


def run_sweep(cfg: ClassifierSweepConfig, acc: Any, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every row, the latency comparison and the report; returns ``sweep.json``'s content."""
    from eval.classifier_eval import load_labelled, predict, write_sweep
    from launch.steal_classifier import run_steal
    from stealer.classifier import ClassifierStealConfig, build_posterior_api, load_pool, write_json
    from victims.classifier import load_classifier
    from victims.defenses.posterior import build_posterior_defenses

    if acc.num_processes != 1:
        raise ValueError("classifier_sweep runs in one process (its rows are small); launch it with python, not accelerate")
    say = log or (lambda s: print(s, flush=True))
    t_start = time.time()
    out_root = cfg.run_dir
    out_root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_root / "config.yaml")
    ckpt = _ensure_victim(cfg, acc, say)
    base = load_config(ClassifierStealConfig, None, row_overrides(cfg, None, None)[1] + [f"victim.checkpoint={ckpt}"])
    if base.attack.name != "knockoff_random":
        say(f"note: the sweep runs attack {base.attack.name} (the default comparison is knockoff_random)")
    model = load_classifier(ckpt).to(acc.device)
    c, s = model.in_chans, model.image_size or 32
    pool = load_pool(base.attack.query_sets, channels=c, image_size=s)
    fit, _ = load_labelled(base.victim.fit_data, channels=c, image_size=s, limit=base.victim.fit_limit)
    x, y = load_labelled(base.eval.test, channels=c, image_size=s, limit=base.eval.limit)
    clean = predict(lambda b: torch.softmax(model(b.to(acc.device)).float(), dim=1), x)
    test_set = (x, y, clean)

    plan: list[tuple[dict[str, Any] | None, float | None]] = [(None, None)] if cfg.include_undefended else []
    plan += [(d, float(v)) for d in cfg.defenses for v in sorted(d["values"])]
    rows: list[dict[str, Any]] = []
    for i, (d, v) in enumerate(plan):
        name, over = row_overrides(cfg, d, v)
        rcfg = load_config(ClassifierStealConfig, None, over + [f"victim.checkpoint={ckpt}"])
        t0 = time.time()
        done = rcfg.run_dir / "steal_classifier.json"
        res = json.loads(done.read_text()) if cfg.reuse and done.is_file() else None
        if res is not None and (res.get("config") != to_dict(rcfg) or "eval" not in res):
            res = None
        if res is None:
            say(f"[{i + 1}/{len(plan)}] {name}")
            t_fit = time.time()
            defenses = build_posterior_defenses(rcfg.defenses, model, device=acc.device, fit_data=fit) if rcfg.defenses else []
            fit_s = time.time() - t_fit
            api = build_posterior_api(rcfg, device=acc.device, victim=model, defenses=defenses)
            res = run_steal(rcfg, acc, api=api, pool=pool, test_set=test_set, log=lambda m: say("    " + m))
            res["defense_fit_seconds"] = fit_s
            res["seconds"] = time.time() - t0
            write_json(done, res)
        else:
            say(f"[{i + 1}/{len(plan)}] {name}: reused {done}")
        ev, q = res["eval"], res["query"]
        rows.append({"defense": "none" if d is None else d["name"], "param": None if d is None else d["param"], "value": v,
                     **{k: ev[k] for k in ("defended_acc", "victim_acc", "top1_kept", "clone_acc", "agreement", "l1_mean",
                                           "l2_mean", "kl_mean")},
                     "spent": q["spent"], "ledger_spent": q["ledger_spent"], "seconds": res.get("seconds"),
                     "run_dir": str(rcfg.run_dir)})

    latency = _latency(cfg, model, x, clean, fit, acc.device, say)
    wall = time.time() - t_start
    notes = [f"attack {base.attack.name}, budget {base.budget} queries per row, clone {base.clone.arch} width "
             f"{base.clone.width}, {base.train.epochs} epochs; victim {ckpt} (clean test accuracy "
             f"{float((clean.argmax(1) == y).double().mean()):.4f} on {len(y)} images)",
             "defender utility = test accuracy of the returned (perturbed) posteriors; l1/l2/kl = mean distance "
             "to the clean posteriors (MAD's eval_bbox); agreement = clone top-1 == victim top-1",
             f"latency per posterior (batches of {latency['images']}; autograd MAD on {latency['autograd_images']}): "
             f"DCP {latency['dcp_ms']:.3f} ms, MAD closed form {latency['mad_closed_form_ms']:.3f} ms, MAD autograd "
             f"(reference) {latency['mad_autograd_ms']:.3f} ms; MAD/DCP = {latency['ratio_closed_form']:.1f}x "
             f"(closed form), {latency['ratio_autograd']:.0f}x (autograd); the DCP paper claims ~37x",
             f"wall time of this sweep: {wall:.0f} s ({len(plan)} rows, {sum(r['seconds'] or 0 for r in rows):.0f} s in rows; "
             f"reused rows count their original time)"]
    paths = write_sweep(rows, out_root, notes=notes, title=f"Knockoff vs. posterior defenses ({cfg.name})")
    result = {"rows": rows, "latency": latency, "wall_seconds": wall, "victim": ckpt,
              "outputs": {k: str(p) for k, p in paths.items()}}
    write_json(out_root / "sweep.json", result)
    say((out_root / "classifier_sweep.md").read_text())
    return result


def _latency(cfg: ClassifierSweepConfig, model: Any, x: torch.Tensor, clean: torch.Tensor, fit: torch.Tensor,
             device: Any, say: Callable[[str], None]) -> dict[str, Any]:
    from victims.defenses.posterior import build_posterior_defenses

    n = min(cfg.latency_images, len(x))
    n_ag = min(cfg.latency_autograd_images, n)
    imgs, probs = x[:n].to(device), clean[:n].to(device)

    def mid(name: str, default: dict[str, Any]) -> dict[str, Any]:
        for d in cfg.defenses:
            if d["name"] == name:
                vals = sorted(d["values"])
                return {"name": name, **(d.get("params") or {}), d["param"]: float(vals[len(vals) // 2])}
        return {"name": name, **default}

    mad_spec, dcp_spec = mid("mad", {"epsilon": 0.5}), mid("dcp", {"beta": 0.8})
    mad_cf, mad_ag, dcp = build_posterior_defenses([mad_spec, {**mad_spec, "jacobian": "autograd"}, dcp_spec], model,
                                                   device=device, fit_data=fit)
    t_dcp = measure_latency(dcp, probs, imgs, cfg.latency_repeats) / n
    t_cf = measure_latency(mad_cf, probs, imgs, cfg.latency_repeats) / n
    t_ag = measure_latency(mad_ag, probs[:n_ag], imgs[:n_ag], max(1, cfg.latency_repeats // 2)) / n_ag
    out = {"images": n, "autograd_images": n_ag, "repeats": cfg.latency_repeats, "mad": mad_spec, "dcp": dcp_spec,
           "dcp_ms": 1e3 * t_dcp, "mad_closed_form_ms": 1e3 * t_cf, "mad_autograd_ms": 1e3 * t_ag,
           "ratio_closed_form": t_cf / max(t_dcp, 1e-12), "ratio_autograd": t_ag / max(t_dcp, 1e-12)}
    say(f"latency per posterior: DCP {out['dcp_ms']:.3f} ms, MAD {out['mad_closed_form_ms']:.3f} ms (closed form) / "
        f"{out['mad_autograd_ms']:.3f} ms (autograd)")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_job_args(ClassifierSweepConfig, __doc__, argv)
    acc = make_accelerator(cfg.cpu)
    try:
        out = run_sweep(cfg, acc)
    except (FileNotFoundError, ValueError, ImportError) as e:
        fail(str(e).splitlines()[0])
    acc.end_training()
    return out


if __name__ == "__main__":
    main()
