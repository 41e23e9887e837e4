"""Data-free model extraction: DFME (Truong et al., CVPR'21) and MAZE (Kariyappa et al., CVPR'21).

Reference code: https://github.com/cake-lab/datafree-model-extraction -- ``dfme/train.py`` ``train`` and
``dfme/approximate_gradients.py`` ``estimate_gradient_objective`` (commit 0043ec4); and
https://github.com/sanjaykariyappa/MAZE -- ``src/attacks/maze.py`` ``maze`` with
``src/attacks/attack_utils.py`` ``zoge_backward`` (commit 0bb05d0).

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

import math
import os
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from stealer.classifier.cache import PosteriorCache, PosteriorTarget
from stealer.classifier.clone import build_clone
from stealer.classifier.config import DATA_FREE_MAY_CHANGE, START_OVER, ClassifierAttackConfig, CloneConfig
from stealer.classifier.losses import kl_posteriors, logits_from_posteriors, quantize
from stealer.config import choice

__all__ = ["Generator", "zo_gradient", "cost_per_iteration", "data_free"]


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


def data_free(target: PosteriorTarget, cache: PosteriorCache, *, kind: str, budget: int, user: str, cfg: ClassifierAttackConfig,
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
                     start_over=START_OVER, rerun="rerun to resume (train.resume=auto)")
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
