"""One classifier steal, every phase: the in-process defended victim, the attack, the clone's training.

``launch/steal_classifier.py`` parses the config and hands in the evaluation (``eval/``); a sweep
(``launch/classifier_sweep.py``) calls :func:`run_steal` once per row with the victim, pool and test
set built once.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from stealer.classifier.cache import PosteriorCache
from stealer.classifier.clone import build_clone, train_clone
from stealer.classifier.config import ClassifierStealConfig
from stealer.classifier.data_free import data_free
from stealer.classifier.knockoff import knockoff_adaptive, knockoff_random, load_pool
from stealer.config import to_dict
from stealer.data import ShardStream, open_shards

__all__ = ["build_posterior_api", "build_defense_chain", "load_images", "run_steal", "write_json"]


def load_images(path: str, *, channels: int, image_size: int, limit: int | None = None) -> Tensor:
    """The first ``limit`` images of a shard folder (uint8 [N, C, S, S]): the defender's fit data."""
    stream = ShardStream(open_shards(path), batch_size=512, shuffle=False, channels=channels, image_size=image_size,
                         limit=limit)
    return torch.cat([b["image"] for b in stream.iter_epoch(0)])


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
    from victims.defenses.posterior import build_posterior_defenses

    fit = load_images(cfg.victim.fit_data, channels=model.in_chans, image_size=model.image_size or 32,
                      limit=cfg.victim.fit_limit)
    return list(build_posterior_defenses([dict(d) for d in specs], model, device=device, fit_data=fit))


def _sum_over_ranks(acc: Any, value: int) -> int:
    if acc.num_processes == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=acc.device)
    return int(acc.reduce(t, reduction="sum").item())


def run_steal(cfg: ClassifierStealConfig, acc: Any, *, api: Any = None, pool: tuple | None = None,
              test_set: tuple | None = None, log: Callable[[str], None] | None = None,
              evaluate: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """All requested phases of one steal; returns what ``steal_classifier.json`` holds (rank 0).

    ``api``, ``pool`` (from :func:`load_pool`) and ``test_set`` (``(images, labels)`` or
    ``(images, labels, clean posteriors)``) let a sweep build them once for many steals.
    ``evaluate(cfg, api, clone, test_set=...) -> metrics`` runs the ``eval`` phase (the attacker's
    package does not measure itself: ``launch/steal_classifier.py`` hands in ``eval/``'s)."""
    if "eval" in cfg.phases and evaluate is None:
        raise ValueError("phases has eval but no evaluate function was given; drop eval from phases or pass evaluate=")
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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write (:func:`stealer.ckpt.atomic_write_json`)."""
    from stealer.ckpt import atomic_write_json

    atomic_write_json(path, obj)
