"""Knockoff Nets (Orekondy et al., CVPR'19): the random and adaptive strategies.

Reference code: https://github.com/tribhuvanesh/knockoffnets -- ``knockoff/adversary/transfer.py``
``RandomAdversary.get_transferset`` (commit 01e75bf) and ``knockoff/adversary/adaptive.py``
``AdaptiveAdversary`` (commit eaa8acb).

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
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stealer.classifier.cache import PosteriorCache, PosteriorTarget
from stealer.classifier.config import ClassifierAttackConfig
from stealer.classifier.losses import soft_cross_entropy
from stealer.config import PositiveInt
from stealer.data import ShardStream, open_shards

__all__ = ["load_pool", "knockoff_random", "knockoff_adaptive", "reward_certainty", "reward_diversity", "reward_loss",
           "RewardNormalizer", "GradientBandit", "kmeans"]


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
    # standard strides: the stream's single-channel images come out [N, 1, S, S] with strides (S*S, 1, S, 1),
    # "contiguous" and "channels_last" at once; oneDNN's CPU convolution backward on such a batch corrupted the
    # heap at OMP_NUM_THREADS=1 (torch 2.14.1: "corrupted double-linked list" in knockoff_adaptive's online clone)
    return torch.cat(imgs).clone(memory_format=torch.contiguous_format), inv, names


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
                      user: str, cfg: ClassifierAttackConfig, clone: nn.Module, seed: int = 0) -> dict[str, Any]:
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
