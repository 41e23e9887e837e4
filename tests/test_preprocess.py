"""Released checkpoints fed exactly (issue 12, item 1).

A file written exactly like facebookresearch/simsiam's ``checkpoint_0099.pth.tar`` (torchvision
ResNet-50 + SimSiam projector/predictor, ``module.encoder.*`` keys, ``arch``/``epoch``/``optimizer``,
no sslsteal record) must answer, through every user path, what a plain torchvision forward gives
with the standard eval transform (Resize 256 + CenterCrop 224 + ToTensor + Normalize(ImageNet)) on
the original JPEG files: the steal config's in-process victim, ``launch/serve.py`` over HTTP, and
the probe's feature extraction. Plus the bad inputs: another arch than named, a preset that
contradicts the record, a cache or resume under other preprocessing.
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T

from stealer.config import ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[1]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# non-square, larger than 256 on the short side or not, both orientations (W x H)
SIZES = [(320, 280), (300, 411), (517, 333)]


def _simsiam_resnet50(dim: int = 2048, pred_dim: int = 512) -> tuple[nn.Module, nn.Module]:
    """facebookresearch/simsiam simsiam/builder.py (commit 833173b27ce2ebc8cdc4b7f37c8dd958225cfc9b,
    SimSiam.__init__) on torchvision's resnet50: encoder.fc replaced by the 3-layer projector, and the
    2-layer predictor. BN statistics are randomised so that a wrong load or a train-mode BN would show."""
    torch.manual_seed(0)
    encoder = torchvision.models.resnet50(num_classes=dim, zero_init_residual=True)
    prev_dim = encoder.fc.weight.shape[1]
    encoder.fc = nn.Sequential(nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim), nn.ReLU(inplace=True),
                               nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim), nn.ReLU(inplace=True),
                               encoder.fc, nn.BatchNorm1d(dim, affine=False))
    encoder.fc[6].bias.requires_grad = False
    predictor = nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
                              nn.Linear(pred_dim, dim))
    g = torch.Generator().manual_seed(1)
    for m in list(encoder.modules()) + list(predictor.modules()):
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.affine:  # zero_init_residual zeroed some; keep every block alive
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
    return encoder.eval(), predictor.eval()


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The official-layout checkpoint, an ImageNet-like folder of JPEGs and its shards."""
    root = tmp_path_factory.mktemp("released")
    encoder, predictor = _simsiam_resnet50()

    class _Model(nn.Module):  # main_simsiam.py saves the DDP-wrapped SimSiam: module.encoder.*, module.predictor.*
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.predictor = encoder, predictor

    model = _Model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    ckpt = root / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict()}, ckpt)

    folder = root / "images"
    files = []
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        d = folder / f"n0000000{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 7) % 256], -1).astype(np.int16)
        img = np.clip(img + rng.integers(-40, 40, img.shape), 0, 255).astype(np.uint8)
        path = d / f"img_{i}.JPEG"
        Image.fromarray(img).save(path, quality=90)
        files.append(path)
    from launch.make_shards import main as make_shards

    assert make_shards([str(folder), str(root / "shards"), "--split", f"query={len(SIZES)}"]) == 0
    return {"root": root, "ckpt": ckpt, "files": files, "encoder": encoder, "shards": root / "shards" / "query"}


