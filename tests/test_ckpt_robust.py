"""Checkpoints under bad conditions: a full disk mid-save and a resume with other settings
(refused with the differing values, or forced with --resume-force)."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_steal_assets

REPO = Path(__file__).resolve().parents[1]
SIZES = {"animal_mnist": {"victim_train": 32, "query": 96, "probe_train": 16, "probe_test": 16},
         "digits": {"probe_train": 16, "probe_test": 16}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_steal_assets(tmp_path_factory.mktemp("ckpt"), SIZES)


def _steal(root: Path, victim: Path, name: str, *extra: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch" / "steal.py"), f"out_dir={root}", f"name={name}", "cpu=true",
           f"victim.checkpoint={victim}", f"data.query={root}/data/animal_mnist/query", "data.image_size=16",
           "student.width=8", "train.batch_size=32", "train.ckpt_every=3", "train.augment=false", *extra]

    def cap() -> None:  # a disk that fills up: writes past limit_bytes fail with EFBIG, as ENOSPC would
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                          preexec_fn=cap if limit_bytes else None)


def _latest(run: Path) -> tuple[Path, dict]:
    from stealer.ckpt import find_latest

    found = find_latest(run / "ckpt")
    assert found is not None
    return found


def test_full_disk_during_save_keeps_the_previous_checkpoint(setup):
    root, victim = setup
    run = root / "disk"
    r = _steal(root, victim, "disk", "train.epochs=1")
    assert r.returncode == 0, r.stderr[-2000:]
    before_path, before = _latest(run)
    assert before["step"] == 3
    size = before_path.stat().st_size
    spent = json.loads((run / "steal.json").read_text())["query"]["ledger_spent"]
    # continue to 2 epochs on a "disk" that cannot hold another checkpoint: the save at step 6 fails
    r = _steal(root, victim, "disk", "train.epochs=2", limit_bytes=size // 2)
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "could not write checkpoint" in err[0] and "still valid" in err[0], r.stderr[-2000:]
    assert not list((run / "ckpt").glob("*.tmp")), "a torn temp file was left behind"
    path, state = _latest(run)
    assert path == before_path and state["step"] == 3
    assert all(torch.equal(state["student"][k], before["student"][k]) for k in before["student"])
    # space is back: the run resumes from the old checkpoint and finishes; no query is paid twice
    r = _steal(root, victim, "disk", "train.epochs=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "step 3/6" in r.stdout
    out = json.loads((run / "steal.json").read_text())
    assert out["train"]["steps"] == 6 and out["query"]["queries_sent"] == 0
    assert out["query"]["ledger_spent"] == spent == 96


def test_resume_with_other_settings_is_refused_then_forced(setup):
    root, victim = setup
    r = _steal(root, victim, "force", "train.epochs=1")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _steal(root, victim, "force", "train.epochs=2", "train.lr=0.5", "train.temperature=0.1")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: checkpoint") and "train.lr 1.0 -> 0.5" in err and "train.temperature 0.2 -> 0.1" in err
    assert "--resume-force" in err
    r = _steal(root, victim, "force", "--resume-force", "train.epochs=2", "train.lr=0.5", "train.temperature=0.1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--resume-force" in r.stdout and "train.lr 1.0 -> 0.5" in r.stdout and "step 3/6" in r.stdout
    assert json.loads((root / "force" / "steal.json").read_text())["train"]["steps"] == 6


def test_atomic_save_error_is_one_line_and_cleans_up(tmp_path, monkeypatch):
    from stealer import ckpt

    ckpt.save_checkpoint(tmp_path, 1, {"x": torch.ones(3)})

    def boom(obj, f):  # a write that fails half-way, as a full disk does
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"No space left on device.*still valid"):
        ckpt.save_checkpoint(tmp_path, 2, {"x": torch.zeros(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000001.pt", "latest"]
    path, state = ckpt.find_latest(tmp_path)
    assert path.name == "ckpt-000000001.pt" and torch.equal(state["x"], torch.ones(3))


def test_query_phase_stops_on_preemption_and_pays_nothing_twice(setup, tmp_path):
    from launch.common import build_victim_api
    from stealer.cache import ResponseCache
    from stealer.config import load_config
    from stealer.preempt import Preempted
    from stealer.steal import StealConfig, run_query_phase

    root, victim = setup
    cfg = load_config(StealConfig, None, [f"out_dir={tmp_path}", "name=q", f"victim.checkpoint={victim}",
                                          f"data.query={root}/data/animal_mnist/query", "data.image_size=16",
                                          "query.batch_size=24"])
    api = build_victim_api(cfg.victim, cfg.run_dir)
    flag = cfg.run_dir / "PREEMPT"

    class Warned:  # the batch script's trap touches the flag while the second batch is being answered
        def __init__(self, inner):
            self.inner, self.calls, self.ledger = inner, 0, inner.ledger

        def describe(self):
            return self.inner.describe()

        def query(self, images, user):
            self.calls += 1
            if self.calls == 2:
                flag.touch()
            return self.inner.query(images, user)

    with pytest.raises(Preempted, match="query phase after 48 queries"):
        run_query_phase(cfg, Warned(api), None)
    assert api.ledger.spent("attacker") == 48  # 2 of 4 batches paid, the rest never sent
    assert len(ResponseCache(cfg.run_dir / "cache").done_keys()) == 48  # and both are on disk
    flag.unlink()  # a requeued job is a new process: it clears the flag its predecessor saw
    out = run_query_phase(cfg, api, None)
    assert out["queries_sent"] == 48 and out["cached"] == 96 and api.ledger.spent("attacker") == 96


def test_victim_pretraining_preempted_and_resumed_is_bitwise_equal(setup):
    import time

    root, _ = setup
    base = [sys.executable, str(REPO / "launch" / "train_victim.py"), f"out_dir={root}", "cpu=true",
            f"train_data={root}/data/animal_mnist/victim_train", "image_size=16", "model.width=8", "model.dim=32",
            "model.pred_dim=16", "epochs=3", "batch_size=8", "ckpt_every=1000", "log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ref = subprocess.run(base + ["name=v_ref"], capture_output=True, text=True, timeout=600, env=env)
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = root / "v_pre"
    p = subprocess.Popen(base + ["name=v_pre"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.time()
    while time.time() - t0 < 300:  # the batch script's trap touches the flag after step 5
        m = run / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= 5:
            (run / "PREEMPT").touch()
            break
        assert p.poll() is None, "victim training ended before it could be preempted"
        time.sleep(0.05)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 3, err[-2000:]
    assert "victim training preempted at step" in out and list((run / "ckpt").glob("ckpt-*.pt"))
    assert not (run / "checkpoint.pth.tar").exists()
    r = subprocess.run(base + ["name=v_pre"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(root / "v_ref" / "checkpoint.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(run / "checkpoint.pth.tar", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
