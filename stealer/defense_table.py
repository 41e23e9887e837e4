"""The defense x attack table's engine: its config, the defended rows and one (defense, attack) cell.

A row is the victim behind a chain of ``victims/defenses`` (or the watermarked victim) with its own
ledger and persisted defense state; a cell is one attack of :mod:`stealer.countermoves` against a row
at ``budget`` queries, the stolen encoder trained on its cached answers by the normal train phase and
scored by a probe that ``launch/defense_table.py`` hands in (``eval/defense_probe.py``): the attacker's
side never imports ``eval/``. Every query is charged by the row's ledger and cached; defense state is
saved after every query phase; a finished cell is a ``cell.json`` marker, so a rerun pays nothing twice.

The victim is loaded as the steal would load it (its ``victim.representation`` and preprocessing keys,
``victim.preprocess``/``mean``/``std``/``resize``/``crop``/``interpolation``, from ``steal_config`` and
``steal``), and every image the table itself sends or reads for the victim — the honest user's, the
calibration stream — is decoded as the steal's query phase decodes its own
(:func:`stealer.steal.query_preprocessing`): :func:`query_decoder`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from stealer.config import (
    Channels, ConfigError, Fraction, NonNegFloat, NonNegInt, PositiveInt, load_config, save_config
)
from victims.atomic import atomic_write, atomic_write_text
from victims.safe_load import load_untrusted

__all__ = ["DefenseTableConfig", "ProbeSet", "HonestConfig", "CalibrationConfig", "WatermarkTableConfig",
           "ProbeAttackConfig", "PROBE_ATTACKS", "WATERMARK", "DefenseRow", "steal_cfg", "load_table_victim",
           "query_decoder", "run_cell", "random_students", "ensure_watermarked_victim"]

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


# ----------------------------------------------------------------------------- the victim and its rows
def steal_cfg(cfg: DefenseTableConfig, row: str, attack: str, overrides: list[str], victim: str = "",
              chain: list[dict[str, Any]] | None = None) -> Any:
    """The StealConfig of one cell: ``steal_config`` + ``steal`` + the cell's own keys + ``overrides``."""
    from stealer.steal import StealConfig

    base = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in cfg.steal.items()]
    cell = [f"out_dir={cfg.run_dir / row}", f"name={attack}", f"seed={cfg.seed}", f"cpu={cfg.cpu}",
            f"victim.checkpoint={victim or cfg.victim}", f"victim.defenses={json.dumps(chain or [])}",
            f"victim.user=attacker-{attack}", f"victim.budget={cfg.budget}", "resume=auto",
            f"data.channels={cfg.channels}", f"data.image_size={cfg.image_size}"]
    return load_config(StealConfig, cfg.steal_config or None, base + cell + overrides)


def load_table_victim(cfg: DefenseTableConfig, checkpoint: str | Path) -> Any:
    """The victim encoder at ``checkpoint`` as every cell's steal would load it in-process
    (``launch.common.build_victim_api``): its ``victim.arch``, ``representation`` and preprocessing keys."""
    from victims.preprocess import preprocess_kwargs
    from victims.simsiam import load_victim_encoder

    v = steal_cfg(cfg, "none", "direct", []).victim
    return load_victim_encoder(checkpoint, arch=v.arch or None, representation=v.representation,
                               **preprocess_kwargs(v, "victim."))


def query_decoder(cfg: DefenseTableConfig, describe: dict[str, Any]) -> Any:
    """The per-image decoder the steal's query phase uses for a victim that ``describe()``s itself so
    (:func:`stealer.steal.query_preprocessing`; None = the stream's decode at ``image_size``)."""
    from stealer.steal import query_preprocessing

    return query_preprocessing(steal_cfg(cfg, "none", "direct", []), describe, main=False)[2]