@pytest.fixture(scope="module")
def reference(released: dict) -> dict[str, dict[bytes, torch.Tensor]]:
    """A plain torchvision forward on the original files with the standard eval transform, by file bytes:
    ``{"backbone": {bytes: pooled 2048-d}, "projector": {bytes: projector output}}``."""
    torch.set_num_threads(1)
    net = torchvision.models.resnet50()
    sd = {k[len("module.encoder."):]: v for k, v in torch.load(released["ckpt"], weights_only=True)["state_dict"].items()
          if k.startswith("module.encoder.")}
    net.fc = _simsiam_resnet50()[0].fc
    net.load_state_dict(sd, strict=True)
    net.eval()
    head, net.fc = net.fc, nn.Identity()
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    out: dict[str, dict[bytes, torch.Tensor]] = {"backbone": {}, "projector": {}}
    with torch.no_grad():
        for path in released["files"]:
            with open(path, "rb") as f:
                x = tf(Image.open(f).convert("RGB"))  # torchvision's pil_loader
            h = net(x[None])
            out["backbone"][path.read_bytes()] = h[0]
            out["projector"][path.read_bytes()] = head(h)[0]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _shard_bytes(shard_dir: Path) -> list[tuple[str, bytes]]:
    """(key, image bytes) of a shard folder in its order."""
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    out = []
    for s in manifest["shards"]:
        with tarfile.open(shard_dir / s["name"]) as t:
            for m in t.getmembers():
                if m.name.rsplit(".", 1)[1] in ("jpg", "jpeg", "png"):
                    out.append((m.name.split(".", 1)[0], t.extractfile(m).read()))
    return out


def _cached(cache_dir: Path) -> dict[bytes, torch.Tensor]:
    """The response cache as {query image bytes: response}."""
    out = {}
    for tar in sorted(cache_dir.glob("resp-*.tar")):
        with tarfile.open(tar) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        for name, data in members.items():
            if name.endswith(".npy"):
                key = name[:-4]
                img = next(v for k, v in members.items() if k.startswith(key + ".") and k.endswith((".jpg", ".png")))
                out[img] = torch.from_numpy(np.load(io.BytesIO(data)))
    return out


def _steal_cfg(released: dict, out: Path, name: str, *extra: str):
    from stealer.steal import StealConfig

    return load_config(StealConfig, None, [f"out_dir={out}", f"name={name}", f"data.query={released['shards']}",
                                           "data.image_size=224", "data.channels=3", "query.batch_size=2",
                                           f"victim.checkpoint={released['ckpt']}", "victim.arch=resnet50", *extra])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(released: dict, state: Path, representation: str, in_thread: bool) -> Any:
    """launch/serve.py serving the checkpoint, and a key for one user. ``in_thread``: its app (build_app) under
    uvicorn in this process; else the real command in its own process, started now. Returns ``ready()``,
    which waits for the server and returns (stop, url, key file)."""
    from victims.server import add_user, state_paths

    keys_db, ledger_db = state_paths(state)
    keys_db.parent.mkdir(parents=True, exist_ok=True)
    key_file = state / "alice.key"
    key_file.write_text(add_user(keys_db, "alice", 100, ledger=ledger_db) + "\n")
    args = ["--checkpoint", str(released["ckpt"]), "--representation", representation, "--state-dir", str(state),
            "--rate", "0", "--log-level", "warning"]
    if in_thread:
        from launch.serve import build_app, serve_parser
        from victims.server import start_server_thread

        def ready_in_thread() -> tuple[Any, str, Path]:
            server, thread, url = start_server_thread(build_app(serve_parser().parse_args(args)))

            def stop() -> None:
                server.should_exit = True
                thread.join(timeout=30)
            return stop, url, key_file
        ready_in_thread.abort = lambda: None  # type: ignore[attr-defined]
        return ready_in_thread
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "serve.py"), *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"

    def stop_proc() -> None:
        proc.terminate()
        proc.wait(timeout=30)

    def ready() -> tuple[Any, str, Path]:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read())
            try:
                if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                stop_proc()
                raise AssertionError("launch/serve.py did not come up")
            time.sleep(0.2)
        note, banner = proc.stdout.readline(), proc.stdout.readline()  # one note line, then what it serves
        assert "has no sslsteal record" in note and "--preprocess=" in note, note
        assert "preprocessing imagenet: Resize 256 (bilinear) + CenterCrop 224" in banner, banner
        return stop_proc, url, key_file
    ready.abort = stop_proc  # type: ignore[attr-defined]
    return ready


