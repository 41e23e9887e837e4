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

The steal itself is :func:`stealer.classifier.run_steal`; this script parses, hands in the evaluation
(``eval/classifier_eval``) and runs it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from launch.common import exit_preempted, fail, make_accelerator, parse_job_args  # noqa: E402
from stealer.classifier import ClassifierStealConfig, EvalSection, VictimSection, build_posterior_api  # noqa: E402,F401
from stealer.classifier import run_steal as _run_steal  # noqa: E402
from stealer.config import save_config  # noqa: E402
from victims.ledger import BudgetExceeded  # noqa: E402

__all__ = ["ClassifierStealConfig", "VictimSection", "EvalSection", "build_posterior_api", "run_steal", "evaluate", "main"]


def run_steal(cfg: ClassifierStealConfig, acc: Any, **kw: Any) -> dict[str, Any]:
    """:func:`stealer.classifier.run_steal` with this launcher's evaluation phase (:func:`evaluate`)."""
    return _run_steal(cfg, acc, evaluate=evaluate, **kw)


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
    except BudgetExceeded as e:
        fail(f"{e}; every posterior paid for so far is kept in {cfg.run_dir / 'cache'}; raise budget and rerun")
    if acc.is_main_process:
        print(json.dumps(out, indent=1, default=str))
    acc.end_training()
    return out


if __name__ == "__main__":
    main()
