"""The clone: its architecture, and its training on the cached ``(image, posterior)`` pairs
(Knockoff's soft cross-entropy, data-parallel, preemptible)."""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import torch
from torch import nn

from stealer.augment import AugmentConfig, augment, batch_generator
from stealer.classifier.config import CLONE_MAY_CHANGE, START_OVER, CloneConfig, CloneTrainConfig
from stealer.classifier.losses import soft_cross_entropy
from stealer.data import ShardStream, open_shards

__all__ = ["CLONE_AUGMENT", "build_clone", "train_clone"]

CLONE_AUGMENT = AugmentConfig(scale_min=0.7, flip=True, brightness=0.2, contrast=0.2, jitter_p=0.5)


def build_clone(cfg: CloneConfig, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """A fresh clone: ``victims.classifier.ClassifierVictim`` (uint8 or [0,1] float in, logits out)."""
    from victims.classifier import build_classifier

    timm = cfg.arch.startswith("timm:")
    return build_classifier(cfg.arch, num_classes, in_chans, image_size, width=None if timm else cfg.width,
                            stem=None if timm else cfg.stem)


def train_clone(cache_dir: str | os.PathLike, *, clone_cfg: CloneConfig, cfg: CloneTrainConfig, accelerator: Any,
                channels: int, image_size: int, seed: int = 0, init: nn.Module | None = None,
                log: Callable[[str], None] | None = None,
                ckpt_dir: str | os.PathLike | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train a clone on the cached ``(image, posterior)`` pairs with the soft cross-entropy, data-parallel
    (every rank reads its share of the cache shards; DDP averages gradients). ``init`` warm-starts it.

    With ``ckpt_dir`` the training is preemptible like the encoder steal: a checkpoint (clone,
    optimizer, schedule, position in the epoch, every rank's RNG) is written atomically at every
    epoch end, every ``cfg.ckpt_every`` steps, and when a preemption is requested (SIGUSR2/SIGTERM
    or the ``PREEMPT`` flag file next to ``ckpt_dir``), which then raises
    :class:`stealer.preempt.Preempted`. ``cfg.resume`` (``auto``) continues from the newest one;
    on the same number of processes the result equals an uninterrupted run bitwise. A checkpoint
    written with other clone/training settings or another cache is refused in one line.
    """
    from stealer.config import to_dict
    from stealer.engine import RunState
    from stealer.optim import build_optimizer, build_schedule

    acc = accelerator
    rank, world = acc.process_index, acc.num_processes
    shards = open_shards(cache_dir)
    k = int((shards.manifest.get("responses") or {}).get("dim") or 0)
    if k < 2:
        raise ValueError(f"response cache {cache_dir} does not record the number of classes; rerun the query phase")
    stream = ShardStream(shards, batch_size=cfg.batch_size, rank=rank, world=world, seed=seed, shuffle=True,
                         channels=channels, image_size=image_size)
    per_epoch = len(stream)
    steps = per_epoch * cfg.epochs
    torch.manual_seed(seed)
    clone = build_clone(clone_cfg, k, channels, image_size)
    if init is not None:
        clone.load_state_dict(init.state_dict())
    opt = build_optimizer(cfg.optimizer, clone, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    sched = build_schedule(opt, steps, int(round(cfg.warmup_epochs * per_epoch)))
    settings = {"clone": to_dict(clone_cfg), "train": to_dict(cfg), "seed": seed, "cache_samples": shards.num_samples,
                "warm_start": init is not None}
    state = RunState(acc, ckpt_dir, config=settings, may_change=CLONE_MAY_CHANGE, force=cfg.resume_force, what="clone",
                     start_over=START_OVER, rerun="rerun to resume (train.resume=auto)", steps_per_epoch=per_epoch)
    state.track(clone=clone, optimizer=opt, scheduler=sched)
    epoch, start_batch, step = state.resume_at(cfg.resume, steps, say=log or (lambda m: None), what="clone training ")
    model, opt = acc.prepare(clone, opt)
    raw = acc.unwrap_model(model)
    t0, last = time.time(), float("nan")
    model.train()
    try:
        while epoch < cfg.epochs:
            for batch in stream.iter_epoch(epoch, start_batch):
                x = batch["image"].to(acc.device).float().div_(255)
                if cfg.augment:
                    x = augment(x, batch_generator(seed, epoch, rank, batch["index"]), CLONE_AUGMENT)
                loss = soft_cross_entropy(model(x), batch["response"].to(acc.device))
                opt.zero_grad(set_to_none=True)
                acc.backward(loss)
                opt.step()
                sched.step()
                step += 1
                last = float(loss.detach())
                state.step_end(step, periodic=cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0,
                               where=f"clone training preempted at step {step}/{steps}", epoch=epoch,
                               batch=batch["index"] + 1)
            epoch, start_batch = epoch + 1, 0
            if epoch < cfg.epochs and state.last_saved_step != step:
                state.save(step, epoch=epoch, batch=0)
            if log is not None:
                log(f"clone epoch {epoch}/{cfg.epochs}: loss {last:.4f} ({time.time() - t0:.0f}s)")
    finally:
        state.close()
    state.save(step, epoch=epoch, batch=0)
    acc.wait_for_everyone()
    return raw.eval(), {"steps": step, "samples": stream.samples_per_epoch, "final_loss": last,
                        "seconds": time.time() - t0}