# backbone: launch/serve.py as its own process; projector: its app in this process (saves a ResNet-50 load)
@pytest.mark.parametrize("representation", ["backbone", "projector"])
def test_released_checkpoint_exact_through_every_path(released: dict, reference: dict, tmp_path: Path,
                                                      representation: str, capsys: pytest.CaptureFixture[str]) -> None:
    from eval.features import extract_features
    from eval.run import ProbeConfig, build_probe_victim
    from launch.common import build_victim_api
    from stealer.steal import run_query_phase

    torch.set_num_threads(1)
    ref = reference[representation]
    assert len(ref) == len(SIZES)

    # the server (b) starts now: its start-up overlaps the in-process path (a)
    ready = _serve(released, tmp_path / "server", representation, in_thread=representation == "projector")
    try:
        # (a) steal config -> the in-process victim launch/steal.py builds -> the query phase's cache
        cfg = _steal_cfg(released, tmp_path, "inproc", f"victim.representation={representation}")
        save_config(cfg, cfg.run_dir / "config.yaml")  # as launch/steal.py does before the query phase
        api = build_victim_api(cfg.victim, cfg.run_dir)
        note = [line for line in capsys.readouterr().out.splitlines() if "sslsteal record" in line]
        assert len(note) == 1 and "ImageNet" in note[0] and str(released["ckpt"]) in note[0]
        out = run_query_phase(cfg, api)
    except BaseException:
        ready.abort()
        raise
    assert out["queries_sent"] == len(SIZES) and out["victim_preprocess"]["preset"] == "imagenet"
    got_a = _cached(cfg.run_dir / "cache")
    assert set(got_a) == set(ref)  # the shards kept the JPEG bytes: the cache holds the original files
    meta = json.loads((cfg.run_dir / "cache" / "cache.json").read_text())
    assert meta["victim_preprocess"]["resize"] == 256 and meta["victim_preprocess"]["crop"] == 224
    assert meta["victim_preprocess"]["mean"] == IMAGENET_MEAN and meta["victim_preprocess"]["std"] == IMAGENET_STD
    resolved = load_config(type(cfg), cfg.run_dir / "config.yaml").victim  # the run's resolved config says it
    assert (resolved.preprocess, resolved.resize, resolved.crop, resolved.mean) == ("imagenet", 256, 224, IMAGENET_MEAN)

    # (b) launch/serve.py over HTTP, queried by the project's HTTP client through the same query phase
    stop, url, key_file = ready()
    try:
        cfg_b = _steal_cfg(released, tmp_path, "http", f"victim.url={url}", f"victim.api_key_file={key_file}",
                           "victim.user=alice")
        client = build_victim_api(cfg_b.victim, cfg_b.run_dir)
        assert client.describe()["preprocess"]["preset"] == "imagenet"
        run_query_phase(cfg_b, client)
        got_b = _cached(cfg_b.run_dir / "cache")
        # declaring another preprocessing than the server's is refused in one line, before anything is paid
        cfg_bad = _steal_cfg(released, tmp_path, "http_bad", f"victim.url={url}", f"victim.api_key_file={key_file}",
                             "victim.user=alice", "victim.preprocess=none")
        with pytest.raises(ValueError) as e:
            run_query_phase(cfg_bad, build_victim_api(cfg_bad.victim, cfg_bad.run_dir))
        assert "\n" not in str(e.value) and "the server decides" in str(e.value) and url in str(e.value)
        assert client.usage()["spent"] == len(SIZES)
    finally:
        stop()

    # (c) the probe's feature extraction with the probe config's victim
    pcfg = load_config(ProbeConfig, None, [f"victim={released['ckpt']}", f"victim_representation={representation}",
                                           "channels=3", "image_size=224", f"out_dir={tmp_path}"])
    victim = build_probe_victim(pcfg)
    feats, _ = extract_features(victim, str(released["shards"]), channels=3, image_size=224, batch_size=2,
                                decoder=victim.decoder())
    got_c = {data: feats[i] for i, (_, data) in enumerate(_shard_bytes(released["shards"]))}

    for name, got in (("in-process steal", got_a), ("HTTP serve.py", got_b), ("probe", got_c)):
        assert set(got) == set(ref), name
        for data, want in ref.items():
            assert got[data].shape == want.shape == (2048,), name
            assert _rel(got[data], want) < 1e-4, (name, _rel(got[data], want))
    # the old serving (mean 0.5 / std 0.25, no resize + crop) is far off: the comparison can fail
    old = build_probe_victim(load_config(ProbeConfig, None, [
        f"victim={released['ckpt']}", f"victim_representation={representation}", "victim_preprocess=imagenet",
        "victim_mean=0.5", "victim_std=0.25"]))
    feats_old, _ = extract_features(old, str(released["shards"]), channels=3, image_size=224, batch_size=1, limit=1,
                                    decoder=old.decoder())
    assert _rel(feats_old[0], ref[_shard_bytes(released["shards"])[0][1]]) > 1e-3


