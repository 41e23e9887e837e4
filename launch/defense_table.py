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
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from launch.common import fail, make_accelerator, parse_job_args  # noqa: E402
from stealer.config import (  # noqa: E402
    Channels, ConfigError, Fraction, NonNegFloat, NonNegInt, PositiveInt, load_config, save_config, to_dict
)
from victims.atomic import atomic_write_text  # noqa: E402
from victims.ledger import BudgetExceeded  # noqa: E402

__all__ = ["DefenseTableConfig", "PROBE_ATTACKS", "calibrate_similarity_threshold", "run_table", "main"]

PROBE_ATTACKS = ("direct", "repeat_average", "coverage_control", "sybils")
WATERMARK = "watermark"


@dataclass
class ProbeSet:
    train: str = "runs/demo/data/animal_mnist/probe_train"
    test: str = "runs/demo/data/animal_mnist/probe_test"
    n_train: PositiveInt | None = 500  # first N training images (None = all)
    n_test: PositiveInt | None = None
    steps: PositiveInt = 300


@dataclass
class HonestConfig:
    train: str = "runs/demo/data/digits/probe_train"  # the honest user's downstream task
    test: str = "runs/demo/data/digits/probe_test"
    n_train: PositiveInt = 300
    n_test: PositiveInt = 200
    user: str = "honest"
    steps: PositiveInt = 300


@dataclass
class CalibrationConfig:
    data: str = "runs/demo/data/animal_mnist/victim_train"  # the defender's own data
    n: PositiveInt = 1500  # a stream as long as the budget
    quantile: Fraction = 0.99  # share of an in-distribution stream answered, not replaced


@dataclass
class WatermarkTableConfig:
    enabled: bool = True
    victim: str = "runs/defense_table/victim_wm/checkpoint.pth.tar"  # trained here when missing
    victim_config: str = "launch/configs/demo_victim.yaml"
    victim_overrides: list[str] = field(default_factory=lambda: ["seed=1"])  # train_victim key=value
    alpha: Fraction = 0.01
    random_nulls: PositiveInt = 3
    seed: NonNegInt = 0


@dataclass
class ProbeAttackConfig:
    repeats: PositiveInt = 3  # repeat_average: paid copies per image
    sybils: PositiveInt = 3  # sybil accounts
    overlap: PositiveInt = 150  # images every sybil asks (to fit the maps)
    ridge: NonNegFloat = 1e-3
    # coverage_control: the attacker queries the narrowest coverage_fraction of its query pool
    # (k-means centres in pixel space, the images nearest to them: query_select spread 0), at
    # most the budget. Querying less and narrower is the move against a coverage-priced defense.
    coverage_fraction: Fraction = 0.5
    coverage_spread: Fraction = 0.0


