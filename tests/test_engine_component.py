"""stealer.engine.RunState, the one save/resume/stop component: GradScaler and RNG round trips, the
changed-settings refusal, preemption (flag file, USR2, SLURM array requeue, exit 3), atomic writes,
and every training loop's fp16 GradScaler state carried across a preemption."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from stealer.ckpt import atomic_write, find_latest
from stealer.engine import RunState
from stealer.preempt import Preempted


def _acc(scale: float = 2.0 ** 8):
    """A CPU accelerator carrying a real GradScaler (what fp16 on a GPU gives), doubling its scale every step."""
    from launch.common import make_accelerator

    acc = make_accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1)
    return acc


def _model_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    return model, opt, sched


def _steps(acc, model, opt, sched, n: int) -> None:
    for _ in range(n):
        x = torch.randn(8, 4)  # the global RNG: a resume that lost it would draw other batches
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        acc.backward(loss)
        opt.step()
        sched.step()


def test_scaler_rng_and_per_rank_state_round_trip(tmp_path):
    acc = _acc()
    model, opt, sched = _model_opt()
    model, opt = acc.prepare(model, opt)
    state = RunState(acc, tmp_path / "ckpt", config={"lr": 0.1}).track(model=model, optimizer=opt, scheduler=sched)
    _steps(acc, model, opt, sched, 3)
    assert acc.scaler.get_scale() == 2.0 ** 11  # the scaler really scaled (and grew) on every step
    gen = torch.Generator().manual_seed(5)
    gen.manual_seed(5)
    state.save(3, per_rank=lambda: {"gen": gen.get_state()}, epoch=0, batch=3)
    state.close()
    _steps(acc, model, opt, sched, 3)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ref_scaler = acc.scaler.state_dict()
    assert ref_scaler["scale"] == 2.0 ** 14

    acc2 = _acc()
    model2, opt2, sched2 = _model_opt()
    torch.manual_seed(123)  # another RNG: the checkpoint's must come back
    state2 = RunState(acc2, tmp_path / "ckpt", config={"lr": 0.1}).track(model=model2, optimizer=opt2, scheduler=sched2)
    found = state2.resume("auto")
    assert found["step"] == 3 and found["epoch"] == 0 and found["batch"] == 3 and found["world_size"] == 1
    assert acc2.scaler.get_scale() == 2.0 ** 11 and torch.equal(state2.mine["gen"], gen.get_state())
    model2, opt2 = acc2.prepare(model2, opt2)
    _steps(acc2, model2, opt2, sched2, 3)
    state2.close()
    assert all(torch.equal(ref[k], model2.state_dict()[k]) for k in ref)
    assert acc2.scaler.state_dict() == ref_scaler


def test_changed_settings_refused_allowed_and_forced(tmp_path, capsys):
    cfg = {"train": {"lr": 1.0, "epochs": 2}, "name": "x"}
    model, opt, _ = _model_opt()
    s = RunState(None, tmp_path / "ckpt", config=cfg).track(model=model)
    s.save(1, epoch=0, batch=1)
    s.close()
    other = {"train": {"lr": 0.5, "epochs": 4}, "name": "x"}
    s = RunState(None, tmp_path / "ckpt", config=other, may_change={"train.epochs"}).track(model=model)
    with pytest.raises(ValueError) as e:
        s.resume("auto")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("checkpoint ") and "train.lr 1.0 -> 0.5" in msg
    assert "train.epochs" not in msg and "--resume-force" in msg
    # an allow-listed key alone resumes silently
    s = RunState(None, tmp_path / "ckpt", config={**cfg, "train": {"lr": 1.0, "epochs": 4}},
                 may_change={"train.epochs"}).track(model=model)
    assert s.resume("auto")["step"] == 1
    # forced: resumes and lists what differs
    s = RunState(None, tmp_path / "ckpt", config=other, force=True).track(model=model)
    assert s.resume("auto")["step"] == 1
    out = capsys.readouterr().out
    assert "--resume-force" in out and "train.lr 1.0 -> 0.5" in out and "train.epochs 2 -> 4" in out
    # a checkpoint of another kind of run (no 'generator') is refused in one line, not a KeyError
    s = RunState(None, tmp_path / "ckpt", config=cfg, what="dfme", start_over="use train.resume=none").track(generator=model)
    with pytest.raises(ValueError, match=r"^dfme checkpoint .* holds no generator .*use train.resume=none$"):
        s.resume("auto")


def test_preemption_flag_checkpoints_requeues_the_array_task_and_exits_3(tmp_path, monkeypatch):
    from launch.common import exit_preempted
    from stealer import preempt

    calls = []
    monkeypatch.setattr(preempt.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    model, opt, sched = _model_opt()
    closed = []
    s = RunState(None, tmp_path / "ckpt", config={}, run_dir=tmp_path).track(model=model, optimizer=opt)
    s.on_stop(lambda: closed.append(1))
    s.step_end(1, periodic=False, where="x preempted at step 1/9", epoch=0, batch=1)
    assert find_latest(tmp_path / "ckpt") is None and not calls  # no request: nothing written, nothing requeued
    (tmp_path / "PREEMPT").touch()  # what the batch script's trap writes
    with pytest.raises(Preempted) as e:
        s.step_end(2, periodic=False, where="x preempted at step 2/9", epoch=0, batch=2)
    assert str(e.value).startswith("x preempted at step 2/9; checkpoint saved in ") and "SLURM job requeued" in str(e.value)
    assert calls == [["scontrol", "requeue", "7_1"]] and closed == [1]
    path, ck = find_latest(tmp_path / "ckpt")
    assert ck["step"] == 2 and ck["batch"] == 2 and all(torch.equal(ck["model"][k], v) for k, v in model.state_dict().items())
    acc = type("Acc", (), {"is_main_process": True})()
    with pytest.raises(SystemExit) as ex:
        exit_preempted(acc, e.value)
    assert ex.value.code == 3
    # SIGUSR2 straight to the process works too (and the handler is restored on close)
    (tmp_path / "PREEMPT").unlink()
    before = signal.getsignal(signal.SIGUSR2)
    s = RunState(None, tmp_path / "ckpt2", config={}, run_dir=tmp_path).track(model=model)
    assert not s.should_stop()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert s.should_stop()
    s.close()
    assert signal.getsignal(signal.SIGUSR2) is before


def test_atomic_write_uses_a_process_unique_temp_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    seen = []

    def write(f):
        seen.append(os.path.basename(f.name))
        f.write(b"new")

    target.write_bytes(b"old")
    atomic_write(target, write)
    assert target.read_bytes() == b"new"
    assert seen[0].startswith(".f.bin.") and f".{os.getpid()}." in seen[0] and seen[0].endswith(".tmp")

    def torn(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, torn)
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


# ------------------------------------------------------------------ every loop: the fp16 GradScaler
class _Posteriors:
    """A fake classifier victim: fixed posteriors per image."""

    def describe(self):
        return {"arch": "fake", "num_classes": 3, "in_chans": 1, "image_size": 8}

    def query(self, images, user):
        m = images.float().mean(dim=(1, 2, 3))
        return torch.softmax(torch.stack([torch.cos(m / 40 + j) * 3 for j in range(3)], dim=1), dim=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from conftest import tiny_steal_assets

    root = tmp_path_factory.mktemp("scaler")
    return tiny_steal_assets(root, {"animal_mnist": {"victim_train": 32, "query": 48}})


def _runner(loop: str, root, victim, tmp):
    """A function acc -> (final weights) that runs ``loop`` once in ``tmp`` (resuming what is there)."""
    from stealer.config import load_config

    data = root / "data" / "animal_mnist"
    if loop == "steal":
        from launch.common import build_victim_api
        from stealer.steal import StealConfig, run_query_phase, run_train_phase

        cfg = load_config(StealConfig, None, [f"out_dir={tmp}", "name=s", f"victim.checkpoint={victim}",
                                              f"data.query={data}/query", "data.image_size=16", "student.width=4",
                                              "train.epochs=2", "train.batch_size=16", "train.ckpt_every=100"])
        run_query_phase(cfg, build_victim_api(cfg.victim, cfg.run_dir), None)

        def go(acc):
            run_train_phase(cfg, acc)
            return torch.load(cfg.run_dir / "student.pt", weights_only=True)["state_dict"]
        return go
    if loop == "simsiam":
        from stealer.pretrain import VictimTrainConfig, train_simsiam_victim

        cfg = load_config(VictimTrainConfig, None, [f"out_dir={tmp}", "name=v", f"train_data={data}/victim_train",
                                                    "image_size=16", "model.width=4", "model.dim=16", "model.pred_dim=8",
                                                    "epochs=2", "batch_size=8", "ckpt_every=100"])
        return lambda acc: torch.load(train_simsiam_victim(cfg, acc), weights_only=True)["state_dict"]
    if loop == "classifier":
        from stealer.train_classifier import ClassifierTrainConfig, train_classifier

        cfg = load_config(ClassifierTrainConfig, None, [f"out_dir={tmp}", "name=c", f"train_data={data}/victim_train",
                                                        "image_size=16", "model.width=4", "epochs=2", "batch_size=8",
                                                        "ckpt_every=100"])
        return lambda acc: torch.load(train_classifier(cfg, acc), weights_only=True)["state_dict"]
    from stealer.classifier_attacks import (ClassifierAttackConfig, CloneConfig, CloneTrainConfig, PosteriorCache, data_free,
                                            knockoff_random, train_clone)
    if loop == "knockoff":
        pool = torch.randint(0, 256, (48, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        cache = PosteriorCache(tmp / "cache", {"out_dim": 3, "channels": 1, "image_size": [8, 8]})
        knockoff_random(_Posteriors(), cache, pool, budget=48, user="u", batch_size=16)
        cache.finalize("test")
        return lambda acc: train_clone(tmp / "cache", clone_cfg=CloneConfig(width=4), accelerator=acc, channels=1,
                                       image_size=8, cfg=CloneTrainConfig(epochs=2, batch_size=8),
                                       ckpt_dir=tmp / "ckpt_clone")[0].state_dict()
    assert loop == "dfme"
    a = ClassifierAttackConfig(name="dfme", df_batch_size=4, gen_width=8, nz=8, clone_iters=1)
    return lambda acc: data_free(_Posteriors(), PosteriorCache(tmp / "pcache", {"out_dim": 3}), kind="dfme", budget=8 * 12,
                                 user="u", cfg=a, clone_cfg=CloneConfig(width=4), num_classes=3, channels=1, image_size=8,
                                 accelerator=acc, ckpt_dir=tmp / "ckpt_df")[0].state_dict()


@pytest.mark.parametrize("loop", ["steal", "simsiam", "classifier", "knockoff", "dfme"])
def test_every_loop_carries_the_grad_scaler_across_a_preemption(shards, tmp_path, monkeypatch, loop):
    root, victim = shards
    ref_acc = _acc()
    ref = _runner(loop, root, victim, tmp_path / "ref")(ref_acc)
    ref_scaler = ref_acc.scaler.state_dict()
    assert ref_scaler["scale"] > 2.0 ** 8  # the scaler was used on this loop's steps

    run = _runner(loop, root, victim, tmp_path / "run")
    calls = {"n": 0}
    real = RunState.should_stop

    def stop_at_step_3(self):
        calls["n"] += 1
        return calls["n"] == 3 or real(self)

    monkeypatch.setattr(RunState, "should_stop", stop_at_step_3)
    stopped = _acc()
    with pytest.raises(Preempted):
        run(stopped)
    monkeypatch.undo()
    saved = stopped.scaler.state_dict()
    assert saved["scale"] != ref_scaler["scale"]  # stopped early: the scale is not the final one yet
    fresh = _acc()
    got = run(fresh)  # resumes: the loss scale continues from the checkpoint, not from 2**8
    assert fresh.scaler.state_dict() == ref_scaler
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    np.testing.assert_equal(len(ref), len(got))


TWO_RANKS = r'''
import json, os, signal, sys, torch
from launch.common import make_accelerator
from stealer.engine import RunState
from stealer.preempt import Preempted
out = sys.argv[1]
acc = make_accelerator(cpu=True)
rank = acc.process_index
torch.manual_seed(10 + rank)  # each rank its own stream
model = torch.nn.Linear(2, 2)
state = RunState(acc, f"{out}/ckpt", config={"x": 1}, run_dir=out, preempt_every=4).track(model=model)
stopped_at = None
try:
    for step in range(1, 10):
        torch.rand(4)
        if step == 3 and rank == 1:
            os.kill(os.getpid(), signal.SIGUSR2)  # the signal reaches one rank only
        state.step_end(step, periodic=False, where=f"preempted at step {step}", epoch=0, batch=step)
except Preempted as e:
    stopped_at = step
after = torch.rand(3).tolist()  # what this rank draws next, from the checkpointed state
torch.manual_seed(999)
again = RunState(acc, f"{out}/ckpt", config={"x": 1}, run_dir=out).track(model=model)
found = again.resume("auto")
json.dump({"stopped_at": stopped_at, "after": after, "resumed": torch.rand(3).tolist(), "step": found["step"],
           "ranks": len(found["ranks"]), "calls": state.preempt.calls, "collectives": state.preempt.collectives},
          open(f"{out}/rank{rank}.json", "w"))
again.close()
'''


class _TwoRanks:
    """An accelerator's surface for Preemption on 2 ranks: ``reduce`` sums this rank's flag with the other's."""

    num_processes, is_main_process, device = 2, True, "cpu"

    def __init__(self, other_flag: float = 0.0):
        self.other, self.reduces = other_flag, 0

    def reduce(self, t, reduction):
        assert reduction == "sum"
        self.reduces += 1
        return t + self.other

    def wait_for_everyone(self):
        pass


