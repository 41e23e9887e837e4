"""victims/: backbones, SimSiam checkpoints (official format), the query ledger and the API."""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import time

import pytest
import torch
import torchvision
from torch import nn

from victims.api import VictimAPI
from victims.backbones import BACKBONES, ResNet, build_backbone
from victims.ledger import BudgetExceeded, QueryLedger
from victims.simsiam import (
    SimSiam,
    load_victim_encoder,
    random_victim,
    save_simsiam_checkpoint,
    simsiam_loss,
)

TINY = {"width": 8, "stem": "small"}  # resnet18 at width 8: ~0.2M parameters
# files without the project's record default to ImageNet preprocessing (tests/test_preprocess.py);
# these 16-px tests serve them as they come, normalised as _normalise does
AS_IS = {"preprocess": "none", "mean": 0.5, "std": 0.25}


def _images(n: int = 4, size: int = 16, c: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)


def _normalise(images: torch.Tensor, mean: float = 0.5, std: float = 0.25) -> torch.Tensor:
    return (images.float() / 255 - mean) / std


def _trained_simsiam(arch: str = "resnet18", **kw: object) -> SimSiam:
    """A SimSiam whose BN statistics have moved, so a bad load would show."""
    torch.manual_seed(0)
    model = SimSiam(arch, dim=32, pred_dim=8, **(TINY if arch.startswith("resnet") else {}), **kw)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(_normalise(_images(8, seed=1)), _normalise(_images(8, seed=2)))
    return model.eval()


