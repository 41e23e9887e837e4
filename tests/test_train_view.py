"""The student trains on the view the victim answered about (the victim's recorded geometry).

A cache made under the ``imagenet`` preset (Resize 256 + CenterCrop 224) from non-square JPEGs
larger than 256 px: the train stream's un-augmented images equal, bitwise, the pixels the victim
was fed when ``data.image_size`` is the crop, and show the same field of view (Resize
round(S*256/224) + CenterCrop S) at another size; caches without a recorded geometry decode as
before. A tiny end-to-end steal (victim at Resize 40 + CenterCrop 32) feeds the student's step the
victim's pixels, and a checkpoint written before the view was recorded is not resumed silently.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from stealer.config import load_config

SIZES = [(300, 270), (280, 340), (400, 290), (333, 261)]  # W x H: non-square, both orientations, > 256 px


def _smooth_jpegs(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """JPEGs with low-frequency content (a resized view is comparable with another), sharded for a query set."""
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        f = rng.uniform(2, 6, 3)
        img = np.stack([127 + 120 * np.sin(x / w * f[c] + y / h * f[(c + 1) % 3] + c) for c in range(3)], -1)
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i}.jpg", quality=92)
    from launch.make_shards import main as make_shards

    assert make_shards([str(root), str(root.parent / "shards"), "--split", f"query={len(sizes)}"]) == 0
    return root.parent / "shards" / "query"


def _tiny_official(path: Path) -> None:
    """A resnet18 SimSiam in the official layout without the project's record (so presets apply)."""
    from victims.simsiam import SimSiam

    torch.manual_seed(0)
    model = SimSiam("resnet18", dim=16, pred_dim=8).eval()
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "optimizer": None}, path)


class Recorder:
    """The real victim, recording the uint8 pixels each query sends it (what it was fed)."""

    def __init__(self, api: Any) -> None:
        self.api, self.fed = api, []
        self.precision = getattr(api, "precision", "fp32")

    def describe(self) -> dict[str, Any]:
        return self.api.describe()

    def query(self, images: torch.Tensor, user: str) -> torch.Tensor:
        self.fed.append(images.clone())
        return self.api.query(images, user)


