"""Classifier-stealing attacks: the maths against hand-computed values, the posterior cache, and every
attack (Knockoff random/adaptive, DFME, MAZE) for a few steps in 2 real CPU processes, with the
victim's ledger equal to what each attack says it spent and a rerun paying nothing."""
from __future__ import annotations

from conftest import free_port

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stealer.classifier import (GradientBandit, PosteriorCache, RewardNormalizer, cost_per_iteration, kmeans,
                                        knockoff_adaptive, logits_from_posteriors, quantize, reward_certainty,
                                        reward_diversity, reward_loss, soft_cross_entropy, zo_gradient, ClassifierAttackConfig)

REPO = Path(__file__).resolve().parents[1]
TINY = {"animal_mnist": {"victim_train": 100, "query": 160, "probe_train": 10, "probe_test": 60},
        "digits": {"probe_train": 10, "probe_test": 10}}


class CountingTarget:
    """A fake victim: fixed posteriors per image (from its mean pixel), counting every image it sees."""

    def __init__(self, k: int = 3, onehot: bool = False) -> None:
        self.k, self.onehot, self.seen = k, onehot, 0

    def describe(self) -> dict:
        return {"arch": "fake", "num_classes": self.k, "in_chans": 1, "image_size": 8}

    def query(self, images: torch.Tensor, user: str) -> torch.Tensor:
        self.seen += len(images)
        m = images.float().mean(dim=(1, 2, 3))
        logits = torch.stack([torch.cos(m / 40 + j) * 3 for j in range(self.k)], dim=1)
        p = torch.softmax(logits, dim=1)
        return torch.nn.functional.one_hot(p.argmax(1), self.k).float() if self.onehot else p


def test_rewards_hand_computed():
    y = torch.tensor([[0.7, 0.2, 0.1]])
    assert reward_certainty(y).item() == pytest.approx(0.5)
    assert reward_diversity(y, torch.tensor([0.5, 0.3, 0.2])).item() == pytest.approx(0.2)
    assert reward_loss(y, torch.zeros(1, 3)).item() == pytest.approx(math.log(3))
    # one-hot posteriors (top-1 APIs, rounding) and saturated clone logits stay finite
    assert torch.isfinite(reward_loss(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[-1e4, 1e4, 0.0]]))).all()
    assert soft_cross_entropy(torch.log(torch.tensor([[0.5, 0.25, 0.25]])), torch.tensor([[1.0, 0, 0]])).item() == \
        pytest.approx(math.log(2))
    z = logits_from_posteriors(torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]))
    lp = [math.log(0.5), math.log(0.25), math.log(0.25)]
    assert z[0].tolist() == pytest.approx([v - sum(lp) / 3 for v in lp], abs=1e-6)
    assert torch.isfinite(z).all() and z[1].sum().abs() < 1e-4  # zeros clamped, mean-corrected


def test_gradient_bandit_hand_computed_and_guarded():
    b = GradientBandit(3, lr=0.5)
    b.update(0, 1.0)  # first reward is its own baseline: no move
    assert b.h.tolist() == [0, 0, 0] and b.baseline == 1.0
    b.update(1, 3.0)  # pi = 1/3 each, step = 0.5 * (3 - 1) = 1
    assert b.h.tolist() == pytest.approx([-1 / 3, 2 / 3, -1 / 3])
    assert b.baseline == pytest.approx(2.0)
    before = b.h.copy()
    b.update(2, float("nan"))
    b.update(2, float("inf"))
    assert (b.h == before).all() and b.skipped == 2
    b.h[:] = [1e6, -1e6, 0]  # would overflow a plain exp
    p = b.probs()
    assert np.isfinite(p).all() and p.sum() == pytest.approx(1) and p[0] == pytest.approx(1)
    b.available[0] = False
    assert b.probs()[0] == 0 and b.probs().sum() == pytest.approx(1)


def test_reward_normalizer_never_blows_up():
    n = RewardNormalizer(3)
    assert n(np.array([2.0, 0.5, -1.0])).tolist() == [1.0, 0.5, 0.0]  # first step clipped to [0, 1]
    out = n(np.array([2.0, 0.5, -1.0]))  # zero variance: 0, not NaN
    assert out.tolist() == [0.0, 0.0, 0.0]
    out = n(np.array([np.inf, np.nan, 3.0]))
    assert np.isfinite(out).all() and n.nonfinite == 2
    z = n(np.array([2.0, 0.5, 7.0]))
    assert np.isfinite(z).all() and z[2] > 0


