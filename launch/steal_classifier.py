#!/usr/bin/env python
"""Steal a classifier from its posteriors: Knockoff (random/adaptive), DFME or MAZE, then evaluate.

    python launch/steal_classifier.py attack.name=knockoff_random budget=1000 defenses='[{name: mad, epsilon: 0.5}]'
    python launch/steal_classifier.py name=adaptive attack.name=knockoff_adaptive attack.actions=kmeans \
        attack.query_sets='[runs/demo/data/animal_mnist/query, runs/demo/data/digits/probe_train]'
    accelerate launch --config_file launch/accelerate/cpu-2proc.yaml launch/steal_classifier.py name=dfme \
        attack.name=dfme budget=20000 attack.df_batch_size=32

Defaults: the demo classifier victim (``runs/demo/victim_clf/classifier.pt``, from
``launch/train_victim.py --task classify --config launch/configs/demo_classifier.yaml``), the
animal_mnist query split as the transfer set, a width-16 ResNet-18 clone.

Phases: ``query`` (the attack; every image charged through the PosteriorAPI ledger, responses
cached under ``<run>/cache`` and never bought twice; data-free attacks train their clone here,
data-parallel), ``train`` (Knockoff: the clone on the cached posteriors, data-parallel), ``eval``
(rank 0: defender utility and clone accuracy/agreement on the labelled test split). Writes
``<out_dir>/<name>/steal_classifier.json`` and ``clone.pt`` (a ``victims.classifier`` checkpoint).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from launch.common import exit_preempted, fail, make_accelerator, parse_job_args  # noqa: E402
from stealer.classifier_attacks import (AttackConfig, CloneConfig, CloneTrainConfig, PosteriorCache,  # noqa: E402
                                        build_clone, data_free, knockoff_adaptive, knockoff_random, load_pool,
                                        train_clone, write_json)
from stealer.config import ConfigError, NonNegInt, PositiveInt, choice, save_config, to_dict  # noqa: E402

__all__ = ["ClassifierStealConfig", "VictimSection", "EvalSection", "build_posterior_api", "run_steal", "main"]


@dataclass
class VictimSection:
    checkpoint: str = "runs/demo/victim_clf/classifier.pt"  # a victims.classifier checkpoint (train_victim.py --task classify)
    user: str = "attacker"
    state_dir: str = ""  # where the victim keeps its ledger ('' = <run>/victim_state)
    top_k: PositiveInt | None = None  # the API returns only the top-k posteriors (renormalised)
    rounding: NonNegInt | None = None  # ... rounded to this many decimals
    fit_data: str = "runs/demo/data/animal_mnist/victim_train"  # the defender's images for defenses that fit a model
    fit_limit: PositiveInt = 2000


@dataclass
class EvalSection:
    test: str = "runs/demo/data/animal_mnist/probe_test"  # labelled test split
    limit: PositiveInt | None = 1000  # first N test images (None = all)
    user: str = "defender_eval"  # the defender's own evaluation queries are charged to this user


@dataclass
class ClassifierStealConfig:
    name: str = "steal_classifier"
    out_dir: str = "runs"
    seed: NonNegInt = 0
    cpu: bool = False
    phases: list[str] = field(default_factory=lambda: ["query", "train", "eval"])
    budget: PositiveInt = 1000  # images the victim may see for this attack (finite-difference probes included)
    attack: AttackConfig = field(default_factory=AttackConfig)
    victim: VictimSection = field(default_factory=VictimSection)
    defenses: list[Any] = field(default_factory=list)  # the defender's chain, e.g. [{name: mad, epsilon: 0.5}]
    clone: CloneConfig = field(default_factory=CloneConfig)
    train: CloneTrainConfig = field(default_factory=CloneTrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def validate(self) -> None:
        for p in self.phases:
            choice("phases", p, ["query", "train", "eval"])
        if self.budget < 1:
            raise ConfigError(f"budget={self.budget} must be >= 1 (images the victim may see)")
        for d in self.defenses:
            if not isinstance(d, dict) or "name" not in d:
                raise ConfigError(f"defenses entry {d!r} is not a mapping with a name (e.g. {{name: mad, epsilon: 0.5}})")


def build_posterior_api(cfg: ClassifierStealConfig, *, device: Any = "cpu", victim: Any = None,
                        defenses: list[Any] | None = None) -> Any:
    """The in-process defended victim: ``PosteriorAPI`` over the classifier, with a persistent ledger
    whose budget for ``victim.user`` is ``budget``. ``victim``/``defenses`` reuse already built ones."""
    from victims.classifier import load_classifier
    from victims.ledger import QueryLedger
    from victims.posterior_api import PosteriorAPI

    model = victim if victim is not None else load_classifier(cfg.victim.checkpoint)
    state = Path(cfg.victim.state_dir) if cfg.victim.state_dir else cfg.run_dir / "victim_state"
    state.mkdir(parents=True, exist_ok=True)
    ledger = QueryLedger(state / "ledger.sqlite")
    ledger.set_budget(cfg.victim.user, cfg.budget)
    if defenses is None:
        defenses = build_defense_chain(cfg, model, device=device)
    return PosteriorAPI(model, ledger, defenses=defenses, top_k=cfg.victim.top_k, rounding=cfg.victim.rounding,
                        device=device)


def build_defense_chain(cfg: ClassifierStealConfig, model: Any, *, device: Any = "cpu") -> list[Any]:
    """``victims.defenses.posterior.build_posterior_defenses`` on ``cfg.defenses``, fitted on the defender's data."""
    specs = [d for d in cfg.defenses if d.get("name") != "none"]
    if not specs:
        return []
    from eval.classifier_eval import load_labelled
    from victims.defenses.posterior import build_posterior_defenses

    fit, _ = load_labelled(cfg.victim.fit_data, channels=model.in_chans, image_size=model.image_size or 32,
                           limit=cfg.victim.fit_limit)
    return list(build_posterior_defenses([dict(d) for d in specs], model, device=device, fit_data=fit))


