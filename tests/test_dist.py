"""Distributed helpers: rank discovery, and real 2-process gloo gathers.

The gradient relation checked here: under ``gather=True`` rank r returns its
local mean ``L_r`` and, after backward, holds ``d(sum_r' L_r')/d s_r`` for its
own rows (the gather's backward sums over ranks). So the concatenation of the
per-rank student gradients, divided by the world size W, equals the gradient of
``mean_r L_r`` w.r.t. the full student matrix; and for a shared parameter,
``sum_r grad_r / W`` (what DDP's all-reduce-mean produces) equals the same. With
equal local sizes ``mean_r L_r`` is single-process infonce on the whole batch;
with unequal sizes it is the average of the per-rank means, not the mean over all
rows.
"""

from __future__ import annotations

from conftest import free_port

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from stealer.dist import (
    DistInfo,
    dist_info,
    gather_nograd,
    gather_sizes,
    gather_with_grad,
    is_main_process,
)
from stealer.losses import infonce_sym as infonce  # the symmetric form this file pins (the ICML'22 infonce: tests/test_losses.py)

WORLD = 2
SIZE_CASES = [[3, 5], [4, 4], [0, 3]]
DIM, TEMP = 4, 0.3

_ENV_VARS = [
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID",
]  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_dist_info_single_process(clean_env: pytest.MonkeyPatch) -> None:
    assert dist_info() == DistInfo(0, 1, 0, 0)
    assert is_main_process()


def test_dist_info_torchrun_wins_over_slurm(clean_env: pytest.MonkeyPatch) -> None:
    for k, v in dict(RANK=5, WORLD_SIZE=8, LOCAL_RANK=1, GROUP_RANK=1).items():
        clean_env.setenv(k, str(v))
    for k, v in dict(SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_LOCALID=0, SLURM_NODEID=0).items():
        clean_env.setenv(k, str(v))
    assert dist_info() == DistInfo(5, 8, 1, 1)
    assert not is_main_process()
    clean_env.delenv("GROUP_RANK")
    clean_env.setenv("NODE_RANK", "3")
    assert dist_info().node_rank == 3


def test_dist_info_slurm(clean_env: pytest.MonkeyPatch) -> None:
    for k, v in dict(SLURM_PROCID=6, SLURM_NTASKS=8, SLURM_LOCALID=2, SLURM_NODEID=1).items():
        clean_env.setenv(k, str(v))
    assert dist_info() == DistInfo(6, 8, 2, 1)


def test_gathers_are_identity_when_not_distributed() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert gather_nograd(x) is x
    assert gather_sizes(3) == [3]


