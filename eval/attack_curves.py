"""Accuracy vs. victim queries for every attack: one command, resumable.

    python launch/attack_curves.py --config launch/configs/curves_demo.yaml
    python launch/attack_curves.py --config launch/configs/curves_demo.yaml budgets=[500,3000] train_steps=100

For each attack row x each query budget B (ICML'22, Dziedzic et al., Fig. 3 / Table 3: stolen
accuracy against the number of queries): ``launch/steal.py`` in its own run
``<out>/runs/<name>_<row>_q<B>`` with ``victim.budget=B`` and ``B // (queries per image)`` query
images (an attack that queries V views of an image pays V per image), taken from the row's query
set (the first images of a source, or a ``random`` / ``class_balanced`` / ``coverage`` subset cut
by stealer/query_select.py); then ``launch/probe.py`` on every finished stolen encoder (with the
victim, for fidelity, and once the random-init reference); then the report through eval/curves.py:
``<out>/results.jsonl`` (one record per row x downstream set x probe), ``curves.md`` + ``curves.csv``
(a table per set and probe, the victim and random init as reference rows), a PNG per (set, probe)
with a line per attack, and one PNG per attack (``per_attack_probes``).

Rows are the ``attacks`` list (each a name and ``key=value`` overrides for launch/steal.py), plus,
with ``registry: true``, a row for every attack of ``stealer.attacks.ENCODER_ATTACKS`` that no row names.
Every row x budget is validated as a StealConfig and its inputs are checked (stealer/preflight.py)
before any work. A row whose steal finished (``student.pt`` + ``steal.json``) is not stolen again
and one that has its probe records (``curve_records.jsonl``) is not probed again; an unfinished steal
resumes from its checkpoints and its response cache, so no query is paid twice. ``train_steps``
sets each steal's epochs to ``ceil(steps / batches per epoch)``: the same optimisation effort at
every budget. ``<out>/run_summary.json`` records each row's status, seconds and CPU seconds.

Honest comparisons (issue 14):

* ``seeds: [0, 1, 2]`` runs every row x budget once per seed (``seed=S`` of the steal: student init, views,
  order; run ``<name>_<row>_q<B>_s<S>``, seed 0 keeps the unseeded name so earlier runs are reused). The
  report reads each cell as mean ± sample std over seeds and lists, per budget, the pairs of rows whose
  difference exceeds seed noise (eval.report.NOISE_RULE: |Δ mean| > 2 x pooled std).
* ``lr_grid: [..]`` on an attack row: before the reported steals, the row is stolen at ``select_budget``
  (default: the largest budget) and the first seed once per learning rate; each is probed on a
  validation folder carved from probe-train (the images after the probe's ``train_limit``,
  eval/validation.py; never the test split) and the best validation top-1 fixes ``train.lr`` for every
  budget and seed of the row (``<out>/lr_choice.json``; the chosen run is reused as that cell).
* ``controls: true`` adds ``<row>+random_teacher`` beside every row whose student sees augmented views
  (every attack but plain ``direct``): the same steal, lr and budgets against a random-init victim of the
  victim's architecture (``victim.random_init=true``). ``victim_random: true`` adds the random-init copy of
  the victim's own architecture as a reference row of every probe table (the probe's ``control_teacher``).
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eval.curves import CurveTable, _slug, load_records, plot_table, write_curves
from eval.run import ProbeConfig
from stealer.config import (
    ConfigError, Fraction, NonNegInt, PositiveInt, apply_overrides, choice, load_config, read_yaml_mapping
)
from stealer.preflight import check_checkpoint, check_inputs, check_probe_inputs, check_shards
from stealer.steal import StealConfig

REPO = Path(__file__).resolve().parents[1]  # the children are REPO/launch/steal.py and REPO/launch/probe.py

__all__ = ["CurvesConfig", "QuerySpec", "AttackRow", "Row", "plan_rows", "preflight", "prepare_queries", "probe_rows",
           "registered_attacks", "report", "run_curves", "select_lrs"]

PHOTO_SOURCE = "photo_patches"


@dataclass
class QuerySpec:
    """Where a row's query images come from and how they are chosen (stealer/query_select.py)."""

    source: str = ""  # a shard folder; '' = the steal config's data.query; photo_patches = grey crops of sklearn's photos
    strategy: str = "first"  # first (the first images of the source) | random | class_balanced | coverage
    features: str = "pixels"  # coverage: pixels | random_encoder
    centres: PositiveInt = 3  # coverage: k-means centres
    spread: Fraction = 1.0  # coverage: 0 narrow (nearest the centres) .. 1 broad (farthest-point sampling)
    size: PositiveInt = 3000  # photo_patches: images made

    def validate(self) -> None:
        choice("queries.strategy", self.strategy, ["first", "random", "class_balanced", "coverage"])
        choice("queries.features", self.features, ["pixels", "random_encoder"])
        if not 0.0 <= self.spread <= 1.0:
            raise ConfigError(f"queries.spread={self.spread} is not valid; it goes from 0 (narrow) to 1 (broad)")


