"""Every training loop, through stealer.engine.RunState, survives a SIGKILL and a preemption:

one run per loop (steal train phase, SimSiam victim, classifier victim, Knockoff clone, DFME) is
SIGKILLed mid-run with its DataLoader worker (the test asserts every process is gone and that the
run had not finished), resumed, preempted through the flag file (exit 3, message), resumed again,
and must end bitwise equal to an uninterrupted run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_steal_assets
from kill_helpers import alive, descendants, kill_tree

REPO = Path(__file__).resolve().parents[1]
SIZES = {"animal_mnist": {"victim_train": 64, "query": 96, "probe_train": 16, "probe_test": 40},
         "digits": {"probe_train": 16, "probe_test": 16}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root, victim = tiny_steal_assets(tmp_path_factory.mktemp("kill"), SIZES)
    from victims.classifier import build_classifier, save_classifier

    torch.manual_seed(0)
    save_classifier(build_classifier("resnet18", 10, 1, 16, width=4, stem="small").eval(), root / "victim_clf.pt")
    return root, victim


def _loop(name: str, root: Path, victim: Path) -> tuple[list[str], str, str, str]:
    """(argv after the run name, checkpoint folder, result file, preemption message) of one loop."""
    data = root / "data" / "animal_mnist"
    if name == "steal":  # 96 queries, 12 batches of 8 per epoch (the loader worker lives through an epoch), 2 epochs
        return ([str(REPO / "launch" / "steal.py"), f"victim.checkpoint={victim}", f"data.query={data}/query",
                 "data.image_size=16", "data.workers=1", "student.width=8", "train.epochs=2", "train.batch_size=8",
                 "train.ckpt_every=2", "train.log_every=1", "train.augment=true"],
                "ckpt", "student.pt", "preempted at step")
    if name == "simsiam":  # 64 images, 8 batches of 8 per epoch, 2 epochs: 16 steps
        return ([str(REPO / "launch" / "train_victim.py"), f"train_data={data}/victim_train", "image_size=16",
                 "workers=1", "model.width=8", "model.dim=32", "model.pred_dim=16", "epochs=2", "batch_size=8",
                 "ckpt_every=2", "log_every=1"], "ckpt", "checkpoint.pth.tar", "victim training preempted at step")
    if name == "classifier":  # 64 images, 8 batches of 8 per epoch, 2 epochs: 16 steps
        return ([str(REPO / "launch" / "train_victim.py"), "--task", "classify", f"train_data={data}/victim_train",
                 "image_size=16", "workers=1", "model.width=4", "epochs=2", "batch_size=8", "ckpt_every=2",
                 "log_every=1"], "ckpt", "classifier.pt", "classifier training preempted at step")
    common = [str(REPO / "launch" / "steal_classifier.py"), f"victim.checkpoint={root / 'victim_clf.pt'}",
              f"attack.query_sets=[{data}/query]", f"eval.test={data}/probe_test", "eval.limit=40", "clone.width=4",
              "phases=[query,train]"]
    if name == "knockoff":  # 96 posteriors, 12 batches of 8 per epoch, 2 epochs: 24 steps
        return (common + ["attack.name=knockoff_random", "budget=96", "attack.batch_size=32", "train.epochs=2",
                          "train.batch_size=8", "train.ckpt_every=2"], "ckpt_clone", "clone.pt",
                "clone training preempted at step")
    # 4 x (1 x 2 + 1) = 12 images per iteration, 60 iterations (fast ones: the kill lands mid-run). The budget is
    # exactly the images: a kill between a charge and its cache write re-pays nothing (tests/test_classifier_payonce.py)
    assert name == "dfme"
    return (common + ["attack.name=dfme", "budget=720", "attack.df_batch_size=4", "attack.gen_width=8", "attack.nz=8",
                      "attack.clone_iters=1", "train.ckpt_every=1"], "ckpt_datafree", "clone.pt",
            "dfme preempted after iteration")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _cmd(argv: list[str], root: Path, run: str) -> list[str]:
    return [sys.executable, *argv, f"out_dir={root}", f"name={run}", "cpu=true"]


def _latest_step(ckpt: Path) -> int:
    try:
        return int((ckpt / (ckpt / "latest").read_text().strip()).stem.split("-")[1])
    except (FileNotFoundError, ValueError, IndexError):
        return -1


def _wait_for_checkpoint(ckpt: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    t0 = time.time()
    while _latest_step(ckpt) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {log.read_text()[-2000:]}"
        assert time.time() - t0 < timeout, f"no checkpoint of step {step} in {timeout}s"
        time.sleep(0.05)


def _run_in_process(argv: list[str], root: Path, run: str) -> None:
    import importlib

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same float reductions
    try:
        importlib.import_module(f"launch.{Path(argv[0]).stem}").main([*argv[1:], f"out_dir={root}", f"name={run}", "cpu=true"])
    finally:
        torch.set_num_threads(threads)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["steal", "simsiam", "classifier", "knockoff", "dfme"])
def test_sigkill_then_preemption_resume_bitwise(assets, loop):
    root, victim = assets
    argv, ckpt_name, result, said = _loop(loop, root, victim)
    _run_in_process(argv, root, f"{loop}_ref")  # the uninterrupted run (in this process: no second start-up)

    run = root / loop
    ckpt, log = run / ckpt_name, root / f"{loop}.log"
    # 1) SIGKILL the run and its loader worker once step 2 is checkpointed (it goes on training meanwhile)
    with open(log, "w") as out:
        p = subprocess.Popen(_cmd(argv, root, loop), env=_env(), stdout=out, stderr=subprocess.STDOUT)
        _wait_for_checkpoint(ckpt, 2, p, log)
        workers = [c for c in descendants(p.pid) if alive(c)]
        pids = kill_tree(p)
    assert p.returncode == -9 and not any(alive(x) for x in pids)
    if loop in ("steal", "simsiam", "classifier"):  # data.workers=1: the DataLoader worker was there, and is gone
        assert workers, "no loader worker to kill"
    assert not (run / result).exists(), "the run had finished before the kill"
    killed_at = _latest_step(ckpt)
    assert killed_at >= 2

    # 2) resume; the batch script's trap touches the flag file as soon as the run has resumed: exit 3
    with open(log, "w") as out:
        p = subprocess.Popen(_cmd(argv, root, loop), env=_env(), stdout=out, stderr=subprocess.STDOUT)
        t0 = time.time()
        while "resumed from" not in log.read_text():
            assert p.poll() is None and time.time() - t0 < 300, log.read_text()[-3000:]
            time.sleep(0.05)
        (run / "PREEMPT").touch()
        assert p.wait(timeout=300) == 3, log.read_text()[-3000:]
    text = log.read_text()
    assert said in text and "checkpoint saved in" in text, text[-2000:]
    assert not (run / result).exists() and _latest_step(ckpt) > killed_at

    # 3) the requeued job resumes and ends where an uninterrupted run ends (it runs in this process, older than
    # the flag, so the flag goes as a new job's start would find it stale)
    (run / "PREEMPT").unlink()
    _run_in_process(argv, root, loop)
    a, b = _weights(root / f"{loop}_ref" / result), _weights(run / result)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"
