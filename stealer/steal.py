"""The steal: a query phase that pays for each image once, then a train phase on the cache.

``run_query_phase`` streams the attacker's query shards (split over ranks), skips every key the
response cache already holds, sends the rest to the victim (any object with
``query(uint8 images, user) -> reps`` and ``describe()``: the in-process ``VictimAPI`` or an
HTTP client) and writes responses back as shards. ``run_train_phase`` trains a
``StolenEncoder`` on those cached responses with a registered loss (InfoNCE negatives gathered
across ranks with gradient), LARS, warmup + cosine, under accelerate; it checkpoints
atomically every N steps and resumes exactly from ``resume=auto``.

``attack.name`` picks the attack (``stealer/attacks.py``: direct, head_recreation, stolenencoder,
contsteal, rda). Each declares how many victim queries it spends per image; the query phase sends
exactly those views, once, and records the declared spend next to the ledger's count in
``query_phase.json`` (and, through launch/steal.py, ``steal.json``).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Protocol

import numpy as np
import torch

from stealer.attacks import EncoderAttackConfig, StepContext, get_attack, steal_step
from stealer.cache import ResponseCache
from stealer.config import (BackboneConfig, Channels, ConfigError, Fraction, JobHeader, MixedPrecision, Momentum, NonNegFloat,
                            NonNegInt, OneOf, OptimRecipe, PositiveFloat, PositiveInt, ShardTrainHeader,
                            check_victim_preprocess, choice, own_default, save_config, setting, to_dict)
from stealer.data import ShardStream, open_shards
from stealer.engine import RunState
from stealer.jsonsafe import dumps as json_dumps
from stealer.losses import LOSSES, default_temperature, get_loss
from stealer.optim import OPTIMIZERS, build_optimizer, build_schedule
from stealer.preempt import Preempted, Preemption
from stealer.student import StolenEncoder, save_student
from victims.atomic import atomic_write_json
from victims.purchase import takes_key

__all__ = ["StealConfig", "EncoderAttackConfig", "run_query_phase", "run_train_phase", "train_stream", "steal_step", "QueryTarget"]

log = logging.getLogger(__name__)


class QueryTarget(Protocol):
    """What the attack needs from a victim transport."""

    def query(self, images: torch.Tensor, user: str) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class DataConfig:
    query: str = setting("runs/demo/data/animal_mnist/query", "shard folder of the attacker's query images")
    image_size: PositiveInt = own_default("image_size", 32, ShardTrainHeader)
    channels: Channels = own_default("channels", 1, ShardTrainHeader)
    workers: NonNegInt = own_default("workers", 0, ShardTrainHeader)
    shuffle_buffer: NonNegInt = setting(1000, "samples the train phase's stream shuffles among (0 or 1: none)")
    decode: Annotated[str, OneOf("cpu", "device")] = setting(
        "cpu", "where images are decoded: cpu (PIL, in the loader workers) or device (JPEGs by nvJPEG on the GPU, in "
               "batches; other formats by PIL in the main process; see stealer/device_decode.py)")

    def validate(self) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"data.channels={self.channels} is not valid; choose one of: 1, 3")
        choice("data.decode", self.decode, ["cpu", "device"])


@dataclass
class VictimConfig:
    checkpoint: str = setting("runs/demo/victim/checkpoint.pth.tar", "the victim's checkpoint (official SimSiam format)")
    arch: str = setting("", "the victim's backbone ('' = read from the checkpoint)")
    representation: Annotated[str, OneOf("backbone", "projector")] = setting(
        "backbone", "what the victim answers: backbone (pooled features, as ICML'22) or projector")
    user: str = setting("attacker", "the account the queries are charged to")
    budget: NonNegInt | None = setting(None, "queries this user may spend (None = unlimited)")
    state_dir: str = setting("", "where the victim keeps its ledger ('' = <run>/victim_state)")
    random_init: bool = setting(False, "the skeptic's control: a random-init victim of the same arch")
    defenses: list[Any] = setting(help="the defender's chain, e.g. [{name: noise, sigma: 0.1}] (see victims/defenses; "
                                       "in-process victim only)", factory=list)
    url: str = setting("", "query a victim server (launch/serve.py) over HTTP instead of in-process")
    api_key_file: str = setting("", "file holding the API key for url")
    max_retries: NonNegInt = setting(8, "HTTP retries (exponential backoff with jitter, honouring Retry-After)")
    precision: Annotated[str, OneOf("auto", "fp32", "bf16", "fp16")] = setting(
        "auto", "the in-process victim's forward: auto (bf16 on GPUs that have it, fp16 on others, fp32 on the CPU), "
                "fp32, bf16 or fp16")
    preprocess: str = setting(
        "auto", "how the victim reads images: auto (the checkpoint's own sslsteal record, else ImageNet's eval "
                "transform Resize 256 + CenterCrop 224 + ImageNet mean/std, said in one line) | imagenet = simsiam = "
                "mocov3 | simclr (Resize 256 + CenterCrop 256, unnormalised, as simclr-converter) | project (the "
                "record) | none (images / 255 as they come); see victims/preprocess.py. Over HTTP the server decides "
                "(launch/serve.py --preprocess); a declared choice must agree with it. The keys below override the preset")
    mean: list[float] | float | None = setting(None, "normalisation mean per channel, on images / 255 (None = the preset's)")
    std: list[float] | float | None = setting(None, "normalisation std per channel, on images / 255 (None = the preset's)")
    resize: NonNegInt | None = setting(None, "shorter side resized to this before the crop (0 = no resize; None = the preset's)")
    crop: NonNegInt | None = setting(None, "centre crop (0 = none; None = the preset's)")
    interpolation: str = setting("", "of the resize: bilinear | bicubic | nearest ('' = the preset's)")

    def validate(self) -> None:
        choice("victim.representation", self.representation, ["backbone", "projector"])
        check_victim_preprocess("victim.", self.preprocess, self.interpolation, self.mean, self.std)
        choice("victim.precision", self.precision, ["auto", "fp32", "bf16", "fp16"])
        if self.url and not self.api_key_file:
            raise ConfigError("victim.url is set but victim.api_key_file is not; create a key with python launch/serve.py add-user NAME")
        for d in self.defenses:
            if not isinstance(d, dict) or "name" not in d:
                raise ConfigError(f"victim.defenses entry {d!r} is not a mapping with a name (e.g. {{name: noise, sigma: 0.1}})")


@dataclass
class QueryConfig:
    num_queries: PositiveInt | None = setting(None, "query only the first N images of the query set (None = all)")
    batch_size: PositiveInt = setting(256, "images per victim query (per rank)")
    dtype: Annotated[str, OneOf("float32", "float16")] = setting("float32", "how responses are cached")

    def validate(self) -> None:
        choice("query.dtype", self.dtype, ["float32", "float16"])


@dataclass
class StudentConfig(BackboneConfig):
    """The student's backbone: the shared ``arch``/``width``/``stem`` keys (:class:`stealer.config.BackboneConfig`,
    with its defaults, ranges and help) under ``student.``."""

    SECTION: ClassVar[str] = "student"


@dataclass
class TrainConfig:
    loss: str = setting("infonce", "the training loss: a stealer.losses name (infonce, mse, cosine, softnn, ...)")
    temperature: PositiveFloat | None = setting(
        None, "None: the loss's own default (stealer.losses.default_temperature: softnn 100, soft_ce 1, every other loss 0.2)")
    loss_args: Any = setting(help="extra keyword arguments of the loss, e.g. {temperature: 100} for softnn", factory=dict)
    epochs: PositiveInt = setting(30, "passes over the cached responses")
    batch_size: PositiveInt = own_default("batch_size", 256, OptimRecipe)
    optimizer: str = setting("lars", "a stealer.optim name (lars, sgd, adamw, ...)")
    lr: PositiveFloat = setting(1.0, "peak learning rate (after warmup; cosine decay to final_lr_fraction of it)")
    weight_decay: NonNegFloat = own_default("weight_decay", 1e-6, OptimRecipe)
    momentum: Momentum = own_default("momentum", 0.9, OptimRecipe)
    warmup_epochs: NonNegFloat = own_default("warmup_epochs", 2.0, OptimRecipe)
    final_lr_fraction: Fraction = setting(0.0, "the cosine schedule ends at lr x this")
    augment: bool = setting(True, "augment the student's view of each query image")
    mixed_precision: MixedPrecision = own_default("mixed_precision", "auto")
    channels_last: bool = setting(False, "NHWC memory format for the student (faster convs on GPUs)")
    compile: bool = setting(False, "torch.compile the student")
    sync_bn: bool = setting(False, "BatchNorm statistics over the global batch (SyncBatchNorm) when several processes train")
    fused: Any = setting("auto", "the fused (single-kernel) step of sgd/adamw: auto (on a GPU) | true | false; lars has no fused form")
    drop_last: bool = setting(False, "drop each epoch's last, smaller batch")
    ckpt_every: PositiveInt = own_default("ckpt_every", 200)
    keep: NonNegInt = setting(2, "checkpoints kept (0 = all)")
    log_every: PositiveInt = own_default("log_every", 10)

    def __post_init__(self) -> None:
        if self.temperature is None and self.loss in LOSSES:
            self.temperature = default_temperature(self.loss)

    def validate(self) -> None:
        choice("train.loss", self.loss, LOSSES)
        if not isinstance(self.loss_args, dict):
            raise ConfigError(f"train.loss_args must be a mapping (e.g. {{lambd: 0.005}}), got {self.loss_args!r}")
        choice("train.optimizer", self.optimizer, OPTIMIZERS)
        choice("train.mixed_precision", self.mixed_precision, ["auto", "no", "bf16", "fp16"])
        if self.fused not in ("auto", True, False):
            raise ConfigError(f"train.fused={self.fused!r} is not valid; choose one of: auto, true, false")
        if self.fused is True and self.optimizer not in FUSED_OPTIMIZERS:
            raise ConfigError(f"train.fused=true needs train.optimizer in {', '.join(FUSED_OPTIMIZERS)} "
                              f"(got {self.optimizer}); use train.fused=auto or false")


@dataclass
class StealConfig(JobHeader):
    """The steal job: the shared header (``name``, ``out_dir``, ``seed``, ``cpu``: :class:`stealer.config.JobHeader`;
    ``resume``/``resume_force`` with :class:`stealer.config.RunHeader`'s help) and the steal's sections."""

    name: str = own_default("name", "steal")
    resume: str = own_default("resume", "auto")
    resume_force: bool = own_default("resume_force", False)
    phases: list[str] = setting(help="the phases to run: [query, train], [query] or [train]",
                                factory=lambda: ["query", "train"])
    data: DataConfig = field(default_factory=DataConfig)
    victim: VictimConfig = field(default_factory=VictimConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    attack: EncoderAttackConfig = field(default_factory=EncoderAttackConfig)

    def validate(self) -> None:
        if not self.phases:
            raise ConfigError("phases=[] runs nothing; set phases=[query,train], [query] or [train]")
        for p in self.phases:
            choice("phases", p, ["query", "train"])

FUSED_OPTIMIZERS = ("sgd", "adamw")  # torch's fused steps (CUDA, and CPU in recent releases)

# what may differ between a checkpoint's run and the run resuming it
RESUME_MAY_CHANGE = {"resume", "resume_force", "phases", "cpu", "out_dir", "train.epochs", "train.ckpt_every", "train.keep",
                     "train.log_every", "data.workers", "victim.budget", "victim.state_dir", "query.batch_size",
                     "train.mixed_precision", "train.channels_last", "train.compile", "train.fused",  # speed
                     "victim.precision"}  # the response cache refuses answers of another precision


def _is_main(acc: Any) -> bool:
    return acc is None or acc.is_main_process


def run_query_phase(cfg: StealConfig, victim: QueryTarget, accelerator: Any = None) -> dict[str, Any]:
    """Query every not-yet-cached image of the query set once; returns counts and timing."""
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    attack = get_attack(cfg.attack.name)
    per_image = attack.queries_per_image(cfg.attack)
    run = cfg.run_dir
    cache = ResponseCache(run / "cache", rank=rank, dtype=cfg.query.dtype)
    shards = open_shards(cfg.data.query)
    desc, pre_record, decoder, served_preprocess = query_preprocessing(cfg, victim.describe(), _is_main(accelerator))
    meta = {"victim": desc, "victim_preprocess": pre_record,
            "victim_checkpoint": cfg.victim.url or os.path.abspath(cfg.victim.checkpoint),
            "random_init_victim": cfg.victim.random_init, "defenses": cfg.victim.defenses, "user": cfg.victim.user, "query_set": os.path.abspath(cfg.data.query),
            "out_dim": desc.get("out_dim"), "channels": cfg.data.channels, "image_size": [cfg.data.image_size] * 2,
            "classes": shards.manifest.get("classes", []), "image_ext": shards.manifest.get("image_ext", "png"),
            "views": attack.view_recipe(cfg.attack, cfg.seed),  # None (the raw image) leaves older caches valid
            # answers at another precision are other answers; fp32 (None) leaves older caches valid
            "victim_precision": None if getattr(victim, "precision", "fp32") == "fp32" else victim.precision,
            "decode": None if cfg.data.decode == "cpu" else cfg.data.decode}  # the pixels the victim saw
    cache.check_meta(meta)
    if _is_main(accelerator):
        cache.write_meta(meta)
    stream = ShardStream(shards, batch_size=cfg.query.batch_size, rank=rank, world=world, seed=cfg.seed, shuffle=False,
                         workers=cfg.data.workers, channels=cfg.data.channels, image_size=cfg.data.image_size,
                         limit=cfg.query.num_queries, keep_bytes=True,
                         decode_device=accelerator.device if cfg.data.decode == "device" else None, decoder=decoder)
    done = cache.done_keys()
    wanted = stream.samples_per_epoch
    user = cfg.victim.user
    # answers paid for by an earlier run that died before caching them: read back, never re-bought
    recovered = cache.recover_paid(victim, user, done, per_image, attack.raw)
    keyed = takes_key(victim)
    forget = getattr(victim, "forget", None)
    t0 = time.time()
    sent = corrupt = reused = 0
    # responses are written by a background thread so that the victim's forward is the only cost
    # on this path; at most two batches are in flight, and every one of them reaches disk before
    # this function returns or raises (a budget error included). A SIGKILL skips that: each batch
    # is therefore journaled (cache.intend) and bought under an idempotency key with which the
    # in-process victim keeps its answer, in the charge's own transaction, until it is cached.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
    pending: deque = deque()
    # a preemption warning (SIGUSR2/SIGTERM or the flag file) stops the phase between batches on
    # every rank: what was paid for is on disk (the finally below), a rerun sends only the rest
    preempt = Preemption(run, accelerator)
    preempt.clear_stale_flag()
    try:
        for batch in stream.iter_epoch(0):
            if preempt.should_stop():  # collective: every rank has the same number of batches
                while pending:
                    pending.popleft().result()
                total = _sum_over_ranks([sent], accelerator)[0]
                requeued = preempt.requeue()
                raise Preempted(f"preempted in the query phase after {total} queries (all ranks); every response paid "
                                f"for is cached in {run / 'cache'}" + ("; SLURM job requeued" if requeued else "; rerun with --resume auto"))
            corrupt += batch["corrupt"]
            todo = [i for i, k in enumerate(batch["key"]) if k not in done]
            if not todo:
                continue
            idx = torch.tensor(todo)
            keys = [batch["key"][i] for i in todo]
            resp: list[Any] = [recovered.pop(k, None) for k in keys]
            buy = [j for j, r in enumerate(resp) if r is None]
            reused += len(keys) - len(buy)
            paid_key = None
            if buy:
                buy_keys = [keys[j] for j in buy]
                images = attack.query_images(cfg.attack, batch["image"][idx[buy]], buy_keys, cfg.seed)  # V*n views, view-major
                if keyed:
                    paid_key = cache.batch_key(user, buy_keys)
                    cache.intend(paid_key, buy_keys)  # journaled before anything is paid
                    reps = victim.query(images, user, key=paid_key)  # charged with its answer kept, once per key
                else:
                    reps = victim.query(images, user)  # charged by the victim, per image sent
                if not attack.raw:  # every view of an image is cached with it: [n, V, D]
                    reps = reps.reshape(per_image, len(buy), -1).transpose(0, 1)
                sent += images.shape[0]
                for j, r in zip(buy, reps.detach().float().cpu().numpy()):
                    resp[j] = r
            pending.append(writer.submit(_cache_batch, cache, keys, [batch["bytes"][i] for i in todo],
                                         batch["label"][idx].tolist(), np.stack(resp),
                                         forget if paid_key else None, user, paid_key))
            while len(pending) > 2:
                pending.popleft().result()
    finally:
        while pending:
            pending.popleft().result()
        writer.shutdown()
        preempt.close()
    if accelerator is not None and world > 1:
        accelerator.wait_for_everyone()
    stats = _sum_over_ranks([sent, corrupt, reused], accelerator)
    out = {"queries_sent": stats[0], "corrupt_skipped": stats[1], "query_set_size": wanted,
           "seconds": time.time() - t0, "attack": attack.name, "queries_per_image": per_image,
           "victim_preprocess": served_preprocess,
           "answers_recovered": stats[2]}  # paid by a killed run, read back from the victim, not bought again
    if _is_main(accelerator):
        cache.settle_journal(victim, user)
        manifest = cache.finalize(source=f"responses of {desc.get('arch', 'victim')} to {cfg.data.query}")
        out["cached"] = manifest["num_samples"]
        out["declared_queries"] = per_image * manifest["num_samples"]  # what the attack says it spent
        out["ledger_spent"] = _ledger_spent(victim, cfg.victim.user)  # what the victim charged
        atomic_write_json(run / "query_phase.json", out)  # a kill mid-write never leaves a torn record
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return out


def _sum_over_ranks(values: list[int], accelerator: Any) -> list[int]:
    """Each value summed over all ranks (collective when there are several)."""
    t = torch.tensor(values, dtype=torch.long)
    if accelerator is not None and accelerator.num_processes > 1:
        t = accelerator.reduce(t.to(accelerator.device), reduction="sum").cpu()
    return [int(v) for v in t]


def _cache_batch(cache: ResponseCache, keys: list[str], images: list[tuple[str, bytes]], labels: list[int],
                 responses: np.ndarray, forget: Any, user: str, paid_key: str | None) -> None:
    """Write one answered batch to the cache, then let the victim drop the answer it kept for it."""
    cache.write_batch(keys, images, labels, responses)
    if forget is not None and paid_key is not None:
        forget(user, [paid_key])


def query_preprocessing(cfg: StealConfig, desc: dict[str, Any],
                        main: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None, Any, dict[str, Any] | None]:
    """What every query phase (:func:`run_query_phase`, the sybil phase of stealer/countermoves.py) decodes
    with and records, from the victim's ``describe()``: ``(desc without its preprocess, the cache's
    victim_preprocess record, the query stream's per-image decoder or None, the preprocessing it serves)``.

    The victim's preprocessing (its own declaration, in-process or over HTTP): the query images are decoded
    with its geometry, and the cache records it so that answers made under another one never mix in.
    data.decode=device is refused for a geometry, before any cache records anything.
    """
    pre_record, decoder = _victim_preprocessing(cfg, desc, main)
    if decoder is not None and cfg.data.decode == "device":
        raise ValueError(f"data.decode=device cannot give the victim its exact {desc['preprocess'].get('preset')} resize/crop "
                         f"(torchvision's, per image, on the CPU); set data.decode=cpu for the query phase")
    served = desc.get("preprocess") or None
    desc = {k: v for k, v in desc.items() if k != "preprocess"}  # recorded apart: older caches stay valid
    return desc, pre_record, decoder, served


def _victim_preprocessing(cfg: StealConfig, desc: dict[str, Any], main: bool = True) -> tuple[dict[str, Any] | None, Any]:
    """The victim's preprocessing record for the cache (None: the project's own, unchanged) and the
    per-image decoder of the query stream (None: the stream's decode at data.image_size).

    Over HTTP the server decides; victim.preprocess/mean/std/resize/crop/interpolation, when set, must
    agree with what it serves (one line naming both otherwise). The resolved choice is written into the
    run's config.yaml and query_phase.json.
    """
    from victims.preprocess import Preprocess, cache_record, resolve_preprocess

    rec = desc.get("preprocess")
    if not rec:  # a server that does not say: its images are decoded as the stream decodes them
        return None, None
    pre = Preprocess.from_record(rec)
    v = cfg.victim
    declared = v.preprocess != "auto" or any(x not in (None, "") for x in (v.mean, v.std, v.resize, v.crop, v.interpolation))
    if v.url and declared:
        record = ({"image_size": pre.image_size, "mean": list(pre.mean), "std": list(pre.std)}
                  if pre.preset == "project" else None)
        try:
            want = resolve_preprocess(v.preprocess, record, channels=len(pre.mean), source=f"the server at {v.url}",
                                      mean=v.mean, std=v.std, resize=v.resize, crop=v.crop,
                                      interpolation=v.interpolation or None, quiet=True)
            same = all(getattr(want, k) == getattr(pre, k) for k in ("resize", "crop", "interpolation")) and all(
                abs(a - b) < 1e-6 for k in ("mean", "std") for a, b in zip(getattr(want, k), getattr(pre, k)))
        except ValueError:
            want, same = None, False
        if not same:
            asked = want.describe() if want is not None else f"victim.preprocess={v.preprocess}"
            raise ValueError(f"victim.preprocess/mean/std/resize/crop ask for {asked} but the server at {v.url} serves "
                             f"{pre.describe()}; the server decides (launch/serve.py --preprocess ...): drop these keys "
                             f"or restart the server with them")
    if main and cfg.run_dir.joinpath("config.yaml").is_file():  # the run's resolved config says what the victim read
        resolved = dataclasses.replace(cfg, victim=dataclasses.replace(
            v, preprocess=pre.preset if pre.preset in ("project", "imagenet", "simsiam", "mocov3", "simclr", "none") else v.preprocess,
            mean=list(pre.mean), std=list(pre.std), resize=pre.resize or 0, crop=pre.crop or 0, interpolation=pre.interpolation))
        try:
            save_config(resolved, cfg.run_dir / "config.yaml")
        except OSError:
            pass
    return cache_record(rec), pre.decoder(cfg.data.channels)


def _ledger_spent(victim: Any, user: str) -> int | None:
    """What the victim has charged ``user``: its ledger in-process, its usage endpoint over HTTP."""
    if hasattr(victim, "ledger"):
        return int(victim.ledger.spent(user))
    if hasattr(victim, "usage"):
        return int(victim.usage()["spent"])
    return None


def _check_views(cfg: StealConfig, attack: Any, cache_dir: Path) -> None:
    """The cache must hold the views this attack trains on (same recipe, count and seed)."""
    path = cache_dir / "cache.json"
    recorded = json.loads(path.read_text()).get("views") if path.is_file() else None
    wanted = attack.view_recipe(cfg.attack, cfg.seed)
    if recorded != wanted:
        raise ValueError(f"response cache {cache_dir} holds views {recorded} but attack.name={attack.name} needs {wanted}; "
                         f"run its query phase under a new run name (name=...)")


def _view_text(view: Any) -> str:
    resize, crop, then = view.geometry()
    geo = " + ".join([f"Resize {resize}"] * (resize is not None) + [f"CenterCrop {crop}"] + [f"Resize {then}x{then}"] * (then is not None))
    return f"{geo} ({view.interpolation}), victim Resize {view.resize} + CenterCrop {view.crop}"


def train_stream(cfg: StealConfig, shards: Any, *, rank: int = 0, world: int = 1,
                 device: Any = None) -> tuple[ShardStream, Any]:
    """The train phase's stream over the response cache ``shards`` and the view it decodes (None: today's).

    The student is fed the field of view the victim answered about: the geometry the cache records
    (``cache.json``'s ``victim_preprocess``, so a train-only job reads it too) scaled to
    ``data.image_size`` (:class:`stealer.data.ViewDecode`; with ``data.image_size`` equal to the victim's
    crop, the very pixels the victim was fed). That decoded image is the un-augmented anchor every attack
    starts from; with ``train.augment`` (and the attacks' own augmentations) the augmented views are
    drawn from it too, i.e. from the victim's field of view -- the queried views of contsteal/rda/
    head_recreation (``keyed_views``) are made from that same image in the query phase. A cache recording
    no geometry (the project's own victims, ``none``, older caches) is decoded at ``data.image_size`` as before.
    """
    from stealer.data import view_decoder

    meta_path = Path(shards.root) / "cache.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    view = view_decoder(meta.get("victim_preprocess"), cfg.data.channels, cfg.data.image_size)
    on_device = cfg.data.decode == "device"
    if view is not None and on_device:
        raise ValueError(f"data.decode=device cannot decode the view the victim answered about (response cache {shards.root} "
                         f"records {_view_text(view)}: torchvision's, per image, on the CPU); set data.decode=cpu")
    stream = ShardStream(shards, batch_size=cfg.train.batch_size, rank=rank, world=world, seed=cfg.seed, shuffle=True,
                         workers=cfg.data.workers, shuffle_buffer=cfg.data.shuffle_buffer, channels=cfg.data.channels,
                         image_size=cfg.data.image_size, drop_last=cfg.train.drop_last,
                         pin_memory=device is not None and torch.device(device).type == "cuda",
                         decode_device=device if on_device else None, decoder=view)
    return stream, view


def run_train_phase(cfg: StealConfig, accelerator: Any) -> dict[str, Any]:
    """Train the stolen encoder on the cached responses; returns final metrics."""
    from tqdm.auto import tqdm

    acc = accelerator
    rank, world = acc.process_index, acc.num_processes
    run = cfg.run_dir
    attack = get_attack(cfg.attack.name)
    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
    shards = open_shards(run / "cache")
    _check_views(cfg, attack, run / "cache")
    out_dim = int(shards.manifest.get("responses", {}).get("dim") or 0)
    if out_dim <= 0:
        raise ValueError(f"response cache {run / 'cache'} does not record the response dim; rerun the query phase")
    stream, view = train_stream(cfg, shards, rank=rank, world=world, device=acc.device)
    steps_per_epoch = len(stream)
    extra_epochs = attack.extra_epochs(cfg)  # epochs before the student's (head_recreation: its head)
    torch.manual_seed(cfg.seed)
    student = StolenEncoder(cfg.student.arch, attack.student_out_dim(cfg, out_dim), in_chans=cfg.data.channels,
                            width=cfg.student.width, stem=cfg.student.stem, image_size=cfg.data.image_size)
    fused = cfg.train.optimizer in FUSED_OPTIMIZERS and (
        cfg.train.fused is True or (cfg.train.fused == "auto" and acc.device.type == "cuda"))
    opt = build_optimizer(cfg.train.optimizer, student, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                          momentum=cfg.train.momentum, **({"fused": True} if fused else {}))
    sched = build_schedule(opt, steps_per_epoch * cfg.train.epochs, int(round(cfg.train.warmup_epochs * steps_per_epoch)),
                           cfg.train.final_lr_fraction)
    loss_fn = get_loss(cfg.train.loss)
    extras = attack.setup(cfg, out_dim)

    epoch, start_batch, step = 0, 0, 0
    # the view of the cached images the student trains on is a setting like any other: a resume under another is refused
    state = RunState(acc, run / "ckpt", config={**to_dict(cfg), "train_view": view.record() if view else None},
                     may_change=RESUME_MAY_CHANGE, force=cfg.resume_force,
                     keep=cfg.train.keep, run_dir=run, steps_per_epoch=steps_per_epoch)
    state.track(student=student, optimizer=opt, scheduler=sched)
    found = state.resume(cfg.resume)
    if found is not None:
        path = state.resumed_from
        if view is not None and "train_view" not in found.get("config", {}):  # written before the view was recorded
            msg = (f"checkpoint {path} was trained on the full centre square of the cached images (written before the "
                   f"victim's view was used), this run trains on the victim's view ({_view_text(view)})")
            if not cfg.resume_force:
                raise ValueError(f"{msg}; use a new run name (name=...), resume=none to start over, or resume_force=true "
                                 f"to resume anyway")
            if _is_main(acc):
                print(f"warning: resume_force: {msg}", flush=True)
        if found.get("cache_samples", shards.num_samples) != shards.num_samples:
            raise ValueError(f"the response cache {run / 'cache'} changed since checkpoint {path} "
                             f"({found['cache_samples']} → {shards.num_samples} samples); use a new run name or resume=none")
        if extras:
            if "attack_state" not in found:
                raise ValueError(f"checkpoint {path} holds no {attack.name} state; use a new run name (name=...) or resume=none")
            attack.load_state_dict(extras, found["attack_state"])
            extra_epochs = found.get("extra_epochs", extra_epochs)  # a resume never re-plans the stages
        epoch, start_batch, step = found["epoch"], found["batch"], found["step"]
        if found.get("world_size", world) != world and _is_main(acc):
            print(f"warning: checkpoint {path} was written by {found['world_size']} processes, this run has {world}: "
                  f"epoch {epoch} is re-planned from batch {start_batch}, so it is not an exact continuation", flush=True)
        if _is_main(acc):
            print(f"resumed from {path} at epoch {epoch}, batch {start_batch} (step {step}/{steps_per_epoch * (extra_epochs + cfg.train.epochs)})", flush=True)
    if extras:
        extras["extra_epochs"] = extra_epochs
    epochs = extra_epochs + cfg.train.epochs
    total = steps_per_epoch * epochs
    if cfg.train.sync_bn and world > 1:  # converted before prepare (DDP), as the SimSiam trainer does
        if acc.device.type != "cuda":
            raise ValueError(f"train.sync_bn needs GPUs (DDP refuses SyncBatchNorm on {acc.device.type} modules); "
                             f"set train.sync_bn=false for {world} CPU processes")
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    if cfg.train.channels_last:
        student = student.to(memory_format=torch.channels_last)
    model, opt = acc.prepare(student, opt)  # never prepare the stream or the schedule (see data.py)
    raw = acc.unwrap_model(model)
    if cfg.train.compile:
        model = torch.compile(model)
    attack.prepare(extras, acc)
    ctx = StepContext(cfg, acc, model, raw, opt, sched, loss_fn, rank, extras)

    state.track(student=raw)  # saved from the prepared (maybe SyncBN-converted) module
    state.save_also(lambda: {"cache_samples": shards.num_samples,
                             **({"attack_state": attack.state_dict(extras), "extra_epochs": extra_epochs} if extras else {})})

    metrics_path = run / "metrics.jsonl"
    bar = tqdm(total=total, initial=step, disable=not acc.is_main_process, desc="steal", dynamic_ncols=True)
    state.on_stop(bar.close)
    t_start, seen, corrupt = time.time(), 0, 0
    last = {"loss": float("nan")}
    model.train()
    while epoch < epochs:
        for batch in stream.iter_epoch(epoch, start_batch):
            n = batch["image"].shape[0]
            if n == 0:
                raise RuntimeError(f"batch {batch['index']} of epoch {epoch} has no decodable image ({batch['corrupt']} corrupt); check the cache shards")
            corrupt += batch["corrupt"]
            loss = attack.step(ctx, batch, epoch)
            step += 1
            seen += n
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total:
                lv = acc.reduce(loss.detach(), reduction="mean").item()
                ips = seen * world / max(time.time() - t_start, 1e-9)
                last = {"step": step, "epoch": epoch, "loss": lv, "lr": sched.get_last_lr()[0], "img_per_s": ips}
                bar.set_postfix(loss=f"{lv:.4f}", ips=f"{ips:.0f}")
                if _is_main(acc):
                    with open(metrics_path, "a") as f:
                        f.write(json_dumps(last) + "\n")  # strict JSON: a diverged (NaN) loss is null
            state.step_end(step, periodic=cfg.train.ckpt_every > 0 and step % cfg.train.ckpt_every == 0,
                           where=f"preempted at step {step}/{total}", epoch=epoch, batch=batch["index"] + 1)
        epoch, start_batch = epoch + 1, 0
    bar.close()
    state.close()
    state.save(step, epoch=epoch, batch=0)
    if _is_main(acc):
        save_student(raw, run / "student.pt")
    acc.wait_for_everyone()
    return {"steps": step, "final_loss": last["loss"], "seconds": time.time() - t_start, "corrupt_skipped": corrupt,
            "samples": stream.samples_per_epoch, "attack": attack.name,
            "train_view": view.record() if view else None,  # the victim's view the student read (None: the full square)
            "queries_per_image": attack.queries_per_image(cfg.attack)}