def test_kmeans_separates_two_blobs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 4, generator=g) * 0.1
    b = torch.randn(20, 4, generator=g) * 0.1 + 5
    lab = kmeans(torch.cat([a, b]), 2, seed=1)
    assert len(set(lab[:30].tolist())) == 1 and len(set(lab[30:].tolist())) == 1 and lab[0] != lab[-1]


def test_zo_gradient_recovers_a_linear_loss():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 1, 4, 4, generator=g)
    x = torch.full((2, 1, 4, 4), 128, dtype=torch.uint8)
    calls = []

    def loss_of(imgs):
        calls.append(len(imgs))
        return (imgs.float() / 255 * w).flatten(1).sum(1)

    grad, l0 = zo_gradient(loss_of, x, m=4000, eps=0.5, gen=g)
    assert calls == [2 + 2 * 4000]  # base + m probes per image, one call
    assert l0.tolist() == pytest.approx([(128 / 255 * w).sum().item()] * 2, rel=1e-5)
    for i in range(2):
        cos = torch.nn.functional.cosine_similarity(grad[i].flatten(), w.flatten(), dim=0)
        assert cos > 0.97, cos
    # a step that quantises back onto its base image contributes nothing
    grad0, _ = zo_gradient(loss_of, x, m=8, eps=1e-4, gen=g)
    assert grad0.abs().max() == 0
    assert quantize(torch.tensor([-0.2, 0.5, 1.3])).tolist() == [0, 128, 255]


def test_cost_per_iteration_matches_the_papers():
    assert cost_per_iteration("dfme", 256, 1, 1, 5) == 256 * (1 * 2 + 5)  # DFME: B (n_G (m+1) + n_S)
    assert cost_per_iteration("maze", 128, 10, 1, 5) == 128 * ((5 - 1) + (1 + 10) * 1)  # MAZE's budget_per_iter


def test_posterior_cache_pays_once_and_refuses_other_settings(tmp_path):
    t = CountingTarget()
    imgs = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    imgs[5] = imgs[0]  # a repeat inside the batch
    meta = {"victim": t.describe(), "out_dim": 3, "channels": 1, "image_size": [8, 8]}
    c = PosteriorCache(tmp_path / "cache", meta)
    y = c.fetch(t, imgs, "u")
    assert t.seen == 5 and c.spent == 5 and c.received == 6 and torch.equal(y[5], y[0])
    again = PosteriorCache(tmp_path / "cache", meta)  # a rerun reads what was bought
    y2 = again.fetch(t, imgs, "u")
    assert t.seen == 5 and again.spent == 0 and torch.allclose(y, y2)
    c.finalize("test")
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["num_samples"] == 5
    with pytest.raises(ValueError, match="other settings"):
        PosteriorCache(tmp_path / "cache", {**meta, "out_dim": 4})


