"""Streaming probe: feature shards, streamed SGD/LARS linear probe, streamed kNN, resume, 2 processes,
and the SimSiam linear-evaluation protocol at tiny size."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from conftest import free_port
from eval.feature_shards import FeatureShards, write_feature_arrays, write_feature_shards
from eval.features import extract_features
from eval.knn import knn_classify
from eval.probe import linear_probe
from eval.stream_probe import (StreamSettings, evaluate_linear, feature_source, feature_stats, global_batches,
                               knn_stream, lincls_protocol, linear_head, train_linear)
from stealer.shards import array_samples, write_shards

C, D = 5, 24


def _clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100)
    centers = torch.randn(C, D, generator=g) * 0.6  # the same classes for every call
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    return centers[y] + torch.randn(n, D, generator=g) + 3.0, y  # offset: standardisation matters


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    root = tmp_path_factory.mktemp("feats")
    xtr, ytr = _clusters(1200, 1)
    xte, yte = _clusters(400, 2)
    tr = write_feature_arrays(root / "train", xtr, ytr, shard_rows=100)
    te = write_feature_arrays(root / "test", xte, yte, shard_rows=64)
    return xtr, ytr, xte, yte, tr, te


def _images(root: Path, n: int = 48, size: int = 12) -> Path:
    """n grey images whose mean brightness encodes one of 3 classes (plus noise)."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    imgs = np.clip(rng.normal(60 + 60 * labels[:, None, None], 25, (n, size, size)), 0, 255).astype(np.uint8)
    write_shards(array_samples(imgs, labels, key_prefix="im"), root, samples_per_shard=10, source="test",
                 classes=["a", "b", "c"], channels=1, image_size=[size, size])
    return root


def _pixel_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(144, 8))


def _encode(model: nn.Module):
    return lambda x: model(x.float() / 255.0)


# ------------------------------------------------------------------------------- feature shards


def test_feature_shards_equal_in_memory_features_and_are_reused(tmp_path):
    src = _images(tmp_path / "img")
    model = _pixel_encoder()
    calls = []

    def enc(x):
        calls.append(len(x))
        return _encode(model)(x)

    fs = write_feature_shards(enc, str(src), tmp_path / "f", encoder="pix", channels=1, image_size=12,
                              batch_size=8, shard_rows=7)
    x, y = fs.load_all()
    ref_x, ref_y = extract_features(_encode(model), str(src), channels=1, image_size=12, batch_size=8)
    assert torch.equal(y, ref_y) and torch.allclose(x, ref_x, atol=1e-6)
    assert fs.counts == [7] * 6 + [6] and fs.num_samples == 48 and fs.dim == 8
    m = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert m["encoder"] == "pix" and m["num_classes"] == 3
    n_calls = len(calls)
    again = write_feature_shards(enc, str(src), tmp_path / "f", encoder="pix", channels=1, image_size=12, shard_rows=7)
    assert len(calls) == n_calls and again.num_samples == 48  # reused: not encoded again
    write_feature_shards(enc, str(src), tmp_path / "f", encoder="other", channels=1, image_size=12, shard_rows=7)
    assert len(calls) > n_calls  # another encoder: extracted again


def test_feature_folder_without_manifest_is_one_line(tmp_path):
    (tmp_path / "f").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json") as e:
        FeatureShards(tmp_path / "f")
    assert "\n" not in str(e.value)


def test_global_batches_are_a_permutation_and_skip_exactly(feats):
    *_, tr, _ = feats
    full = list(global_batches(tr, 3, 128, seed=5, window=3, block_rows=100))
    ys = np.concatenate([b[1] for b in full])
    assert [len(b[1]) for b in full] == [128] * 9 + [48]
    allx = np.concatenate([b[0] for b in full])
    ref = tr.load_all()[0].numpy()
    assert sorted(map(tuple, allx.round(5))) == sorted(map(tuple, ref.round(5)))  # each row once
    late = list(global_batches(tr, 3, 128, seed=5, window=3, block_rows=100, start_batch=4))
    assert len(late) == 6 and all(np.array_equal(a[0], b[0]) for a, b in zip(late, full[4:]))
    assert not np.array_equal(ys, np.concatenate([b[1] for b in global_batches(tr, 4, 128, seed=5, window=3, block_rows=100)]))


# ------------------------------------------------------------------------------- agreement