@dataclass
class AttackRow:
    """One line of the plot: a label and the launch/steal.py overrides that make the attack."""

    name: str = ""
    args: list[str] = field(default_factory=list)  # e.g. [train.loss=mse] or [attack.name=rda, attack.k=2]
    queries: QuerySpec | None = None  # this row's query set (None = the config's queries)
    lr_grid: list[float] = field(default_factory=list)  # train.lr candidates chosen on the validation split ([] = none)

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", self.name or ""):
            raise ConfigError(f"attack row name {self.name!r} is not valid; use letters, digits, '_', '-', '.', '+'")
        for a in self.args:
            if "=" not in a:
                raise ConfigError(f"attack row '{self.name}': '{a}' is not key=value")
        if any(not isinstance(x, (int, float)) or x <= 0 for x in self.lr_grid) or len(set(self.lr_grid)) != len(self.lr_grid):
            raise ConfigError(f"attack row '{self.name}': lr_grid={self.lr_grid} must be distinct positive learning rates")


@dataclass
class CurvesConfig:
    name: str = "curves"
    out_dir: str = "runs/curves"
    seed: NonNegInt = 0
    seeds: list[NonNegInt] = field(default_factory=list)  # every row x budget once per seed ([] = [seed])
    controls: bool = False  # a random-teacher row beside every row whose student sees augmented views
    victim_random: bool = True  # the random-init copy of the victim's architecture as a probe reference row
    select_budget: PositiveInt | None = None  # lr_grid rows: the budget the lr is chosen at (None = the largest)
    n_val: PositiveInt = 500  # lr_grid rows: validation images carved from probe-train after its train_limit
    steal_config: str = "launch/configs/demo.yaml"  # every steal starts from it
    steal_args: list[str] = field(default_factory=list)  # key=value for every steal
    probe_config: str = "launch/configs/demo_probe.yaml"
    probe_args: list[str] = field(default_factory=list)  # key=value for every probe
    budgets: list[PositiveInt] = field(default_factory=lambda: [250, 500, 1000, 3000])  # victim queries per steal
    train_steps: PositiveInt | None = None  # optimisation steps per steal (None = the steal config's epochs)
    attacks: list[AttackRow] = field(default_factory=list)
    registry: bool = True  # add a row for every registered attack (stealer/attacks.py) no row names
    registry_args: Any = field(default_factory=dict)  # attack name -> extra key=value for its registry row
    queries: QuerySpec = field(default_factory=QuerySpec)
    data_root: str = "runs/demo/data"  # where photo_patches is made (<data_root>/photo_patches/query)
    random_seeds: PositiveInt = 3  # random-init reference encoders (mean reported)
    probe_chunk: PositiveInt = 8  # stolen encoders per probe process
    per_attack_probes: list[str] = field(default_factory=lambda: ["linear"])  # one PNG per attack for these
    launcher: list[str] = field(default_factory=list)  # command prefix for steal/probe ([] = this python)
    threads: PositiveInt | None = None  # OMP_NUM_THREADS of the children (None = inherited)
    title: str = ""

    @property
    def out(self) -> Path:
        return Path(self.out_dir) / self.name

    @property
    def seed_list(self) -> list[int]:
        return list(self.seeds) or [self.seed]

    def validate(self) -> None:
        if len(set(self.seeds)) != len(self.seeds) or any(x < 0 for x in self.seeds):
            raise ConfigError(f"seeds={self.seeds} must be distinct non-negative integers, e.g. [0, 1, 2]")
        if not self.budgets or any(b < 1 for b in self.budgets):
            raise ConfigError(f"budgets={self.budgets} is not valid; give positive query budgets, e.g. [250, 500, 1000, 3000]")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"budgets={self.budgets} repeats a budget")
        if self.train_steps is not None and self.train_steps < 1:
            raise ConfigError(f"train_steps={self.train_steps} is not valid; give a positive number or null")
        if not isinstance(self.registry_args, dict):
            raise ConfigError("registry_args must map an attack name to a list of key=value (e.g. {rda: [attack.k=2]})")
        names = [r.name for r in self.attacks]
        if len(set(names)) != len(names):
            raise ConfigError(f"attack row names repeat: {', '.join(names)}")


