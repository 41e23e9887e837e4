"""Stealing classifiers from their posteriors: Knockoff Nets, DFME and MAZE, and the clone's training.

The victim is any object with ``query(uint8 images [N, C, H, W], user) -> probabilities [N, K]`` and
``describe()`` (``victims.posterior_api.PosteriorAPI`` in process, or a client of it). Every
posterior the attack receives passes through :class:`PosteriorCache`: images are keyed by a hash of
their pixels, so an image already bought -- in this run, or by an earlier run of the same attack on
the same victim -- is served from disk and **never paid for twice**; a rerun of a deterministic attack
replays its own history for free. ``cache.spent`` counts exactly the images sent to the victim,
which is what the victim's ledger charges.

Attacks (each returns a dict with ``spent``, ``received`` and the attack's own statistics):

* :func:`knockoff_random` -- Orekondy et al., *Knockoff Nets: Stealing Functionality of Black-Box
  Models*, CVPR'19, "random" strategy: ``budget`` images drawn uniformly without replacement from
  the attacker's query sets (split over ranks), then :func:`train_clone` on the posteriors with the
  soft cross-entropy (data-parallel).
* :func:`knockoff_adaptive` -- the same paper's "adaptive" strategy: a gradient bandit (Sutton &
  Barto, ch. 2.8) over actions = the query set's classes or k-means clusters; reward = certainty
  (top-1 minus top-2 posterior), diversity (``sum_k max(0, y_k - mean of y_k over the last Δ
  steps)``) and loss (soft cross-entropy of the online clone), or all three z-scored. Rewards that
  are not finite (a posterior with exact zeros under top-k/rounding/defenses, a zero variance in
  the z-score -- the blow-ups reported against other toolkits' ``_reward_all``) are replaced by 0
  and counted; preferences are turned into probabilities with a max-subtracted softmax.
* :func:`data_free` with ``kind="dfme"`` -- Truong et al., *Data-Free Model Extraction*, CVPR'21:
  a generator is trained to maximise the ℓ1 distance between the clone's logits and the victim's
  logits recovered from its posteriors (``log p - mean(log p)``, the paper's mean correction), its
  gradient estimated by forward differences along ``m`` random unit directions; the clone is trained
  to minimise it. Defaults from the public code: m=1, n_G=1, n_S=5, lr_S=0.1 (SGD), lr_G=1e-4
  (Adam), multistep ×0.3 at 10/30/50 % of the run, nz=256.
* :func:`data_free` with ``kind="maze"`` -- Kariyappa et al., *MAZE: Data-Free Model Stealing
  Attack Using Zeroth-Order Gradient Estimation*, CVPR'21: the same loop with the KL divergence,
  ``ndirs=10`` directions, n_G=1, n_C=5, experience replay of all past queries for n_R=10 clone
  steps per iteration, SGD (lr_G=1e-4, lr_C=0.1, cosine), latent 100; the first clone step reuses the
  generator step's base images (the paper's budget per iteration ``B·((n_C-1) + (1+ndirs)·n_G)``).

Data-free budget: **every image the victim sees counts, finite-difference probes included**. The
victim takes uint8 images, so the generator's float output is quantised before querying, and the
forward difference uses the *realised* step ``δ = q(x + εu) - q(x)``:
``ĝ = d/m · Σ_j (L(q(x)+δ_j) - L(q(x))) / ||δ_j||² · δ_j`` (equal to the papers' estimator when
``δ = εu``); ε (default 0.5 on [0, 1] pixels, ≈ 4 grey levels per pixel at 32×32) is large enough
that the step survives quantisation -- the papers' ε=1e-3 would vanish in uint8.

Every rank runs the same number of collective steps; the data-free loop is data-parallel (generator
and clone under DDP, each rank querying its own images with its share of the budget).
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stealer.augment import AugmentConfig, augment, batch_generator
from stealer.cache import ResponseCache
from stealer.config import ConfigError, Momentum, NonNegFloat, NonNegInt, PositiveFloat, PositiveInt, choice
from stealer.data import ShardStream, open_shards
from stealer.shards import encode_png
from stealer.steal import _recover_paid, _settle_journal, _takes_key  # the encoder steal's pay-once journal

__all__ = [
    "PosteriorTarget", "AttackConfig", "CloneConfig", "CloneTrainConfig", "ATTACKS",
    "PosteriorCache", "load_pool", "quantize", "soft_cross_entropy", "logits_from_posteriors",
    "reward_certainty", "reward_diversity", "reward_loss", "RewardNormalizer", "GradientBandit", "kmeans",
    "Generator", "zo_gradient", "build_clone", "knockoff_random", "knockoff_adaptive", "data_free",
    "train_clone", "cost_per_iteration",
]

ATTACKS = ("knockoff_random", "knockoff_adaptive", "dfme", "maze")
LOG_FLOOR = 1e-8  # posteriors are clamped here before a log (exact zeros come from top-k, rounding, defenses)


class PosteriorTarget(Protocol):
    """What the attack needs from a classifier victim transport."""

    def query(self, images: Tensor, user: str) -> Tensor: ...

    def describe(self) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------------------- config
@dataclass
class AttackConfig:
    """The attack and its parameters (sources in the module docstring)."""

    name: str = "knockoff_random"  # knockoff_random | knockoff_adaptive | dfme | maze
    # Knockoff: the attacker's transfer set (shard folders); add runs/demo/data/digits/probe_train for an OOD source
    query_sets: list[str] = field(default_factory=lambda: ["runs/demo/data/animal_mnist/query"])
    batch_size: PositiveInt = 128  # images per victim call (knockoff random)
    # Knockoff adaptive
    actions: str = "classes"  # classes (labels of the query sets) | kmeans (clusters of 8x8 thumbnails)
    num_clusters: PositiveInt = 10
    reward: str = "all"  # certainty | diversity | loss | all
    bandit_lr: PositiveFloat = 0.1  # α of the gradient bandit
    step_images: PositiveInt = 16  # images per bandit step (one action per step)
    diversity_window: PositiveInt = 25  # Δ, bandit steps in the diversity reward's running mean
    online_lr: PositiveFloat = 0.01  # SGD lr of the online clone that scores the loss reward
    # DFME / MAZE (None = the paper's value for the chosen attack)
    df_batch_size: PositiveInt = 64
    nz: PositiveInt | None = None  # latent size (DFME 256, MAZE 100)
    gen_width: PositiveInt = 32  # generator base width
    directions: PositiveInt | None = None  # m random directions per image (DFME 1, MAZE 10)
    fd_epsilon: PositiveFloat = 0.5  # forward-difference step on [0, 1] pixels (see the module docstring)
    gen_iters: PositiveInt = 1  # n_G
    clone_iters: PositiveInt = 5  # n_S / n_C
    replay_iters: NonNegInt | None = None  # MAZE experience replay steps per iteration (MAZE 10; DFME 0)
    lr_gen: PositiveFloat = 1e-4
    lr_clone: PositiveFloat = 0.1
    weight_decay: NonNegFloat = 5e-4

    def validate(self) -> None:
        choice("attack.name", self.name, ATTACKS)
        choice("attack.actions", self.actions, ["classes", "kmeans"])
        choice("attack.reward", self.reward, ["certainty", "diversity", "loss", "all"])
        for k in ("batch_size", "step_images", "df_batch_size", "gen_iters", "clone_iters", "num_clusters", "gen_width",
                  "diversity_window"):
            if getattr(self, k) < 1:
                raise ConfigError(f"attack.{k}={getattr(self, k)} must be >= 1")
        if self.directions is not None and self.directions < 1:
            raise ConfigError(f"attack.directions={self.directions} must be >= 1 (or null for the paper's value)")
        if not self.fd_epsilon > 0:
            raise ConfigError(f"attack.fd_epsilon={self.fd_epsilon} must be > 0")

    def resolved(self) -> dict[str, Any]:
        """The data-free parameters with the paper's defaults filled in."""
        maze = self.name == "maze"
        return {"nz": self.nz or (100 if maze else 256), "m": self.directions or (10 if maze else 1),
                "replay": (10 if maze else 0) if self.replay_iters is None else self.replay_iters}