@dataclass
class DefenseTableConfig:
    name: str = "defense_table"
    out_dir: str = "runs"
    seed: NonNegInt = 0
    # the whole table once per seed (<out>/<name>/seed<S>/, each cached like a one-seed table) and
    # <out>/<name>/defense_table_seeds.md: mean ± std over seeds, pairs beyond seed noise ([] = one run at seed)
    seeds: list[NonNegInt] = field(default_factory=list)
    cpu: bool = True
    budget: PositiveInt = 1500  # queries per attack (every attack spends exactly this)
    victim: str = "runs/demo/victim/checkpoint.pth.tar"
    steal_config: str = "launch/configs/demo.yaml"  # the StealConfig every cell starts from
    steal: Any = field(default_factory=dict)  # dotted StealConfig overrides for every cell, e.g. {train.epochs: 6}
    defenses: Any = field(default_factory=lambda: {"none": []})  # row name -> list of defense specs
    attacks: list[str] = field(default_factory=lambda: list(PROBE_ATTACKS))
    attack: ProbeAttackConfig = field(default_factory=ProbeAttackConfig)
    probe: ProbeSet = field(default_factory=ProbeSet)
    honest: HonestConfig = field(default_factory=HonestConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    watermark: WatermarkTableConfig = field(default_factory=WatermarkTableConfig)
    channels: Channels = 1
    image_size: PositiveInt = 32

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def validate(self) -> None:
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ConfigError(f"seeds={self.seeds} must be distinct non-negative integers, e.g. [0, 1, 2]")
        for a in self.attacks:
            if a not in PROBE_ATTACKS:
                raise ConfigError(f"attacks entry {a!r} is not valid; choose from: {', '.join(PROBE_ATTACKS)}")
        if not isinstance(self.defenses, dict) or not self.defenses:
            raise ConfigError("defenses must be a mapping row name -> list of defense specs, e.g. {none: [], noise: [{name: noise}]}")
        for row, specs in self.defenses.items():
            if row == WATERMARK:
                raise ConfigError(f"defenses row name {row!r} is reserved for the watermarked victim (watermark.enabled)")
            if not isinstance(specs, list) or not all(isinstance(s, dict) and "name" in s for s in specs):
                raise ConfigError(f"defenses.{row} must be a list of {{name: ..., **params}}; got {specs!r}")
        if "none" not in self.defenses:
            raise ConfigError("defenses must include the undefended row 'none: []' (the reference of every delta)")
        if not isinstance(self.steal, dict):
            raise ConfigError(f"steal must be a mapping of dotted StealConfig keys, e.g. {{train.epochs: 6}}; got {self.steal!r}")
        a = self.attack
        if self.budget < 2 or a.repeats < 1 or a.sybils < 1 or a.overlap < 2:
            raise ConfigError(f"budget={self.budget} >= 2, attack.repeats={a.repeats} >= 1, attack.sybils={a.sybils} >= 1 "
                              f"and attack.overlap={a.overlap} >= 2 are required")
        if "sybils" in self.attacks and self.budget - (a.sybils - 1) * a.overlap <= a.overlap:
            raise ConfigError(f"budget={self.budget} leaves no image outside the sybil overlap ({a.sybils} x {a.overlap}); "
                              f"lower attack.overlap or attack.sybils")
        if not (0 < a.coverage_fraction < 1 and 0 <= a.coverage_spread <= 1):
            raise ConfigError(f"attack.coverage_fraction={a.coverage_fraction} must be in (0, 1) (a share of the query pool) "
                              f"and attack.coverage_spread={a.coverage_spread} in [0, 1] (0 = narrowest)")
        if not 0 < self.watermark.alpha < 1:
            raise ConfigError(f"watermark.alpha={self.watermark.alpha} must be in (0, 1)")


# ----------------------------------------------------------------------------- helpers
def calibrate_similarity_threshold(encoder: Any, shard_dir: str, *, n: int, quantile: float, channels: int,
                                   image_size: int) -> float:
    """The ``quantile`` of ``s_i`` (max cosine to the earlier images, as ``similarity_noise`` computes
    it) over a stream of the defender's own ``n`` images: that share of an in-distribution user's
    answers stays unreplaced (Dziedzic et al., ICML'22 fix 0.6; post-ReLU features need their own)."""
    from eval.features import extract_features

    feats, _ = extract_features(encoder, shard_dir, channels=channels, image_size=image_size, limit=n)
    z = torch.nn.functional.normalize(feats.double(), dim=1)
    sim = (z @ z.T).tril(-1)
    sim = sim + torch.triu(torch.full_like(sim, -2.0))  # only earlier images count
    s = sim.amax(dim=1)[1:]
    return float(torch.quantile(s, quantile))


def _images(shard_dir: str, n: int | None, channels: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from stealer.data import ShardStream, open_shards

    stream = ShardStream(open_shards(shard_dir), batch_size=500, shuffle=False, channels=channels,
                         image_size=image_size, limit=n)
    batches = list(stream.iter_epoch(0))
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


class _Row:
    """One defense row: the victim behind its defended API, a ledger, persisted defense state."""

    def __init__(self, cfg: DefenseTableConfig, name: str, checkpoint: str, encoder: Any,
                 specs: list[dict[str, Any]]) -> None:
        from victims.api import VictimAPI
        from victims.defenses import build_defenses
        from victims.ledger import QueryLedger

        self.name, self.checkpoint, self.specs, self.dir = name, checkpoint, specs, cfg.run_dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.defenses = build_defenses(specs)
        self.state_path = self.dir / "defense_state.pt"
        if self.state_path.is_file():
            for d, st in zip(self.defenses, torch.load(self.state_path, map_location="cpu", weights_only=True)):
                d.load_state_dict(st)  # type: ignore[attr-defined]
        self.api = VictimAPI(encoder, QueryLedger(self.dir / "ledger.sqlite"), defenses=self.defenses)

    def save_state(self) -> None:
        from victims.atomic import atomic_write

        states = [d.state_dict() for d in self.defenses]  # type: ignore[attr-defined]
        atomic_write(self.state_path, lambda f: torch.save(states, f))

    def coverage(self, users: list[str]) -> float | None:
        """The largest B4B coverage among ``users`` (None when the chain has no coverage meter)."""
        meters = [d for d in self.defenses if hasattr(d, "coverage")]
        return max(float(m.coverage(u)) for m in meters for u in users) if meters else None

    def reference(self, clean: torch.Tensor, user: str) -> torch.Tensor:
        """Undefended answers as ``user`` would get them without noise: through each secret transform."""
        for d in self.defenses:
            if hasattr(d, "transform"):
                clean = d.transform(clean, user)
        return clean


def _cached_query(row: _Row, user: str, images: torch.Tensor, root: Path, budget: int) -> torch.Tensor:
    """``user``'s defended answers to ``images``, paid once: kept in ``root/answers.pt``."""
    path = root / "answers.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    root.mkdir(parents=True, exist_ok=True)
    row.api.ledger.set_budget(user, budget)
    answers = torch.cat([row.api.query(images[i:i + 250], user) for i in range(0, len(images), 250)]).cpu()
    from victims.atomic import atomic_write

    atomic_write(path, lambda f: torch.save(answers, f))
    row.save_state()
    return answers


def honest_utility(cfg: DefenseTableConfig, row: _Row, encoder: Any) -> dict[str, Any]:
    """Linear probe on the honest user's defended answers, the perturbation, and the coverage."""
    from eval.probe import linear_probe

    h = cfg.honest
    xtr, ytr = _images(h.train, h.n_train, cfg.channels, cfg.image_size)
    xte, yte = _images(h.test, h.n_test, cfg.channels, cfg.image_size)
    images = torch.cat([xtr, xte])
    answers = _cached_query(row, h.user, images, row.dir / "honest", len(images))
    with torch.no_grad():
        clean = torch.cat([encoder(images[i:i + 250]) for i in range(0, len(images), 250)]).cpu()
    ref = row.reference(clean, h.user)
    pert = (answers - ref).norm(dim=1) if answers.shape == ref.shape else torch.full((len(images),), float("nan"))
    res = linear_probe(answers[: len(xtr)], ytr, answers[len(xtr):], yte, steps=h.steps, seed=cfg.seed)
    return {"honest_top1": res["top1"], "perturbation_l2": float(pert.mean()),
            "perturbation_rel": float(pert.mean() / clean.norm(dim=1).mean()), "honest_queries": len(images),
            "honest_coverage": row.coverage([h.user])}


def _steal_cfg(cfg: DefenseTableConfig, row: str, attack: str, overrides: list[str], victim: str = "",
               chain: list[dict[str, Any]] | None = None) -> Any:
    from stealer.steal import StealConfig

    base = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in cfg.steal.items()]
    cell = [f"out_dir={cfg.run_dir / row}", f"name={attack}", f"seed={cfg.seed}", f"cpu={cfg.cpu}",
            f"victim.checkpoint={victim or cfg.victim}", f"victim.defenses={json.dumps(chain or [])}",
            f"victim.user=attacker-{attack}", f"victim.budget={cfg.budget}", "resume=auto",
            f"data.channels={cfg.channels}", f"data.image_size={cfg.image_size}"]
    return load_config(StealConfig, cfg.steal_config or None, base + cell + overrides)


def run_cell(cfg: DefenseTableConfig, row: _Row, attack: str, acc: Any) -> dict[str, Any]:
    """Query (the attack), train the stolen encoder, probe it; cached in ``<row>/<attack>/cell.json``."""
    from stealer.countermoves import RepeatAverage, coverage_controlled_queries, run_sybil_query_phase, sybil_users
    from stealer.steal import run_query_phase, run_train_phase

    a, b = cfg.attack, cfg.budget
    done = cfg.run_dir / row.name / attack / "cell.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.time()
    users = [f"attacker-{attack}"]
    ctx = (row.checkpoint, row.specs)
    if attack == "direct":
        sc = _steal_cfg(cfg, row.name, attack, [f"query.num_queries={b}"], *ctx)
        row.api.ledger.set_budget(users[0], b)
        q = run_query_phase(sc, row.api)
    elif attack == "repeat_average":
        sc = _steal_cfg(cfg, row.name, attack, [f"query.num_queries={b // a.repeats}"], *ctx)
        row.api.ledger.set_budget(users[0], b)
        q = run_query_phase(sc, RepeatAverage(row.api, a.repeats))
    elif attack == "coverage_control":
        from stealer.data import open_shards

        base = _steal_cfg(cfg, row.name, attack, [], *ctx)
        n = max(1, min(b, round(a.coverage_fraction * open_shards(base.data.query).num_samples)))
        sel = coverage_controlled_queries(base, n, cfg.run_dir / "selections" / f"coverage_{n}_s{a.coverage_spread:g}",
                                          spread=a.coverage_spread)
        sc = _steal_cfg(cfg, row.name, attack, [f"data.query={sel}", f"query.num_queries={n}"], *ctx)
        row.api.ledger.set_budget(users[0], b)
        q = run_query_phase(sc, row.api)
    else:  # sybils: n images so that S * overlap + (n - overlap) = budget
        n = b - (a.sybils - 1) * a.overlap
        sc = _steal_cfg(cfg, row.name, attack, [f"query.num_queries={n}"], *ctx)
        users = sybil_users(sc.victim.user, a.sybils)
        for u in users:
            row.api.ledger.set_budget(u, a.overlap + math.ceil((n - a.overlap) / a.sybils))
        q = run_sybil_query_phase(sc, row.api, sybils=a.sybils, overlap=a.overlap, ridge=a.ridge)
    row.save_state()
    spent = sum(int(row.api.ledger.spent(u)) for u in users)
    t1 = time.time()
    train = run_train_phase(sc, acc)
    out = {"defense": row.name, "attack": attack, "queries_spent": spent, "distinct_images": q.get("cached"),
           "attacker_coverage": row.coverage(users), "train_loss": train["final_loss"],
           "stolen_top1": probe_student(cfg, sc.run_dir / "student.pt"),
           "seconds_query": round(t1 - t0, 1), "seconds_train": round(time.time() - t1, 1)}
    if "map_residual" in q:
        out["sybil_map_residual"] = max(q["map_residual"].values()) if q["map_residual"] else None
    atomic_write_text(done, json.dumps(out, indent=1))  # the cell's done marker: never torn
    return out


def _encoder_fn(model: Any) -> Any:
    model = model.eval()

    @torch.no_grad()
    def enc(x: torch.Tensor) -> torch.Tensor:
        return model(model.preprocess(x))

    return enc


def probe_student(cfg: DefenseTableConfig, path: Path | Any) -> float:
    """Linear-probe top-1 of a stolen encoder's output (a path to student.pt, or a StolenEncoder)."""
    from eval.features import extract_features
    from eval.probe import linear_probe
    from stealer.student import load_student

    enc = _encoder_fn(load_student(path) if isinstance(path, (str, Path)) else path)
    p = cfg.probe
    kw = dict(channels=cfg.channels, image_size=cfg.image_size)
    xtr, ytr = extract_features(enc, p.train, limit=p.n_train, **kw)
    xte, yte = extract_features(enc, p.test, limit=p.n_test, **kw)
    return float(linear_probe(xtr, ytr, xte, yte, steps=p.steps, seed=cfg.seed)["top1"])


def _out_dim(model: Any) -> int | None:
    head = getattr(model, "head", None)
    return getattr(head, "out_features", None) if head is not None else getattr(model, "out_dim", None)


def _random_students(cfg: DefenseTableConfig, out_dim: int, k: int) -> list[Any]:
    from stealer.student import StolenEncoder

    sc = _steal_cfg(cfg, "none", "direct", [])
    out = []
    for i in range(k):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 9_000 + i)
            out.append(StolenEncoder(sc.student.arch, out_dim, in_chans=cfg.channels, width=sc.student.width,
                                     stem=sc.student.stem, image_size=cfg.image_size))
    return out


