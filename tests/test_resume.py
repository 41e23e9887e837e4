"""Exact resume: a steal killed (SIGKILL) or preempted (flag file) mid-run and resumed ends with
bitwise the same student as an uninterrupted run, and spends exactly the same queries."""
from __future__ import annotations

from conftest import free_port, tiny_steal_assets

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SIZES = {"animal_mnist": {"victim_train": 64, "query": 200, "probe_train": 32, "probe_test": 32},
         "digits": {"probe_train": 16, "probe_test": 16}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_steal_assets(tmp_path_factory.mktemp("resume"), SIZES)




def _cmd(root: Path, victim: Path, name: str, nproc: int) -> list[str]:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return launcher + [str(REPO / "launch" / "steal.py"), f"out_dir={root}", f"name={name}", "cpu=true",
                       f"victim.checkpoint={victim}", f"data.query={root}/data/animal_mnist/query",
                       "data.image_size=16", "student.width=8", "train.epochs=4", "train.batch_size=32",
                       "train.ckpt_every=3", "train.log_every=1", "train.augment=true", "query.batch_size=40"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    metrics = run / "metrics.jsonl"
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def _proc_tools():
    """benchmarks/chaos_query.py's process helpers: descendants via /proc, kill_tree by PID, alive."""
    spec = importlib.util.spec_from_file_location("chaos_query", REPO / "benchmarks" / "chaos_query.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _spent(run: Path) -> int:
    with sqlite3.connect(run / "victim_state" / "ledger.sqlite") as con:
        return con.execute("SELECT spent FROM users WHERE user='attacker'").fetchone()[0]


def _student(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "student.pt", map_location="cpu", weights_only=True)["state_dict"]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_and_preemption_resume_bitwise(setup, nproc):
    root, victim = setup
    ref = f"ref{nproc}"
    subprocess.run(_cmd(root, victim, ref, nproc), env=_env(), check=True, capture_output=True, timeout=600)
    steps = json.loads((root / ref / "steal.json").read_text())["train"]["steps"]

    # 1) SIGKILL the launcher and every worker by PID after step 5 (checkpoint at step 3), then resume
    #    (torchrun starts its workers in sessions of their own: killing its process group missed them,
    #    they finished training and the resume had nothing to do)
    killed = f"kill{nproc}"
    p = subprocess.Popen(_cmd(root, victim, killed, nproc), env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_step(root / killed, 5, p)
    proc = _proc_tools()
    workers = [w for w in proc.descendants(p.pid) if proc.alive(w)]
    assert p.poll() is None and len(workers) >= (nproc if nproc > 1 else 0), workers  # alive mid-run
    gone = proc.kill_tree(p)  # SIGKILL by PID, then asserts every one is gone
    assert p.returncode == -signal.SIGKILL and set(workers) <= set(gone)
    assert not any(proc.alive(w) for w in workers)
    last = json.loads((root / killed / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 5 <= last < steps and not (root / killed / "student.pt").exists()  # the run had not finished
    time.sleep(1.0)
    assert not (root / killed / "student.pt").exists()  # and nothing kept training it behind our back
    r = subprocess.run(_cmd(root, victim, killed, nproc) + ["--resume", "auto"], env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((root / killed / "steal.json").read_text())["train"]["steps"] == steps

    # 2) preemption through the flag file (what the sbatch trap writes): exit 3, checkpointed, resumable
    pre = f"pre{nproc}"
    p = subprocess.Popen(_cmd(root, victim, pre, nproc), env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _wait_for_step(root / pre, 4, p)
    (root / pre / "PREEMPT").touch()
    out, err = p.communicate(timeout=300)
    if nproc == 1:
        assert p.returncode == 3, err[-3000:]
    else:  # torchrun exits 1 when a worker exits non-zero; the workers' own code is 3
        assert p.returncode == 1 and "exitcode  : 3" in err, err[-3000:]
    assert "preempted at step" in out
    r = subprocess.run(_cmd(root, victim, pre, nproc) + ["--resume", "auto"], env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    ref_w = _student(root / ref)
    for run in (killed, pre):
        _assert_same(ref_w, _student(root / run))
        assert _spent(root / run) == _spent(root / ref) == 200  # each query image paid exactly once