@dataclass
class Row:
    """One steal of the curves: a row at one budget."""

    label: str  # the attack row (a line of the plot)
    attack: str  # attack.name it runs
    budget: int
    images: int
    per_image: int
    tag: str  # run name and probe encoder name
    run_dir: Path
    spec: QuerySpec
    steal_argv: list[str]
    query_dir: str  # the folder data.query points at (made by prepare_queries when it is a selection)
    source: str
    seed: int = 0
    lr: float | None = None  # train.lr of an lr_grid row (None = the steal config's)
    control: bool = False  # the random-teacher control of row `base`
    base: str = ""  # the attack row this steal belongs to

    @property
    def done_steal(self) -> bool:
        return (self.run_dir / "student.pt").is_file() and (self.run_dir / "steal.json").is_file()

    @property
    def records_path(self) -> Path:
        return self.run_dir / "curve_records.jsonl"


def registered_attacks() -> list[str]:
    """Names in ``stealer.attacks.ENCODER_ATTACKS`` ([] where the engine has no attack registry)."""
    try:
        from stealer.attacks import ENCODER_ATTACKS
    except ImportError:
        return []
    return list(ENCODER_ATTACKS)


def _attack_of(args: list[str]) -> str:
    found = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0].strip() == "attack.name"]
    return found[-1] if found else "direct"


def _rows_spec(cfg: CurvesConfig) -> list[AttackRow]:
    rows = list(cfg.attacks)
    if cfg.registry:
        named = {_attack_of(cfg.steal_args + r.args) for r in rows}
        for name in registered_attacks():
            if name not in named:
                rows.append(AttackRow(name=name, args=[f"attack.name={name}"] + list(cfg.registry_args.get(name, []))))
    unknown = set(cfg.registry_args) - set(registered_attacks())
    if unknown:
        raise ConfigError(f"registry_args names unknown attacks {', '.join(sorted(unknown))}; registered: "
                          f"{', '.join(registered_attacks()) or 'none'}")
    if not rows:
        raise ConfigError("no attack rows: list some under attacks or set registry: true")
    return rows


def _source(cfg: CurvesConfig, spec: QuerySpec, base: StealConfig) -> str:
    if spec.source == PHOTO_SOURCE:
        return str(Path(cfg.data_root) / PHOTO_SOURCE / "query")
    return spec.source or base.data.query