@dataclass
class CloneConfig:
    """The clone's architecture (a ``victims.backbones`` name + a linear head)."""

    arch: str = "resnet18"
    width: PositiveInt = 16
    stem: str = "small"

    def validate(self) -> None:
        from victims.backbones import BACKBONES, STEMS

        if not self.arch.startswith("timm:"):
            choice("clone.arch", self.arch, list(BACKBONES) + ["timm:<model name>"])
            choice("clone.stem", self.stem, list(STEMS))


@dataclass
class CloneTrainConfig:
    """Training of the clone on the cached posteriors (Knockoff; soft cross-entropy)."""

    epochs: NonNegInt = 10
    batch_size: PositiveInt = 64  # per rank
    optimizer: str = "sgd"
    lr: PositiveFloat = 0.05
    momentum: Momentum = 0.9
    weight_decay: NonNegFloat = 5e-4
    warmup_epochs: NonNegFloat = 0.5
    augment: bool = True  # mild crop/flip/jitter of the query images (Knockoff trains with augmentation)
    # auto (the newest checkpoint of this run's clone training, or of DFME/MAZE's loop) | none | a ckpt path
    resume: str = "auto"
    resume_force: bool = False  # resume even from a checkpoint written with other settings (they are listed)
    # also checkpoint every N clone steps (Knockoff; always at epoch ends) or N DFME/MAZE iterations;
    # 0: Knockoff at epoch ends only, DFME/MAZE at the end only; both also on preemption
    ckpt_every: NonNegInt = 0

    def validate(self) -> None:
        from stealer.optim import OPTIMIZERS

        choice("train.optimizer", self.optimizer, OPTIMIZERS)
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError(f"train.epochs must be >= 0 and train.batch_size >= 1 (got {self.epochs}, {self.batch_size})")
        if self.ckpt_every < 0:
            raise ConfigError(f"train.ckpt_every={self.ckpt_every} must be >= 0 (0: checkpoint at epoch ends only)")