def _cache_bytes(cache: Path) -> dict[str, bytes]:
    out = {}
    for tar in sorted(cache.glob("resp-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".jpg"):
                    out[m.name.rsplit(".", 1)[0]] = t.extractfile(m).read()
    return out


def _train_images(cfg: Any) -> dict[str, torch.Tensor]:
    from stealer.data import open_shards
    from stealer.steal import train_stream

    stream, _ = train_stream(cfg, open_shards(cfg.run_dir / "cache"))
    return {k: img for b in stream.iter_epoch(0) for k, img in zip(b["key"], b["image"])}


@pytest.fixture(scope="module")
def imagenet_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from launch.common import build_victim_api
    from stealer.steal import StealConfig, run_query_phase

    tmp = tmp_path_factory.mktemp("view")
    ckpt = tmp / "official.pth.tar"
    _tiny_official(ckpt)
    shards = _smooth_jpegs(tmp / "imgs", SIZES)
    base = [f"out_dir={tmp}", "name=run", f"data.query={shards}", "data.channels=3", "victim.preprocess=imagenet",
            f"victim.checkpoint={ckpt}", "query.batch_size=2", "train.batch_size=2", "train.augment=false"]
    cfg = load_config(StealConfig, None, base + ["data.image_size=224"])
    victim = Recorder(build_victim_api(cfg.victim, cfg.run_dir))
    out = run_query_phase(cfg, victim)
    assert out["queries_sent"] == len(SIZES) and out["victim_preprocess"]["preset"] == "imagenet"
    assert sum(b.shape[0] for b in victim.fed) == len(SIZES)
    # the cache says what the victim was fed: the queried order is the shard order (shuffle=False)
    from stealer.data import ShardStream, open_shards

    order = [k for b in ShardStream(open_shards(shards), batch_size=2, shuffle=False, channels=3,
                                                 image_size=8).iter_epoch(0)
             for k in b["key"]]
    fed = dict(zip(order, torch.cat(victim.fed)))
    return {"tmp": tmp, "base": base, "fed": fed, "bytes": _cache_bytes(cfg.run_dir / "cache")}


def test_train_stream_is_the_victims_view(imagenet_cache: dict[str, Any]) -> None:
    from stealer.steal import StealConfig

    fed, raw = imagenet_cache["fed"], imagenet_cache["bytes"]
    assert json.loads((imagenet_cache["tmp"] / "run" / "cache" / "cache.json").read_text())["victim_preprocess"]["crop"] == 224
    ref = T.Compose([T.Resize(256), T.CenterCrop(224)])  # simsiam main_lincls.py val_loader, before ToTensor
    for k, img in fed.items():  # the victim really was fed torchvision's eval view of the original JPEG
        with Image.open(io.BytesIO(raw[k])) as im:
            want = torch.from_numpy(np.array(ref(im.convert("RGB")))).permute(2, 0, 1)
        assert img.shape == (3, 224, 224) and torch.equal(img, want)
    # data.image_size == crop: the student's un-augmented input is exactly the victim's pixels
    cfg = load_config(StealConfig, None, imagenet_cache["base"] + ["data.image_size=224"])
    got = _train_images(cfg)
    assert set(got) == set(fed) and all(torch.equal(got[k], fed[k]) for k in fed)
    # the old decode (full centre square) is a different crop: the test would catch a regression
    from stealer.data import decode_image

    k0 = next(iter(fed))
    old = torch.from_numpy(np.array(decode_image(raw[k0], 3, 224))).permute(2, 0, 1)
    assert (old.float() - fed[k0].float()).abs().mean() > 5


@pytest.mark.parametrize("size", [64, 112])
def test_train_stream_scaled_field_of_view(imagenet_cache: dict[str, Any], size: int) -> None:
    import torch.nn.functional as F

    from stealer.data import decode_image
    from stealer.steal import StealConfig

    fed, raw = imagenet_cache["fed"], imagenet_cache["bytes"]
    cfg = load_config(StealConfig, None, imagenet_cache["base"] + [f"data.image_size={size}"])
    got = _train_images(cfg)
    r = round(size * 256 / 224)
    for k, img in got.items():
        with Image.open(io.BytesIO(raw[k])) as im:  # Resize round(S*256/224) + CenterCrop S
            want = torch.from_numpy(np.array(T.CenterCrop(size)(T.Resize(r)(im.convert("RGB"))))).permute(2, 0, 1)
        # equal up to the JPEG's reduced-scale decode (PIL draft) of images over twice the size
        assert img.shape == (3, size, size) and (img.float() - want.float()).abs().mean() < 2.5
        # the same field of view: the victim's 224 view shrunk to S is within a few grey levels (of 255); the old
        # full-square decode at S is not
        shrunk = F.interpolate(fed[k][None].float(), size=(size, size), mode="bilinear", antialias=True)[0]
        old = torch.from_numpy(np.array(decode_image(raw[k], 3, size))).permute(2, 0, 1).float()
        near, far = (img.float() - shrunk).abs().mean().item(), (old - shrunk).abs().mean().item()
        assert near < 6 and far > 2.5 * near, (near, far)


def test_caches_without_geometry_decode_as_before(imagenet_cache: dict[str, Any], tmp_path: Path) -> None:
    """A cache whose record has no geometry (``none``; the project's own victims record None) and one made
    before preprocessing was recorded (no key): the full centre square at data.image_size, as before."""
    import shutil

    from stealer.data import decode_image, view_decoder
    from stealer.steal import StealConfig

    assert view_decoder(None, 3, 32) is None
    assert view_decoder({"preset": "none", "resize": None, "crop": None}, 3, 32) is None
    src = imagenet_cache["tmp"] / "run" / "cache"
    for name, edit in (("legacy", lambda m: m.pop("victim_preprocess")),
                       ("none", lambda m: m.update(victim_preprocess={"preset": "none", "resize": None, "crop": None}))):
        run = tmp_path / name
        shutil.copytree(src, run / "cache")
        meta = json.loads((run / "cache" / "cache.json").read_text())
        edit(meta)
        (run / "cache" / "cache.json").write_text(json.dumps(meta))
        cfg = load_config(StealConfig, None, imagenet_cache["base"] + ["data.image_size=48", f"out_dir={tmp_path}",
                                                                       f"name={name}"])
        got = _train_images(cfg)
        for k, img in got.items():
            assert torch.equal(img, torch.from_numpy(np.array(decode_image(imagenet_cache["bytes"][k], 3, 48))).permute(2, 0, 1))


def test_device_decode_refused_for_a_recorded_view(imagenet_cache: dict[str, Any]) -> None:
    from stealer.data import open_shards
    from stealer.steal import StealConfig, train_stream

    cfg = load_config(StealConfig, None, imagenet_cache["base"] + ["data.image_size=224", "data.decode=device"])
    with pytest.raises(ValueError) as e:
        train_stream(cfg, open_shards(cfg.run_dir / "cache"), device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.decode=device cannot decode the view") and "data.decode=cpu" in msg


def test_tiny_steal_trains_on_the_victims_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """End to end at a small crop: query phase, then the train phase's steps receive, un-augmented, the
    pixels the victim was fed; a checkpoint from before the view was recorded is refused on resume."""
    from accelerate import Accelerator

    import stealer.attacks as attacks
    from launch.common import build_victim_api
    from stealer.steal import StealConfig, run_query_phase, run_train_phase

    ckpt = tmp_path / "official.pth.tar"
    _tiny_official(ckpt)
    shards = _smooth_jpegs(tmp_path / "imgs", [(50 + 3 * i, 41 + 5 * i) for i in range(6)])
    argv = [f"out_dir={tmp_path}", "name=run", f"data.query={shards}", "data.channels=3", "data.image_size=32",
            f"victim.checkpoint={ckpt}", "victim.preprocess=imagenet", "victim.resize=40", "victim.crop=32",
            "query.batch_size=3", "train.batch_size=3", "train.augment=false", "train.epochs=1", "student.width=8",
            "train.log_every=1", "cpu=true"]
    cfg = load_config(StealConfig, None, argv)
    victim = Recorder(build_victim_api(cfg.victim, cfg.run_dir))
    run_query_phase(cfg, victim)
    fed = torch.cat(victim.fed)
    seen: list[torch.Tensor] = []
    real = attacks.steal_step

    def spy(model: Any, raw: Any, opt: Any, sched: Any, loss_fn: Any, images: torch.Tensor, *a: Any, **kw: Any) -> Any:
        assert kw.get("gen") is None  # train.augment=false: the anchor view itself
        seen.append(images.clone())
        return real(model, raw, opt, sched, loss_fn, images, *a, **kw)

    monkeypatch.setattr(attacks, "steal_step", spy)
    acc = Accelerator(cpu=True)
    out = run_train_phase(cfg, acc)
    assert out["steps"] == 2 and np.isfinite(out["final_loss"]) and out["train_view"]["crop"] == 32
    got = torch.cat(seen)
    assert got.shape == fed.shape == (6, 3, 32, 32)
    # the same set of images (the train stream shuffles): each student input is one the victim was fed
    as_set = lambda x: sorted(bytes(t.numpy().tobytes()) for t in x)  # noqa: E731
    assert as_set(got) == as_set(fed)
    saved = torch.load(sorted((cfg.run_dir / "ckpt").glob("*.pt"))[-1], weights_only=True)
    assert saved["config"]["train_view"]["resize"] == 40 and saved["config"]["train_view"]["crop"] == 32
    # a checkpoint written before the view was recorded (trained on the full square): refused, force resumes
    for p in (cfg.run_dir / "ckpt").glob("*.pt"):
        st = torch.load(p, weights_only=True)
        st["config"].pop("train_view")
        torch.save(st, p)
    cfg2 = load_config(StealConfig, None, argv + ["train.epochs=2"])
    with pytest.raises(ValueError) as e:
        run_train_phase(cfg2, acc)
    msg = str(e.value)
    assert "\n" not in msg and "trained on the full centre square" in msg and "resume_force=true" in msg
    capsys.readouterr()
    seen.clear()
    out2 = run_train_phase(load_config(StealConfig, None, argv + ["train.epochs=2", "resume_force=true"]), acc)
    assert out2["steps"] == 4 and len(seen) == 2 and "warning: resume_force" in capsys.readouterr().out
