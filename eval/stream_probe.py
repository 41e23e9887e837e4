"""Probes whose memory does not grow with the number of training samples N.

Three pieces, all collective (call them on every rank) and data-parallel over ranks:

* :func:`train_linear` -- a linear classifier trained by minibatch SGD or LARS over streamed
  feature shards (:mod:`eval.feature_shards`), or over any other batch source (the augmented
  images of :func:`lincls_protocol`). Each global batch of ``batch_size`` rows is split over the
  ranks (rank r takes rows ``r, r+W, ...``); every rank sums its cross-entropy, the gradients and
  the row count are summed with one all-reduce, and every rank takes the same step with the
  gradient of the global mean loss -- the same update one process takes, up to float summation
  order. Resumable through :class:`stealer.engine.RunState`: weights, optimizer, position
  (epoch, batch) and every rank's RNG every ``ckpt_every`` steps and on preemption; the epoch's
  batch order is a function of (seed, epoch), so a resumed run takes bitwise the steps an
  uninterrupted one takes.
* :func:`knn_stream` -- the weighted kNN of :mod:`eval.knn`, streamed: the training features are
  read one shard at a time and each test row keeps a running top-k of (similarity, label); only
  ``O(k x N_test)`` state exists, never ``N_test x N_train`` similarities nor all training
  features. It merges top-k lists exactly as :func:`eval.knn._topk_neighbours` does, so the
  predictions equal the in-memory kNN's.
* :func:`lincls_protocol` -- the standard linear evaluation of the SimSiam and MoCo v3 papers.

Memory: one window of ``window`` blocks (``window x block_rows x D`` floats) for the
shuffle, the ``D x C`` classifier with its optimizer state, and O(N_test) test predictions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eval.feature_shards import FeatureShards
from eval.knn import vote_counts

__all__ = ["StreamSettings", "feature_stats", "global_batches", "train_linear", "evaluate_linear", "knn_stream",
           "lincls_protocol", "build_optimizer", "Solo"]


class Solo:
    """The accelerator facade of one process (what :class:`RunState` needs) when none is given."""

    process_index, num_processes, is_main_process, device = 0, 1, True, torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass

    def reduce(self, t: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return t


def _world(acc: Any) -> tuple[int, int]:
    return (int(acc.process_index), int(acc.num_processes)) if acc is not None else (0, 1)


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(t)
    return t


@dataclass
class StreamSettings:
    """Knobs of the streamed linear classifier (probe keys of the same names in eval/run.py).

    ``lr = base_lr x batch_size / 256`` (the linear scaling of main_lincls), cosine-annealed per
    epoch; ``optimizer`` ``lars`` is apex's LARC over SGD (trust coefficient 0.001, no clipping,
    every parameter adapted), ``sgd`` plain SGD with momentum.
    """

    epochs: int = 90
    batch_size: int = 4096  # global, over all ranks
    base_lr: float = 0.1
    optimizer: str = "lars"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    window: int = 4  # blocks shuffled together
    block_rows: int = 8192  # rows per shuffle block (memory: window x block_rows rows)
    ckpt_every: int = 100  # steps between checkpoints (0: only on preemption and at the end)

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.base_lr > 0 or self.window < 1 or self.block_rows < 1:
            raise ValueError(f"streamed probe needs epochs >= 1, batch_size >= 1, base_lr > 0, window >= 1 "
                             f"(got {self.epochs}, {self.batch_size}, {self.base_lr}, {self.window}; probe keys "
                             f"epochs, probe_batch_size, base_lr, window)")
        if self.optimizer not in ("lars", "sgd"):
            raise ValueError(f"probe optimizer {self.optimizer!r} is not one of lars, sgd (probe key optimizer)")


def build_optimizer(model: nn.Module, s: StreamSettings) -> torch.optim.Optimizer:
    """SGD, or LARC over SGD as main_lincls builds it (``apex.parallel.LARC(trust_coefficient=.001,
    clip=False)``): timm's Lars with ``always_adapt`` so every parameter gets the trust ratio."""
    if s.optimizer == "lars":
        from timm.optim import Lars

        return Lars(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
                    trust_coeff=0.001, trust_clip=False, always_adapt=True)
    return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def linear_head(dim: int, num_classes: int, seed: int) -> nn.Linear:
    """The BN-free head of main_lincls: weight ~ normal(0, 0.01), bias 0 (seeded, same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=g)
        head.bias.zero_()
    return head


@torch.no_grad()
def feature_stats(shards: FeatureShards, acc: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and (unbiased) std of a feature folder, two streamed float64 passes, shards
    split over ranks; the same on every rank (what :func:`eval.probe.standardize` computes)."""
    rank, world = _world(acc)
    total = torch.zeros(shards.dim, dtype=torch.float64)
    for i in range(rank, len(shards), world):
        total += torch.from_numpy(shards.read(i)[0]).double().sum(0)
    mean = _all_reduce(total, world) / max(1, shards.num_samples)
    sq = torch.zeros(shards.dim, dtype=torch.float64)
    for i in range(rank, len(shards), world):
        sq += (torch.from_numpy(shards.read(i)[0]).double() - mean).pow(2).sum(0)
    var = _all_reduce(sq, world) / max(1, shards.num_samples - 1)
    return mean.float(), var.sqrt().float().clamp_min(1e-6)