def _official_save(model: SimSiam, path: os.PathLike[str], arch: str = "resnet18") -> None:
    """Exactly what facebookresearch/simsiam main_simsiam.py writes (model wrapped in DDP)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    ddp_state = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save(
        {"epoch": 1, "arch": arch, "state_dict": ddp_state, "optimizer": optimizer.state_dict()},
        path,
    )


# ---------------------------------------------------------------- backbones


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_resnet_state_dict_identical_to_torchvision(name: str) -> None:
    ref = getattr(torchvision.models, name)()
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = ResNet(*_layout(name), num_classes=1000)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    assert list(ours.state_dict()) == list(ref.state_dict())  # same order too
    net, dim = build_backbone(name)
    assert isinstance(net.fc, nn.Identity)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {
        k: s for k, s in ref_shapes.items() if not k.startswith("fc.")
    }
    assert dim == ref.fc.in_features


def _layout(name: str) -> tuple[type, tuple[int, int, int, int]]:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return {
        "resnet18": (BasicBlock, (2, 2, 2, 2)),
        "resnet34": (BasicBlock, (3, 4, 6, 3)),
        "resnet50": (Bottleneck, (3, 4, 6, 3)),
    }[name]


@pytest.mark.parametrize(
    ("name", "width", "dim"),
    [("resnet18", 64, 512), ("resnet18", 32, 256), ("resnet34", 8, 64), ("resnet50", 8, 256)],
)
def test_feature_dims(name: str, width: int, dim: int) -> None:
    net, d = build_backbone(name, width=width, stem="small")
    assert d == dim
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, dim)


@pytest.mark.parametrize(("stem", "side"), [("imagenet", 1), ("small", 2), ("cifar", 4)])
def test_stems_downsample(stem: str, side: int) -> None:
    net, dim = build_backbone("resnet18", stem=stem, width=8, in_chans=1)
    feats = net.forward_features(torch.randn(2, 1, 32, 32))
    assert feats.shape == (2, dim, side, side)  # 32 px / (32, 16, 8)


def test_unknown_backbone_lists_names() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg11'") as e:
        build_backbone("vgg11")
    for name in BACKBONES:
        assert name in str(e.value)
    assert "timm:" in str(e.value)
    with pytest.raises(ValueError, match="stem"):
        build_backbone("resnet18", stem="huge")


def test_timm_backbone() -> None:
    net, dim = build_backbone("timm:resnet10t", in_chans=1)
    assert dim == net.num_features
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, dim)
    with pytest.raises(ValueError, match="stem and width"):
        build_backbone("timm:resnet10t", width=32)
    with pytest.raises(ValueError, match="unknown timm model"):
        build_backbone("timm:no_such_model_xyz")


# ---------------------------------------------------------------- SimSiam and checkpoints


def test_simsiam_forward_and_loss() -> None:
    model = SimSiam("resnet18", dim=32, pred_dim=8, **TINY)
    assert isinstance(model.encoder.fc[7], nn.BatchNorm1d) and not model.encoder.fc[7].affine
    assert not model.encoder.fc[6].bias.requires_grad
    x1, x2 = _normalise(_images(4, seed=1)), _normalise(_images(4, seed=2))
    p1, p2, z1, z2 = model(x1, x2)
    assert p1.shape == z1.shape == (4, 32) and not z1.requires_grad
    loss = simsiam_loss(p1, p2, z1, z2)
    cos = nn.CosineSimilarity(dim=1)
    assert torch.allclose(loss, -(cos(p1, z2).mean() + cos(p2, z1).mean()) * 0.5)
    assert torch.allclose(simsiam_loss(z1, z2, z1, z2), -cos(z1, z2).mean())
    z = torch.randn(4, 32, requires_grad=True)
    assert simsiam_loss(z, z, z, z).item() == pytest.approx(-1.0)
    loss.backward()
    assert model.predictor[0].weight.grad is not None


@pytest.mark.parametrize("representation", ["backbone", "projector"])
def test_official_checkpoint_loads(tmp_path: os.PathLike[str], representation: str) -> None:
    model = _trained_simsiam()
    path = tmp_path / "checkpoint_0001.pth.tar"
    _official_save(model, path)
    victim = load_victim_encoder(path, representation=representation, **AS_IS, **TINY)
    images = _images(5)
    ref = copy.deepcopy(model.encoder).eval()
    if representation == "backbone":
        ref.fc = nn.Identity()
    with torch.no_grad():
        expected = ref(_normalise(images))
    out = victim(images)
    assert out.shape == (5, victim.out_dim) == expected.shape
    assert victim.out_dim == (64 if representation == "backbone" else 32)
    torch.testing.assert_close(out, expected)


def test_our_checkpoint_roundtrip_and_official_reader(tmp_path: os.PathLike[str]) -> None:
    model = _trained_simsiam()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "runs" / "v.pth.tar"
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    save_simsiam_checkpoint(
        model, path, epoch=3, arch="resnet18", optimizer=opt,
        extra={"image_size": 16, "mean": mean, "std": std},
    )
    assert sorted(os.listdir(path.parent)) == ["v.pth.tar"]  # no temp file of any name is left
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["arch"] == "resnet18"
    assert {"module.encoder.conv1.weight", "module.encoder.fc.0.weight",
            "module.predictor.0.weight"} <= set(ckpt["state_dict"])
    assert ckpt["sslsteal"]["width"] == 8 and ckpt["sslsteal"]["stem"] == "small"

    # main_lincls.py's loader: keep module.encoder.* but fc, strip the prefix, load strictly
    sd = {k[len("module.encoder."):]: v for k, v in ckpt["state_dict"].items()
          if k.startswith("module.encoder") and not k.startswith("module.encoder.fc")}
    net, _ = build_backbone("resnet18", **TINY)
    net.load_state_dict(sd, strict=True)

    victim = load_victim_encoder(path)  # everything from the record
    assert (victim.arch, victim.image_size, victim.backbone_kwargs) == (
        "resnet18", 16, {"in_chans": 3, "stem": "small", "width": 8})
    got_mean, got_std = victim.normalisation
    assert got_mean == pytest.approx(mean) and got_std == pytest.approx(std)
    images = _images(3)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net.eval()((images.float() / 255 - m) / s)
    torch.testing.assert_close(victim(images), expected)
    # other sizes are resized to image_size
    assert victim(_images(2, size=24)).shape == (2, 64)


def test_prefix_variants_load(tmp_path: os.PathLike[str]) -> None:
    model = _trained_simsiam()
    images = _images(2)
    _official_save(model, tmp_path / "a.pt")
    expected = load_victim_encoder(tmp_path / "a.pt", **AS_IS, **TINY)(images)
    # without DDP's module. prefix: keys encoder.* / predictor.*
    torch.save({"arch": "resnet18", "state_dict": model.state_dict()}, tmp_path / "b.pt")
    torch.save(model.state_dict(), tmp_path / "c.pt")  # bare SimSiam state dict
    bare = copy.deepcopy(model.encoder)
    bare.fc = nn.Identity()
    torch.save(bare.state_dict(), tmp_path / "d.pt")  # bare backbone (torchvision layout)
    for name in ("b.pt", "c.pt", "d.pt"):
        victim = load_victim_encoder(tmp_path / name, arch="resnet18", **AS_IS, **TINY)
        torch.testing.assert_close(victim(images), expected)
    with pytest.raises(ValueError, match="does not record its arch"):
        load_victim_encoder(tmp_path / "d.pt", **TINY)
    with pytest.raises(ValueError, match="no projector weights"):
        load_victim_encoder(tmp_path / "d.pt", arch="resnet18", representation="projector", **TINY)


def test_timm_simsiam_roundtrip(tmp_path: os.PathLike[str]) -> None:
    model = _trained_simsiam("timm:resnet10t")
    path = tmp_path / "timm.pth.tar"
    save_simsiam_checkpoint(model, path, epoch=1, arch="timm:resnet10t")
    victim = load_victim_encoder(path, representation="projector")
    with torch.no_grad():
        expected = model.encoder(_normalise(_images(2)))
    torch.testing.assert_close(victim(_images(2)), expected)
    assert load_victim_encoder(path).out_dim == model.feature_dim


def test_wrong_arch_one_line_error(tmp_path: os.PathLike[str]) -> None:
    path = tmp_path / "r18.pth.tar"
    _official_save(_trained_simsiam(), path)
    with pytest.raises(ValueError) as e, pytest.warns(UserWarning, match="records arch"):
        load_victim_encoder(path, arch="resnet34", **TINY)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "resnet34" in msg
    assert "missing encoder keys [layer1.2." in msg and "victim.arch=" in msg
    with pytest.raises(ValueError) as e:
        load_victim_encoder(path, width=16, stem="small")  # official file: no record of width
    assert "shape mismatches [conv1.weight [8, 3, 3, 3] vs [16, 3, 3, 3]" in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_garbage_files(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(FileNotFoundError, match="train_victim.py") as e:
        load_victim_encoder(tmp_path / "nope.pth.tar")
    assert "nope.pth.tar" in str(e.value)
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="not a readable torch checkpoint") as e:
        load_victim_encoder(junk)
    assert "\n" not in str(e.value)


def test_random_victim_same_kind() -> None:
    victim = random_victim("resnet18", representation="projector", proj_dim=16, image_size=16, **TINY)
    control = random_victim(victim, seed=1)
    assert (control.arch, control.representation, control.out_dim, control.image_size) == (
        "resnet18", "projector", 16, 16)
    assert control.backbone_kwargs == victim.backbone_kwargs
    images = _images(3)
    assert not torch.allclose(control(images), victim(images))
    torch.testing.assert_close(random_victim(victim, seed=1)(images), control(images))


def test_victim_output_usable_as_target() -> None:
    victim = random_victim("resnet18", **TINY)
    target = victim(_images(2))
    student = torch.randn(2, victim.out_dim, requires_grad=True)
    nn.functional.mse_loss(student, target).backward()  # not an inference tensor
    assert student.grad is not None and not target.requires_grad


# ---------------------------------------------------------------- ledger


def test_ledger_budget(tmp_path: os.PathLike[str]) -> None:
    ledger = QueryLedger(tmp_path / "db" / "ledger.sqlite")
    assert ledger.spent("alice") == 0 and ledger.budget("alice") is None
    ledger.set_budget("alice", 10)
    assert ledger.charge("alice", 4) == 4
    assert ledger.charge("alice", 6) == 10
    assert ledger.remaining("alice") == 0
    with pytest.raises(BudgetExceeded) as e:
        ledger.charge("alice", 1)
    msg = str(e.value)
    assert "'alice'" in msg and "1 images" in msg and "10 of 10" in msg and "\n" not in msg
    assert isinstance(e.value, RuntimeError) and ledger.spent("alice") == 10
    ledger.set_budget("bob", 5)
    with pytest.raises(BudgetExceeded):
        ledger.charge("bob", 6)  # all or nothing
    assert ledger.spent("bob") == 0
    assert ledger.charge("carol", 1000) == 1000  # unlimited by default
    with pytest.raises(ValueError):
        ledger.charge("alice", -1)

    again = QueryLedger(tmp_path / "db" / "ledger.sqlite")  # persisted
    assert again.usage() == {
        "alice": {"budget": 10, "spent": 10, "remaining": 0},
        "bob": {"budget": 5, "spent": 0, "remaining": 5},
        "carol": {"budget": None, "spent": 1000, "remaining": None},
    }
    again.set_budget("alice", 15)  # raising a budget keeps what was spent
    assert again.remaining("alice") == 5
    assert QueryLedger(tmp_path / "x.sqlite", default_budget=3).remaining("dave") == 3


def test_ledger_receipts_charge_once(tmp_path: os.PathLike[str]) -> None:
    """A charge carrying a receipt already recorded is not charged again (crash-safe retries)."""
    path = tmp_path / "ledger.sqlite"
    ledger = QueryLedger(path)
    ledger.set_budget("alice", 10)
    assert ledger.charge("alice", 4, receipt="r1") == 4
    assert QueryLedger(path).charge("alice", 4, receipt="r1") == 4  # another process, same receipt: free
    assert ledger.has_receipt("alice", "r1") and not ledger.has_receipt("bob", "r1")
    assert ledger.charge("alice", 4, receipt="r2") == 8
    with pytest.raises(ValueError, match="charged for 4 images, not 3"):
        ledger.charge("alice", 3, receipt="r1")
    with pytest.raises(BudgetExceeded):  # a refused charge leaves no receipt
        ledger.charge("alice", 3, receipt="r3")
    assert not ledger.has_receipt("alice", "r3") and ledger.spent("alice") == 8
    assert ledger.charge("alice", 2, receipt="r1:other") == 10  # receipts are exact strings
    assert ledger.drop_receipts([("alice", "r1"), ("alice", "nope")]) == 1
    with pytest.raises(BudgetExceeded):  # a dropped receipt is a new charge again
        ledger.charge("alice", 4, receipt="r1")
    assert ledger.prune_receipts(time.time() + 1) == 2  # r2, r1:other
    assert not ledger.has_receipt("alice", "r2") and ledger.spent("alice") == 10


def _charge_many(path: str, user: str, times: int) -> int:
    ledger = QueryLedger(path)
    ok = 0
    for _ in range(times):
        try:
            ledger.charge(user, 1)
            ok += 1
        except BudgetExceeded:
            pass
    return ok


def test_ledger_two_processes(tmp_path: os.PathLike[str]) -> None:
    path = str(tmp_path / "ledger.sqlite")
    ledger = QueryLedger(path)
    ledger.set_budget("capped", 300)
    jobs = [(path, "free", 200), (path, "free", 200), (path, "capped", 200), (path, "capped", 200)]
    with mp.get_context("spawn").Pool(2) as pool:
        ok = pool.starmap(_charge_many, jobs)
    assert ok[:2] == [200, 200] and ledger.spent("free") == 400
    assert sum(ok[2:]) == 300 and ledger.spent("capped") == 300  # never exceeded


# ---------------------------------------------------------------- API


@pytest.fixture
def api(tmp_path: os.PathLike[str]) -> VictimAPI:
    ledger = QueryLedger(tmp_path / "ledger.sqlite")
    ledger.set_budget("eve", 10)
    return VictimAPI(random_victim("resnet18", image_size=16, **TINY), ledger)


def test_api_counts_every_image(api: VictimAPI) -> None:
    images = _images(4)
    first = api.query(images, user="eve")
    assert first.shape == (4, api.out_dim) and first.dtype == torch.float32
    torch.testing.assert_close(api.query(images, user="eve"), first)  # repeat: paid again
    assert api.ledger.spent("eve") == 8
    with pytest.raises(BudgetExceeded, match="'eve'"):
        api.query(images, user="eve")
    assert api.ledger.spent("eve") == 8
    assert api.query(images[:2], user="eve").shape == (2, api.out_dim)
    assert api.ledger.remaining("eve") == 0
    assert api.describe() == {
        "arch": "resnet18", "representation": "backbone", "out_dim": 64,
        "image_size": 16, "in_chans": 3, "input": "uint8 [N, C, H, W], 0..255",
        "preprocess": {"preset": "project", "resize": None, "crop": None, "image_size": 16,
                       "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3, "overrides": []},
    }


def test_api_weights_never_move(api: VictimAPI) -> None:
    api.ledger.set_budget("eve", None)
    before = copy.deepcopy(api.encoder.state_dict())
    api.encoder.train()
    assert not api.encoder.training and not any(m.training for m in api.encoder.modules())
    api.encoder.encoder.train()  # even the inner module, by mistake
    for seed in range(10):
        api.query(_images(4, seed=seed), user="eve")
    after = api.encoder.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert not any(p.requires_grad for p in api.encoder.parameters())
    assert api.ledger.spent("eve") == 40


def test_api_rejects_bad_input(api: VictimAPI) -> None:
    bad = [
        _images(2).float(),
        _images(2)[0],
        _images(2, c=1),
        [[0]],
    ]
    for images in bad:
        with pytest.raises(ValueError, match="uint8") as e:
            api.query(images, user="eve")  # type: ignore[arg-type]
        assert "\n" not in str(e.value)
    assert api.ledger.spent("eve") == 0


def test_api_defenses_in_order(tmp_path: os.PathLike[str]) -> None:
    seen: list[str] = []

    def plus_one(reps: torch.Tensor, images: torch.Tensor, user: str) -> torch.Tensor:
        seen.append(user)
        assert images.dtype == torch.uint8
        return reps + 1

    def double(reps: torch.Tensor, images: torch.Tensor, user: str) -> torch.Tensor:
        return reps * 2

    victim = random_victim("resnet18", **TINY)
    ledger = QueryLedger(tmp_path / "l.sqlite")
    images = _images(3)
    clean = VictimAPI(victim, ledger).query(images, user="u")
    defended = VictimAPI(victim, ledger, defenses=[plus_one, double]).query(images, user="u")
    torch.testing.assert_close(defended, (clean + 1) * 2)
    assert seen == ["u"] and ledger.spent("u") == 6
    assert VictimAPI(victim, ledger).query(images[:0], user="u").shape == (0, victim.out_dim)


def _open_ledger_at(path: str, start: float, q) -> None:
    import time as _t

    from victims.ledger import QueryLedger

    while _t.time() < start:
        pass
    try:
        QueryLedger(path).set_budget("attacker", 100)
        q.put("ok")
    except Exception as e:  # noqa: BLE001
        q.put(repr(e))


def test_ranks_opening_a_new_ledger_at_once_never_fail(tmp_path):
    """Two ranks create the same ledger in the same instant (WAL switch: SQLITE_BUSY without waiting)."""
    import multiprocessing as mp
    import time as _t

    ctx = mp.get_context("fork")
    for i in range(15):
        q = ctx.Queue()
        start = _t.time() + 0.2
        procs = [ctx.Process(target=_open_ledger_at, args=(str(tmp_path / f"l{i}" / "ledger.sqlite"), start, q)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [q.get(timeout=10) for _ in procs] == ["ok", "ok"]


def test_victim_precision_bf16_answers_close_to_fp32_and_cache_refuses_mixing(tmp_path) -> None:
    """bf16 autocast of the victim's forward: float32 answers within bf16 rounding of fp32; a response
    cache made at one precision refuses answers of another; fp16 on a CPU is refused in one line."""
    from launch.common import make_accelerator
    from stealer.config import load_config
    from stealer.shards import array_samples, write_shards
    from stealer.steal import StealConfig, run_query_phase
    from victims.api import resolve_precision
    from victims.simsiam import random_victim

    torch.manual_seed(0)
    enc = random_victim("resnet18", in_chans=1, width=8, stem="small", image_size=16)
    x = torch.randint(0, 256, (12, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    fp32 = VictimAPI(enc, QueryLedger(tmp_path / "a.sqlite"))
    bf16 = VictimAPI(enc, QueryLedger(tmp_path / "b.sqlite"), precision="bf16")
    a, b = fp32.query(x, "u"), bf16.query(x, "u")
    assert a.dtype == b.dtype == torch.float32 and bf16.ledger.spent("u") == 12 and not torch.equal(a, b)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert cos.min() > 0.99 and ((a - b).norm(dim=1) / a.norm(dim=1)).max() < 0.05
    assert resolve_precision("auto", "cpu") == "fp32" and fp32.precision == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a GPU; use bf16 or fp32 on the CPU"):
        VictimAPI(enc, QueryLedger(tmp_path / "c.sqlite"), precision="fp16")
    with pytest.raises(ValueError, match="victim precision 'half' is not valid; choose one of: auto, fp32, bf16, fp16"):
        resolve_precision("half", "cpu")

    import numpy as np

    write_shards(array_samples(np.asarray(x[:, 0]), np.zeros(12, dtype=int), key_prefix="q"), tmp_path / "q",
                 source="t", classes=["x"], channels=1, image_size=[16, 16])
    cfg = load_config(StealConfig, None, [f"out_dir={tmp_path}", "name=p", f"data.query={tmp_path / 'q'}",
                                          "data.image_size=16", "data.channels=1", "query.batch_size=6"])
    acc = make_accelerator(cpu=True)
    assert run_query_phase(cfg, fp32, acc)["queries_sent"] == 12
    with pytest.raises(ValueError, match=r"made with other settings \{'victim_precision': \(None, 'bf16'\)\}"):
        run_query_phase(cfg, bf16, acc)
