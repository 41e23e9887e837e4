"""The attacks of the steal engine: what each one queries (and pays), and how it trains.

Every attack is an entry of ``ENCODER_ATTACKS`` (``attack.name`` in the config) and declares

* ``queries_per_image(a)`` -- victim queries it spends per query image, each one paid through
  the ledger once: the query phase sends that many views of every image in one batch and caches
  them together, so a cached image is never sent again (a rerun or resume pays nothing);
* ``view_recipe(a, seed)`` -- how those views are made: ``None`` for the raw image (direct
  extraction), else ``keyed_views(image, key, seed, view)``, a pure function of the image, its
  shard key, the run's seed and the view index, so the train phase rebuilds bitwise the images
  the victim saw, on any number of ranks. The recipe is recorded in the cache's ``cache.json``
  and a cache made with another recipe is refused;
* ``step(ctx, batch, epoch)`` -- one optimisation step on cached responses (no victim access:
  training is query-free for every attack, whatever the number of epochs).

Registered:

``direct``  (Dziedzic et al., "On the Difficulty of Defending Self-Supervised Learning against
    Model Extraction", ICML 2022, Algorithm 1; cleverhans-lab/ssl-attacks-defenses @1d3874ff
    ``simclr.py:SimCLR.steal``): one query per image (the raw image); the student matches the
    response with ``train.loss`` (``infonce`` is their NT-Xent). The engine's original path, bit
    for bit.
``head_recreation``  (same paper, Algorithm 2; followed ``stealhead.py`` of
    cleverhans-lab/ssl-attacks-defenses @1d3874ff): ``views`` (2) augmented views per image are queried
    (``victim.representation``, the backbone by default: 2 queries per image). A head
    ``g = Linear(D, D) -> ReLU -> Linear(D, head_dim)`` (their ``HeadSimCLR``, head_dim 128)
    is first trained on the cached responses alone with NT-Xent between the views (Adam, lr
    1e-3, wd 1e-4, temperature 0.07, ``2 x train.epochs`` epochs as their ``epochs * 2``);
    then the student (backbone + linear head to ``head_dim``) is trained on the very views the
    victim saw to match ``g(victim(view))`` with ``train.loss``. Departures: their stolen model
    has an MLP head (ours is linear, the engine's ``StolenEncoder``); their head learning rate
    follows a cosine that they step per epoch with ``T_max`` = batches per epoch (ours is
    constant); their stealing loop re-queries the victim every epoch (ours reuses the 2 paid
    views, which is what the pay-once rule demands).
``stolenencoder``  (Liu et al., "StolenEncoder: Stealing Pre-trained Encoders in
    Self-supervised Learning", CCS 2022; followed ``code/models/surrogate_model.py`` of
    liu00222/StolenEncoder @e2143164): each image is queried once, raw (the cache is interchangeable
    with ``direct``'s); the loss pulls the student's embedding of the image *and* of ``k``
    fresh augmentations of it toward the single response:
    ``mean_i ||s(x_i) - t_i|| + lam / k * sum_j mean_i ||s(A_j x_i) - t_i||`` on L2-normalised
    rows (their default distance ``l2``; ``lam`` = 9, ``k`` = 9 are their argparse defaults).
    Departures: they sum over the batch (we average: only the learning-rate scale differs) and
    forward the raw batch and each view separately (we forward them as one batch, one DDP
    forward per step); the paper does not fix the augmentations, their code uses flip + colour
    jitter + grayscale, we use the engine's crop/flip/jitter.
``contsteal``  (Sha et al., "Can't Steal? Cont-Steal! Contrastive Stealing Attacks Against
    Image Encoders", CVPR 2023; loss as reimplemented in ShuchiWu/RDA @42110d95 ``Con-Steal.py``):
    ``views`` (1) augmented views per image are queried once; each step pairs the student's
    embedding of a fresh augmentation of image i with one cached victim view of image i
    (positive) against the victim *and* student embeddings of the other images (negatives,
    gathered over ranks): ``-log(exp(s_i.t_i/T) / (sum_{j!=i} exp(s_i.t_j/T) + sum_{j!=i}
    exp(s_i.s_j/T)))``, T = 0.07. Underspecified: the paper re-queries the victim with new
    augmentations every epoch (unbounded cost); here the victim views are fixed and paid once,
    and the cached view a sample uses is drawn per step. Their reimplementation anchors the
    victim-negatives on the victim row; we anchor both negative sets on the student row.
``rda``  (Wu et al., "Refine, Discriminate and Align: Stealing Encoders via Sample-Wise
    Prototypes and Multi-Relational Extraction", ECCV 2024; followed ShuchiWu/RDA @f943f3f5 ``RDA.py``):
    ``views`` (10, their ``proto_patch``) augmented views of each image are queried once; the
    prototype of image i is the mean of its L2-normalised responses (not renormalised, as theirs).
    Training is query-free: ``k`` (5, their ``query_patch``) fresh augmentations per image per
    step, each normalised student row aligned to the prototype in angle and amplitude,
    ``-log((cos(s_i, p_i) + 1) / ||s_i - p_i||^2)`` (``beta`` = 1), plus the mismatch
    discrimination term of ``contsteal`` against the prototypes (``alpha`` = 1, T = 0.07),
    averaged over the k views. We add 1e-6 inside both logs (theirs has no guard).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stealer.augment import augment, batch_generator, keyed_views, normalize
from stealer.config import ConfigError, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, choice
from stealer.dist import gather_nograd, gather_sizes, gather_with_grad, is_distributed

__all__ = ["EncoderAttackConfig", "Attack", "ENCODER_ATTACKS", "get_attack", "queries_per_image", "StepContext", "steal_step",
           "stolenencoder_loss", "mismatch_nce", "contsteal_loss", "rda_loss", "ntxent", "VIEW_RECIPE"]

VIEW_RECIPE = "keyed-augment/1"  # stealer.augment.keyed_views with the default AugmentConfig


@dataclass
class EncoderAttackConfig:
    name: str = "direct"  # direct | head_recreation | stolenencoder | contsteal | rda
    views: PositiveInt | None = None  # victim-queried views per image, each one paid (None = the attack's paper default)
    k: PositiveInt | None = None  # fresh student augmentations per image per step (stolenencoder 9, rda 5; None = default)
    lam: NonNegFloat = 9.0  # stolenencoder: weight of the augmented views' term (their lambda_value)
    temperature: PositiveFloat = 0.07  # contsteal, rda and the head_recreation head's NT-Xent
    alpha: NonNegFloat = 1.0  # rda: weight of the mismatch-discrimination term
    beta: NonNegFloat = 1.0  # rda: weight of the amplitude + angle alignment term
    head_dim: PositiveInt = 128  # head_recreation: output size of the recreated head
    head_epochs: NonNegInt | None = None  # head_recreation: epochs training the head (None = 2 x train.epochs)
    head_lr: PositiveFloat = 1e-3  # head_recreation: Adam learning rate of the head (their --lrhead)
    head_weight_decay: NonNegFloat = 1e-4  # head_recreation: Adam weight decay of the head (their --wd)

    def validate(self) -> None:
        choice("attack.name", self.name, ENCODER_ATTACKS)
        attack = ENCODER_ATTACKS[self.name]
        if self.views is not None and self.views < 1:
            raise ConfigError(f"attack.views={self.views} is not valid; it must be >= 1 (or null for the default)")
        if attack.raw and self.views not in (None, 1):
            raise ConfigError(f"attack.views={self.views} is not valid for attack.name={self.name}: it queries each "
                              f"image once, raw; use attack.name=contsteal or rda for several views")
        if self.k is not None and self.k < attack.min_k:
            raise ConfigError(f"attack.k={self.k} is not valid for attack.name={self.name}; it must be >= {attack.min_k}")
        for key in ("temperature", "head_lr"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"attack.{key}={getattr(self, key)} is not valid; it must be > 0")
        if self.head_dim < 1 or (self.head_epochs is not None and self.head_epochs < 0):
            raise ConfigError("attack.head_dim must be >= 1 and attack.head_epochs >= 0 (or null)")


@dataclass
class StepContext:
    """What a training step may touch: the student (DDP-wrapped ``model`` and ``raw``), its
    optimiser and schedule, the loss of ``train.loss``, the accelerator, and the attack's extras."""

    cfg: Any  # StealConfig
    acc: Any
    model: nn.Module
    raw: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    loss_fn: Any
    rank: int
    extras: dict[str, Any] = field(default_factory=dict)