def _sum_over_ranks(acc: Any, value: int) -> int:
    if acc.num_processes == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=acc.device)
    return int(acc.reduce(t, reduction="sum").item())


def run_steal(cfg: ClassifierStealConfig, acc: Any, *, api: Any = None, pool: tuple | None = None,
              test_set: tuple | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """All requested phases of one steal; returns what ``steal_classifier.json`` holds (rank 0).

    ``api``, ``pool`` (from :func:`load_pool`) and ``test_set`` (``(images, labels)`` or
    ``(images, labels, clean posteriors)``) let a sweep build them once for many steals."""
    from victims.classifier import load_classifier, save_classifier

    rank, world, main_proc = acc.process_index, acc.num_processes, acc.is_main_process
    say = log or (lambda s: print(s, flush=True) if main_proc else None)
    run = cfg.run_dir
    if main_proc:
        run.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    api = api or build_posterior_api(cfg, device=acc.device)
    desc = api.describe()
    k, channels, size = int(desc["num_classes"]), int(desc["in_chans"]), int(desc["image_size"] or 32)
    user = cfg.victim.user
    out: dict[str, Any] = {"world_size": world, "attack": cfg.attack.name, "budget": cfg.budget,
                           "defenses": cfg.defenses, "victim": desc, "config": to_dict(cfg)}
    clone_path = run / "clone.pt"
    datafree = cfg.attack.name in ("dfme", "maze")
    if "query" in cfg.phases:
        t0 = time.time()
        meta = {"victim": desc, "victim_checkpoint": os.path.abspath(cfg.victim.checkpoint), "defenses": cfg.defenses,
                "user": user, "out_dim": k, "channels": channels, "image_size": [size, size],
                "classes": list(getattr(api.model, "classes", None) or [])}
        cache = PosteriorCache(run / "cache", meta, rank=rank)
        acc.wait_for_everyone()
        a = cfg.attack
        if datafree:
            clone, stats = data_free(api, cache, kind=a.name, budget=cfg.budget, user=user, cfg=a, clone_cfg=cfg.clone,
                                     num_classes=k, channels=channels, image_size=size, accelerator=acc, seed=cfg.seed,
                                     log=say, ckpt_dir=run / "ckpt_datafree", resume=cfg.train.resume,
                                     ckpt_every=cfg.train.ckpt_every, resume_force=cfg.train.resume_force)
            if main_proc:
                save_classifier(clone, clone_path, extra={"attack": a.name, "budget": cfg.budget})
        else:
            images, labels, _ = pool if pool is not None else load_pool(a.query_sets, channels=channels, image_size=size)
            if a.name == "knockoff_random":
                stats = knockoff_random(api, cache, images, budget=cfg.budget, user=user, batch_size=a.batch_size,
                                        seed=cfg.seed, rank=rank, world=world, labels=labels)
            else:  # the bandit is sequential: rank 0 queries, the others wait for the cache
                stats = {"spent": 0, "received": 0}
                if main_proc:
                    torch.manual_seed(cfg.seed)
                    online = build_clone(cfg.clone, k, channels, size).to(acc.device)
                    stats = knockoff_adaptive(api, cache, images, labels, budget=cfg.budget, user=user, cfg=a,
                                              clone=online, seed=cfg.seed)
        acc.wait_for_everyone()
        stats["spent"] = _sum_over_ranks(acc, cache.spent)
        stats["received"] = _sum_over_ranks(acc, cache.received)
        stats["recovered"] = _sum_over_ranks(acc, cache.recovered)  # paid by a killed run, read back, not bought again
        if main_proc:
            manifest = cache.finalize(source=f"posteriors of {desc['arch']} ({a.name})")
            stats["cached"] = manifest["num_samples"]
        stats["ledger_spent"] = int(api.ledger.spent(user))
        stats["seconds"] = time.time() - t0
        out["query"] = stats
        say(f"query phase: {stats['spent']} images bought this run ({stats['recovered']} paid by a killed run read back), "
            f"ledger total {stats['ledger_spent']} "
            f"({stats['seconds']:.0f}s)")
        acc.wait_for_everyone()
    if "train" in cfg.phases and not datafree:
        clone, tstats = train_clone(run / "cache", clone_cfg=cfg.clone, cfg=cfg.train, accelerator=acc, channels=channels,
                                    image_size=size, seed=cfg.seed, log=say, ckpt_dir=run / "ckpt_clone")
        if main_proc:
            save_classifier(clone, clone_path, extra={"attack": cfg.attack.name, "budget": cfg.budget})
        out["train"] = tstats
        acc.wait_for_everyone()
    if "eval" in cfg.phases:
        if main_proc:
            out["eval"] = evaluate(cfg, api, load_classifier(clone_path), test_set=test_set)
            say("eval: " + ", ".join(f"{key} {out['eval'][key]:.4f}" for key in
                                     ("victim_acc", "defended_acc", "clone_acc", "agreement", "l1_mean")))
        acc.wait_for_everyone()
    if main_proc:
        write_json(run / "steal_classifier.json", out)
    return out


def evaluate(cfg: ClassifierStealConfig, api: Any, clone: Any, *, test_set: tuple | None = None) -> dict[str, Any]:
    """Defender utility (the API's own answers, charged to ``eval.user``) and clone accuracy/agreement."""
    from eval.classifier_eval import clone_metrics, defender_utility, load_labelled, predict

    model = api.model
    if test_set is None:
        test_set = load_labelled(cfg.eval.test, channels=model.in_chans, image_size=model.image_size or 32,
                                 limit=cfg.eval.limit)
    x, y = test_set[0], test_set[1]
    dev = api.device
    clean = test_set[2] if len(test_set) > 2 else predict(lambda b: torch.softmax(model(b.to(dev)).float(), dim=1), x)
    defended = predict(lambda b: api.query(b, cfg.eval.user), x)
    clone = clone.to(dev).eval()
    logits = predict(lambda b: clone(b.to(dev)), x)
    return {**defender_utility(clean, defended, y), **clone_metrics(logits, clean, y), "test_images": int(len(y))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cfg = parse_job_args(ClassifierStealConfig, __doc__, argv)
    acc = make_accelerator(cfg.cpu)
    if acc.is_main_process:
        save_config(cfg, cfg.run_dir / "config.yaml")
    from stealer.preempt import Preempted

    try:
        out = run_steal(cfg, acc)
    except Preempted as e:  # checkpointed; a requeued or rerun job resumes (train.resume=auto)
        exit_preempted(acc, e)
    except (FileNotFoundError, ValueError, ImportError) as e:
        fail(str(e).splitlines()[0])
    except RuntimeError as e:
        if type(e).__name__ == "BudgetExceeded":
            fail(f"{e}; every posterior paid for so far is kept in {cfg.run_dir / 'cache'}; raise budget and rerun")
        raise
    if acc.is_main_process:
        print(json.dumps(out, indent=1, default=str))
    acc.end_training()
    return out


if __name__ == "__main__":
    main()
