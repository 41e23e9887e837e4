"""Distributed helpers: rank discovery and all-gathers of variable-sized batches.

No dependency on accelerate: ranks come from ``torch.distributed`` when it is
initialised, else from the torchrun / accelerate or SLURM environment variables.

The gathers accept a different number of rows on every rank (last batch of an
epoch, skipped corrupt images): sizes are all-gathered first, every rank pads to
the largest size, all-gathers, and strips the padding.

Example::

    >>> info = dist_info()
    >>> all_rows = gather_with_grad(local_rows)   # [sum_r n_r, D], rank order
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import torch.distributed as torch_dist
from torch import Tensor

__all__ = [
    "make_accelerator",
    "DistInfo",
    "dist_info",
    "is_distributed",
    "is_main_process",
    "gather_sizes",
    "gather_nograd",
    "gather_with_grad",
]


class DistInfo(NamedTuple):
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    node_rank: int


def _env_int(*names: str) -> int | None:
    """First of ``names`` set in the environment, as an int; None if none is."""
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def _info_from_env() -> DistInfo:
    # torchrun / accelerate launch
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is not None and world is not None:
        local = _env_int("LOCAL_RANK")
        node = _env_int("GROUP_RANK", "NODE_RANK")
        if node is None:
            local_world = _env_int("LOCAL_WORLD_SIZE")
            node = rank // local_world if local_world else 0
        return DistInfo(rank, world, local if local is not None else 0, node)
    # SLURM (srun launches one task per process)
    rank, world = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
    if rank is not None and world is not None:
        local = _env_int("SLURM_LOCALID")
        node = _env_int("SLURM_NODEID")
        return DistInfo(rank, world, local or 0, node or 0)
    return DistInfo(0, 1, 0, 0)


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return (
        torch_dist.is_available()
        and torch_dist.is_initialized()
        and torch_dist.get_world_size() > 1
    )


def dist_info() -> DistInfo:
    """Rank, world size, local rank and node rank of this process.

    Reads ``torch.distributed`` for rank and world size when it is initialised
    (local and node rank still come from the environment). Otherwise reads, in
    order: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``GROUP_RANK`` (or
    ``NODE_RANK``) as set by torchrun and accelerate; then ``SLURM_PROCID``/
    ``SLURM_NTASKS``/``SLURM_LOCALID``/``SLURM_NODEID``; else a single process.

    Returns:
        ``DistInfo(rank, world_size, local_rank, node_rank)``.
    """
    env = _info_from_env()
    if torch_dist.is_available() and torch_dist.is_initialized():
        return env._replace(
            rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size()
        )
    return env


def is_main_process() -> bool:
    """True on global rank 0 (and in a single-process run)."""
    return dist_info().rank == 0


def gather_sizes(n: int, device: torch.device | str | None = None) -> list[int]:
    """All-gather one integer per rank (e.g. the local batch size).

    Args:
        n: this rank's value.
        device: where the temporary tensor lives; must suit the backend
            (CUDA for NCCL). Defaults to the current CUDA device under NCCL,
            else CPU.

    Returns:
        ``[n_0, n_1, ...]`` in rank order; ``[n]`` when not distributed.
    """
    if not is_distributed():
        return [int(n)]
    if device is None:
        nccl = torch_dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
    local = torch.tensor([int(n)], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def _gather_padded(x: Tensor, sizes: list[int]) -> Tensor:
    """All-gather rows of ``x`` (this rank holds ``sizes[rank]``), concatenated."""
    max_n = max(sizes)
    padded = x.new_zeros((max_n, *x.shape[1:]))
    padded[: x.shape[0]] = x
    chunks = [torch.empty_like(padded) for _ in sizes]
    torch_dist.all_gather(chunks, padded.contiguous())
    return torch.cat([c[:n] for c, n in zip(chunks, sizes)], dim=0)


def gather_nograd(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """All-gather ``x`` [n_r, ...] from every rank, without autograd.

    Ranks may hold different ``n_r``; trailing dims and dtype must match.

    Args:
        x: this rank's rows, ``[n_r, ...]``.
        sizes: the result of ``gather_sizes(n_r)`` if already known (saves a
            collective); gathered here when None.

    Returns:
        ``[sum_r n_r, ...]`` concatenated in rank order (detached);
        ``x`` unchanged when not distributed.
    """
    if not is_distributed():
        return x
    with torch.no_grad():
        if sizes is None:
            sizes = gather_sizes(x.shape[0], x.device)
        return _gather_padded(x.detach(), sizes)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the gradient over ranks and keeps the local slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int]) -> Tensor:
        rank = torch_dist.get_rank()
        ctx.start = sum(sizes[:rank])
        ctx.n = sizes[rank]
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        # Every rank's loss may depend on our rows: d(sum_r L_r)/dx_local is the
        # sum over ranks of their gradient w.r.t. the gathered tensor, sliced.
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.n], None


def gather_with_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """All-gather ``x`` [n_r, ...] from every rank, keeping the autograd graph.

    The GatherLayer of SimCLR / lightly (``lightly/utils/dist.py``), extended to
    different ``n_r`` per rank. Backward all-reduces (sums) the incoming gradient
    and returns this rank's slice, so each rank receives
    ``d(sum_r L_r) / d x_local``; DDP then averages parameter gradients over ranks,
    which yields the gradient of ``mean_r L_r``. Every rank must call backward.

    Args:
        x: this rank's rows, ``[n_r, ...]``.
        sizes: the result of ``gather_sizes(n_r)`` if already known (saves a
            collective); gathered here when None.

    Returns:
        ``[sum_r n_r, ...]`` concatenated in rank order; ``x`` unchanged when not
        distributed.
    """
    if not is_distributed():
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device)
    out: Tensor = _GatherWithGrad.apply(x, sizes)
    return out


def make_accelerator(cpu: bool = False, mixed_precision: str = "no") -> Any:
    """An Accelerator on the GPU when there is one (and ``cpu`` is false), else CPU (gloo across processes)."""
    import logging

    from accelerate import Accelerator

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    use_cpu = cpu or not torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "no" if use_cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if use_cpu and mixed_precision == "fp16":
        mixed_precision = "no"  # fp16 autocast is a GPU feature; bf16 works on CPU
    return Accelerator(cpu=use_cpu, mixed_precision=mixed_precision)
