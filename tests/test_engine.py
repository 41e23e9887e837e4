"""Config validation, atomic checkpoints, the response cache, the report and the probe."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval.metrics import fidelity
from eval.probe import linear_probe
from eval.report import build_report, gain_recovered, markdown_table
from stealer.cache import ResponseCache
from stealer.ckpt import find_latest, load_checkpoint, resolve_resume, save_checkpoint
from stealer.config import ConfigError, load_config
from stealer.data import open_shards
from stealer.steal import StealConfig


def test_config_yaml_overrides_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\ntrain: {lr: 0.5, epochs: 3}\n")
    cfg = load_config(StealConfig, f, ["train.lr=0.25", "victim.budget=1e3", "train.augment=false", "phases=[query]"])
    assert cfg.name == "x" and cfg.train.lr == 0.25 and cfg.train.epochs == 3
    assert cfg.victim.budget == 1000 and cfg.train.augment is False and cfg.phases == ["query"]
    assert cfg.victim.user == "attacker"  # defaults kept


@pytest.mark.parametrize("override,match", [
    ("train.lrr=1", "unknown config key 'train.lrr'; valid keys under 'train':.*lr"),
    ("nope=1", "unknown config key 'nope'"),
    ("train.loss=l3", r"train.loss='l3' is not valid; choose one of: .*mse.*infonce"),
    ("train.optimizer=adam9", "choose one of: .*lars"),
    ("train.epochs=many", "train.epochs: expected an integer"),
    ("victim.representation=logits", "backbone, projector"),
    ("lr", "not of the form key=value"),
])
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(StealConfig, None, [override])


def test_checkpoints_atomic_latest_keep_and_torn(tmp_path):
    d = tmp_path / "ckpt"
    for step in (10, 20, 30):
        save_checkpoint(d, step, {"w": torch.full((3,), float(step)), "step": step}, keep=2)
    assert sorted(p.name for p in d.glob("ckpt-*.pt")) == ["ckpt-000000020.pt", "ckpt-000000030.pt"]
    path, state = find_latest(d)
    assert path.name == "ckpt-000000030.pt" and state["step"] == 30
    # a torn newest checkpoint is skipped with a warning, never loaded
    path.write_bytes(path.read_bytes()[:50])
    path2, state2 = find_latest(d)
    assert path2.name == "ckpt-000000020.pt" and state2["step"] == 20
    assert resolve_resume("none", d) is None
    with pytest.raises(ValueError, match="torn or not a checkpoint"):
        load_checkpoint(path)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not an sslsteal training checkpoint"):
        load_checkpoint(other)


def test_response_cache_full_disk_keeps_the_folder_consistent(tmp_path):
    """A write past the disk's end fails in one line and leaves no partial shard or sidecar behind."""
    import resource
    import signal

    from stealer.cache import CacheWriteError

    cache = ResponseCache(tmp_path / "cache", rank=0)
    cache.write_batch(["a0", "a1"], [("png", b"x" * 100)] * 2, [0, 0], np.ones((2, 4), dtype=np.float32))
    before = sorted(p.name for p in (tmp_path / "cache").iterdir())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # a disk with 64 KiB left per file
    try:
        with pytest.raises(CacheWriteError) as e:
            cache.write_batch(["b0", "b1"], [("png", b"x" * 100)] * 2, [0, 0], np.ones((2, 65536), dtype=np.float32))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    msg = str(e.value)
    assert msg.startswith("could not cache 2 answered queries in ") and "\n" not in msg and "free space and rerun" in msg
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == before  # no .tmp, no orphan sidecar
    assert ResponseCache(tmp_path / "cache").done_keys() == {"a0", "a1"}
    cache.write_batch(["b0", "b1"], [("png", b"x" * 100)] * 2, [0, 0], np.ones((2, 4), dtype=np.float32))  # room again
    assert ResponseCache(tmp_path / "cache").done_keys() == {"a0", "a1", "b0", "b1"}


def test_response_cache_round_trip_and_done_keys(tmp_path):
    from stealer.shards import encode_png

    cache = ResponseCache(tmp_path / "cache", rank=0)
    cache.write_meta({"out_dim": 4, "channels": 1, "image_size": [8, 8], "classes": ["a", "b"]})
    imgs = [("png", encode_png(np.full((8, 8), i, dtype=np.uint8))) for i in range(5)]
    reps = np.arange(20, dtype=np.float32).reshape(5, 4)
    cache.write_batch([f"k{i}" for i in range(3)], imgs[:3], [0, 1, 0], reps[:3])
    cache.write_batch(["k3", "k4"], imgs[3:], [1, -1], reps[3:])
    assert cache.done_keys() == {f"k{i}" for i in range(5)}
    # a lost sidecar is rebuilt from its (complete) tar
    side = sorted((tmp_path / "cache").glob("resp-*.json"))[0]
    side.unlink()
    assert ResponseCache(tmp_path / "cache").done_keys() == {f"k{i}" for i in range(5)}
    manifest = cache.finalize()
    assert manifest["num_samples"] == 5 and manifest["responses"]["dim"] == 4
    from stealer.data import ShardStream

    s = ShardStream(open_shards(tmp_path / "cache"), batch_size=8, shuffle=False, channels=1, image_size=8)
    (b,) = list(s.iter_epoch(0))
    order = [int(k[1:]) for k in b["key"]]
    assert torch.equal(b["response"], torch.from_numpy(reps[order]))
    assert b["label"].tolist() == [[0, 1, 0, 1, -1][i] for i in order]
    assert all(int(b["image"][j, 0, 0, 0]) == i for j, i in enumerate(order))
    with pytest.raises(ValueError, match="was made with other settings"):
        cache.check_meta({"out_dim": 8})