def test_streamed_knn_equals_in_memory_knn(feats):
    xtr, ytr, xte, yte, tr, te = feats
    ref = knn_classify(xtr, ytr, xte, yte, k=20, return_predictions=True)
    got = knn_stream(tr, te, k=20, train_rows=77, return_predictions=True)
    assert torch.equal(got["predictions"], ref["predictions"])
    assert got["top1"] == ref["top1"] and got["top5"] == ref["top5"] and got["n_test"] == 400
    ref_u = knn_classify(xtr, ytr, xte, yte, k=5, weighted=False, return_predictions=True)
    got_u = knn_stream(tr, te, k=5, weighted=False, return_predictions=True)
    assert torch.equal(got_u["predictions"], ref_u["predictions"])


def test_streamed_sgd_probe_agrees_with_full_batch_probe(feats):
    xtr, ytr, xte, yte, tr, te = feats
    full = linear_probe(xtr, ytr, xte, yte, steps=100, lr=0.03, weight_decays=(0.0,), seed=0)
    s = StreamSettings(epochs=8, batch_size=64, base_lr=0.1, optimizer="sgd", window=3, block_rows=100)
    mean, std = feature_stats(tr)
    assert torch.allclose(mean, xtr.mean(0), atol=1e-4) and torch.allclose(std, xtr.std(0), atol=1e-4)
    head, log = train_linear(feature_source(tr, s, None, mean, std), dim=D, num_classes=C,
                             num_samples=tr.num_samples, settings=s)
    acc, pred = evaluate_linear(head, te, mean=mean, std=std)
    assert log["steps"] == 8 * 19 and len(pred) == 400
    assert full["top1"] > 0.85  # the set is learnable, so agreement is informative
    assert abs(acc - full["top1"]) < 0.03, (acc, full["top1"])


# ------------------------------------------------------------------------------- resume


class Boom(RuntimeError):
    pass


def test_streamed_probe_resumes_bitwise_after_a_stop_mid_run(feats, tmp_path):
    *_, tr, _ = feats
    s = StreamSettings(epochs=3, batch_size=100, base_lr=0.5, optimizer="lars", window=2, block_rows=150, ckpt_every=5)
    mean, std = feature_stats(tr)
    src = feature_source(tr, s, None, mean, std)
    kw = dict(dim=D, num_classes=C, num_samples=tr.num_samples, settings=s)
    straight, _ = train_linear(src, **kw)
    seen = []

    def crash(step):
        seen.append(step)
        if step == 17:  # mid-epoch 1 (12 steps per epoch), 2 steps after the checkpoint at 15
            raise Boom("injected")

    with pytest.raises(Boom):
        train_linear(src, ckpt_dir=str(tmp_path / "ck"), on_step=crash, **kw)
    assert seen[-1] == 17 < 36
    assert (tmp_path / "ck" / "latest").read_text().strip() == "ckpt-000000015.pt"
    partial = torch.load(tmp_path / "ck" / "ckpt-000000015.pt", weights_only=True)
    assert (partial["epoch"], partial["batch"]) == (1, 3)
    assert not torch.equal(partial["head"]["weight"], straight.weight)
    later = []
    resumed, log = train_linear(src, ckpt_dir=str(tmp_path / "ck"), on_step=later.append, **kw)
    assert later[0] == 16 and later[-1] == 36 and log["resumed_from"].endswith("ckpt-000000015.pt")
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)
    with pytest.raises(ValueError, match="other settings"):  # a resume with other knobs is refused in one line
        train_linear(src, ckpt_dir=str(tmp_path / "ck"), **{**kw, "settings": StreamSettings(epochs=3, batch_size=50)})


# ------------------------------------------------------------------------------- 2 processes


def _two_proc_worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # a forked worker inherits accelerate's process-wide singletons: if an earlier test in this pytest
    # process built a 1-process Accelerator, the worker would see world 1 and never split the work
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.num_processes
    out = _pipeline(Path(root), "two", acc)
    if rank == 0:
        torch.save(out, Path(root) / "two.pt")
    acc.wait_for_everyone()


