"""Train a classifier victim (supervised cross-entropy) on labelled shards.

Lives in the engine next to :mod:`stealer.pretrain` and reuses the stream (exact-once per
epoch, split by rank and worker), the augmentations, SGD + warmup/cosine schedule and the
atomic checkpoints, ``resume auto`` and preemption of :class:`stealer.engine.RunState`. Data-parallel under accelerate: the model and
optimizer are prepared, the stream is not (batches are moved to the device by hand). The
result is a self-describing :func:`victims.classifier.save_classifier` file,
``<out_dir>/<name>/classifier.pt``, with the test accuracy recorded when ``test_data`` is set.

    python launch/train_victim.py --task classify --config launch/configs/demo_classifier.yaml
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F

from stealer.augment import AugmentConfig, augment, batch_generator
from stealer.config import (HEADER_MAY_CHANGE, BackboneConfig, Fraction, Momentum, NonNegFloat, OptimRecipe, PositiveFloat,
                            PositiveInt, Range, ShardTrainHeader, own_default, setting, to_dict)
from stealer.data import ShardStream, open_shards
from stealer.engine import RunState
from stealer.optim import build_optimizer, build_schedule
from victims.atomic import atomic_write_json
from victims.classifier import build_classifier, save_classifier

__all__ = ["ClassifierModelConfig", "ClassifierTrainConfig", "train_classifier", "evaluate_classifier"]


@dataclass
class ClassifierModelConfig(BackboneConfig):
    """The classifier's backbone: the shared ``model.arch``/``width``/``stem`` keys."""


@dataclass
class ClassifierTrainConfig(ShardTrainHeader):
    """Supervised classifier victim training: the shared header and training shards
    (:class:`stealer.config.ShardTrainHeader`), the evaluation set, the model, the views and the SGD recipe."""

    name: str = own_default("name", "victim_clf")
    test_data: str = setting("", "optional labelled shards: accuracy recorded in the checkpoint and result.json")
    mean: Fraction = setting(0.5, "normalisation of images/255, stored in the checkpoint")
    std: PositiveFloat = setting(0.25, "normalisation of images/255, stored in the checkpoint")
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(scale_min=0.5, jitter_p=0.0))
    epochs: PositiveInt = setting(10, "passes over train_data")
    batch_size: PositiveInt = own_default("batch_size", 128, OptimRecipe)
    lr: PositiveFloat = setting(0.1, "base learning rate, scaled by global batch / 256; cosine decay")
    weight_decay: NonNegFloat = own_default("weight_decay", 5e-4, OptimRecipe)
    momentum: Momentum = own_default("momentum", 0.9, OptimRecipe)
    warmup_epochs: NonNegFloat = own_default("warmup_epochs", 0.5, OptimRecipe)
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] = setting(0.0, "label smoothing of the cross-entropy")


def _classes(shards: Any, where: str) -> list[str]:
    classes = shards.manifest.get("classes") or []
    if len(classes) < 2:
        raise ValueError(f"shard folder {where} records {len(classes)} classes in its manifest; a classifier needs "
                         f"labelled shards with >= 2 classes (make them with launch/make_shards.py)")
    return [str(c) for c in classes]


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, data: str, *, channels: int, image_size: int, device: Any,
                        batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` (uint8 in, logits out) on labelled shards."""
    stream = ShardStream(open_shards(data), batch_size=batch_size, shuffle=False, channels=channels, image_size=image_size)
    was = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    for batch in stream.iter_epoch(0):
        logits = model(batch["image"].to(device))
        y = batch["label"].to(device)
        correct += int((logits.argmax(dim=1) == y).sum())
        loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        total += int(y.numel())
    model.train(was)
    return {"accuracy": correct / max(total, 1), "loss": loss / max(total, 1), "samples": total}


# what may differ between a checkpoint's run and the run resuming it (bookkeeping, speed, evaluation)
RESUME_MAY_CHANGE = HEADER_MAY_CHANGE | {"epochs", "test_data"}


def train_classifier(cfg: ClassifierTrainConfig, accelerator: Any) -> Path:
    """Supervised training; returns the path of ``classifier.pt`` (written by rank 0)."""
    from tqdm.auto import tqdm

    acc = accelerator
    rank, world = acc.process_index, acc.num_processes
    run = cfg.run_dir
    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
    shards = open_shards(cfg.train_data)
    classes = _classes(shards, cfg.train_data)
    stream = ShardStream(shards, batch_size=cfg.batch_size, rank=rank, world=world, seed=cfg.seed, workers=cfg.workers,
                         channels=cfg.channels, image_size=cfg.image_size, drop_last=False)
    torch.manual_seed(cfg.seed)
    m = cfg.model
    model = build_classifier(m.arch, len(classes), cfg.channels, cfg.image_size, width=m.width, stem=m.stem,
                             mean=cfg.mean, std=cfg.std, classes=classes)
    lr = cfg.lr * cfg.batch_size * world / 256
    opt = build_optimizer("sgd", model, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    total = len(stream) * cfg.epochs
    sched = build_schedule(opt, total, int(cfg.warmup_epochs * len(stream)))
    state = RunState(acc, run / "ckpt", config=to_dict(cfg), may_change=RESUME_MAY_CHANGE, force=cfg.resume_force,
                     run_dir=run, steps_per_epoch=len(stream))
    state.track(model=model, optimizer=opt, scheduler=sched)
    epoch, start_batch, step = state.resume_at(cfg.resume, total)
    ddp, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(ddp)
    bar = tqdm(total=total, initial=step, disable=not acc.is_main_process, desc="classifier", dynamic_ncols=True)
    state.on_stop(bar.close)
    t0 = time.time()
    while epoch < cfg.epochs:
        ddp.train()
        for batch in stream.iter_epoch(epoch, start_batch):
            x = batch["image"].to(acc.device).float().div_(255.0)
            x = augment(x, batch_generator(cfg.seed, epoch, rank, batch["index"]), cfg.augment)
            y = batch["label"].to(acc.device)
            with acc.autocast():
                logits = ddp(x)  # float in [0, 1]: normalised inside the model
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if acc.is_main_process:
                    with open(run / "metrics.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, "epoch": epoch, "loss": loss.item(),
                                            "seconds": time.time() - t0}) + "\n")
            state.step_end(step, periodic=bool(cfg.ckpt_every and step % cfg.ckpt_every == 0),
                           where=f"classifier training preempted at step {step}/{total}", epoch=epoch,
                           batch=batch["index"] + 1)
        epoch, start_batch = epoch + 1, 0
    bar.close()
    state.close()
    state.save(step, epoch=epoch, batch=0)  # a rerun of a finished training trains nothing
    path = run / "classifier.pt"
    if acc.is_main_process:
        raw.eval()
        extra: dict[str, Any] = {"steps": step, "seconds": time.time() - t0, "world_size": world,
                                 "train_data": cfg.train_data}
        if cfg.test_data:
            extra["test"] = evaluate_classifier(raw, cfg.test_data, channels=cfg.channels, image_size=cfg.image_size,
                                                device=acc.device)
            extra["test"]["data"] = cfg.test_data
        save_classifier(raw, path, extra=extra)
        atomic_write_json(run / "result.json", extra, indent=2)
    acc.wait_for_everyone()
    return path