class DefenseRow:
    """One defense row: the victim behind its defended API, a ledger, persisted defense state."""

    def __init__(self, cfg: DefenseTableConfig, name: str, checkpoint: str, encoder: Any,
                 specs: list[dict[str, Any]]) -> None:
        from victims.api import VictimAPI
        from victims.defenses import build_defenses
        from victims.ledger import QueryLedger

        self.name, self.checkpoint, self.specs, self.dir = name, checkpoint, specs, cfg.run_dir / name
        self.encoder = encoder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.defenses = build_defenses(specs)
        self.state_path = self.dir / "defense_state.pt"
        if self.state_path.is_file():
            for d, st in zip(self.defenses, load_untrusted(self.state_path, "defense state")):
                d.load_state_dict(st)  # type: ignore[attr-defined]
        self.api = VictimAPI(encoder, QueryLedger(self.dir / "ledger.sqlite"), defenses=self.defenses)
        self.decoder = query_decoder(cfg, self.api.describe())

    def save_state(self) -> None:
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

    def cached_query(self, user: str, images: torch.Tensor, root: Path, budget: int) -> torch.Tensor:
        """``user``'s defended answers to ``images``, paid once: kept in ``root/answers.pt``."""
        path = root / "answers.pt"
        if path.is_file():
            return load_untrusted(path, "cached answers")
        root.mkdir(parents=True, exist_ok=True)
        self.api.ledger.set_budget(user, budget)
        answers = torch.cat([self.api.query(images[i:i + 250], user) for i in range(0, len(images), 250)]).cpu()
        atomic_write(path, lambda f: torch.save(answers, f))
        self.save_state()
        return answers


# ----------------------------------------------------------------------------- one cell
def run_cell(cfg: DefenseTableConfig, row: DefenseRow, attack: str, acc: Any,
             probe: Callable[[Path], float]) -> dict[str, Any]:
    """Query (the attack), train the stolen encoder, score it with ``probe(student.pt)``; cached in
    ``<row>/<attack>/cell.json``."""
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
        sc = steal_cfg(cfg, row.name, attack, [f"query.num_queries={b}"], *ctx)
        row.api.ledger.set_budget(users[0], b)
        q = run_query_phase(sc, row.api)
    elif attack == "repeat_average":
        sc = steal_cfg(cfg, row.name, attack, [f"query.num_queries={b // a.repeats}"], *ctx)
        row.api.ledger.set_budget(users[0], b)
        q = run_query_phase(sc, RepeatAverage(row.api, a.repeats))
    elif attack == "coverage_control":
        from stealer.data import open_shards

        base = steal_cfg(cfg, row.name, attack, [], *ctx)
        n = max(1, min(b, round(a.coverage_fraction * open_shards(base.data.query).num_samples)))
        sel = coverage_controlled_queries(base, n, cfg.run_dir / "selections" / f"coverage_{n}_s{a.coverage_spread:g}",
                                          spread=a.coverage_spread)
        sc = steal_cfg(cfg, row.name, attack, [f"data.query={sel}", f"query.num_queries={n}"], *ctx)
        row.api.ledger.set_budget(users[0], b)
        q = run_query_phase(sc, row.api)
    else:  # sybils: n images so that S * overlap + (n - overlap) = budget
        n = b - (a.sybils - 1) * a.overlap
        sc = steal_cfg(cfg, row.name, attack, [f"query.num_queries={n}"], *ctx)
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
           "stolen_top1": probe(sc.run_dir / "student.pt"),
           "seconds_query": round(t1 - t0, 1), "seconds_train": round(time.time() - t1, 1)}
    if "map_residual" in q:
        out["sybil_map_residual"] = max(q["map_residual"].values()) if q["map_residual"] else None
    atomic_write_text(done, json.dumps(out, indent=1))  # the cell's done marker: never torn
    return out


def random_students(cfg: DefenseTableConfig, out_dim: int, k: int) -> list[Any]:
    """``k`` random-init encoders of the cells' student architecture (seeds ``seed + 9000 + i``): the
    probe's chance-level reference and the watermark test's null."""
    from stealer.student import StolenEncoder

    sc = steal_cfg(cfg, "none", "direct", [])
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
