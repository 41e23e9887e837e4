"""SimSiam victim pre-training writes the official format; the steal runs in one process and resumes."""
from __future__ import annotations

import json

import pytest
import torch

from stealer.config import load_config
from stealer.pretrain import VictimTrainConfig, train_simsiam_victim
from stealer.shards import build_default_data
from stealer.steal import StealConfig, run_query_phase, run_train_phase

SIZES = {"animal_mnist": {"victim_train": 256, "query": 192, "probe_train": 64, "probe_test": 64},
         "digits": {"probe_train": 32, "probe_test": 32}}


@pytest.fixture(scope="module")
def acc():
    from launch.common import make_accelerator

    return make_accelerator(cpu=True)


@pytest.fixture(scope="module")
def victim(tmp_path_factory, acc):
    root = tmp_path_factory.mktemp("pre")
    build_default_data(root / "data", image_size=16, sizes=SIZES)
    cfg = load_config(VictimTrainConfig, None, [f"out_dir={root}", "name=v", f"train_data={root}/data/animal_mnist/victim_train",
                                                "image_size=16", "model.width=8", "model.dim=32", "model.pred_dim=16",
                                                "epochs=2", "batch_size=64", "ckpt_every=3"])
    path = train_simsiam_victim(cfg, acc)
    return root, path


def test_victim_checkpoint_is_official_format(victim):
    from victims.simsiam import load_victim_encoder

    root, path = victim
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["arch"] == "resnet18" and ckpt["epoch"] == 2
    assert any(k.startswith("module.encoder.fc.0.") for k in ckpt["state_dict"])
    assert any(k.startswith("module.predictor.") for k in ckpt["state_dict"])
    enc = load_victim_encoder(path)
    assert enc.out_dim == 64 and enc.in_chans == 1  # width 8 x 8 pooled backbone features
    out = enc(torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8))
    assert out.shape == (3, 64) and torch.isfinite(out).all()
    losses = [json.loads(line)["loss"] for line in (root / "v" / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(-1.0 <= v <= 1.0 for v in losses)


def test_steal_single_process_resume_and_budget(victim, acc, tmp_path):
    from launch.common import build_victim_api
    from victims.ledger import BudgetExceeded

    root, path = victim
    base = [f"out_dir={tmp_path}", "name=s", "cpu=true", f"victim.checkpoint={path}",
            f"data.query={root}/data/animal_mnist/query", "data.image_size=16", "student.width=8",
            "train.batch_size=64", "query.batch_size=50", "train.ckpt_every=2"]
    # a budget below the query set: the error names the user and budget, and what was paid for stays cached
    cfg = load_config(StealConfig, None, base + ["victim.budget=120", "train.epochs=2"])
    api = build_victim_api(cfg.victim, cfg.run_dir)
    with pytest.raises(BudgetExceeded, match="attacker"):
        run_query_phase(cfg, api, acc)
    assert api.ledger.spent("attacker") == 96  # 4 batches of 48: the third would pass 120
    from stealer.cache import ResponseCache

    assert len(ResponseCache(tmp_path / "s" / "cache").done_keys()) == 96
    # raise the budget: only the 96 missing images are paid for
    cfg = load_config(StealConfig, None, base + ["victim.budget=192", "train.epochs=2"])
    api = build_victim_api(cfg.victim, cfg.run_dir)
    out = run_query_phase(cfg, api, acc)
    assert out["queries_sent"] == 96 and api.ledger.spent("attacker") == 192 and out["cached"] == 192
    first = run_train_phase(cfg, acc)
    assert first["steps"] == 2 * 3 and first["samples"] == 192
    # more epochs with resume=auto continue from the final checkpoint of the first run
    cfg = load_config(StealConfig, None, base + ["train.epochs=3"])
    more = run_train_phase(cfg, acc)
    assert more["steps"] == 3 * 3
    assert api.ledger.spent("attacker") == 192


def test_defense_chain_from_config(victim, tmp_path):
    from launch.common import build_victim_api

    root, path = victim
    base = [f"out_dir={tmp_path}", f"victim.checkpoint={path}"]
    plain = build_victim_api(load_config(StealConfig, None, base + ["name=a"]).victim, tmp_path / "a")
    noisy = build_victim_api(load_config(StealConfig, None, base + ["name=b", "victim.defenses=[{name: noise, sigma: 1.0}]"]).victim,
                             tmp_path / "b")
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    a, b = plain.query(x, "u"), noisy.query(x, "u")
    assert a.shape == b.shape and not torch.allclose(a, b)
    assert (b - a).std().item() == pytest.approx(1.0, rel=0.35)
    assert plain.ledger.spent("u") == noisy.ledger.spent("u") == 4
    from stealer.config import ConfigError

    with pytest.raises(ConfigError, match="not a mapping with a name"):
        load_config(StealConfig, None, ["victim.defenses=[noise]"])
    with pytest.raises(ValueError, match="unknown defense"):
        build_victim_api(load_config(StealConfig, None, base + ["name=c", "victim.defenses=[{name: nois}]"]).victim, tmp_path / "c")


@pytest.mark.slow
def test_steal_bf16_channels_last_compiled(victim, tmp_path):
    """The GPU-speed switches run on CPU too: bf16 autocast, NHWC and torch.compile (issue 7)."""
    import subprocess
    import sys
    from pathlib import Path

    root, path = victim
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "launch" / "steal.py"), f"out_dir={tmp_path}", "name=fast", "cpu=true",
           f"victim.checkpoint={path}", f"data.query={root}/data/animal_mnist/query", "data.image_size=16",
           "student.width=8", "train.batch_size=64", "train.epochs=1", "train.mixed_precision=bf16",
           "train.channels_last=true", "train.compile=true"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "fast" / "steal.json").read_text())
    assert out["train"]["steps"] == 3 and out["train"]["final_loss"] == out["train"]["final_loss"]  # finite, not NaN
