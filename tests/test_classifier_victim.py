"""Classifier victims: checkpoints, the posterior query API and its ledger, supervised training
(1 and 2 real processes, resume), and the int8 quantized victim — on small real data."""
from __future__ import annotations

from conftest import free_port

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from victims.classifier import ClassifierVictim, build_classifier, load_classifier, save_classifier
from victims.ledger import BudgetExceeded, QueryLedger
from victims.posterior_api import PosteriorAPI

REPO = Path(__file__).resolve().parents[1]
SIZES = {"animal_mnist": {"victim_train": 384, "query": 32, "probe_train": 32, "probe_test": 160}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from stealer.shards import build_default_data

    root = tmp_path_factory.mktemp("clfdata")
    build_default_data(root, image_size=16, sizes=SIZES)
    return root / "animal_mnist"


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--task", "classify", f"out_dir={out}", "name=clf", "cpu=true", f"train_data={data / 'victim_train'}",
            f"test_data={data / 'probe_test'}", "image_size=16", "model.width=8", "epochs=10", "batch_size=64",
            "lr=0.4", "ckpt_every=15", "log_every=2", *extra]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    from launch.train_victim import main

    out = tmp_path_factory.mktemp("clfrun")
    return main(_args(data, out))


def _images(data: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from stealer.data import ShardStream, open_shards

    s = ShardStream(open_shards(data / split), batch_size=1024, shuffle=False, channels=1, image_size=16)
    b = next(iter(s.iter_epoch(0)))
    return b["image"], b["label"]


# ---------------------------------------------------------------- the model and its file
@pytest.mark.parametrize("arch,kw", [("resnet18", {"width": 8, "stem": "small"}), ("timm:resnet10t", {})])
def test_checkpoint_round_trip(tmp_path, arch, kw):
    torch.manual_seed(0)
    m = build_classifier(arch, 5, 1, 16, mean=0.4, std=0.3, classes=list("abcde"), **kw).eval()
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    save_classifier(m, tmp_path / "c.pt", extra={"note": "x"})
    m2 = load_classifier(tmp_path / "c.pt")
    assert isinstance(m2, ClassifierVictim) and not m2.training
    assert (m2.arch, m2.num_classes, m2.in_chans, m2.image_size, m2.classes) == (arch, 5, 1, 16, list("abcde"))
    assert m2.mean == pytest.approx([0.4]) and m2.std == pytest.approx([0.3])
    assert torch.allclose(m(x), m2(x), atol=1e-6)
    assert m2.features(x).shape == (4, m2.feature_dim)
    # float [0, 1] input is the same image; other sizes are resized
    assert torch.allclose(m2(x.float() / 255), m2(x), atol=1e-5)
    assert m2(torch.randint(0, 256, (2, 1, 24, 24), dtype=torch.uint8)).shape == (2, 5)


def test_checkpoint_errors_name_the_file(tmp_path):
    m = build_classifier("resnet18", 3, 1, 16, width=8, stem="small")
    with pytest.raises(FileNotFoundError, match="no classifier checkpoint at .*missing.pt; train one with"):
        load_classifier(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk.pt is not a readable torch checkpoint"):
        load_classifier(tmp_path / "junk.pt")
    torch.save({"state_dict": {}, "arch": "resnet18"}, tmp_path / "simsiam.pth.tar")
    with pytest.raises(ValueError, match=r"simsiam.pth.tar is a SimSiam checkpoint \(no format"):
        load_classifier(tmp_path / "simsiam.pth.tar")
    save_classifier(m, tmp_path / "c.pt")
    ck = torch.load(tmp_path / "c.pt", weights_only=True)
    ck["state_dict"]["head.weight"] = torch.zeros(7, 7)
    torch.save(ck, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match=r"edited.pt weights do not fit resnet18 \(1 keys differ, e.g. \['head.weight'\]"):
        load_classifier(tmp_path / "edited.pt")
    with pytest.raises(ValueError, match=r"classifier expects images \[N, 1, H, W\]"):
        m(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


# ---------------------------------------------------------------- the posterior API
class _Fixed(nn.Module):
    """A classifier double returning fixed posteriors (for hand-computed top-k / rounding); counts forwards."""

    arch, num_classes, in_chans, image_size = "fixed", 4, 1, 8

    def __init__(self, probs: list[float]) -> None:
        super().__init__()
        self.register_buffer("logp", torch.tensor(probs).log())
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.logp.expand(images.shape[0], -1)


def test_posterior_api_top_k_and_rounding_by_hand(tmp_path):
    x = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    ledger = QueryLedger(tmp_path / "l.sqlite")
    full = PosteriorAPI(_Fixed([0.5, 0.3, 0.15, 0.05]), ledger).query(x, "u")
    assert torch.allclose(full, torch.tensor([0.5, 0.3, 0.15, 0.05]).expand(3, 4), atol=1e-6)
    top2 = PosteriorAPI(_Fixed([0.5, 0.3, 0.15, 0.05]), ledger, top_k=2).query(x, "u")
    assert torch.allclose(top2[0], torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=1e-6)
    # round to 1 decimal: [.4, .3, .2, .1] -> sum 1 already; [.44,.32,.19,.05] -> [.4,.3,.2,.1] (0.05 -> 0.0 half-even)
    r = PosteriorAPI(_Fixed([0.44, 0.32, 0.19, 0.05]), ledger, rounding=1).query(x, "u")
    assert torch.allclose(r[0], torch.tensor([0.4, 0.3, 0.2, 0.0]) / 0.9, atol=1e-6)
    both = PosteriorAPI(_Fixed([0.04, 0.03, 0.9, 0.03]), ledger, top_k=1, rounding=0).query(x, "u")
    assert torch.equal(both[0], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    api = PosteriorAPI(_Fixed([0.25] * 4), ledger, top_k=3, rounding=2)
    assert api.describe() == {"arch": "fixed", "num_classes": 4, "image_size": 8, "in_chans": 1, "output": "posterior",
                              "top_k": 3, "rounding": 2, "input": "uint8 [N, C, H, W], 0..255"}
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 4\] or None; got 5"):
        PosteriorAPI(_Fixed([0.25] * 4), ledger, top_k=5)


def test_ledger_counts_every_posterior_before_the_forward(tmp_path):
    ledger = QueryLedger(tmp_path / "l.sqlite")
    ledger.set_budget("eve", 10)
    model = _Fixed([0.25] * 4)
    api = PosteriorAPI(model, ledger)
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    api.query(x, "eve")
    api.query(x, "eve")  # the same images again: paid again
    assert ledger.spent("eve") == 8 and model.calls == 2
    with pytest.raises(BudgetExceeded):
        api.query(x, "eve")  # 8 + 4 > 10: nothing charged, nothing computed
    assert ledger.spent("eve") == 8 and model.calls == 2
    with pytest.raises(ValueError, match=r"query images must be uint8 \[N, 1, H, W\]"):
        api.query(x.float(), "eve")
    assert ledger.spent("eve") == 8

    class Broken(_Fixed):
        def forward(self, images):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        PosteriorAPI(Broken([0.25] * 4), ledger).query(x[:2], "eve")
    assert ledger.spent("eve") == 10  # charged before the forward: a failed query stays paid


# ---------------------------------------------------------------- training
def test_trained_classifier_learns_and_resume_pays_nothing(trained, data):
    run = trained.parent
    res = json.loads((run / "result.json").read_text())
    assert res["world_size"] == 1 and res["steps"] == 10 * 6  # 384 images / 64 per batch x 10 epochs
    assert res["test"]["samples"] == 160 and res["test"]["accuracy"] > 0.3, res  # chance is 0.1
    m = load_classifier(trained)
    assert m.classes is not None and len(m.classes) == 10
    x, y = _images(data, "probe_test")
    assert (m(x).argmax(1) == y).float().mean().item() == pytest.approx(res["test"]["accuracy"])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    from launch.train_victim import main

    main(_args(data, run.parent))  # resume auto: the last checkpoint is the end
    assert (run / "metrics.jsonl").read_text().splitlines() == lines  # no step re-run
    assert torch.allclose(load_classifier(trained)(x), m(x), atol=1e-6)


def test_train_victim_cli_errors(capsys, data, tmp_path):
    from launch.train_victim import main

    with pytest.raises(SystemExit) as e:
        main(["--task", "regress"])
    assert e.value.code == 2 and "error: --task 'regress' is not valid; choose one of: simsiam, classify" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--task", "classify", "model.depth=3"])
    assert "unknown config key 'model.depth'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_args(data, tmp_path, f"train_data={tmp_path / 'nope'}"))
    assert "error: shard folder" in capsys.readouterr().err


def test_two_process_training(data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "launch" / "train_victim.py"), *_args(data, tmp_path, "epochs=1", "ckpt_every=1000")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "clf" / "result.json").read_text())
    assert res["world_size"] == 2 and res["steps"] == 3  # 384 / (2 x 64) batches, each rank in step
    assert load_classifier(tmp_path / "clf" / "classifier.pt").num_classes == 10


# ---------------------------------------------------------------- int8
def test_quantized_victim_agrees_and_serves_posteriors(trained, data, tmp_path):
    from victims.quantize import int8_weight_fraction, quantize_int8

    m = load_classifier(trained)
    calib, _ = _images(data, "victim_train")
    q = quantize_int8(m, calib[:128])
    assert int8_weight_fraction(q) == 1.0 and int8_weight_fraction(m) == 0.0
    assert any(getattr(mod, "weight", None) is not None and callable(mod.weight) and mod.weight().dtype == torch.qint8
               for mod in q.modules())
    x, _ = _images(data, "probe_test")
    agree = (q(x).argmax(1) == m(x).argmax(1)).float().mean().item()
    assert agree >= 0.9, agree
    api = PosteriorAPI(q, QueryLedger(tmp_path / "l.sqlite"), top_k=3)
    out = api.query(x[:20], "u")
    assert torch.allclose(out.sum(1), torch.ones(20), atol=1e-5) and (out >= 0).all()
    assert api.ledger.spent("u") == 20 and api.describe()["arch"] == "resnet18"
    with pytest.raises(ValueError, match="needs calibration_images"):
        quantize_int8(m, torch.zeros(0, 1, 16, 16, dtype=torch.uint8))