def _data(sizes: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Same full student inputs, targets and shared weight on every rank."""
    g = torch.Generator().manual_seed(sum(sizes))
    x = torch.randn(sum(sizes), DIM, generator=g, dtype=dtype)
    target = torch.randn(sum(sizes), DIM, generator=g, dtype=dtype)
    weight = torch.randn(DIM, DIM, generator=g, dtype=dtype)
    return x, target, weight


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch_dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        assert torch_dist.get_world_size() == WORLD
        info = dist_info()
        assert (info.rank, info.world_size) == (rank, WORLD)
        assert is_main_process() == (rank == 0)
        results = {}
        for sizes in SIZE_CASES:
            for dtype in (torch.float64, torch.float32):
                start = sum(sizes[:rank])
                local = slice(start, start + sizes[rank])
                x, target, weight = _data(sizes, dtype)
                assert gather_sizes(sizes[rank]) == sizes
                assert torch.equal(gather_nograd(target[local]), target)

                # gradient w.r.t. the student matrix itself
                s = x[local].clone().requires_grad_(True)
                gathered = gather_with_grad(s)
                assert torch.equal(gathered.detach(), x)
                loss = infonce(s, target[local], temperature=TEMP, gather=True)
                loss.backward()

                # gradient w.r.t. a shared parameter: student = x @ W
                w = weight.clone().requires_grad_(True)
                infonce(x[local] @ w, target[local], temperature=TEMP, gather=True).backward()

                assert s.grad is not None and w.grad is not None
                results[(tuple(sizes), str(dtype))] = {
                    "loss": loss.detach(), "s_grad": s.grad, "w_grad": w.grad,
                }  # fmt: skip
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()




def _per_rank_losses(s: torch.Tensor, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Single-process reference: per-rank mean of the symmetric per-row InfoNCE."""
    sn, tn = F.normalize(s, dim=1), F.normalize(t, dim=1)
    logits = sn @ tn.T / TEMP  # M x M
    labels = torch.arange(s.shape[0])
    rows = 0.5 * (
        F.cross_entropy(logits, labels, reduction="none")
        + F.cross_entropy(logits.T, labels, reduction="none")
    )
    return torch.stack([r.sum() / max(len(r), 1) for r in rows.split(sizes)])


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    ctx = mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process gloo test timed out (a collective hung)")
    return [torch.load(Path(out, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("sizes", SIZE_CASES, ids=lambda s: f"sizes{s[0]}-{s[1]}")
def test_two_rank_infonce_gradient_matches_single_process(
    two_rank_results: list[dict], sizes: list[int], dtype: torch.dtype, tol: float
) -> None:
    ranks = [r[(tuple(sizes), str(dtype))] for r in two_rank_results]
    x, target, weight = _data(sizes, dtype)

    # reference objective: mean over ranks of the per-rank means
    s = x.clone().requires_grad_(True)
    per_rank = _per_rank_losses(s, target, sizes)
    per_rank.mean().backward()
    w = weight.clone().requires_grad_(True)
    _per_rank_losses(x @ w, target, sizes).mean().backward()
    assert s.grad is not None and w.grad is not None

    torch.testing.assert_close(
        torch.stack([r["loss"] for r in ranks]), per_rank.detach(), atol=tol, rtol=0
    )
    # rank r holds d(sum_r' L_r')/d s_r: concatenate, divide by world size
    s_grad = torch.cat([r["s_grad"] for r in ranks]) / WORLD
    torch.testing.assert_close(s_grad, s.grad, atol=tol, rtol=0)
    # DDP: all-reduce-mean of the per-rank parameter gradients
    w_grad = sum(r["w_grad"] for r in ranks) / WORLD
    torch.testing.assert_close(w_grad, w.grad, atol=tol, rtol=0)

    if sizes[0] == sizes[1]:  # equal sizes: plain single-process infonce on the batch
        s2 = x.clone().requires_grad_(True)
        infonce(s2, target, temperature=TEMP).backward()
        assert s2.grad is not None
        torch.testing.assert_close(s_grad, s2.grad, atol=tol, rtol=0)


@pytest.mark.slow
def test_two_cpu_processes_victim_pretraining_and_sync_bn_on_cpu(tmp_path):
    """SimSiam victim pre-training on 2 CPU processes runs (SyncBatchNorm, which DDP refuses on CPU
    modules, is used on GPUs only), and a steal asking for train.sync_bn on CPU processes stops in one
    line after its query phase, which keeps every paid answer."""
    import subprocess
    import sys

    from conftest import tiny_steal_assets

    from stealer.cache import ResponseCache
    from victims.ledger import QueryLedger

    repo = Path(__file__).resolve().parents[1]
    sizes = {"animal_mnist": {"victim_train": 64, "query": 64, "probe_train": 8, "probe_test": 8},
             "digits": {"probe_train": 8, "probe_test": 8}}
    root, victim = tiny_steal_assets(tmp_path, sizes)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    run2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    p = subprocess.run(run2 + ["--master_port", str(free_port()), str(repo / "launch" / "train_victim.py"),
                               f"out_dir={tmp_path}", "name=v2", "cpu=true", f"train_data={root}/data/animal_mnist/victim_train",
                               "image_size=16", "model.width=8", "model.dim=32", "model.pred_dim=16", "batch_size=16",
                               "epochs=1"], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "BatchNorm statistics are per process on the CPU (2 processes" in p.stdout + p.stderr
    assert (tmp_path / "v2" / "checkpoint.pth.tar").is_file()
    p = subprocess.run(run2 + ["--master_port", str(free_port()), str(repo / "launch" / "steal.py"), f"out_dir={tmp_path}",
                               "name=s", "cpu=true", f"victim.checkpoint={victim}", "victim.budget=64",
                               f"data.query={root}/data/animal_mnist/query", "data.image_size=16", "student.width=8",
                               "train.sync_bn=true"], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    errors = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("error:")]
    assert p.returncode != 0 and errors and "train.sync_bn needs GPUs" in errors[0] and "train.sync_bn=false" in errors[0]
    # the preflight refuses it before the query phase pays: nothing charged, nothing cached
    ledger = tmp_path / "s" / "victim_state" / "ledger.sqlite"
    assert not ledger.exists() or QueryLedger(ledger).spent("attacker") == 0
    assert not (tmp_path / "s" / "cache").exists() or ResponseCache(tmp_path / "s" / "cache").num_cached() == 0