def test_preemption_agrees_every_check_every_calls_and_records_a_signal_at_once(tmp_path):
    from stealer.preempt import PREEMPT_CHECK_EVERY, Preemption

    acc = _TwoRanks()
    p = Preemption(tmp_path, acc, check_every=5)
    try:
        assert [p.should_stop() for _ in range(4)] == [False] * 4 and acc.reduces == 0  # no collective yet
        os.kill(os.getpid(), signal.SIGUSR2)
        assert p.signalled == signal.SIGUSR2 and p.requested()  # recorded the moment it arrives
        assert [p.should_stop() for _ in range(1)] == [True] and acc.reduces == 1  # call 5: agreed
    finally:
        p.close()
    other = _TwoRanks(other_flag=1.0)  # only the other rank saw it: this rank stops at the same call
    q = Preemption(tmp_path, other, check_every=3)
    try:
        assert [q.should_stop() for _ in range(6)] == [False, False, True, False, False, True] and other.reduces == 2
    finally:
        q.close()
    one = Preemption(tmp_path, None, check_every=5)  # one process: no collective, looked at on every call
    try:
        (tmp_path / "PREEMPT").touch()
        assert one.should_stop()
    finally:
        one.close()
        (tmp_path / "PREEMPT").unlink()
    for kw, want in (({}, PREEMPT_CHECK_EVERY), ({"preempt_every": 1}, 1)):  # where the engine is built
        state = RunState(None, tmp_path / "ck", config={}, run_dir=tmp_path, **kw)
        assert state.preempt.check_every == want
        state.close()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="check_every="):
            Preemption(tmp_path, acc, check_every=bad)


def test_two_ranks_agree_to_stop_and_each_gets_its_own_rng_back(tmp_path):
    """USR2 on rank 1 only, at step 3: both ranks stop at the same step, the next agreement (step 4 with
    preempt_every=4: one all-reduce in four steps), one checkpoint holds both ranks' RNG states, and a
    resume gives each rank its own back."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_port

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "two.py").write_text(TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(tmp_path / "two.py"), str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert a["stopped_at"] == b["stopped_at"] == 4 and a["step"] == b["step"] == 4 and a["ranks"] == 2
    assert a["calls"] == b["calls"] == 4 and a["collectives"] == b["collectives"] == 1
    assert a["resumed"] == a["after"] and b["resumed"] == b["after"] and a["after"] != b["after"]