def test_released_wrong_arch_named(released: dict) -> None:
    from victims.simsiam import load_victim_encoder

    with pytest.raises(ValueError) as e, pytest.warns(UserWarning, match="records arch"):
        load_victim_encoder(released["ckpt"], arch="resnet18")
    msg = str(e.value)
    assert "\n" not in msg and str(released["ckpt"]) in msg
    assert "holds resnet50 weights (Bottleneck blocks 3-4-6-3, width 64" in msg and "set victim.arch=resnet50" in msg


def test_tensor_geometry_close_to_exact(released: dict) -> None:
    """Images sent at another size than the crop get Resize + CenterCrop on tensors: within PIL's rounding."""
    from victims.preprocess import resolve_preprocess

    pre = resolve_preprocess("imagenet", None)
    dec = pre.decoder(3)
    for path in released["files"]:
        exact = torch.from_numpy(dec(path.read_bytes()).copy()).permute(2, 0, 1).float() / 255
        full = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()[None] / 255
        approx = pre.geometry(full)[0]
        assert approx.shape == exact.shape == (3, 224, 224)
        assert (approx - exact).abs().mean() < 2 / 255  # PIL rounds to uint8 and filters in its own fixed point
        same = pre.geometry(exact[None])[0]  # already at the input size: taken as decoded this way
        assert torch.equal(same, exact)


@pytest.mark.parametrize("preset,reference", [
    # facebookresearch/simsiam and moco-v3 main_lincls.py val_loader
    ("simsiam", [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]),
    ("mocov3", [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]),
    # tonylins/simclr-converter eval.py: the released SimCLR weights take unnormalised images
    ("simclr", [T.Resize(256), T.CenterCrop(256), T.ToTensor()]),
])
def test_preset_input_equals_its_repository_transform(released: dict, preset: str, reference: list) -> None:
    """What the victim's encoder receives (decoder, then VictimEncoder.preprocess) equals the tensor its own
    repository's eval transform makes from the file."""
    from victims.preprocess import resolve_preprocess
    from victims.simsiam import VictimEncoder

    pre = resolve_preprocess(preset, None)
    victim = VictimEncoder(nn.Identity(), out_dim=3, in_chans=3, preprocessing=pre)
    dec = victim.decoder()
    for path in released["files"]:
        ours = victim.preprocess(torch.from_numpy(dec(path.read_bytes()).copy()).permute(2, 0, 1)[None])[0]
        with open(path, "rb") as f:
            want = T.Compose(reference)(Image.open(f).convert("RGB"))
        assert ours.shape == want.shape
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ small victims: records, presets, refusals

def _tiny_official(path: Path) -> None:
    """A torchvision-shaped resnet18 in the official layout, without the project's record."""
    from victims.simsiam import SimSiam

    torch.manual_seed(0)
    model = SimSiam("resnet18", dim=16, pred_dim=8).eval()
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "optimizer": None}, path)