CLONE_AUGMENT = AugmentConfig(scale_min=0.7, flip=True, brightness=0.2, contrast=0.2, jitter_p=0.5)


# ------------------------------------------------------------------------------------ the cache
def _image_key(img: np.ndarray) -> str:
    h = hashlib.sha1(str(img.shape).encode())
    h.update(np.ascontiguousarray(img).tobytes())
    return "p" + h.hexdigest()[:30]


class PosteriorCache:
    """Every posterior bought, on disk as response shards keyed by the image's pixel hash.

    Args:
        root: the folder (a :class:`stealer.cache.ResponseCache`; one per victim, defense chain and user).
        meta: what the responses depend on; a folder made with other settings is refused.
        rank: this process (each rank writes its own shard files).

    ``fetch`` sends only the images not yet cached (each distinct image once, even within a batch)
    and counts them in ``spent``; ``received`` counts every posterior handed to the attack.

    Paid once under SIGKILL (issue 13), as the encoder steal's query phase
    (``stealer.steal.run_query_phase``): with a victim whose ``query`` takes an idempotency ``key=``
    (:class:`victims.posterior_api.PosteriorAPI`), each purchase is journaled (fsynced) under a key
    derived from the cache's ``run_id``, the user, the caller's ``tag`` and the image keys, before it
    is paid; the victim commits the charge together with the answer. A run killed after the charge
    and before the cache write gets those answers back on resume (``recovered``: read from the
    victim's ledger, never bought again), and :meth:`finalize` lets the victim forget every kept
    answer that is now cached.
    """

    def __init__(self, root: str | os.PathLike, meta: dict[str, Any], *, rank: int = 0) -> None:
        self.store = ResponseCache(root, rank=rank)
        self.store.check_meta(meta)
        if rank == 0:
            self.store.write_meta(meta)
        self.root = Path(root)
        self.known: dict[str, np.ndarray] = {}
        for tar_path, _ in self.store.complete_shards():
            with tarfile.open(tar_path) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".npy"):
                        data = tar.extractfile(m).read()  # type: ignore[union-attr]
                        self.known[m.name[:-4]] = np.load(io.BytesIO(data), allow_pickle=False)
        self.spent = 0
        self.received = 0
        self.recovered = 0  # posteriors paid by a killed run, read back from the victim, not bought again
        self._paid: dict[str, np.ndarray] | None = None  # those answers, read on the first keyed fetch
        self._victim: tuple[Any, str] | None = None  # (target, user) of the keyed purchases, for finalize

    def __len__(self) -> int:
        return len(self.known)

    def fetch(self, target: PosteriorTarget, images: Tensor, user: str, labels: Sequence[int] | None = None, *,
              tag: str | None = None) -> Tensor:
        """Posteriors ``[N, K]`` (float32, CPU) of uint8 ``images``; pays only for images never bought.

        ``tag`` names the purchase in the run (data-free attacks: ``<kind>/it<iteration>/r<rank>/...``)
        so that a resumed iteration asks under the key it paid under."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W]; got {images.dtype} {list(images.shape)}")
        arr = images.detach().cpu().numpy()
        keys = [_image_key(a) for a in arr]
        new: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in self.known and k not in new:
                new[k] = i
        if new:
            new_keys, idx = list(new), list(new.values())
            keyed = _takes_key(target)
            if keyed and self._paid is None:  # answers a killed run paid for and never cached
                self._paid = _recover_paid(self.store, target, user, set(self.known), 1, True)
                self._victim = (target, user)
            got: list[Any] = [(self._paid or {}).pop(k, None) for k in new_keys]
            buy = [j for j, r in enumerate(got) if r is None]
            self.recovered += len(got) - len(buy)
            paid_key = None
            if buy:
                buy_keys = [new_keys[j] for j in buy]
                sub = images[[idx[j] for j in buy]].contiguous()
                if keyed:
                    paid_key = self.store.batch_key(user, buy_keys if tag is None else [f"@{tag}", *buy_keys])
                    self.store.intend(paid_key, buy_keys)  # journaled before anything is paid
                    resp = target.query(sub, user, key=paid_key)  # type: ignore[call-arg]  # charged with its answer kept
                else:
                    resp = target.query(sub, user)  # charged per image
                self.spent += len(buy)
                for j, r in zip(buy, resp.detach().float().cpu().numpy()):
                    got[j] = r
            lab = [int(labels[i]) if labels is not None else -1 for i in idx]
            pngs = [("png", encode_png(np.moveaxis(arr[i], 0, -1))) for i in idx]
            self.store.write_batch(new_keys, pngs, lab, np.stack(got))
            if paid_key is not None:  # cached now: the victim need not keep it
                target.forget(user, [paid_key])  # type: ignore[attr-defined]
            for k, r in zip(new_keys, got):
                self.known[k] = r
        self.received += len(keys)
        return torch.from_numpy(np.stack([self.known[k] for k in keys])).float()

    def finalize(self, source: str) -> dict[str, Any]:
        """Write the manifest that makes the cache a shard folder (one rank, after all are done); the
        victim forgets the answers it kept for purchases now cached, the journal keeps the rest."""
        if self._victim is not None:
            _settle_journal(self.store, *self._victim)
        return self.store.finalize(source=source)


# ------------------------------------------------------------------------------------- helpers
def quantize(x: Tensor) -> Tensor:
    """Float images in [0, 1] → uint8 0..255 (rounded, clamped): what a victim API accepts."""
    return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8)


def soft_cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """``-Σ_k y_k log softmax(logits)_k`` per row (Knockoff's training loss); mean or none."""
    loss = -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    return loss.mean() if reduction == "mean" else loss


def logits_from_posteriors(p: Tensor) -> Tensor:
    """DFME's logit recovery: ``log p - mean_k log p`` (p clamped at LOG_FLOOR so zeros stay finite)."""
    lp = p.float().clamp_min(LOG_FLOOR).log()
    return lp - lp.mean(dim=1, keepdim=True)


def kl_posteriors(p: Tensor, logits: Tensor) -> Tensor:
    """``KL(p || softmax(logits))`` per row; ``0 log 0 = 0`` (MAZE's loss)."""
    return (torch.xlogy(p, p) - p * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


def load_pool(paths: Sequence[str], *, channels: int, image_size: int) -> tuple[Tensor, Tensor, list[str]]:
    """All images of the query sets in memory: ``(uint8 [N, C, S, S], action labels [N], label names)``.

    Labels are per set (``set_index * 10_000 + cls``, relabelled 0..A-1) so classes of different
    sets never merge; a set without ``cls`` gives one action per set.
    """
    if not paths:
        raise ValueError("attack.query_sets is empty; give at least one shard folder (e.g. runs/demo/data/animal_mnist/query)")
    imgs, labs, classes = [], [], []
    for si, p in enumerate(paths):
        shards = open_shards(p)
        classes.append(shards.manifest.get("classes") or [])
        stream = ShardStream(shards, batch_size=512, shuffle=False, channels=channels, image_size=image_size)
        for b in stream.iter_epoch(0):
            imgs.append(b["image"])
            labs.append(si * 10_000 + b["label"].clamp_min(0))
    uniq, inv = torch.unique(torch.cat(labs), return_inverse=True)
    names = []
    for u in uniq.tolist():
        si, c = divmod(u, 10_000)
        names.append(f"{Path(paths[si]).name}:{classes[si][c] if c < len(classes[si]) else c}")
    return torch.cat(imgs), inv, names


def build_clone(cfg: CloneConfig, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    """A fresh clone: ``victims.classifier.ClassifierVictim`` (uint8 or [0,1] float in, logits out)."""
    from victims.classifier import build_classifier

    timm = cfg.arch.startswith("timm:")
    return build_classifier(cfg.arch, num_classes, in_chans, image_size, width=None if timm else cfg.width,
                            stem=None if timm else cfg.stem)


# ------------------------------------------------------------------------- Knockoff: random
def knockoff_random(target: PosteriorTarget, cache: PosteriorCache, pool: Tensor, *, budget: int, user: str,
                    batch_size: PositiveInt = 128, seed: int = 0, rank: int = 0, world: int = 1,
                    labels: Tensor | None = None) -> dict[str, Any]:
    """Query ``budget`` images drawn uniformly without replacement from ``pool`` (this rank's share)."""
    n = int(pool.shape[0])
    if budget > n:
        raise ValueError(f"budget={budget} exceeds the {n} images of attack.query_sets; lower budget or add query sets")
    order = torch.from_numpy(np.random.default_rng([seed, 11]).permutation(n)[:budget])
    mine = order[rank::world]
    for i in range(0, len(mine), batch_size):
        idx = mine[i:i + batch_size]
        cache.fetch(target, pool[idx], user, None if labels is None else labels[idx].tolist())
    return {"spent": cache.spent, "received": cache.received, "selected": len(mine)}


# ----------------------------------------------------------------------- Knockoff: adaptive
def reward_certainty(y: Tensor) -> Tensor:
    """Per row: top-1 minus top-2 posterior (Knockoff's certainty reward)."""
    top = y.float().topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def reward_diversity(y: Tensor, y_mean: Tensor) -> Tensor:
    """Per row: ``Σ_k max(0, y_k - ȳ_k)`` with ȳ the running mean over the last Δ steps."""
    return (y.float() - y_mean.float()).clamp_min(0).sum(dim=1)


def reward_loss(y: Tensor, clone_logits: Tensor) -> Tensor:
    """Per row: the clone's soft cross-entropy on the victim's posterior (log-softmax: never inf)."""
    return soft_cross_entropy(clone_logits, y.float(), reduction="none")


class RewardNormalizer:
    """Running z-score of a reward vector (Welford), guarded: a zero or tiny variance, or a
    non-finite reward, gives 0 for that component instead of inf/NaN; the first step is
    clipped to [0, 1] (as the reference implementation does)."""

    def __init__(self, n: int, min_std: float = 1e-6) -> None:
        self.n, self.count, self.min_std = n, 0, min_std
        self.mean = np.zeros(n)
        self.m2 = np.zeros(n)
        self.nonfinite = 0

    def __call__(self, r: np.ndarray) -> np.ndarray:
        r = np.asarray(r, dtype=np.float64)
        bad = ~np.isfinite(r)
        if bad.any():
            self.nonfinite += int(bad.sum())
            r = np.where(bad, self.mean if self.count else 0.0, r)
        self.count += 1
        d = r - self.mean
        self.mean = self.mean + d / self.count
        self.m2 = self.m2 + d * (r - self.mean)
        if self.count == 1:
            return np.clip(r, 0.0, 1.0)
        std = np.sqrt(self.m2 / self.count)
        return np.where(std > self.min_std, (r - self.mean) / np.maximum(std, self.min_std), 0.0)


class GradientBandit:
    """Gradient bandit over ``n`` actions (Sutton & Barto 2nd ed., §2.8), as in Knockoff's adaptive strategy.

    ``π = softmax(H)`` over the available actions; after action ``a`` with reward ``r`` and baseline
    ``r̄`` (the mean of all earlier rewards; ``r̄ = r`` at the first step):
    ``H_a += α (r - r̄)(1 - π_a)``, ``H_b -= α (r - r̄) π_b`` for ``b ≠ a``. A non-finite reward
    leaves H unchanged (counted in ``skipped``); H is kept in ``[-clip, clip]``.
    """

    def __init__(self, n: int, lr: float, *, clip: float = 50.0) -> None:
        self.h = np.zeros(n)
        self.available = np.ones(n, dtype=bool)
        self.lr, self.clip = lr, clip
        self.baseline, self.t, self.skipped = 0.0, 0, 0

    def probs(self) -> np.ndarray:
        h = np.where(self.available, self.h, -np.inf)
        if not self.available.any():
            return np.zeros_like(self.h)
        e = np.exp(h - h[self.available].max())
        return e / e.sum()

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.choice(len(self.h), p=self.probs()))

    def update(self, action: int, reward: float) -> None:
        if not math.isfinite(reward):
            self.skipped += 1
            return
        self.t += 1
        base = reward if self.t == 1 else self.baseline
        pi = self.probs()
        step = self.lr * (reward - base)
        onehot = np.zeros_like(self.h)
        onehot[action] = 1.0
        self.h = np.clip(self.h + step * (onehot - pi) * self.available, -self.clip, self.clip)
        self.baseline += (reward - self.baseline) / self.t


def kmeans(x: Tensor, k: int, *, iters: int = 25, seed: int = 0) -> Tensor:
    """Lloyd's k-means with k-means++ seeding; returns the cluster index of each row of ``x`` [N, D]."""
    x = x.float()
    n = x.shape[0]
    if k > n:
        raise ValueError(f"attack.num_clusters={k} exceeds the {n} query images")
    g = torch.Generator().manual_seed(seed)
    centres = [x[int(torch.randint(n, (1,), generator=g))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).pow(2).min(dim=1).values
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full((n,), 1.0 / n)
        centres.append(x[int(torch.multinomial(p, 1, generator=g))])
    c = torch.stack(centres)
    assign = torch.cdist(x, c).argmin(dim=1)
    for _ in range(iters):
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(dim=0)
        new = torch.cdist(x, c).argmin(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def knockoff_adaptive(target: PosteriorTarget, cache: PosteriorCache, pool: Tensor, labels: Tensor, *, budget: int,
                      user: str, cfg: AttackConfig, clone: nn.Module, seed: int = 0) -> dict[str, Any]:
    """Knockoff's adaptive strategy on one process; ``clone`` is trained online (one SGD step per
    bandit step) to score the loss reward. Returns spend, action counts and guard counters."""
    rng = np.random.default_rng([seed, 13])
    if cfg.actions == "kmeans":
        thumbs = F.adaptive_avg_pool2d(pool.float() / 255, 8).flatten(1)
        labels = kmeans(thumbs, cfg.num_clusters, seed=seed)
    n_actions = int(labels.max()) + 1
    pools = [list(rng.permutation(np.flatnonzero(labels.numpy() == a))) for a in range(n_actions)]
    bandit = GradientBandit(n_actions, cfg.bandit_lr)
    for a, p in enumerate(pools):
        bandit.available[a] = len(p) > 0
    norm = RewardNormalizer(3)
    opt = torch.optim.SGD(clone.parameters(), lr=cfg.online_lr, momentum=0.9)
    history: list[Tensor] = []
    counts = np.zeros(n_actions, dtype=int)
    rewards: list[float] = []
    nonfinite = 0
    taken = 0  # images chosen (a rerun replays the same choices from the cache, paying nothing)
    while taken < budget and bandit.available.any():
        a = bandit.sample(rng)
        take = min(cfg.step_images, budget - taken, len(pools[a]))
        taken += take
        idx = torch.tensor([pools[a].pop() for _ in range(take)], dtype=torch.long)
        if not pools[a]:
            bandit.available[a] = False
        x = pool[idx]
        y = cache.fetch(target, x, user, labels[idx].tolist())
        counts[a] += take
        history = (history + [y.mean(dim=0)])[-cfg.diversity_window:]
        clone.eval()
        with torch.no_grad():
            logits = clone(x)
        parts = np.array([float(reward_certainty(y).mean()), float(reward_diversity(y, torch.stack(history).mean(0)).mean()),
                          float(reward_loss(y, logits).mean())])
        if cfg.reward == "all":
            r = float(norm(parts).mean())
            nonfinite = norm.nonfinite
        else:
            r = float(parts[["certainty", "diversity", "loss"].index(cfg.reward)])
            if not math.isfinite(r):
                nonfinite += 1
                r = 0.0
        rewards.append(r)
        bandit.update(a, r)
        if x.shape[0] < 2:  # the last image of an action: batch norm cannot train on one sample
            continue
        clone.train()
        loss = soft_cross_entropy(clone(x), y)
        if torch.isfinite(loss):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {"spent": cache.spent, "received": cache.received, "actions": int(n_actions),
            "action_counts": counts.tolist(), "final_policy": [round(float(p), 4) for p in bandit.probs()],
            "mean_reward": float(np.mean(rewards)) if rewards else 0.0, "nonfinite_rewards": int(nonfinite),
            "bandit_skipped": bandit.skipped}


# ------------------------------------------------------------------------------ DFME / MAZE
class Generator(nn.Module):
    """DFAD/DFME-style generator (``GeneratorA``): z → fc → 2× (upsample, conv, BN, LeakyReLU) → conv → tanh,
    returned as images in [0, 1]."""

    def __init__(self, nz: int, channels: int, image_size: int, width: int = 32) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"the generator needs an image size divisible by 4; got {image_size}")
        self.s0, self.w = image_size // 4, width
        self.fc = nn.Linear(nz, 2 * width * self.s0 * self.s0)
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * width), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1),
        )
        self.nz = nz

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).view(z.shape[0], 2 * self.w, self.s0, self.s0)
        return torch.tanh(self.net(h)) * 0.5 + 0.5  # N x C x S x S in [0, 1]