# -- the maths (pure functions, tested against hand-computed values) --------------------------------
def _dist(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise L2 distance with a finite gradient at 0."""
    return (a - b).pow(2).sum(-1).add(1e-12).sqrt()


def stolenencoder_loss(raw: Tensor, views: list[Tensor], target: Tensor, lam: float) -> Tensor:
    """StolenEncoder (Liu et al., CCS 2022), ``distance='l2'``, batch-averaged.

    ``mean_i d(s_i, t_i) + lam / k * sum_j mean_i d(v_ji, t_i)`` with ``d`` the L2 distance of
    L2-normalised rows, ``raw`` the student's rows of the queried images [N, D], ``views`` its
    rows of ``k`` augmentations of them, ``target`` the victim's responses [N, D] (detached).
    """
    t = F.normalize(target.detach(), dim=-1)
    loss = _dist(F.normalize(raw, dim=-1), t).mean()
    if views:
        loss = loss + lam / len(views) * sum(_dist(F.normalize(v, dim=-1), t).mean() for v in views)
    return loss


def mismatch_nce(s: Tensor, t: Tensor, *, temperature: float, gather: bool = False) -> Tensor:
    """Contrast of matched against mismatched pairs (Cont-Steal's loss; RDA's discrimination term).

    For prepared rows ``s`` (student, with gradient) and ``t`` (the victim side, detached):
    ``l_i = -log(exp(s_i.t_i/T) / (sum_{j!=i} exp(s_i.t_j/T) + sum_{j!=i} exp(s_i.s_j/T)))``,
    averaged over local rows; the positive is not in the denominator (as both public codes).
    With ``gather`` under torch.distributed the negatives come from every rank.
    """
    t = t.detach()
    n = s.shape[0]
    offset, s_all, t_all = 0, s, t
    if gather and is_distributed():
        sizes = gather_sizes(n, s.device)
        offset = sum(sizes[: torch.distributed.get_rank()])
        s_all, t_all = gather_with_grad(s, sizes), gather_nograd(t, sizes)
    idx = torch.arange(n, device=s.device)
    pos = (s * t).sum(-1) / temperature  # N
    st = s @ t_all.T / temperature  # N x M
    ss = s @ s_all.T / temperature  # N x M
    mask = torch.zeros_like(st, dtype=torch.bool)
    mask[idx, offset + idx] = True  # the matched pair and the row itself
    neg = torch.cat([st.masked_fill(mask, float("-inf")), ss.masked_fill(mask, float("-inf"))], dim=1)
    return (torch.logsumexp(neg, dim=1) - pos).sum() / max(n, 1)


def contsteal_loss(student: Tensor, target: Tensor, *, temperature: float = 0.07, gather: bool = False) -> Tensor:
    """Cont-Steal (Sha et al., CVPR 2023): ``mismatch_nce`` of L2-normalised student and victim rows."""
    return mismatch_nce(F.normalize(student, dim=-1), F.normalize(target.detach(), dim=-1),
                        temperature=temperature, gather=gather)


def rda_loss(student: Tensor, proto: Tensor, *, temperature: float = 0.07, alpha: float = 1.0, beta: float = 1.0,
             gather: bool = False, eps: float = 1e-6) -> Tensor:
    """RDA (Wu et al., ECCV 2024): ``alpha * mismatch_nce(s, p) + beta * align(s, p)``.

    ``s`` are the L2-normalised student rows, ``p`` the sample-wise prototypes as given (means of
    normalised victim views); ``align = mean_i -log((cos(s_i, p_i) + 1 + eps) / (||s_i - p_i||^2 + eps))``
    rewards agreement in angle (cosine) and in amplitude (distance).
    """
    s = F.normalize(student, dim=-1)
    p = proto.detach()
    cos = F.cosine_similarity(s, p, dim=-1)
    align = (torch.log((s - p).pow(2).sum(-1) + eps) - torch.log(cos + 1 + eps)).mean()
    return alpha * mismatch_nce(s, p, temperature=temperature, gather=gather) + beta * align


def ntxent(z: Tensor, *, temperature: float, gather: bool = False) -> Tensor:
    """NT-Xent over V views (Chen et al., "SimCLR", ICML 2020), with gradient through every row.

    ``z`` is [N, V, D]; each of the N*V rows is an anchor whose positives are the other V-1 views
    of its image and whose negatives are every other row (gathered over ranks with gradient):
    ``mean over anchors and positives of -log(exp(a.p/T) / sum_{r != a} exp(a.r/T))`` on
    L2-normalised rows. With V = 2 this is SimCLR's loss.
    """
    n, v, d = z.shape
    if v < 2:
        raise ValueError("ntxent needs at least 2 views per image; set attack.views >= 2")
    z = F.normalize(z, dim=-1)
    ids = torch.arange(n, device=z.device)
    offset, z_all = 0, z
    if gather and is_distributed():
        sizes = gather_sizes(n, z.device)
        offset = sum(sizes[: torch.distributed.get_rank()])
        z_all = gather_with_grad(z, sizes)
    m = z_all.shape[0]
    logits = z.reshape(n * v, d) @ z_all.reshape(m * v, d).T / temperature  # NV x MV
    row_img = (offset + ids).repeat_interleave(v)
    row_view = torch.arange(v, device=z.device).repeat(n)
    col_img = torch.arange(m, device=z.device).repeat_interleave(v)
    col_view = torch.arange(v, device=z.device).repeat(m)
    self_mask = (row_img[:, None] == col_img[None]) & (row_view[:, None] == col_view[None])
    pos_mask = (row_img[:, None] == col_img[None]) & ~self_mask
    logp = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    return -(logp * pos_mask).sum() / (v - 1) / max(n * v, 1)


# -- the steps --------------------------------------------------------------------------------------
def steal_step(model: torch.nn.Module, raw: Any, opt: torch.optim.Optimizer, sched: Any, loss_fn: Any,
               images: torch.Tensor, responses: torch.Tensor, acc: Any, *, temperature: float,
               gen: torch.Generator | None = None, loss_args: dict | None = None) -> torch.Tensor:
    """One optimisation step of the student on cached responses (the hot path; see benchmarks/)."""
    x = images.float().div_(255.0)
    if gen is not None:
        x = augment(x, gen)
    x = normalize(x, raw.meta["mean"], raw.meta["std"])
    with acc.autocast():
        s = model(x)  # N x D
    kwargs = {"temperature": temperature, **(loss_args or {})}
    loss = loss_fn(s.float(), responses, gather=acc.num_processes > 1, **kwargs)
    opt.zero_grad(set_to_none=True)
    acc.backward(loss)
    opt.step()
    sched.step()
    return loss


def _inputs(ctx: StepContext, images: Tensor, gen: torch.Generator | None = None) -> Tensor:
    """uint8 [N, C, H, W] (CPU) → the student's standardised float input on its device."""
    x = images.to(ctx.acc.device, non_blocking=True)
    if ctx.cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.float().div_(255.0)
    if gen is not None:
        x = augment(x, gen)
    return normalize(x, ctx.raw.meta["mean"], ctx.raw.meta["std"])


def _student_update(ctx: StepContext, loss: Tensor) -> Tensor:
    ctx.opt.zero_grad(set_to_none=True)
    ctx.acc.backward(loss)
    ctx.opt.step()
    ctx.sched.step()
    return loss


def _embed(ctx: StepContext, x: Tensor) -> Tensor:
    with ctx.acc.autocast():
        return ctx.model(x).float()  # N x D


class Attack:
    """Direct extraction (ICML'22 Algorithm 1): the base every attack refines."""

    name = "direct"
    default_views = 1
    raw = True  # the one queried view is the raw image
    default_k = 0
    min_k = 0

    def views(self, a: EncoderAttackConfig) -> int:
        return a.views or self.default_views

    def queries_per_image(self, a: EncoderAttackConfig) -> int:
        """Victim queries (ledger charges) this attack spends per query image."""
        return self.views(a)

    def k(self, a: EncoderAttackConfig) -> int:
        return self.default_k if a.k is None else a.k

    def view_recipe(self, a: EncoderAttackConfig, seed: int) -> dict[str, Any] | None:
        """How the queried views are made (recorded in the cache); None = the raw image."""
        return None if self.raw else {"recipe": VIEW_RECIPE, "count": self.views(a), "seed": int(seed)}

    def query_images(self, a: EncoderAttackConfig, images: Tensor, keys: list[str], seed: int) -> Tensor:
        """The uint8 images sent for a batch: [V * N, C, H, W], view-major."""
        if self.raw:
            return images
        return torch.cat([keyed_views(images, keys, seed, v) for v in range(self.views(a))])

    def student_out_dim(self, cfg: Any, victim_dim: int) -> int:
        return victim_dim

    def extra_epochs(self, cfg: Any) -> int:
        """Epochs over the cache before the student's (head_recreation trains its head there); the
        engine stores the value in ``extras["extra_epochs"]`` and keeps a resumed run's."""
        return 0

    def setup(self, cfg: Any, victim_dim: int) -> dict[str, Any]:
        """Trainable state beside the student (built after it, from the same seeded RNG)."""
        return {}

    def prepare(self, extras: dict[str, Any], acc: Any) -> None:
        """Wrap the extras for distributed training (after a resume has loaded them)."""

    def state_dict(self, extras: dict[str, Any]) -> dict[str, Any]:
        return {}

    def load_state_dict(self, extras: dict[str, Any], state: dict[str, Any]) -> None:
        pass

    def step(self, ctx: StepContext, batch: dict[str, Any], epoch: int) -> Tensor:
        cfg, acc = ctx.cfg, ctx.acc
        x = batch["image"].to(acc.device, non_blocking=True)
        if cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch["response"].to(acc.device, non_blocking=True)
        gen = batch_generator(cfg.seed, epoch, ctx.rank, batch["index"]) if cfg.train.augment else None
        return steal_step(ctx.model, ctx.raw, ctx.opt, ctx.sched, ctx.loss_fn, x, y, acc,
                          temperature=cfg.train.temperature, gen=gen, loss_args=cfg.train.loss_args)


class StolenEncoderAttack(Attack):
    name = "stolenencoder"
    default_k = 9

    def step(self, ctx: StepContext, batch: dict[str, Any], epoch: int) -> Tensor:
        a, images = ctx.cfg.attack, batch["image"]
        k, n = self.k(a), images.shape[0]
        gen = batch_generator(ctx.cfg.seed, epoch, ctx.rank, batch["index"])
        x = torch.cat([_inputs(ctx, images)] + [_inputs(ctx, images, gen) for _ in range(k)])
        s = _embed(ctx, x).split(n)  # (k+1) x [N x D]
        y = batch["response"].to(ctx.acc.device, non_blocking=True)
        return _student_update(ctx, stolenencoder_loss(s[0], list(s[1:]), y, a.lam))


class ContStealAttack(Attack):
    name = "contsteal"
    raw = False

    def step(self, ctx: StepContext, batch: dict[str, Any], epoch: int) -> Tensor:
        a, images = ctx.cfg.attack, batch["image"]
        n, y = images.shape[0], batch["response"]  # y: N x V x D
        gen = batch_generator(ctx.cfg.seed, epoch, ctx.rank, batch["index"])
        pick = torch.randint(y.shape[1], (n,), generator=gen)  # which paid view each sample uses now
        t = y[torch.arange(n), pick].to(ctx.acc.device, non_blocking=True)
        s = _embed(ctx, _inputs(ctx, images, gen))
        loss = contsteal_loss(s, t, temperature=a.temperature, gather=ctx.acc.num_processes > 1)
        return _student_update(ctx, loss)


class RDAAttack(Attack):
    name = "rda"
    raw = False
    default_views = 10
    default_k = 5
    min_k = 1

    def step(self, ctx: StepContext, batch: dict[str, Any], epoch: int) -> Tensor:
        a, images = ctx.cfg.attack, batch["image"]
        n, k = images.shape[0], self.k(a)
        proto = F.normalize(batch["response"].to(ctx.acc.device, non_blocking=True), dim=-1).mean(1)  # N x D
        gen = batch_generator(ctx.cfg.seed, epoch, ctx.rank, batch["index"])
        s = _embed(ctx, torch.cat([_inputs(ctx, images, gen) for _ in range(k)])).split(n)
        gather = ctx.acc.num_processes > 1
        loss = sum(rda_loss(si, proto, temperature=a.temperature, alpha=a.alpha, beta=a.beta, gather=gather)
                   for si in s) / k
        return _student_update(ctx, loss)


class HeadRecreationAttack(Attack):
    name = "head_recreation"
    raw = False
    default_views = 2

    def student_out_dim(self, cfg: Any, victim_dim: int) -> int:
        return cfg.attack.head_dim

    def extra_epochs(self, cfg: Any) -> int:
        a = cfg.attack
        return 2 * cfg.train.epochs if a.head_epochs is None else a.head_epochs

    def setup(self, cfg: Any, victim_dim: int) -> dict[str, Any]:
        a = cfg.attack
        if self.views(a) < 2:
            raise ValueError(f"attack.views={a.views}: head_recreation trains its head on pairs of views; set attack.views >= 2")
        head = nn.Sequential(nn.Linear(victim_dim, victim_dim), nn.ReLU(), nn.Linear(victim_dim, a.head_dim))
        opt = torch.optim.Adam(head.parameters(), lr=a.head_lr, weight_decay=a.head_weight_decay)
        return {"head": head, "head_opt": opt}

    def prepare(self, extras: dict[str, Any], acc: Any) -> None:
        extras["head_model"], extras["head_opt"] = acc.prepare(extras["head"], extras["head_opt"])

    def state_dict(self, extras: dict[str, Any]) -> dict[str, Any]:
        return {"head": extras["head"].state_dict(), "head_opt": extras["head_opt"].state_dict()}

    def load_state_dict(self, extras: dict[str, Any], state: dict[str, Any]) -> None:
        extras["head"].load_state_dict(state["head"])
        extras["head_opt"].load_state_dict(state["head_opt"])

    def step(self, ctx: StepContext, batch: dict[str, Any], epoch: int) -> Tensor:
        cfg, acc, ex = ctx.cfg, ctx.acc, ctx.extras
        y = batch["response"].to(acc.device, non_blocking=True)  # N x V x D
        n, v, d = y.shape
        gather = acc.num_processes > 1
        if epoch < ex["extra_epochs"]:  # stage 1: recreate the head from the responses alone
            with acc.autocast():
                z = ex["head_model"](y.reshape(n * v, d)).float().reshape(n, v, -1)
            loss = ntxent(z, temperature=cfg.attack.temperature, gather=gather)
            ex["head_opt"].zero_grad(set_to_none=True)
            acc.backward(loss)
            ex["head_opt"].step()
            return loss
        # stage 2: the student sees exactly the views the victim saw and matches g(victim(view))
        with torch.no_grad():
            target = ex["head"](y.transpose(0, 1).reshape(v * n, d)).float()  # VN x head_dim, view-major
        views = self.query_images(cfg.attack, batch["image"], batch["key"], cfg.seed)
        s = _embed(ctx, _inputs(ctx, views))
        loss = ctx.loss_fn(s, target, gather=gather, **{"temperature": cfg.train.temperature, **cfg.train.loss_args})
        return _student_update(ctx, loss)


ENCODER_ATTACKS: dict[str, Attack] = {a.name: a for a in (Attack(), HeadRecreationAttack(), StolenEncoderAttack(),
                                                   ContStealAttack(), RDAAttack())}


def get_attack(name: str) -> Attack:
    """The attack registered as ``name``; ValueError listing the valid names otherwise."""
    if name not in ENCODER_ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of: {', '.join(ENCODER_ATTACKS)}")
    return ENCODER_ATTACKS[name]


def queries_per_image(a: EncoderAttackConfig) -> int:
    """Victim queries ``a`` spends per query image (for budget planning: images = budget // this)."""
    return get_attack(a.name).queries_per_image(a)