def test_project_record_used_and_preset_contradicting_it_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.common import build_victim_api
    from stealer.steal import StealConfig
    from victims.simsiam import SimSiam, load_victim_encoder, save_simsiam_checkpoint

    ckpt = tmp_path / "ours.pth.tar"
    save_simsiam_checkpoint(SimSiam("resnet18", dim=16, pred_dim=8, width=8, stem="small"), ckpt, epoch=1,
                            arch="resnet18", extra={"image_size": 32, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]})
    v = load_victim_encoder(ckpt)
    assert v.preprocessing.preset == "project" and v.image_size == 32 and v.decoder() is None
    assert v.normalisation[0] == pytest.approx([0.4, 0.5, 0.6])
    assert "sslsteal record" not in capsys.readouterr().out  # no note: the record says how
    # a preset that contradicts the record: one line naming the key and the fix
    cfg = load_config(StealConfig, None, [f"victim.checkpoint={ckpt}", "victim.preprocess=imagenet", f"out_dir={tmp_path}"])
    with pytest.raises(ValueError) as e:
        build_victim_api(cfg.victim, cfg.run_dir)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("victim.preprocess=imagenet contradicts the record of")
    assert str(ckpt) in msg and "set victim.preprocess=project" in msg
    with pytest.raises(ValueError, match="^--preprocess=none contradicts"):
        load_victim_encoder(ckpt, preprocess="none", preprocess_key="--preprocess")
    # project for a file without the record: refused, naming the key
    _tiny_official(tmp_path / "official.pth.tar")
    with pytest.raises(ValueError, match=r"^victim_preprocess=project but .* has no sslsteal record"):
        load_victim_encoder(tmp_path / "official.pth.tar", preprocess="project", preprocess_key="victim_preprocess")
    # explicit overrides win over a preset and are recorded as such
    w = load_victim_encoder(tmp_path / "official.pth.tar", preprocess="imagenet", mean=0.5, crop=200)
    assert w.image_size == 200 and w.normalisation[0] == [0.5] * 3 and w.preprocessing.overrides == ("mean", "crop")


