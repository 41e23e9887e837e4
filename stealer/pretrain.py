"""Train a SimSiam victim on shards (the seeds train their victims themselves).

Lives in the engine (it reuses the stream, augmentations, optimizer and checkpoints); the
result is written in the OFFICIAL facebookresearch/simsiam checkpoint format, so the victim
side loads it exactly as it would load the released ImageNet ResNet-50.

``watermark.enabled=true`` adds the watermark task of Dziedzic et al., ICML'22 (see
:mod:`victims.watermark`): every step also predicts the rotation (0/90/180/270 degrees) of a
batch of the watermark set from the victim's pooled backbone features (what the API serves),
``loss = simsiam + watermark.weight * cross_entropy``. The head is written to ``watermark.pt``
next to the official checkpoint (which stays loadable by the official code and ours). With the
default ``enabled=false`` nothing of this runs and training is bitwise what it was.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stealer.augment import AugmentConfig, augment, batch_generator, normalize
from stealer.config import (HEADER_MAY_CHANGE, BackboneConfig, Momentum, NonNegFloat, OptimRecipe, PositiveFloat, PositiveInt,
                            ShardTrainHeader, own_default, setting, to_dict)
from stealer.data import ShardStream, open_shards
from stealer.engine import RunState
from stealer.optim import build_optimizer, build_schedule
from victims.simsiam import SimSiam, save_simsiam_checkpoint, simsiam_loss
from victims.watermark import RotationHead, rotation_batch, save_watermark, watermark_path

__all__ = ["VictimTrainConfig", "train_simsiam_victim"]


@dataclass
class VictimModelConfig(BackboneConfig):
    dim: PositiveInt = setting(512, "projector output (2048 for the official ResNet-50)")
    pred_dim: PositiveInt = setting(128, "predictor bottleneck (512 officially)")


@dataclass
class WatermarkConfig:
    enabled: bool = setting(False, "train the rotation-prediction watermark task (ICML'22) alongside SimSiam")
    data: str = setting("", "shard folder of the watermark set ('' = the first `size` images of train_data)")
    size: PositiveInt = setting(512, "images in the watermark set")
    batch_size: PositiveInt = setting(32, "watermark images per step (x4 rotations), appended to the first view")
    weight: NonNegFloat = setting(1.0, "weight of the rotation loss")
    hidden: PositiveInt = setting(256, "hidden width of the rotation head")


@dataclass
class VictimTrainConfig(ShardTrainHeader):
    """SimSiam victim pre-training: the shared header and training shards (:class:`stealer.config.ShardTrainHeader`),
    the model, the watermark task, the views and the SGD recipe."""

    name: str = own_default("name", "victim")
    model: VictimModelConfig = field(default_factory=VictimModelConfig)
    watermark: WatermarkConfig = field(default_factory=WatermarkConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    epochs: PositiveInt = setting(40, "passes over train_data")
    batch_size: PositiveInt = own_default("batch_size", 256, OptimRecipe)
    lr: PositiveFloat = setting(0.05, "base learning rate, scaled by global batch / 256 (SimSiam); cosine decay")
    weight_decay: NonNegFloat = own_default("weight_decay", 1e-4, OptimRecipe)
    momentum: Momentum = own_default("momentum", 0.9, OptimRecipe)
    fix_pred_lr: bool = setting(True, "keep the predictor at the constant (batch-scaled) learning rate, no warmup or decay (the official recipe)")
    warmup_epochs: NonNegFloat = own_default("warmup_epochs", 0.0, OptimRecipe)


# what may differ between a checkpoint's run and the run resuming it (bookkeeping and speed)
RESUME_MAY_CHANGE = HEADER_MAY_CHANGE | {"epochs"}


def train_simsiam_victim(cfg: VictimTrainConfig, accelerator: Any) -> Path:
    """SimSiam pre-training; returns the path of ``checkpoint.pth.tar`` (official format)."""
    from tqdm.auto import tqdm

    acc = accelerator
    rank, world = acc.process_index, acc.num_processes
    run = cfg.run_dir
    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
    stream = ShardStream(open_shards(cfg.train_data), batch_size=cfg.batch_size, rank=rank, world=world, seed=cfg.seed,
                         workers=cfg.workers, channels=cfg.channels, image_size=cfg.image_size, drop_last=False)
    torch.manual_seed(cfg.seed)
    m = cfg.model
    model = SimSiam(m.arch, dim=m.dim, pred_dim=m.pred_dim, in_chans=cfg.channels, width=m.width, stem=m.stem)
    if world > 1 and acc.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SimSiam needs SyncBN across ranks
    elif world > 1 and acc.is_main_process:  # DDP refuses SyncBatchNorm on CPU modules
        print(f"note: BatchNorm statistics are per process on the CPU ({world} processes x batch {cfg.batch_size}); "
              f"SyncBatchNorm needs GPUs", flush=True)
    lr = cfg.lr * cfg.batch_size * world / 256
    opt = build_optimizer("sgd", model, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    if cfg.fix_pred_lr:  # the official recipe keeps the predictor at a constant lr
        opt.param_groups[:] = _split_predictor_groups(opt, {id(p) for p in model.predictor.parameters()})
    total = len(stream) * cfg.epochs
    sched = build_schedule(opt, total, int(cfg.warmup_epochs * len(stream)))
    mean, std = [0.5] * cfg.channels, [0.25] * cfg.channels
    wm = _Watermark(cfg, model.feature_dim, lr, total, len(stream), acc) if cfg.watermark.enabled else None
    state = RunState(acc, run / "ckpt", config=to_dict(cfg), may_change=RESUME_MAY_CHANGE, force=cfg.resume_force,
                     run_dir=run, steps_per_epoch=len(stream))
    state.track(model=model, optimizer=opt, scheduler=sched, **(wm.tracked() if wm is not None else {}))
    epoch, start_batch, step = state.resume_at(cfg.resume, total)
    ddp, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(ddp)
    if wm is not None:
        wm.attach(raw, acc)
    bar = tqdm(total=total, initial=step, disable=not acc.is_main_process, desc="victim", dynamic_ncols=True)
    state.on_stop(bar.close)
    t0 = time.time()
    while epoch < cfg.epochs:
        for batch in stream.iter_epoch(epoch, start_batch):
            x = batch["image"].to(acc.device).float().div_(255.0)
            g = batch_generator(cfg.seed, epoch, rank, batch["index"])
            x1 = normalize(augment(x, g, cfg.augment), mean, std)
            x2 = normalize(augment(x, g, cfg.augment), mean, std)
            if wm is None:
                with acc.autocast():
                    p1, p2, z1, z2 = ddp(x1, x2)
                loss = simsiam_loss(p1.float(), p2.float(), z1.float(), z2.float())
                opt.zero_grad(set_to_none=True)
                acc.backward(loss)
                opt.step()
                sched.step()
            else:
                loss = wm.step(ddp, opt, sched, x1, x2, normalize(wm.batch(epoch, rank, batch["index"]), mean, std))
            for grp in opt.param_groups:
                if grp.get("fix_lr"):
                    grp["lr"] = lr
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if acc.is_main_process:
                    with open(run / "metrics.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, "epoch": epoch, "loss": loss.item(), "seconds": time.time() - t0}) + "\n")
            state.step_end(step, periodic=bool(cfg.ckpt_every and step % cfg.ckpt_every == 0),
                           where=f"victim training preempted at step {step}/{total}", epoch=epoch, batch=batch["index"] + 1)
        epoch, start_batch = epoch + 1, 0
    bar.close()
    state.close()
    state.save(step, epoch=epoch, batch=0)  # a rerun of a finished training trains nothing
    path = run / "checkpoint.pth.tar"
    if acc.is_main_process:
        extra = {"arch": m.arch, "width": m.width, "stem": m.stem, "in_chans": cfg.channels,
                 "image_size": cfg.image_size, "mean": mean, "std": std, "dim": m.dim, "pred_dim": m.pred_dim,
                 "steps": step, "seconds": time.time() - t0}
        if wm is not None:
            extra["watermark"] = watermark_path(path).name
        save_simsiam_checkpoint(raw, path, epoch=epoch, arch=m.arch, optimizer=opt, extra=extra)
        if wm is not None:
            wm.save(path)
    acc.wait_for_everyone()
    return path


def _split_predictor_groups(opt: torch.optim.Optimizer, pred: set[int]) -> list[dict]:
    """Move predictor params into their own groups (flagged ``fix_lr``) keeping decay settings."""
    groups = []
    for g in opt.param_groups:
        own = [p for p in g["params"] if id(p) in pred]
        rest = [p for p in g["params"] if id(p) not in pred]
        for params, fix in ((rest, False), (own, True)):
            if params:
                ng = {k: v for k, v in g.items() if k != "params"}
                ng.update(params=params, fix_lr=fix)
                groups.append(ng)
    return groups


class _Watermark:
    """The watermark task's state: the set (in memory), the head, its optimizer and schedule."""

    def __init__(self, cfg: VictimTrainConfig, dim: int, lr: float, total: int, steps_per_epoch: int, acc: Any) -> None:
        w = cfg.watermark
        self.cfg, self.seed = w, cfg.seed
        self.source = w.data or cfg.train_data
        shards = open_shards(self.source)
        if shards.num_samples < w.size:
            raise ValueError(f"watermark.data {self.source} holds {shards.num_samples} images, fewer than "
                             f"watermark.size={w.size}; lower watermark.size or pass a larger set")
        stream = ShardStream(shards, batch_size=256, shuffle=False, channels=cfg.channels, image_size=cfg.image_size,
                             limit=w.size)
        self.images = torch.cat([b["image"] for b in stream.iter_epoch(0)])  # size x C x H x W, uint8
        self.head = RotationHead(dim, w.hidden)
        self.opt = build_optimizer("sgd", self.head, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        self.sched = build_schedule(self.opt, total, int(cfg.warmup_epochs * steps_per_epoch))
        self.feats: list[torch.Tensor] = []

    def attach(self, raw: torch.nn.Module, acc: Any) -> None:
        """Prepare the head; capture the pooled backbone features (the input of ``encoder.fc``)."""
        self.ddp_head, self.opt = acc.prepare(self.head, self.opt)
        self.acc = acc
        raw.encoder.fc.register_forward_pre_hook(lambda _m, args: self.feats.append(args[0]))

    def batch(self, epoch: int, rank: int, index: int) -> torch.Tensor:
        """This step's watermark images (float in [0, 1], all four rotations, on the device)."""
        g = batch_generator(self.seed, epoch, rank, index, 7)
        pick = torch.randint(0, len(self.images), (self.cfg.batch_size,), generator=g)
        x, self.labels = rotation_batch(self.images[pick])
        self.labels = self.labels.to(self.acc.device)
        return x.to(self.acc.device).float().div_(255.0)

    def step(self, ddp: Any, opt: Any, sched: Any, x1: torch.Tensor, x2: torch.Tensor, xw: torch.Tensor) -> torch.Tensor:
        n = x1.shape[0]
        self.feats.clear()
        with self.acc.autocast():
            p1, p2, z1, z2 = ddp(torch.cat([x1, xw]), x2)  # the watermark rows ride along the first view
            logits = self.ddp_head(self.feats[0][n:])
        loss = simsiam_loss(p1[:n].float(), p2.float(), z1[:n].float(), z2.float())
        loss_all = loss + self.cfg.weight * torch.nn.functional.cross_entropy(logits.float(), self.labels)
        opt.zero_grad(set_to_none=True)
        self.opt.zero_grad(set_to_none=True)
        self.acc.backward(loss_all)
        opt.step()
        self.opt.step()
        sched.step()
        self.sched.step()
        self.feats.clear()
        return loss

    def tracked(self) -> dict[str, Any]:
        """What a checkpoint holds of the task (the head, its optimizer and schedule), for :class:`RunState`."""
        return {"watermark_head": self.head, "watermark_optimizer": self.opt, "watermark_scheduler": self.sched}

    def save(self, checkpoint: Path) -> None:
        head = self.acc.unwrap_model(self.ddp_head)
        save_watermark(head, watermark_path(checkpoint), {"data": str(self.source), "size": self.cfg.size,
                                                          "hidden": self.cfg.hidden, "weight": self.cfg.weight})