def global_batches(shards: FeatureShards, epoch: int, batch_size: int, *, seed: int = 0, window: int = 4,
                   block_rows: int = 8192, start_batch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The global batches of ``epoch`` from ``start_batch`` on, as ``(x float32, y int64)``.

    The folder's rows are cut into blocks of ``block_rows`` (by row number, so the order does not
    depend on how many ranks wrote the shards); the block order is permuted by ``(seed, epoch)``;
    consecutive groups of ``window`` blocks are loaded together and their rows permuted by
    ``(seed, epoch, group)``; the resulting sequence is cut into batches of ``batch_size`` (the
    last one shorter). Groups wholly before ``start_batch`` are skipped without being read.
    Memory: one group (``window x block_rows`` rows) plus one batch.
    """
    n_all = shards.num_samples
    blocks = max(1, math.ceil(n_all / block_rows))
    order = np.random.default_rng([seed, epoch, 11]).permutation(blocks)
    skip = start_batch * batch_size  # rows of the epoch already consumed
    pos = 0  # epoch row position of the next group's first row
    carry_x: list[np.ndarray] = []
    carry_y: list[np.ndarray] = []
    held = 0
    for g, start in enumerate(range(0, blocks, window)):
        group = [int(b) for b in order[start:start + window]]
        spans = [(b * block_rows, min(n_all, (b + 1) * block_rows)) for b in group]
        n = sum(hi - lo for lo, hi in spans)
        if pos + n <= skip:
            pos += n
            continue
        parts = [shards.read_rows(lo, hi) for lo, hi in spans]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        perm = np.random.default_rng([seed, epoch, 13, g]).permutation(n)
        x, y = x[perm], y[perm]
        if pos < skip:
            x, y = x[skip - pos:], y[skip - pos:]
        pos += n
        carry_x.append(x)
        carry_y.append(y)
        held += len(y)
        if held >= batch_size:
            bx, by = np.concatenate(carry_x), np.concatenate(carry_y)
            cut = (len(by) // batch_size) * batch_size
            for j in range(0, cut, batch_size):
                yield bx[j:j + batch_size], by[j:j + batch_size]
            carry_x, carry_y, held = [bx[cut:]], [by[cut:]], len(by) - cut
    if held:
        yield np.concatenate(carry_x), np.concatenate(carry_y)


BatchSource = Callable[[int, int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def feature_source(shards: FeatureShards, s: StreamSettings, acc: Any = None,
                   mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> BatchSource:
    """``(epoch, start_batch) -> this rank's rows of each global batch`` (standardised when given stats)."""
    rank, world = _world(acc)

    def source(epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for bx, by in global_batches(shards, epoch, s.batch_size, seed=s.seed, window=s.window,
                                         block_rows=s.block_rows, start_batch=start_batch):
            x, y = torch.from_numpy(bx[rank::world]), torch.from_numpy(by[rank::world])
            if mean is not None and std is not None:
                x = (x - mean) / std
            yield x, y

    return source


def _step(head: nn.Linear, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, world: int) -> float:
    """One step on the global mean cross-entropy; grads and row counts summed over ranks."""
    dev = head.weight.device
    loss = F.cross_entropy(head(x.to(dev)), y.to(dev), reduction="sum")
    opt.zero_grad(set_to_none=False)
    loss.backward()
    flat = torch.cat([head.weight.grad.reshape(-1), head.bias.grad.reshape(-1),
                      torch.tensor([float(len(y)), float(loss.detach())], device=dev)])
    flat = _all_reduce(flat, world)
    rows, total = flat[-2], flat[-1]
    nw = head.weight.numel()
    head.weight.grad.copy_(flat[:nw].view_as(head.weight) / rows)
    head.bias.grad.copy_(flat[nw:nw + head.bias.numel()] / rows)
    opt.step()
    return float(total / rows)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return max(1, math.ceil(num_samples / batch_size))


def train_linear(
    source: BatchSource,
    *,
    dim: int,
    num_classes: int,
    num_samples: int,
    settings: StreamSettings,
    acc: Any = None,
    ckpt_dir: str | None = None,
    resume: str = "auto",
    config: dict[str, Any] | None = None,
    on_step: Callable[[int], None] | None = None,
    what: str = "probe",
    per_epoch: int | None = None,
    run_dir: str | None = None,
) -> tuple[nn.Linear, dict[str, Any]]:
    """Train a linear head over ``source`` batches (collective); returns it (on CPU) and a log.

    Args:
        source: ``(epoch, start_batch) -> this rank's (x [b, dim], y [b])`` for each global batch.
        num_samples: rows per epoch over all ranks (fixes the steps per epoch and the schedule).
        ckpt_dir: checkpoint folder (None: no checkpoints); ``resume`` ``auto``/``none``/a path.
        config: what the checkpoint records and a resume must match (the probe settings).
        on_step: called with the global step after each step and its checkpoint (tests inject
            faults here).
        per_epoch: global batches per epoch when ``source`` is not cut in ``batch_size`` rows.
        run_dir: where the preemption flag file ``PREEMPT`` is watched (default: beside ``ckpt_dir``).
    Returns ``(head, {"steps", "loss", "resumed_from"})``.
    """
    from stealer.engine import RunState

    settings.validate()
    acc = acc if acc is not None else Solo()
    rank, world = _world(acc)
    dev = getattr(acc, "device", torch.device("cpu"))
    head = linear_head(dim, num_classes, settings.seed).to(dev)
    opt = build_optimizer(head, settings)
    per_epoch = per_epoch or steps_per_epoch(num_samples, settings.batch_size)
    total = per_epoch * settings.epochs
    cfg = {**(config or {}), "probe_settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__
                                                if k != "ckpt_every"},
           "dim": dim, "num_classes": num_classes, "num_samples": num_samples}
    state = RunState(acc, ckpt_dir, config=cfg, what=what, steps_per_epoch=per_epoch, run_dir=run_dir,
                     rerun="rerun the probe (it resumes from its checkpoint)",
                     start_over="delete the probe's ckpt folder or use a new run name")
    state.track(head=head, optimizer=opt)
    found = state.resume(resume) if ckpt_dir is not None else None
    epoch0, batch0 = (int(found["epoch"]), int(found["batch"])) if found else (0, 0)
    step = epoch0 * per_epoch + batch0
    last = float("nan")
    try:
        for epoch in range(epoch0, settings.epochs):
            lr = settings.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / settings.epochs))  # main_lincls adjust_learning_rate
            for group in opt.param_groups:
                group["lr"] = lr
            start = batch0 if epoch == epoch0 else 0
            b = start
            for x, y in source(epoch, start):
                last = _step(head, opt, x, y, world)
                b += 1
                step += 1
                every = settings.ckpt_every
                state.step_end(step, periodic=bool(every) and step % every == 0 and step < total,
                               where=f"{what} preempted at step {step}/{total}", epoch=epoch, batch=b)
                if on_step is not None:
                    on_step(step)
            if b != per_epoch:
                raise RuntimeError(f"{what}: epoch {epoch} gave {b} batches, expected {per_epoch}; this is a bug")
        if state.enabled and state.last_saved_step != total:
            state.save(total, epoch=settings.epochs, batch=0)
    finally:
        state.close()
    return head.cpu().eval(), {"steps": total, "loss": last, "resumed_from": str(state.resumed_from or "")}