def _selection_dir(cfg: CurvesConfig, spec: QuerySpec, source: str, images: int, seed: int) -> str:
    knobs = f"_{spec.features}_c{spec.centres}_s{spec.spread:g}" if spec.strategy == "coverage" else ""
    src = _slug(Path(source).parent.name + "-" + Path(source).name)
    return str(cfg.out / "queries" / f"{src}_{spec.strategy}{knobs}_n{images}_seed{seed}")


def _variants(cfg: CurvesConfig, ar: AttackRow) -> list[tuple[str, list[str], bool]]:
    """(label, extra args, is control) of a row: itself, and its random-teacher control when asked and relevant."""
    from eval.validation import sees_augmented_views

    out = [(ar.name, [], False)]
    if cfg.controls:
        base = load_config(StealConfig, cfg.steal_config or None, list(cfg.steal_args) + list(ar.args))
        if sees_augmented_views(getattr(getattr(base, "attack", None), "name", "direct"), base.train.augment):
            out.append((f"{ar.name}+random_teacher", ["victim.random_init=true"], True))
    return out


def plan_rows(cfg: CurvesConfig, lr_choice: dict[str, float] | None = None, *, select: bool = False) -> list[Row]:
    """Every attack row (and control) x budget x seed as a validated steal; ConfigError (one line, naming the row)
    otherwise. An ``lr_grid`` row runs at ``lr_choice[row]`` (its first candidate while unchosen). With
    ``select``: the lr-selection steals instead, every candidate of every ``lr_grid`` row at ``select_budget``
    and the first seed (no controls)."""
    out: list[Row] = []
    runs = cfg.out / "runs"
    for ar in _rows_spec(cfg):
        spec = ar.queries or cfg.queries
        if select:
            if not ar.lr_grid:
                continue
            cells = [(ar.name, [], False, lr, cfg.select_budget or max(cfg.budgets), cfg.seed_list[0]) for lr in ar.lr_grid]
        else:
            lr = (lr_choice or {}).get(ar.name, ar.lr_grid[0]) if ar.lr_grid else None
            cells = [(label, extra, ctl, lr, b, sd) for label, extra, ctl in _variants(cfg, ar)
                     for b in cfg.budgets for sd in cfg.seed_list]
        for label, extra, ctl, lr, b, sd in cells:
            tag = f"{cfg.name}_{label}" + (f"_lr{lr:g}" if lr is not None else "") + f"_q{b}" + (f"_s{sd}" if sd else "")
            where = f"attack row '{label}' at budget {b}" + (f", seed {sd}" if len(cfg.seed_list) > 1 else "")
            argv = ["--config", cfg.steal_config] if cfg.steal_config else []
            over = (list(cfg.steal_args) + list(ar.args) + extra + ([f"train.lr={lr}"] if lr is not None else [])
                    + [f"name={tag}", f"out_dir={runs}", f"seed={sd}"])
            try:
                base = load_config(StealConfig, cfg.steal_config or None, over)
                per_image = 1
                if hasattr(base, "attack"):  # an engine with attacks: V views per image cost V queries
                    from stealer.attacks import queries_per_image

                    per_image = queries_per_image(base.attack)
                images = b // per_image
                if images < 1:
                    raise ConfigError(f"budget {b} buys no image at {per_image} queries per image; raise the budget")
                source = _source(cfg, spec, base)
                qdir = source if spec.strategy == "first" else _selection_dir(cfg, spec, source, images, sd)
                over += [f"data.query={qdir}", f"query.num_queries={images}", f"victim.budget={b}"]
                if cfg.train_steps:
                    per_epoch = math.ceil(images / base.train.batch_size)
                    over.append(f"train.epochs={max(1, math.ceil(cfg.train_steps / per_epoch))}")
                load_config(StealConfig, cfg.steal_config or None, over)  # the final row validates too
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            out.append(Row(label=label, attack=_attack_of(over), budget=b, images=images, per_image=per_image,
                           tag=tag, run_dir=runs / tag, spec=spec, steal_argv=argv + over, query_dir=qdir, source=source,
                           seed=sd, lr=lr, control=ctl, base=ar.name))
    return out