def test_config_keys_validated() -> None:
    from eval.run import ProbeConfig
    from stealer.steal import StealConfig

    with pytest.raises(ConfigError, match="victim.preprocess='imagenet1k' is not valid; choose one of: auto, project"):
        load_config(StealConfig, None, ["victim.preprocess=imagenet1k"])
    with pytest.raises(ConfigError, match="victim.std=.* must be > 0"):
        load_config(StealConfig, None, ["victim.std=[0.2,0,0.2]"])
    with pytest.raises(ConfigError, match="victim.mean=.* has 2 values"):
        load_config(StealConfig, None, ["victim.mean=[0.4,0.5]"])
    with pytest.raises(ConfigError, match="victim_interpolation='cubic' is not valid"):
        load_config(ProbeConfig, None, ["victim_interpolation=cubic"])
    cfg = load_config(StealConfig, None, ["victim.preprocess=mocov3", "victim.mean=0.5", "victim.resize=0"])
    assert (cfg.victim.preprocess, cfg.victim.mean, cfg.victim.resize) == ("mocov3", 0.5, 0)
    from launch.serve import serve_parser

    a = serve_parser().parse_args(["--checkpoint", "x", "--preprocess", "simsiam", "--mean", "0.485,0.456,0.406"])
    assert a.preprocess == "simsiam" and a.mean == [0.485, 0.456, 0.406]
    r = subprocess.run([sys.executable, str(REPO / "launch" / "serve.py"), "--checkpoint", "x", "--mean", "0.4,0.5"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "--mean takes 1 or 3 values" in r.stderr.strip().splitlines()[-1]


def _small_jpegs(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    from launch.make_shards import main as make_shards

    assert make_shards([str(root), str(root.parent / "shards"), "--split", f"query={n}"]) == 0
    return root.parent / "shards" / "query"


def test_cache_refuses_answers_under_other_preprocessing(tmp_path: Path) -> None:
    from launch.common import build_victim_api
    from stealer.steal import StealConfig, run_query_phase

    ckpt = tmp_path / "official.pth.tar"
    _tiny_official(ckpt)
    shards = _small_jpegs(tmp_path / "imgs")
    base = [f"out_dir={tmp_path}", "name=run", f"data.query={shards}", "data.channels=3", "data.image_size=32",
            f"victim.checkpoint={ckpt}", "query.batch_size=3", "query.num_queries=3"]
    cfg = load_config(StealConfig, None, base)  # auto: ImageNet's eval transform (no record)
    api = build_victim_api(cfg.victim, cfg.run_dir)
    # the batched device decode cannot resize/crop exactly: refused before the cache records anything
    cfg_dev = load_config(StealConfig, None, base + ["data.decode=device"])
    with pytest.raises(ValueError, match="^data.decode=device cannot give the victim its exact imagenet resize/crop"):
        run_query_phase(cfg_dev, api)
    assert not (cfg.run_dir / "cache" / "cache.json").exists() and api.ledger.spent("attacker") == 0
    assert run_query_phase(cfg, api)["queries_sent"] == 3
    spent = api.ledger.spent("attacker")
    cache = cfg.run_dir / "cache"
    before = sorted(p.name for p in cache.iterdir())
    # the same run resumed with other preprocessing: refused in one line naming both, nothing bought
    cfg2 = load_config(StealConfig, None, base + ["query.num_queries=6", "victim.preprocess=none", "victim.mean=0.5",
                                                  "victim.std=0.25"])
    api2 = build_victim_api(cfg2.victim, cfg2.run_dir)
    with pytest.raises(ValueError) as e:
        run_query_phase(cfg2, api2)
    msg = str(e.value)
    assert "\n" not in msg and "imagenet: Resize 256 (bilinear) + CenterCrop 224" in msg
    assert "none (set: mean, std): no resize" in msg and "name=" in msg
    assert api2.ledger.spent("attacker") == spent and sorted(p.name for p in cache.iterdir()) == before
    # the same preprocessing declared explicitly is the same answers: the rerun buys only the rest
    cfg3 = load_config(StealConfig, None, base + ["query.num_queries=6", "victim.preprocess=simsiam"])
    api3 = build_victim_api(cfg3.victim, cfg3.run_dir)
    assert run_query_phase(cfg3, api3)["queries_sent"] == 3 and api3.ledger.spent("attacker") == spent + 3


def test_resume_with_other_preprocessing_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A steal resumed with another victim preprocessing: the query phase refuses the cache, a train-only
    resume refuses the checkpoint, each in one line naming the keys and the fix; nothing more is bought."""
    import sqlite3

    from conftest import tiny_steal_assets
    from launch.steal import main as steal

    root, victim = tiny_steal_assets(tmp_path, {"animal_mnist": {"victim_train": 8, "query": 24, "probe_train": 8,
                                                                 "probe_test": 8}, "digits": {"probe_train": 8, "probe_test": 8}})
    argv = [f"out_dir={root}", "name=r", "cpu=true", f"victim.checkpoint={victim}",
            f"data.query={root}/data/animal_mnist/query", "data.image_size=16", "student.width=8", "train.epochs=1",
            "train.batch_size=12", "query.batch_size=12", "train.log_every=1"]
    steal(argv)
    run = root / "r"
    assert "preprocess: project" in (run / "config.yaml").read_text()  # the resolved choice is recorded

    def spent() -> int:
        with sqlite3.connect(run / "victim_state" / "ledger.sqlite") as con:
            return con.execute("SELECT spent FROM users WHERE user='attacker'").fetchone()[0]

    def refused(*extra: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            steal(argv + list(extra))
        assert e.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert spent() == 24
    last = refused("victim.mean=0.4")
    assert "holds answers made under victim preprocessing 'project'" in last
    assert "project (set: mean)" in last and "name=" in last
    last = refused("victim.mean=0.4", "phases=[train]")
    assert "victim.mean" in last and "resume" in last
    assert spent() == 24