@torch.no_grad()
def evaluate_linear(head: nn.Linear, shards: FeatureShards, *, mean: torch.Tensor | None = None,
                    std: torch.Tensor | None = None, rows: int = 4096) -> tuple[float, torch.Tensor]:
    """Top-1 of ``head`` on a feature folder (read a chunk at a time) and its predictions (int64, in order)."""
    preds, correct, n = [], 0, 0
    for _, x, y in shards.chunks(rows):
        if mean is not None and std is not None:
            x = (x - mean) / std
        p = head(x).argmax(1)
        preds.append(p)
        correct += int((p == y).sum())
        n += len(y)
    return (correct / n if n else float("nan")), (torch.cat(preds) if preds else torch.empty(0, dtype=torch.long))


@torch.no_grad()
def knn_stream(train: FeatureShards, test: FeatureShards, *, k: int = 20, temperature: float = 0.07,
               weighted: bool = True, acc: Any = None, train_rows: int = 65536,
               return_predictions: bool = False) -> dict[str, Any]:
    """Weighted kNN (:func:`eval.knn.knn_classify`'s classifier) with training features streamed.

    Rank r classifies test rows ``r, r+W, ...`` (held with their running top-k: ``O(k x N_test / W)``)
    against every training shard, read ``train_rows`` rows at a time; the correct counts are summed
    over ranks and the predictions gathered back into test order. Same returns as ``knn_classify``.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0 (got k={k}, temperature={temperature})")
    if train.num_samples == 0:
        raise ValueError(f"kNN needs at least one training sample ({train.dir} is empty)")
    if train.dim != test.dim:
        raise ValueError(f"train features {train.dir} have D={train.dim}, test {test.dir} D={test.dim}: another encoder")
    rank, world = _world(acc)
    dev = getattr(acc, "device", torch.device("cpu")) if acc is not None else torch.device("cpu")
    qx, qy = test.load_all()
    mine = torch.arange(rank, len(qy), world)
    q = F.normalize(qx[mine].float().to(dev), dim=1)
    y = qy[mine].long().to(dev)
    kk = min(int(k), train.num_samples)
    best_s: torch.Tensor | None = None
    best_l: torch.Tensor | None = None
    num_classes = max(train.num_classes, test.num_classes, int(qy.max()) + 1 if len(qy) else 0)
    for _, bx, by in train.chunks(train_rows):
        if (by < 0).any():
            raise ValueError(f"kNN sets must be labelled (found samples without a cls in {train.dir})")
        bank = F.normalize(bx.float().to(dev), dim=1)
        num_classes = max(num_classes, int(by.max()) + 1)
        sim = q @ bank.T
        s, i = sim.topk(min(kk, sim.shape[1]), dim=1, largest=True, sorted=True)
        lab = by.to(dev)[i]
        if best_s is not None:  # merge exactly as eval.knn._topk_neighbours does
            both = torch.cat([best_s, s], 1)
            s, j = both.topk(min(kk, both.shape[1]), dim=1, largest=True, sorted=True)
            lab = torch.cat([best_l, lab], 1).gather(1, j)
        best_s, best_l = s, lab
    assert best_s is not None and best_l is not None
    w = (best_s / temperature).exp() if weighted else torch.ones_like(best_s)
    votes = torch.zeros(len(y), num_classes, dtype=torch.float32, device=dev)
    votes.scatter_add_(1, best_l, w.float())
    pred, counts = vote_counts(votes, y, num_classes)
    top5_ok = num_classes >= 5
    counts = _all_reduce(counts, world)
    c1, c5, n = (int(v) for v in counts.cpu().tolist())
    out: dict[str, Any] = {"top1": c1 / n if n else float("nan"), "top5": c5 / n if (n and top5_ok) else float("nan"),
                           "k": kk, "temperature": float(temperature), "n_test": n}
    if return_predictions:
        if world > 1:
            m = (len(qy) + world - 1) // world
            padded = torch.full((m,), -1, dtype=torch.long, device=dev)
            padded[: len(pred)] = pred
            allp = [torch.empty_like(padded) for _ in range(world)]
            torch.distributed.all_gather(allp, padded)
            pred = torch.stack(allp).T.reshape(-1)[: len(qy)]
        out["predictions"] = pred.cpu()
    return out


# ---------------------------------------------------------------------------------------------
# The linear-evaluation protocol of SimSiam / MoCo v3


def resize_size(image_size: int) -> int:
    """The eval Resize of main_lincls scaled to ``image_size`` (256 for 224)."""
    return int(round(image_size * 256 / 224))


def center_crop(image_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``CenterCrop(image_size)`` of uint8 batches already resized to :func:`resize_size`."""
    from torchvision.transforms.v2 import functional as TF

    return lambda x: TF.center_crop(x, [image_size, image_size])