def preflight(cfg: CurvesConfig, rows: list[Row], probe: ProbeConfig) -> None:
    """Check every input before the first steal: query sources, the victim, budgets, the probe sets."""
    sizes: dict[str, int] = {}
    for r in rows:
        made_here = r.spec.source == PHOTO_SOURCE  # photo_patches is made on first use
        if r.source not in sizes and not made_here:
            sizes[r.source] = check_shards(r.source, f"query source of attack row '{r.label}'")
        if not made_here and r.images > sizes[r.source]:
            raise ValueError(f"attack row '{r.label}' at budget {r.budget} needs {r.images} query images but "
                             f"{r.source} holds {sizes[r.source]}; lower the budget or use a larger query source")
        row = _row_cfg(cfg, r)
        if r.spec.strategy == "first" and not made_here:
            check_inputs(row)  # shards, victim checkpoint, budget >= images x queries per image
        elif not row.victim.url:
            check_checkpoint(row.victim.checkpoint, "victim.checkpoint")
    check_probe_inputs(probe)


def _row_cfg(cfg: CurvesConfig, r: Row) -> StealConfig:
    return load_config(StealConfig, cfg.steal_config or None, r.steal_argv[2:] if cfg.steal_config else r.steal_argv)


def prepare_queries(cfg: CurvesConfig, r: Row) -> None:
    """Make the row's query folder when it is photo patches or a selection (once; later rows reuse it)."""
    from stealer.query_select import select_queries, write_photo_patches

    if r.spec.source == PHOTO_SOURCE and not (Path(r.source) / "manifest.json").is_file():
        size = _row_cfg(cfg, r).data.image_size
        write_photo_patches(r.source, r.spec.size, size=size, seed=0)
    if r.spec.strategy != "first" and not (Path(r.query_dir) / "manifest.json").is_file():
        select_queries(r.source, r.query_dir, r.images, r.spec.strategy, r.seed,
                       r.spec.features if r.spec.strategy == "coverage" else None,
                       centres=r.spec.centres, spread=r.spec.spread)