def _pipeline(root: Path, tag: str, acc) -> dict:
    """Extract (data-parallel), train the streamed probe, streamed kNN: what eval/run.py does per encoder."""
    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    model = _pixel_encoder()
    kw = dict(encoder="pix", channels=1, image_size=12, batch_size=8, shard_rows=9, rank=rank, world=world)
    tr = write_feature_shards(_encode(model), str(root / "img"), root / tag / "tr", **kw)
    te = write_feature_shards(_encode(model), str(root / "img"), root / tag / "te", **kw)
    s = StreamSettings(epochs=2, batch_size=16, base_lr=0.5, optimizer="sgd", window=2, block_rows=5, ckpt_every=4)
    mean, std = feature_stats(tr, acc)
    head, _ = train_linear(feature_source(tr, s, acc, mean, std), dim=tr.dim, num_classes=3,
                           num_samples=tr.num_samples, settings=s, acc=acc, ckpt_dir=str(root / tag / "ck"))
    knn = knn_stream(tr, te, k=5, acc=acc, return_predictions=True)
    x, y = tr.load_all()
    return {"x": x, "y": y, "counts": tr.counts, "w": head.weight.detach(), "b": head.bias.detach(),
            "knn": knn["predictions"], "knn_top1": knn["top1"]}


def test_two_processes_match_one(tmp_path):
    _images(tmp_path / "img")
    one = _pipeline(tmp_path, "one", None)
    # fork: the workers start with torch already imported (spawn re-imports it: ~20 s more on 2 busy cores)
    mp.start_processes(_two_proc_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert one["counts"] == [9, 9, 9, 9, 9, 3]
    assert two["counts"] == [9, 9, 6, 9, 9, 6]  # two ranks really wrote their own shards (24 + 24 rows)
    assert torch.equal(one["y"], two["y"]) and torch.allclose(one["x"], two["x"], atol=1e-6)
    # same global batches and steps; only the order of the gradient sum differs (all-reduce of 2 halves)
    assert torch.allclose(one["w"], two["w"], atol=1e-5) and torch.allclose(one["b"], two["b"], atol=1e-5)
    assert not torch.equal(one["w"], linear_head(8, 3, 0).weight)
    assert torch.equal(one["knn"], two["knn"]) and one["knn_top1"] == two["knn_top1"]


# ------------------------------------------------------------------------------- lincls protocol


class TinyEncoder(nn.Module):
    """Conv + BatchNorm: BN in train mode would move its running statistics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x.float() / 255.0)).relu().mean((2, 3))


def test_lincls_protocol_trains_head_keeps_backbone_and_honours_knobs(tmp_path):
    src = _images(tmp_path / "img", n=40, size=16)
    enc = TinyEncoder()
    enc.train()  # the protocol must switch it to eval itself
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    s = StreamSettings(epochs=2, batch_size=16, base_lr=0.4, optimizer="lars", ckpt_every=0, seed=3)
    lrs = []
    head, log = lincls_protocol(enc, [enc], str(src), dim=6, num_classes=3, channels=1, image_size=12, settings=s,
                                ckpt_dir=str(tmp_path / "ck"), on_step=lambda st: lrs.append(st))
    assert not enc.training
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # backbone (and BN stats) unchanged
    assert log["steps_per_epoch"] == 3 and log["steps"] == 6 and lrs == [1, 2, 3, 4, 5, 6]
    init = linear_head(6, 3, 3)
    assert init.weight.std().item() == pytest.approx(0.01, rel=0.3) and torch.equal(init.bias, torch.zeros(3))
    assert not torch.equal(head.weight, init.weight) and math.isfinite(log["loss"])
    ck = torch.load(tmp_path / "ck" / "ckpt-000000006.pt", weights_only=True)
    group = ck["optimizer"]["param_groups"][0]
    # lr = base_lr x batch / 256, cosine per epoch: the last epoch (1 of 2) runs at half of it
    assert group["lr"] == pytest.approx(0.4 * 16 / 256 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert group["momentum"] == 0.9 and group["weight_decay"] == 0.0 and group["trust_coeff"] == 0.001
    assert group["always_adapt"] and not group["trust_clip"]
    assert ck["config"]["probe_settings"]["epochs"] == 2 and ck["config"]["probe_settings"]["batch_size"] == 16

    class Moving(TinyEncoder):
        def forward(self, x):
            with torch.no_grad():
                self.conv.bias.add_(1.0)  # a backbone that moves must fail the sanity check
            return super().forward(x)

    bad = Moving()
    with pytest.raises(RuntimeError, match="changed the frozen encoder"):
        lincls_protocol(bad, [bad], str(src), dim=6, num_classes=3, channels=1, image_size=12,
                        settings=StreamSettings(epochs=1, batch_size=16))


# ------------------------------------------------------------------------------- launch/probe.py wiring


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from conftest import tiny_steal_assets

    return tiny_steal_assets(tmp_path_factory.mktemp("probe"), {"animal_mnist": {"victim_train": 10, "query": 10,
                                                                                  "probe_train": 240, "probe_test": 120}})


def _launch(root: Path, victim: Path, name: str, *args: str) -> list[dict]:
    from launch.probe import main

    d = root / "data" / "animal_mnist"
    main([f"out_dir={root}", f"name={name}", "cpu=true", f"victim={victim}", "random=false", "image_size=16",
          f"sets=[animal:{d / 'probe_train'}:{d / 'probe_test'}]", "batch_size=50", *args])
    return [json.loads(line) for line in (root / name / "results.jsonl").read_text().splitlines()]


def test_probe_modes_from_the_command_line(assets):
    root, victim = assets
    full = {r["probe"]: r for r in _launch(root, victim, "full", "steps=200")}
    stream = {r["probe"]: r for r in _launch(root, victim, "stream", "mode=stream", "epochs=20", "probe_batch_size=32",
                                             "shard_rows=64", "ckpt_every=5")}
    assert stream["linear"]["mode"] == "stream" and stream["linear"]["steps"] == 20 * 8
    assert stream["linear"]["n_train"] == 240 and stream["linear"]["n_test"] == 120
    assert full["linear"]["top1"] > 0.2  # 2x chance (10 classes) from a random tiny victim: agreement is informative
    assert abs(stream["linear"]["top1"] - full["linear"]["top1"]) <= 0.06, (stream["linear"]["top1"], full["linear"]["top1"])
    assert stream["knn"]["top1"] == full["knn"]["top1"]  # the same features: the streamed kNN is the same classifier
    feats = root / "stream" / "features" / "animal" / "victim" / "train"
    m = json.loads((feats / "manifest.json").read_text())
    assert m["num_samples"] == 240 and [s["count"] for s in m["shards"]] == [64, 64, 64, 48]
    assert (root / "stream" / "ckpt" / "animal" / "victim" / "latest").is_file()
    lin = {r["probe"]: r for r in _launch(root, victim, "lincls", "mode=lincls", "epochs=1", "probe_batch_size=64")}
    assert lin["linear"]["mode"] == "lincls" and lin["linear"]["optimizer"] == "lars" and lin["linear"]["steps"] == 4
    assert lin["linear"]["lr"] == pytest.approx(0.1 * 64 / 256) and 0.0 <= lin["linear"]["top1"] <= 1.0


def test_bad_probe_mode_is_one_line(assets, capsys):
    root, victim = assets
    with pytest.raises(SystemExit):
        _launch(root, victim, "bad", "mode=streaming")
    err = capsys.readouterr().err.strip()
    assert "mode" in err and "stream" in err and len(err.splitlines()) == 1


def test_preempted_streamed_probe_exits_3_and_the_rerun_resumes(assets):
    root, victim = assets
    args = ("mode=stream", "epochs=20", "probe_batch_size=32", "shard_rows=64", "ckpt_every=50")
    import stealer.preempt  # noqa: F401  (a flag older than this module's import counts as stale and is removed)

    (root / "pre").mkdir(exist_ok=True)
    flag = root / "pre" / "PREEMPT"
    flag.touch()  # the flag SLURM's trap would write: honoured at the first step
    os.utime(flag, (time.time() + 1, time.time() + 1))  # newer than the import above despite a coarse fs clock
    with pytest.raises(SystemExit) as e:
        _launch(root, victim, "pre", *args)
    assert e.value.code == 3
    ck = root / "pre" / "ckpt" / "animal" / "victim"
    assert (ck / "latest").read_text().strip() == "ckpt-000000001.pt"  # stopped after step 1 of 160
    assert not (root / "pre" / "results.jsonl").exists()
    (root / "pre" / "PREEMPT").unlink()
    rows = {r["probe"]: r for r in _launch(root, victim, "pre", *args)}
    straight = {r["probe"]: r for r in _launch(root, victim, "straight", *args)}
    assert rows["linear"]["steps"] == 160 and (ck / "latest").read_text().strip() == "ckpt-000000160.pt"
    assert rows["linear"]["top1"] == straight["linear"]["top1"]
    assert rows["linear"]["train_top1"] == straight["linear"]["train_top1"]