def test_report_and_gain():
    assert gain_recovered(0.8, 0.9, 0.7) == pytest.approx(0.5)
    results = {"victim": {"a": {"top1": 0.9}}, "stolen": {"a": {"top1": 0.88}}, "random": {"a": {"top1": 0.7}},
               "control": {"a": {"top1": 0.71}}}
    rep = build_report(results, primary_set="a", queries_spent=3000, seconds={"train": 10.0, "probe": 2.0})
    assert rep["ratio"] == pytest.approx(0.88 / 0.9) and rep["gain_recovered"] == pytest.approx(0.9)
    assert rep["control_gain_recovered"] == pytest.approx(0.05) and rep["seconds"]["total"] == 12.0
    md = markdown_table(rep)
    assert "| gain recovered" in md and "| queries spent | 3000 |" in md
    json.dumps(rep)


def test_fidelity_hand_values():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    v = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    f = fidelity(s, v)
    assert f["cosine"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert f["l2"] == pytest.approx((0 + 8 ** 0.5) / 2)


def test_linear_probe_separable_vs_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    centers = torch.randn(4, 16, generator=g) * 3
    x = centers[y] + torch.randn(400, 16, generator=g)
    good = linear_probe(x[:300], y[:300], x[300:], y[300:], steps=150)
    noise = torch.randn(400, 16, generator=g)
    bad = linear_probe(noise[:300], y[:300], noise[300:], y[300:], steps=150)
    assert good["top1"] > 0.95 and bad["top1"] < 0.45
    with pytest.raises(ValueError, match="must be labelled"):
        linear_probe(x[:10], -torch.ones(10, dtype=torch.long), x[:5], y[:5])


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    import random

    from stealer.ckpt import rng_state, set_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint(tmp_path, 1, {"rng": [rng_state()]})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    _, state = find_latest(tmp_path)  # loaded with weights_only=True
    set_rng_state(state["rng"][0])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_loss_args_reach_the_loss():
    cfg = load_config(StealConfig, None, ["train.loss=softnn", "train.loss_args={temperature: 100}"])
    assert cfg.train.loss_args == {"temperature": 100}
    with pytest.raises(ConfigError, match="loss_args must be a mapping"):
        load_config(StealConfig, None, ["train.loss_args=[1]"])
    from launch.common import make_accelerator
    from stealer.losses import get_loss
    from stealer.optim import build_optimizer, build_schedule
    from stealer.steal import steal_step
    from stealer.student import StolenEncoder

    torch.manual_seed(0)
    seen = {}

    def spy(s, t, **kw):
        seen.update(kw)
        return get_loss("softnn")(s, t, **kw)

    m = StolenEncoder("resnet18", 8, in_chans=1, width=8, stem="small")
    opt = build_optimizer("sgd", m, lr=0.1, weight_decay=0.0)
    sched = build_schedule(opt, 10, 0)
    x = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    loss = steal_step(m, m, opt, sched, spy, x, torch.randn(6, 8), make_accelerator(cpu=True), temperature=0.2,
                      loss_args=cfg.train.loss_args)
    assert seen["temperature"] == 100 and torch.isfinite(loss)


def test_preemption_flag_staleness_and_no_requeue_on_sigterm(tmp_path, monkeypatch):
    import os
    import signal

    from stealer import preempt

    flag = tmp_path / "PREEMPT"
    flag.touch()
    os.utime(flag, (preempt._PROCESS_START - 100, preempt._PROCESS_START - 100))  # left by an earlier run
    p = preempt.Preemption(tmp_path, signals=())
    p.clear_stale_flag()
    assert not flag.exists() and not p.should_stop()
    flag.touch()  # touched during this process (e.g. while querying): honoured
    p.clear_stale_flag()
    assert flag.exists() and p.should_stop()
    calls = []
    monkeypatch.setattr(preempt.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert p.requeue() and calls[-1] == ["scontrol", "requeue", "7_1"]
    flag.unlink()
    p.signalled = signal.SIGTERM  # scancel / time limit: checkpoint, but never requeue
    assert p.should_stop() and not p.requeue() and len(calls) == 1