def _cpu() -> float:
    """CPU seconds (user + system) of this process and its finished children."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _env(cfg: CurvesConfig) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    return env


def _child(cfg: CurvesConfig, script: str, argv: list[str], log: Path) -> tuple[float, float]:
    """Run launch/<script> with ``argv``; returns (wall seconds, CPU seconds). One-line error on failure."""
    cmd = (list(cfg.launcher) or [sys.executable]) + [str(REPO / "launch" / script)] + argv
    log.parent.mkdir(parents=True, exist_ok=True)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(cfg)).returncode
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        errs = [ln for ln in log.read_text().splitlines() if ln.startswith("error:")]
        raise RuntimeError(f"launch/{script} failed (exit {rc})" + (f": {errs[-1][7:]}" if errs else "") + f"; see {log}")
    return time.time() - t0, (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)


def _probe_config(cfg: CurvesConfig, extra: list[str]) -> ProbeConfig:
    """The probe config file + ``probe_args`` + ``extra``, validated (through a temporary YAML file)."""
    import tempfile

    data = apply_overrides(read_yaml_mapping(cfg.probe_config) if cfg.probe_config else {}, list(cfg.probe_args) + extra)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "probe.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(ProbeConfig, path)


def _probe_base(cfg: CurvesConfig, steal: StealConfig) -> list[str]:
    return [f"victim={steal.victim.checkpoint}", f"victim_representation={steal.victim.representation}",
            f"image_size={steal.data.image_size}", f"channels={steal.data.channels}", f"seed={cfg.seed}",
            "control_teacher=false"]


def probe_rows(cfg: CurvesConfig, rows: list[Row], steal: StealConfig, references: bool,
               sets: list[str] | None = None, records: str = "curve_records.jsonl") -> tuple[float, float]:
    """Probe ``rows`` (and the references when asked) in one launch/probe.py; write each row's records
    (``records`` in its run folder). ``sets`` replaces the probe's sets (the validation split)."""
    pdir = cfg.out / "probes"
    name = f"p{len(list(pdir.glob('p*.yaml'))):03d}"
    ctl = references and cfg.victim_random
    extra = _probe_base(cfg, steal) + [f"out_dir={pdir}", f"name={name}", f"random={'true' if references else 'false'}",
                                       f"random_seeds={cfg.random_seeds}", f"control_teacher={'true' if ctl else 'false'}"]
    pcfg = _probe_config(cfg, extra)
    if sets is not None:
        pcfg.sets = list(sets)
    pcfg.stolen = [f"{r.tag}={r.run_dir / 'student.pt'}" for r in rows]
    path = pdir / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    from stealer.config import save_config

    save_config(pcfg, path)
    wall, cpu = _child(cfg, "probe.py", ["--config", str(path)], pdir / f"{name}.log")
    _write_jsonl(pdir / f"{name}.cost.json", [{"seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}])
    lines = [json.loads(ln) for ln in (pdir / name / "results.jsonl").read_text().splitlines() if ln.strip()]
    for r in rows:
        steal_out = json.loads((r.run_dir / "steal.json").read_text())
        recs = [{**ln, "encoder": "stolen", "attack": r.label, "attack_name": r.attack, "queries": _spent(r, steal_out),
                 "budget": r.budget, "images": r.images, "queries_per_image": r.per_image,
                 "strategy": r.spec.strategy, "source": r.source, "query_set": r.query_dir, "seed": r.seed,
                 "lr": r.lr, "control": r.control, "run": str(r.run_dir)} for ln in lines if ln["encoder"] == r.tag]
        _write_jsonl(r.run_dir / records, recs)
    if references:  # the victim, each random-init student seed (random_<i>) and the random-init victim arch
        _write_jsonl(cfg.out / "references.jsonl",
                     [ln for ln in lines if ln["encoder"] in ("victim", "control_teacher")
                      or re.fullmatch(r"random_\d+", ln["encoder"])])
    return wall, cpu


def _spent(r: Row, steal_out: dict[str, Any]) -> int:
    spent = (steal_out.get("query") or {}).get("ledger_spent")
    if spent is None:
        raise RuntimeError(f"{r.run_dir / 'steal.json'} records no ledger spend (no query phase); keep phases=[query, train]")
    return int(spent)


def _write_jsonl(path: Path, recs: list[dict[str, Any]]) -> None:
    from victims.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(x) + "\n" for x in recs))


def report(cfg: CurvesConfig, rows: list[Row], summary: dict[str, Any]) -> dict[str, Any]:
    """results.jsonl + curves.md/.csv + the PNGs from every finished row's records and the references."""
    files = [r.records_path for r in rows if r.records_path.is_file()]
    if (cfg.out / "references.jsonl").is_file():
        files.append(cfg.out / "references.jsonl")
    raw = [json.loads(ln) for f in files for ln in f.read_text().splitlines() if ln.strip()]
    _write_jsonl(cfg.out / "results.jsonl", raw)
    records = load_records(cfg.out / "results.jsonl")
    title = cfg.title or f"{cfg.name}: stolen accuracy vs. victim queries"
    res = write_curves(records, cfg.out, title=title)
    pngs = []
    for t in res["tables"]:
        if t.probe not in cfg.per_attack_probes:
            continue
        for key, pts in t.lines.items():
            one = CurveTable(t.set, t.probe, lines={key: pts}, references=t.references)
            name = f"attack_{_slug(key[0])}_{_slug(t.set)}_{_slug(t.probe)}.png"
            pngs.append(plot_table(one, cfg.out / name, title=f"{key[0]}: {t.set} ({t.probe})").name)
    md = [res["markdown"].rstrip(), "", "## Per attack", ""] + [f"![{p}]({p})" for p in pngs]
    if (cfg.out / "lr_choice.json").is_file():
        md += ["", "## Learning rates chosen on the validation split", "",
               "Each lr_grid row was stolen once per candidate (budget and seed below) and probed on probe-train images "
               "after the probe's train_limit (never the test split); the best validation linear top-1 is used for every "
               "budget and seed of the row (and of its random-teacher control).", "",
               "| row | budget | seed | validation top-1 per lr | chosen |", "|---|---|---|---|---|"]
        for name, c in json.loads((cfg.out / "lr_choice.json").read_text()).items():
            cands = ", ".join(f"{x['lr']:g}: {x['top1']:.3f}" for x in c["candidates"])
            md.append(f"| {name} | {c['budget']} | {c['seed']} | {cands} | {c['chosen']:g} |")
    steps = f"{cfg.train_steps} optimisation steps per steal" if cfg.train_steps else "the steal config's epochs"
    costs = [json.loads(f.read_text()) for f in [r.run_dir / "curve_cost.json" for r in rows] +
             sorted((cfg.out / "probes").glob("p*.cost.json")) if f.is_file()]
    md += ["", "## Run", "",
           f"{len(rows)} steals ({len({r.label for r in rows})} attack rows x budgets {cfg.budgets} x seeds "
           f"{cfg.seed_list}), {steps}; "
           f"each steal's ledger charged exactly its budget (queries = images x queries per image).",
           f"This invocation: {summary['stolen']} steals and {summary['probed']} probe runs, "
           f"{summary['wall_seconds'] / 60:.1f} wall minutes, {summary['cpu_seconds'] / 60:.1f} CPU minutes "
           f"(user + system, this command and its children; the report itself not counted).",
           f"All steals and probes behind this report, over every invocation: "
           f"{sum(c['cpu_seconds'] for c in costs) / 60:.1f} CPU minutes, {sum(c['seconds'] for c in costs) / 60:.1f} "
           f"wall minutes ({len(costs)} child runs).", ""]
    (cfg.out / "curves.md").write_text("\n".join(md))
    return {**res, "attack_pngs": pngs}


def _steal_rows(cfg: CurvesConfig, rows: list[Row], status: dict[str, dict[str, Any]], log: Any) -> None:
    for i, r in enumerate(rows, 1):
        if r.tag in status:
            continue
        if r.done_steal:
            status[r.tag] = {"steal": "done before"}
            continue
        prepare_queries(cfg, r)
        wall, cpu = _child(cfg, "steal.py", r.steal_argv + ["--resume", "auto"], r.run_dir / "steal.log")
        spent = _spent(r, json.loads((r.run_dir / "steal.json").read_text()))
        if spent != r.images * r.per_image or spent > r.budget:
            raise RuntimeError(f"row {r.tag}: the ledger charged {spent} queries, expected {r.images * r.per_image} "
                               f"(budget {r.budget}); see {r.run_dir / 'steal.log'}")
        status[r.tag] = {"steal": "ran", "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "spent": spent}
        _write_jsonl(r.run_dir / "curve_cost.json", [{"seconds": round(wall, 1), "cpu_seconds": round(cpu, 1)}])
        log(f"[{i}/{len(rows)}] {r.label} q={r.budget} seed {r.seed}" + (f" lr {r.lr:g}" if r.lr is not None else "")
            + f": stole in {wall:.0f} s ({cpu:.0f} CPU s), ledger {spent}")


VAL_RECORDS = "val_records.jsonl"


def select_lrs(cfg: CurvesConfig, probe: ProbeConfig, steal0: StealConfig, status: dict[str, dict[str, Any]],
               log: Any) -> tuple[dict[str, float], int]:
    """Steal every lr candidate, probe it on the validation split carved from probe-train, choose per row.

    Returns ({row: chosen lr}, probe runs). ``<out>/lr_choice.json`` records the candidates' validation top-1."""
    from eval.run import parse_set, present_sets
    from eval.validation import carve_validation, choose_by_validation, write_json

    sel = plan_rows(cfg, select=True)
    if not sel:
        return {}, 0
    if not probe.train_limit:
        raise ConfigError("lr_grid needs the probe's train_limit (the few-label probe's images): the validation split "
                          "is carved from the probe-train images after them; set probe_args: [train_limit=500]")
    set_name, train_dir, _ = parse_set(present_sets(probe.sets)[0])
    val_dir = cfg.out / "validation" / f"{_slug(set_name)}_after{probe.train_limit}_n{cfg.n_val}"
    carve_validation(train_dir, val_dir, skip=probe.train_limit, n=cfg.n_val)
    _steal_rows(cfg, sel, status, log)
    todo = [r for r in sel if not (r.run_dir / VAL_RECORDS).is_file()]
    probed = 0
    for j in range(0, len(todo), cfg.probe_chunk):
        wall, _ = probe_rows(cfg, todo[j:j + cfg.probe_chunk], steal0, False, sets=[f"val:{train_dir}:{val_dir}"],
                             records=VAL_RECORDS)
        probed += 1
        log(f"probed {len(todo[j:j + cfg.probe_chunk])} lr candidates on the validation split in {wall:.0f} s")
    choice: dict[str, Any] = {}
    for base in dict.fromkeys(r.base for r in sel):
        recs = [{**rec, "lr": r.lr} for r in sel if r.base == base
                for rec in map(json.loads, (r.run_dir / VAL_RECORDS).read_text().splitlines())]
        choice[base] = {**choose_by_validation(recs, key="lr"), "budget": sel[0].budget, "seed": sel[0].seed,
                        "validation": str(val_dir), "probe_train_limit": probe.train_limit}
    write_json(cfg.out / "lr_choice.json", choice)
    return {k: float(v["chosen"]) for k, v in choice.items()}, probed


def run_curves(cfg: CurvesConfig, log: Any = print) -> dict[str, Any]:
    """Plan, check, steal, probe and report; returns the run summary (also ``<out>/run_summary.json``)."""
    t_start, cpu_start = time.time(), _cpu()
    rows = plan_rows(cfg)
    steal0 = _row_cfg(cfg, rows[0])
    probe = _probe_config(cfg, _probe_base(cfg, steal0))
    preflight(cfg, rows + plan_rows(cfg, select=True), probe)
    cfg.out.mkdir(parents=True, exist_ok=True)
    status: dict[str, dict[str, Any]] = {}
    lrs, probed = select_lrs(cfg, probe, steal0, status, log)
    rows = plan_rows(cfg, lrs)
    _steal_rows(cfg, rows, status, log)
    todo = [r for r in rows if not r.records_path.is_file()]
    refs = not (cfg.out / "references.jsonl").is_file()
    for j in range(0, max(len(todo), 1 if refs else 0), cfg.probe_chunk):
        chunk = todo[j:j + cfg.probe_chunk] or rows[:1]  # the references need a stolen encoder's architecture
        wall, cpu = probe_rows(cfg, chunk, steal0, refs)
        probed += 1
        refs = False
        for r in todo[j:j + cfg.probe_chunk]:
            status.setdefault(r.tag, {})["probe"] = "ran"
        log(f"probed {len(chunk)} encoders in {wall:.0f} s ({cpu:.0f} CPU s)")
    summary = {"rows": len(rows), "stolen": sum(1 for s in status.values() if s.get("steal") == "ran"),
               "probed": probed, "wall_seconds": round(time.time() - t_start, 1), "cpu_seconds": round(_cpu() - cpu_start, 1),
               "status": status}
    rep = report(cfg, rows, summary)
    summary["report"] = {"md": str(rep["paths"]["md"]), "csv": str(rep["paths"]["csv"]),
                         "png": [str(p) for p in rep["paths"]["png"]] + [str(cfg.out / p) for p in rep["attack_pngs"]]}
    _write_jsonl(cfg.out / "run_summary.json", [summary])
    return summary