def random_resized_crop_flip(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """``RandomResizedCrop(image_size)`` (scale 0.08-1, ratio 3/4-4/3) + ``RandomHorizontalFlip`` per
    image of a uint8 batch, drawn from the global torch RNG (which checkpoints carry)."""
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.v2 import functional as TF

    out = []
    for img in x:
        i, j, h, w = RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        crop = TF.resized_crop(img, i, j, h, w, [image_size, image_size], antialias=True)
        if torch.rand(1).item() < 0.5:
            crop = TF.horizontal_flip(crop)
        out.append(crop)
    return torch.stack(out) if out else x.new_empty(0, x.shape[1], image_size, image_size)


def _fingerprint(modules: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone().cpu() for k, v in m.state_dict().items()} for m in modules]


def sanity_check(before: list[dict[str, torch.Tensor]], modules: list[nn.Module]) -> None:
    """main_lincls ``sanity_check``: every parameter and buffer of the frozen encoder is unchanged."""
    for old, m in zip(before, modules):
        for k, v in m.state_dict().items():
            if not torch.equal(old[k], v.detach().cpu()):
                raise RuntimeError(f"linear evaluation changed the frozen encoder ({k}); this is a bug")


def lincls_protocol(
    encode: Callable[[torch.Tensor], torch.Tensor],
    modules: list[nn.Module],
    train_dir: str,
    *,
    dim: int,
    num_classes: int,
    channels: int,
    image_size: int,
    settings: StreamSettings,
    acc: Any = None,
    ckpt_dir: str | None = None,
    resume: str = "auto",
    config: dict[str, Any] | None = None,
    limit: int | None = None,
    workers: int = 0,
    on_step: Callable[[int], None] | None = None,
    run_dir: str | None = None,
) -> tuple[nn.Linear, dict[str, Any]]:
    """The linear evaluation of SimSiam (and MoCo v3): a linear head on a frozen encoder, trained on
    augmented images.

    Follows facebookresearch/simsiam ``main_lincls.py`` (read at commit 08f45d0; ``main_worker``,
    ``train``, ``adjust_learning_rate``, ``sanity_check``; moco-v3 ``main_lincls.py`` is the same
    protocol): training images through ``RandomResizedCrop(S)`` + ``RandomHorizontalFlip`` and the
    frozen encoder in eval mode (BatchNorm statistics untouched), a BN-free ``nn.Linear`` head with
    weight ~ normal(0, 0.01) and bias 0, cross-entropy, LARC (``--lars``: trust coefficient 0.001, no
    clipping) over SGD momentum 0.9, weight decay 0, ``init_lr = lr x batch / 256`` with ``lr``
    0.1, batch 4096 (global), cosine per epoch, 90 epochs (``settings`` holds these knobs;
    ``settings.window``/``block_rows`` are unused). Evaluation is ``Resize(S*256/224)`` + ``CenterCrop(S)``: run
    :func:`eval.feature_shards.write_feature_shards` with :func:`center_crop` and score the head
    with :func:`evaluate_linear` (no standardisation). After training, the encoder's parameters
    and buffers are checked unchanged (``sanity_check``).

    Differences: images come from the project's shards (decoded at ``resize_size(S)`` square, then
    cropped) instead of an ImageFolder; the batch order is the shard stream's for ``(seed, epoch)``.
    """
    from stealer.data import ShardStream, open_shards

    settings.validate()
    rank, world = _world(acc)
    dev = getattr(acc, "device", torch.device("cpu")) if acc is not None else torch.device("cpu")
    for m in modules:
        m.eval()
    before = _fingerprint(modules)
    source_set = open_shards(train_dir)
    n = source_set.num_samples if limit is None else min(int(limit), source_set.num_samples)
    per_rank = max(1, math.ceil(settings.batch_size / world))
    stream = ShardStream(source_set, batch_size=per_rank, rank=rank, world=world, seed=settings.seed, shuffle=True,
                         workers=workers, channels=channels, image_size=resize_size(image_size), limit=limit,
                         drop_last=False)

    def source(epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in stream.iter_epoch(epoch, start_batch):
            x = random_resized_crop_flip(batch["image"], image_size).to(dev)
            with torch.no_grad():
                f = encode(x).float()
            yield f, batch["label"]

    # the stream's own plan fixes the steps per epoch: len(stream) global batches of <= batch_size rows
    head, log = train_linear(source, dim=dim, num_classes=num_classes, num_samples=n, per_epoch=len(stream),
                             settings=settings, acc=acc, ckpt_dir=ckpt_dir, resume=resume, config=config,
                             on_step=on_step, what="linear evaluation", run_dir=run_dir)
    sanity_check(before, modules)
    log["steps_per_epoch"] = len(stream)
    return head, log