def ensure_watermarked_victim(cfg: DefenseTableConfig, acc: Any) -> Path:
    """The watermarked victim's checkpoint, trained (SimSiam + rotation watermark) when missing."""
    from stealer.pretrain import VictimTrainConfig, train_simsiam_victim
    from victims.watermark import watermark_path

    path = Path(cfg.watermark.victim)
    if path.is_file() and watermark_path(path).is_file():
        return path
    vc = load_config(VictimTrainConfig, cfg.watermark.victim_config or None,
                     list(cfg.watermark.victim_overrides) + [f"out_dir={path.parent.parent}", f"name={path.parent.name}",
                                                             "watermark.enabled=true", f"cpu={cfg.cpu}"])
    save_config(vc, path.parent / "config.yaml")
    got = train_simsiam_victim(vc, acc)
    if got.resolve() != path.resolve():
        raise ValueError(f"watermark.victim={path} must be <out_dir>/<name>/checkpoint.pth.tar; training wrote {got}")
    return got


def watermark_verdicts(cfg: DefenseTableConfig, wm_ckpt: Path, cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Verify every stolen encoder of the watermark row against the null of the ``none`` row's copies
    (stolen from the other, independent victim) and random inits; also leave-one-out on the null."""
    from eval.watermark import load_watermark_images, null_pvalue, rotation_accuracy, verify_watermark
    from stealer.student import load_student
    from victims.simsiam import load_victim_encoder
    from victims.watermark import load_watermark, watermark_path

    head, meta = load_watermark(watermark_path(wm_ckpt))
    images = load_watermark_images(meta["data"], size=int(meta["size"]), channels=cfg.channels, image_size=cfg.image_size)
    seed = cfg.watermark.seed
    null_models = {f"none/{c['attack']}": load_student(cfg.run_dir / "none" / c["attack"] / "student.pt")
                   for c in cells if c["defense"] == "none"}
    # copies of a victim with another output dim cannot wear this head: they are left out of the null
    null_models = {k: m for k, m in null_models.items() if _out_dim(m) == head.dim}
    for i, m in enumerate(_random_students(cfg, head.dim, cfg.watermark.random_nulls)):
        null_models[f"random_{i}"] = m
    null_acc = {}
    for k, m in null_models.items():
        c, n = rotation_accuracy(_encoder_fn(m), head, images, seed=seed)
        null_acc[k] = c / n
    loo_fp = sum(null_pvalue(v, [w for j, w in null_acc.items() if j != k]) < cfg.watermark.alpha
                 for k, v in null_acc.items()) if len(null_acc) >= 3 else None
    victim_c, victim_n = rotation_accuracy(load_victim_encoder(wm_ckpt), head, images, seed=seed)
    verdicts = {}
    for c in cells:
        if c["defense"] != WATERMARK:
            continue
        model = load_student(cfg.run_dir / WATERMARK / c["attack"] / "student.pt")
        verdicts[c["attack"]] = verify_watermark(_encoder_fn(model), head, images, null_accuracies=list(null_acc.values()),
                                                 alpha=cfg.watermark.alpha, seed=seed)
    return {"verdicts": verdicts, "null_accuracies": null_acc, "null_leave_one_out_false_positives": loo_fp,
            "victim_accuracy": victim_c / victim_n, "n": victim_n, "alpha": cfg.watermark.alpha}


# ----------------------------------------------------------------------------- outputs
def _f(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{100 * x:.1f}" if pct else (f"{x:.3g}" if abs(x) < 0.01 and x != 0 else f"{x:.3f}")
    return str(x)


def write_outputs(cfg: DefenseTableConfig, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
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
    from eval.report import save_figure

    save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------- the table
def run_table(cfg: DefenseTableConfig, acc: Any) -> list[dict[str, Any]]:
    """Every (defense, attack) cell; returns the rows and writes the table files."""
    from victims.simsiam import load_victim_encoder

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
    from victims.defenses import build_defenses

    for row_name, chain in cfg.defenses.items():  # every chain is checked before anything is paid for
        build_defenses([{**d, **({"threshold": 0.5} if d.get("threshold") == "calibrate" else {}),
                         **({"center": None} if d.get("center") == "calibrate" else {})} for d in chain])
    encoder = load_victim_encoder(cfg.victim)
    threshold = None
    center: list[float] | None = None
    specs = {}
    for row, chain in cfg.defenses.items():
        specs[row] = []
        for spec in chain:
            spec = dict(spec)
            if spec["name"] == "similarity_noise" and spec.get("threshold") == "calibrate":
                if threshold is None:
                    c = cfg.calibration
                    threshold = calibrate_similarity_threshold(encoder, c.data, n=c.n, quantile=c.quantile,
                                                               channels=cfg.channels, image_size=cfg.image_size)
                spec["threshold"] = threshold
            if spec["name"] == "b4b" and spec.get("center") == "calibrate":
                if center is None:  # the defender's mean representation over its own data
                    from eval.features import extract_features

                    c = cfg.calibration
                    feats, _ = extract_features(encoder, c.data, channels=cfg.channels, image_size=cfg.image_size, limit=c.n)
                    center = feats.double().mean(dim=0).float().tolist()
                spec["center"] = center
            specs[row].append(spec)
    rows_spec: list[tuple[str, str, Any, list[dict[str, Any]]]] = [(r, cfg.victim, encoder, s) for r, s in specs.items()]
    if cfg.watermark.enabled:  # trained after the other rows are done (it is the slowest step)
        rows_spec.append((WATERMARK, cfg.watermark.victim, None, []))
    wm_ckpt = None
    rows: list[dict[str, Any]] = []
    honest: dict[str, dict[str, Any]] = {}
    for name, ckpt, enc, chain in rows_spec:
        if name == WATERMARK:
            wm_ckpt = ensure_watermarked_victim(cfg, acc)
            ckpt, enc = str(wm_ckpt), load_victim_encoder(wm_ckpt)
        row = _Row(cfg, name, ckpt, enc, chain)
        honest[name] = honest_utility(cfg, row, enc)
        for attack in cfg.attacks:
            cell = run_cell(cfg, row, attack, acc)
            rows.append({**cell, **honest[name]})
            print(json.dumps({k: cell[k] for k in ("defense", "attack", "queries_spent", "stolen_top1")}
                             | {"honest_top1": honest[name]["honest_top1"]}), flush=True)
    base = {r["attack"]: r["stolen_top1"] for r in rows if r["defense"] == "none"}
    for r in rows:
        r["stolen_drop"] = base[r["attack"]] - r["stolen_top1"] if r["attack"] in base else None
        r["utility_drop"] = honest["none"]["honest_top1"] - r["honest_top1"]
    extra: dict[str, Any] = {"similarity_threshold": threshold, "honest_none": honest["none"]["honest_top1"]}
    if wm_ckpt is not None:
        wmx = watermark_verdicts(cfg, wm_ckpt, rows)
        for r in rows:
            v = wmx["verdicts"].get(r["attack"]) if r["defense"] == WATERMARK else None
            if v:
                r.update(wm_accuracy=v["accuracy"], wm_p_binomial=v["p_binomial"], wm_p_null=v["p_null"],
                         wm_stolen=v["stolen"])
        extra["watermark"] = wmx
    sc = _steal_cfg(cfg, "none", "direct", [])
    victim_top1 = _victim_probe(cfg, encoder)
    rnd = [probe_student(cfg, m) for m in _random_students(cfg, encoder.out_dim, 2)]
    extra.update(victim_top1=victim_top1, random_top1=sum(rnd) / len(rnd), random_each=rnd,
                 seconds=time.time() - t0, student=to_dict(sc.student), epochs=sc.train.epochs)
    write_outputs(cfg, rows, extra)
    return rows


def _victim_probe(cfg: DefenseTableConfig, encoder: Any) -> float:
    from eval.features import extract_features
    from eval.probe import linear_probe

    p = cfg.probe
    kw = dict(channels=cfg.channels, image_size=cfg.image_size)
    xtr, ytr = extract_features(encoder, p.train, limit=p.n_train, **kw)
    xte, yte = extract_features(encoder, p.test, limit=p.n_test, **kw)
    return float(linear_probe(xtr, ytr, xte, yte, steps=p.steps, seed=cfg.seed)["top1"])


def run_seeds(cfg: DefenseTableConfig, acc: Any) -> list[dict[str, Any]]:
    """The table once per seed of ``cfg.seeds`` (``<name>/seed<S>``; finished cells reused), then the seed table
    ``<name>/defense_table_seeds.md`` (eval.report.defense_seed_table). Returns every cell row with its ``seed``."""
    import dataclasses

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
        if cfg.seeds:
            rows = run_seeds(cfg, acc)
        else:
            rows = run_table(cfg, acc)
    except (FileNotFoundError, ValueError, ImportError, ConfigError) as e:
        fail(str(e).splitlines()[0])
    except BudgetExceeded as e:
        fail(f"{e}; raise budget or lower the attack's queries")
    print(f"wrote {cfg.run_dir / 'defense_table.md'}, {cfg.run_dir / 'defense_table.csv'}, "
          f"{cfg.run_dir / 'utility_vs_stolen.png'}")
    return rows


if __name__ == "__main__":
    main()