def zo_gradient(loss_of: Callable[[Tensor], Tensor], x: Tensor, *, m: int, eps: float,
                gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Forward-difference gradient of a per-image loss at uint8 images ``x`` [B, C, H, W].

    ``loss_of(uint8 [M, C, H, W]) -> [M]`` is called once on the base images and their ``m`` probes
    ``q(x/255 + ε u_j)`` (u_j uniform on the unit sphere). Returns ``(ĝ [B, C, H, W] w.r.t. pixels
    in [0, 1], base losses [B])`` with ``ĝ = d/m Σ_j (L_j - L_0) / ||δ_j||² δ_j`` over the realised
    steps δ_j; a probe that quantises back onto its base contributes nothing.
    """
    b, c, h, w = x.shape
    d = c * h * w
    u = torch.randn(b, m, d, generator=gen)
    u = (u / u.norm(dim=2, keepdim=True)).view(b, m, c, h, w)
    base = x.float() / 255
    probes = quantize(base.unsqueeze(1) + eps * u)  # B x m x C x H x W
    delta = probes.float() / 255 - base.unsqueeze(1)
    losses = loss_of(torch.cat([x, probes.view(b * m, c, h, w)]))
    l0, lp = losses[:b], losses[b:].view(b, m)
    n2 = delta.flatten(2).pow(2).sum(dim=2)  # B x m
    coef = torch.where(n2 > 0, (lp - l0[:, None]) / n2.clamp_min(1e-12), torch.zeros_like(n2))
    grad = d * (coef[:, :, None, None, None] * delta).mean(dim=1)
    return grad, l0


def cost_per_iteration(kind: str, batch: int, m: int, gen_iters: int, clone_iters: int) -> int:
    """Images the victim sees per data-free iteration: DFME ``B(n_G(m+1) + n_S)``,
    MAZE ``B((n_C - 1) + (1 + m) n_G)`` (its first clone step reuses the generator's base images)."""
    return batch * (gen_iters * (m + 1) + clone_iters - (1 if kind == "maze" else 0))


def _multistep(total: int) -> Callable[[int], float]:
    marks = [int(f * total) for f in (0.1, 0.3, 0.5)]
    return lambda it: 0.3 ** sum(it >= s for s in marks)


def _cosine(total: int) -> Callable[[int], float]:
    return lambda it: 0.5 * (1 + math.cos(math.pi * min(it, total) / max(total, 1)))


# the keys a clone / data-free checkpoint may differ in from the run resuming it
CLONE_MAY_CHANGE = frozenset({"train.resume", "train.resume_force", "train.ckpt_every"})
DATA_FREE_MAY_CHANGE = frozenset({"attack.query_sets", "attack.batch_size"})  # Knockoff's keys: DFME/MAZE ignore them
_START_OVER = "use a new run name (name=...), train.resume=none to start over, or train.resume_force=true to resume anyway"


def data_free(target: PosteriorTarget, cache: PosteriorCache, *, kind: str, budget: int, user: str, cfg: AttackConfig,
              clone_cfg: CloneConfig, num_classes: int, channels: int, image_size: int, accelerator: Any,
              seed: int = 0, log: Callable[[str], None] | None = None, ckpt_dir: str | os.PathLike | None = None,
              resume: str = "auto", ckpt_every: int = 0, resume_force: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Run DFME (``kind="dfme"``) or MAZE (``"maze"``) under ``budget`` images (all ranks together);
    returns the (unwrapped) clone and statistics. Every rank runs the same number of iterations.

    With ``ckpt_dir`` the run is preemptible: generator, clone, both optimizers and schedules,
    the iteration, every rank's random generators and MAZE's replay bank are checkpointed every
    ``ckpt_every`` iterations (0: only on preemption and at the end) and when a preemption is
    requested (then :class:`stealer.preempt.Preempted` is raised). ``resume="auto"`` continues
    from the newest checkpoint; on the same number of processes the clone equals an
    uninterrupted run's bitwise, and every posterior bought before the stop is read back from
    the cache, not bought again. (The replay bank travels through rank 0: fine at the image
    sizes of these attacks; it grows with the budget.)
    """
    choice("attack.name", kind, ["dfme", "maze"])
    acc = accelerator
    rank, world = acc.process_index, acc.num_processes
    p = cfg.resolved()
    nz, m, replay_iters = p["nz"], p["m"], p["replay"]
    bsz, gi, ci = cfg.df_batch_size, cfg.gen_iters, cfg.clone_iters
    cost = cost_per_iteration(kind, bsz, m, gi, ci)
    iters = (budget // world) // cost
    if iters < 1:
        raise ValueError(f"budget={budget} is below one {kind} iteration ({cost * world} images on {world} process(es): "
                         f"batch {bsz}, {m} direction(s)); raise budget or lower attack.df_batch_size")
    torch.manual_seed(seed)  # the same initial weights on every rank
    g_net = Generator(nz, channels, image_size, cfg.gen_width)
    clone = build_clone(clone_cfg, num_classes, channels, image_size)
    if kind == "dfme":
        opt_g: torch.optim.Optimizer = torch.optim.Adam(g_net.parameters(), lr=cfg.lr_gen)
        factor = _multistep(iters)
    else:
        opt_g = torch.optim.SGD(g_net.parameters(), lr=cfg.lr_gen, momentum=0.9, weight_decay=cfg.weight_decay)
        factor = _cosine(iters)
    opt_s = torch.optim.SGD(clone.parameters(), lr=cfg.lr_clone, momentum=0.9, weight_decay=cfg.weight_decay)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, factor)
    sched_s = torch.optim.lr_scheduler.LambdaLR(opt_s, factor)
    g_ddp, s_ddp, opt_g, opt_s = acc.prepare(g_net, clone, opt_g, opt_s)
    raw_g, raw_s = acc.unwrap_model(g_ddp), acc.unwrap_model(s_ddp)
    dev = acc.device
    rng = torch.Generator().manual_seed(int(seed) * 1000 + rank + 1)

    def per_image_loss(logits: Tensor, y: Tensor) -> Tensor:
        if kind == "dfme":  # ℓ1 between the clone's logits and the victim's recovered logits
            return (logits.float() - logits_from_posteriors(y)).abs().mean(dim=1)
        return kl_posteriors(y, logits)

    purchase = [""]  # the current purchase's tag: (run, iteration, rank, step) names what a resumed iteration asks

    def disagreement(xq: Tensor) -> Tensor:
        y = cache.fetch(target, xq, user, tag=purchase[0]).to(dev)
        with torch.no_grad():
            return per_image_loss(raw_s(xq.to(dev)), y).cpu()

    def clone_step(xq: Tensor, y: Tensor) -> float:
        s_ddp.train()
        loss = per_image_loss(s_ddp(xq.to(dev)), y.to(dev)).mean()
        opt_s.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt_s.step()
        return float(loss.detach())

    replay_x: list[Tensor] = []
    replay_y: list[Tensor] = []
    from stealer.config import to_dict
    from stealer.engine import RunState

    settings = {"kind": kind, "attack": to_dict(cfg), "clone": to_dict(clone_cfg), "budget": budget, "seed": seed,
                "world_size": world, "num_classes": num_classes}
    state = RunState(acc, ckpt_dir, config=settings, may_change=DATA_FREE_MAY_CHANGE, force=resume_force, what=kind,
                     start_over=_START_OVER, rerun="rerun to resume (train.resume=auto)")
    state.track(generator=raw_g, clone=raw_s, opt_g=opt_g, opt_s=opt_s, sched_g=sched_g, sched_s=sched_s)
    state.save_also(lambda: {"iteration": it_done, "loss_g": loss_g, "loss_s": loss_s})

    def per_rank() -> dict[str, Any]:  # this rank's generator and MAZE's replay bank
        bank = (torch.cat(replay_x), torch.cat(replay_y)) if replay_x else (None, None)
        return {"gen": rng.get_state(), "bank_x": bank[0], "bank_y": bank[1]}

    start, loss_g, loss_s = 0, float("nan"), float("nan")
    found = state.resume(resume)
    if found is not None:
        rng.set_state(state.mine["gen"])
        if state.mine.get("bank_x") is not None:
            replay_x, replay_y = [state.mine["bank_x"]], [state.mine["bank_y"]]
        start = int(found["iteration"])
        loss_g, loss_s = float(found.get("loss_g", float("nan"))), float(found.get("loss_s", float("nan")))
        if log is not None:
            log(f"{kind} resumed from {state.resumed_from} at iteration {start}/{iters}")
    it_done = start
    t0 = time.time()
    for it in range(start, iters):
        base_x = None
        for j in range(gi):  # (1) generator: maximise the disagreement, gradient estimated zeroth-order
            purchase[0] = f"{kind}/it{it}/r{rank}/g{j}"
            g_ddp.train()
            z = torch.randn(bsz, nz, generator=rng).to(dev)
            img = g_ddp(z)  # B x C x S x S in [0, 1]
            xq = quantize(img).cpu()
            raw_s.eval()
            grad, l0 = zo_gradient(disagreement, xq, m=m, eps=cfg.fd_epsilon, gen=rng)
            opt_g.zero_grad(set_to_none=True)
            scaler = getattr(acc, "scaler", None)  # fp16: the step below unscales, so the backward is scaled
            (scaler.scale(img) if scaler is not None else img).backward(-(grad / bsz).to(dev))  # straight through the quantiser; ascend the loss
            opt_g.step()
            loss_g = float(l0.mean())
            base_x = xq
        for c in range(ci):  # (2) clone: imitate the victim on fresh generator images
            if kind == "maze" and c == 0 and base_x is not None:
                xq = base_x  # MAZE reuses the generator step's images (already bought)
            else:
                with torch.no_grad():
                    xq = quantize(raw_g(torch.randn(bsz, nz, generator=rng).to(dev))).cpu()
            y = cache.fetch(target, xq, user, tag=f"{kind}/it{it}/r{rank}/c{c}")
            loss_s = clone_step(xq, y)
            if replay_iters:
                replay_x.append(xq)
                replay_y.append(y)
        if replay_iters:  # (3) MAZE experience replay over every query so far
            bank_x, bank_y = torch.cat(replay_x), torch.cat(replay_y)
            replay_x, replay_y = [bank_x], [bank_y]
            for _ in range(replay_iters):
                idx = torch.randint(len(bank_x), (bsz,), generator=rng)
                clone_step(bank_x[idx], bank_y[idx])
        sched_g.step()
        sched_s.step()
        if log is not None and (it % max(1, iters // 10) == 0 or it == iters - 1):
            log(f"{kind} iter {it + 1}/{iters}: loss_G {loss_g:.4f} loss_S {loss_s:.4f} spent {cache.spent} "
                f"({time.time() - t0:.0f}s)")
        it_done = it + 1
        state.step_end(it_done, periodic=ckpt_every > 0 and it_done % ckpt_every == 0 and it_done < iters,
                       where=f"{kind} preempted after iteration {it_done}/{iters}; every posterior bought is cached",
                       per_rank=per_rank)
    state.close()
    state.save(iters, per_rank=per_rank)
    acc.wait_for_everyone()
    stats = {"spent": cache.spent, "received": cache.received, "iterations": iters, "cost_per_iteration": cost,
             "claimed_per_rank": iters * cost, "directions": m, "nz": nz, "replay_iters": replay_iters,
             "final_loss_gen": loss_g, "final_loss_clone": loss_s}
    return raw_s.eval(), stats


# ------------------------------------------------------------------------------ clone training
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
                     start_over=_START_OVER, rerun="rerun to resume (train.resume=auto)", steps_per_epoch=per_epoch)
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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write (:func:`stealer.ckpt.atomic_write_json`)."""
    from stealer.ckpt import atomic_write_json

    atomic_write_json(path, obj)