def test_knockoff_adaptive_stays_finite_on_one_hot_posteriors(tmp_path):
    from victims.classifier import build_classifier

    t = CountingTarget(onehot=True)
    pool = torch.randint(0, 256, (97, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(97) % 4  # class 0 has 25 images: its last step holds one (no BN step on one sample)
    cache = PosteriorCache(tmp_path / "c", {"out_dim": 3})
    torch.manual_seed(0)
    clone = build_classifier("resnet18", 3, 1, 8, width=4, stem="small")
    for actions in ("classes", "kmeans"):
        cfg = ClassifierAttackConfig(name="knockoff_adaptive", actions=actions, num_clusters=3, step_images=8, reward="all")
        out = knockoff_adaptive(t, cache, pool, labels, budget=40, user="u", cfg=cfg, clone=clone, seed=0)
        assert sum(out["action_counts"]) == 40 and math.isfinite(out["mean_reward"])
        assert np.isfinite(out["final_policy"]).all() and out["bandit_skipped"] == 0
    assert t.seen == cache.spent <= 80
    # the whole pool: class 0's last step holds one image (clone not stepped on it, no BN error)
    cfg = ClassifierAttackConfig(name="knockoff_adaptive", actions="classes", step_images=8, reward="all")
    out = knockoff_adaptive(t, PosteriorCache(tmp_path / "all", {"out_dim": 3}), pool, labels, budget=97, user="v",
                            cfg=cfg, clone=clone, seed=1)
    assert sum(out["action_counts"]) == 97 and math.isfinite(out["mean_reward"])


STEAL_SCRIPT = r'''
import json, sys, torch
from launch.common import make_accelerator
from launch.steal_classifier import ClassifierStealConfig, run_steal
from stealer.config import load_config
root, data, victim = sys.argv[1:4]
acc = make_accelerator(True)
assert acc.num_processes == 2, acc.num_processes
common = [f"out_dir={root}", "cpu=true", f"victim.checkpoint={victim}", f"attack.query_sets=[{data}/query]",
          f"eval.test={data}/probe_test", "eval.limit=40", "clone.width=4", "train.epochs=1", "train.batch_size=16",
          f"victim.fit_data={data}/victim_train"]
runs = {
    "knockoff_random": ["budget=64", "attack.batch_size=16", "defenses=[{name: noise, epsilon: 0.3}]"],
    "knockoff_adaptive": ["budget=48", "attack.step_images=8", "attack.actions=kmeans", "attack.num_clusters=4"],
    "dfme": ["budget=112", "attack.df_batch_size=4", "attack.gen_width=8", "attack.clone_iters=2"],
    "maze": ["budget=120", "attack.df_batch_size=4", "attack.gen_width=8", "attack.directions=2", "attack.clone_iters=2",
             "attack.replay_iters=2"],
}
out = {}
for name, extra in runs.items():
    cfg = load_config(ClassifierStealConfig, None, common + extra + [f"name={name}", f"attack.name={name}"])
    first = run_steal(cfg, acc, log=lambda s: None)
    again = run_steal(load_config(ClassifierStealConfig, None, common + extra + [f"name={name}", f"attack.name={name}",
                                  "phases=[query]"]), acc, log=lambda s: None)
    out[name] = {"first": first, "again": again}
if acc.is_main_process:
    json.dump(out, open(f"{root}/attacks.json", "w"), default=str)
'''


@pytest.mark.slow
def test_every_attack_in_two_processes_and_the_ledger_counts_every_posterior(tmp_path):
    from stealer.shards import build_default_data
    from victims.classifier import build_classifier, save_classifier

    data = tmp_path / "data"
    build_default_data(data, seed=0, image_size=16, sizes=TINY)
    torch.manual_seed(0)
    victim = build_classifier("resnet18", 10, 1, 16, width=4, stem="small")
    save_classifier(victim.eval(), tmp_path / "victim.pt")
    script = tmp_path / "steal_all.py"
    script.write_text(STEAL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(tmp_path / "runs"), str(data / "animal_mnist"), str(tmp_path / "victim.pt")]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    out = json.loads((tmp_path / "runs" / "attacks.json").read_text())
    for name, r in out.items():
        q, again = r["first"]["query"], r["again"]["query"]
        assert r["first"]["world_size"] == 2
        # the ledger charged exactly the images the attack says it sent (probes included), all ranks together
        assert q["ledger_spent"] == q["spent"] > 0, (name, q)
        assert q["received"] >= q["spent"] and q["cached"] == q["spent"]
        # a rerun replays from the cache and pays for nothing
        assert again["spent"] == 0 and again["ledger_spent"] == q["ledger_spent"], (name, again)
        ev = r["first"]["eval"]
        assert 0 <= ev["clone_acc"] <= 1 and 0 <= ev["agreement"] <= 1 and ev["test_images"] == 40
        assert (tmp_path / "runs" / name / "clone.pt").is_file()
    assert out["knockoff_random"]["first"]["query"]["spent"] <= 64  # budget respected (repeats paid once)
    assert out["knockoff_random"]["first"]["eval"]["l1_mean"] == pytest.approx(0.3, abs=1e-4)  # noise at ε=0.3 (L1)
    assert sum(out["knockoff_adaptive"]["first"]["query"]["action_counts"]) == 48
    d = out["dfme"]["first"]["query"]
    assert d["cost_per_iteration"] == 4 * (1 * 2 + 2) and d["iterations"] == 112 // 2 // 16
    assert d["spent"] <= d["claimed_per_rank"] * 2
    m = out["maze"]["first"]["query"]
    assert m["cost_per_iteration"] == 4 * ((2 - 1) + (1 + 2) * 1) and m["spent"] <= m["claimed_per_rank"] * 2


def test_bad_budgets_fail_in_one_line(tmp_path):
    from types import SimpleNamespace

    from stealer.classifier import CloneConfig, data_free, knockoff_random

    t = CountingTarget()
    cache = PosteriorCache(tmp_path / "c", {"out_dim": 3})
    with pytest.raises(ValueError, match=r"budget=20 exceeds the 10 images of attack.query_sets"):
        knockoff_random(t, cache, torch.zeros(10, 1, 8, 8, dtype=torch.uint8), budget=20, user="u")
    acc = SimpleNamespace(process_index=0, num_processes=2)
    with pytest.raises(ValueError, match=r"budget=100 is below one dfme iteration \(896 images on 2 process"):
        data_free(t, cache, kind="dfme", budget=100, user="u", cfg=ClassifierAttackConfig(name="dfme"), clone_cfg=CloneConfig(),
                  num_classes=3, channels=1, image_size=8, accelerator=acc)
    assert t.seen == 0


def test_clone_training_preempted_mid_epoch_resumes_bitwise(tmp_path, monkeypatch):
    """Knockoff's clone training checkpoints and resumes like the encoder steal (issue 3's contract)."""
    from launch.common import make_accelerator
    from stealer.classifier import CloneConfig, CloneTrainConfig, knockoff_random, train_clone
    from stealer.preempt import Preempted, Preemption

    t = CountingTarget()
    pool = torch.randint(0, 256, (90, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cache = PosteriorCache(tmp_path / "cache", {"out_dim": 3, "channels": 1, "image_size": [8, 8]})
    knockoff_random(t, cache, pool, budget=90, user="u", batch_size=30)
    cache.finalize("test")
    acc = make_accelerator(cpu=True)
    clone_cfg = CloneConfig(width=4)
    kw = dict(clone_cfg=clone_cfg, accelerator=acc, channels=1, image_size=8, seed=0)
    cfg = CloneTrainConfig(epochs=3, batch_size=16, resume="none")  # 6 steps per epoch, 18 in all
    ref, ref_stats = train_clone(tmp_path / "cache", cfg=cfg, ckpt_dir=tmp_path / "ref" / "ckpt_clone", **kw)
    assert ref_stats["steps"] == 18

    calls = {"n": 0}

    def stop_at_step_8(self):
        calls["n"] += 1
        return calls["n"] == 8  # mid-epoch 2 (batch 2 of 6)

    monkeypatch.setattr(Preemption, "should_stop", stop_at_step_8)
    run = tmp_path / "run" / "ckpt_clone"
    with pytest.raises(Preempted, match="preempted at step 8/18"):
        train_clone(tmp_path / "cache", cfg=CloneTrainConfig(epochs=3, batch_size=16), ckpt_dir=run, **kw)
    monkeypatch.undo()
    state = torch.load(run / (run / "latest").read_text().strip(), weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 8)
    said = []
    got, stats = train_clone(tmp_path / "cache", cfg=CloneTrainConfig(epochs=3, batch_size=16), ckpt_dir=run,
                             log=said.append, **kw)
    assert stats["steps"] == 18 and "at epoch 1, batch 2 (step 8/18)" in said[0]
    assert len([m for m in said if m.startswith("clone epoch")]) == 2  # epochs 2 and 3 only
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert ref_sd.keys() == got_sd.keys() and all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    # a rerun of a finished training trains nothing and returns the same clone
    again, again_stats = train_clone(tmp_path / "cache", cfg=CloneTrainConfig(epochs=3, batch_size=16), ckpt_dir=run, **kw)
    assert again_stats["steps"] == 18 and all(torch.equal(again.state_dict()[k], ref_sd[k]) for k in ref_sd)
    # other settings: refused in one line naming the key
    with pytest.raises(ValueError, match=r"train\.lr 0\.05 -> 0\.1") as e:
        train_clone(tmp_path / "cache", cfg=CloneTrainConfig(epochs=3, batch_size=16, lr=0.1), ckpt_dir=run, **kw)
    assert "\n" not in str(e.value) and "train.resume=none" in str(e.value)


@pytest.mark.parametrize("kind", ["dfme", "maze"])
def test_data_free_preempted_resumes_bitwise_and_buys_nothing_twice(tmp_path, monkeypatch, kind):
    """DFME/MAZE (generator, clone, optimizers, RNGs, MAZE's replay bank) checkpoint and resume exactly."""
    from launch.common import make_accelerator
    from stealer.classifier import CloneConfig, data_free
    from stealer.preempt import Preempted, Preemption

    acc = make_accelerator(cpu=True)
    cfg = ClassifierAttackConfig(name=kind, df_batch_size=4, gen_width=8, directions=2, clone_iters=2, replay_iters=2, nz=8)
    kw = dict(kind=kind, budget=6 * cost_per_iteration(kind, 4, 2, 1, 2), user="u", cfg=cfg, clone_cfg=CloneConfig(width=4),
              num_classes=3, channels=1, image_size=8, accelerator=acc, seed=0)
    meta = {"out_dim": 3}
    ref_t = CountingTarget()
    ref, ref_stats = data_free(ref_t, PosteriorCache(tmp_path / "ref_cache", meta), ckpt_dir=tmp_path / "ref" / "ckpt",
                               resume="none", **kw)
    assert ref_stats["iterations"] == 6

    calls = {"n": 0}

    def stop_after_3(self):
        calls["n"] += 1
        return calls["n"] == 3

    t = CountingTarget()
    monkeypatch.setattr(Preemption, "should_stop", stop_after_3)
    with pytest.raises(Preempted, match=f"{kind} preempted after iteration 3/6"):
        data_free(t, PosteriorCache(tmp_path / "cache", meta), ckpt_dir=tmp_path / "run" / "ckpt", **kw)
    monkeypatch.undo()
    bought = t.seen
    assert 0 < bought < ref_t.seen
    said = []
    got, stats = data_free(t, PosteriorCache(tmp_path / "cache", meta), ckpt_dir=tmp_path / "run" / "ckpt",
                           **{**kw, "log": said.append})
    assert stats["iterations"] == 6 and any("resumed from" in m and "iteration 3/6" in m for m in said)
    assert stats["received"] == ref_stats["received"] // 2  # iterations 4-6 only: 1-3 were not run again
    # the resumed run bought exactly what the uninterrupted one did in all (nothing twice), and the same clone
    assert t.seen == ref_t.seen
    assert all(torch.equal(ref.state_dict()[k], got.state_dict()[k]) for k in ref.state_dict())
    with pytest.raises(ValueError, match=r"attack\.lr_clone 0\.1 -> 0\.2") as e:
        data_free(t, PosteriorCache(tmp_path / "cache", meta), ckpt_dir=tmp_path / "run" / "ckpt",
                  **{**kw, "cfg": ClassifierAttackConfig(**{**cfg.__dict__, "lr_clone": 0.2})})
    assert "\n" not in str(e.value)


ONLINE_CLONE_SCRIPT = r'''
import sys, torch
from stealer.classifier import ClassifierAttackConfig, CloneConfig, build_clone, knockoff_adaptive, load_pool
imgs, labels, _ = load_pool([sys.argv[1]], channels=1, image_size=16)
assert imgs.stride() == (256, 256, 16, 1), imgs.stride()
class Fake:
    def describe(self): return {}
    def query(self, x, user): return torch.softmax(torch.randn(len(x), 10, generator=torch.Generator().manual_seed(len(x))), 1)
class NoCache:
    spent = received = 0
    def fetch(self, t, x, user, labels=None): return t.query(x, user)
torch.manual_seed(0)
out = knockoff_adaptive(Fake(), NoCache(), imgs, labels, budget=48, user="u", clone=build_clone(CloneConfig(width=4), 10, 1, 16),
                        cfg=ClassifierAttackConfig(name="knockoff_adaptive", step_images=8), seed=0)
print("steps", sum(out["action_counts"]))
'''


def test_online_clone_on_a_single_channel_pool_does_not_corrupt_the_heap(tmp_path):
    """The 'corrupted double-linked list' abort of the two-process test: the stream's [N, 1, S, S] images have
    strides (S*S, 1, S, 1); oneDNN's convolution backward on them corrupted the heap at OMP_NUM_THREADS=1
    (torch 2.14.1). load_pool now returns standard strides; before, this script aborted (SIGABRT) in its 3rd step."""
    from stealer.shards import build_default_data

    build_default_data(tmp_path / "data", seed=0, image_size=16, sizes={"animal_mnist": {"query": 160}})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", ONLINE_CLONE_SCRIPT, str(tmp_path / "data" / "animal_mnist" / "query")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "steps 48" in p.stdout, (p.returncode, p.stderr[-2000:])
