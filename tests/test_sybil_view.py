"""The sybil query phase decodes and records the victim's preprocessing as the main query phase does.

A victim at Resize 40 + CenterCrop 32 (a released checkpoint with a declared geometry), queried by 2
sybil accounts on non-square JPEGs larger than 40 px: each account's victim is fed, bitwise,
torchvision's Resize 40 + CenterCrop 32 of the original image (not the full centre square); every
cache (per account and the mapped one) records ``victim_preprocess``; the train phase decodes with
it (steal.json ``train_view``) and feeds the student the victim's pixels; a rerun under another
preprocessing is refused before anything is paid.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from stealer.config import load_config
from tests.test_train_view import _cache_bytes, _smooth_jpegs, _tiny_official

SIZES = [(50 + 3 * i, 41 + 5 * i) for i in range(6)]  # W x H: non-square, both orientations, > 40 px


class AccountRecorder:
    """The real victim, recording per account the uint8 pixels each query sends it."""

    def __init__(self, api: Any) -> None:
        self.api, self.fed = api, {}
        self.precision = getattr(api, "precision", "fp32")

    def describe(self) -> dict[str, Any]:
        return self.api.describe()

    def query(self, images: torch.Tensor, user: str) -> torch.Tensor:
        self.fed.setdefault(user, []).append(images.clone())
        return self.api.query(images, user)


def test_sybil_steal_feeds_records_and_trains_on_the_victims_view(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate import Accelerator

    import stealer.attacks as attacks
    from launch.common import build_victim_api
    from stealer.countermoves import run_sybil_query_phase, sybil_users
    from stealer.data import ShardStream, decode_image, open_shards
    from stealer.steal import StealConfig, run_train_phase

    ckpt = tmp_path / "official.pth.tar"
    _tiny_official(ckpt)
    shards = _smooth_jpegs(tmp_path / "imgs", SIZES)
    argv = [f"out_dir={tmp_path}", "name=run", f"data.query={shards}", "data.channels=3", "data.image_size=32",
            f"victim.checkpoint={ckpt}", "victim.preprocess=imagenet", "victim.resize=40", "victim.crop=32",
            "query.batch_size=4", "train.batch_size=3", "train.augment=false", "train.epochs=1", "student.width=8",
            "train.log_every=1", "cpu=true"]
    cfg = load_config(StealConfig, None, argv)
    api = build_victim_api(cfg.victim, cfg.run_dir)
    victim = AccountRecorder(api)
    out = run_sybil_query_phase(cfg, victim, sybils=2, overlap=2)
    users = sybil_users(cfg.victim.user, 2)
    assert out["queries_sent"] == 2 * 2 + 4 and out["cached"] == len(SIZES)
    assert out["victim_preprocess"]["resize"] == 40 and out["victim_preprocess"]["crop"] == 32

    # each account was fed torchvision's eval view of the original JPEG, in the queried (shard) order
    order = [k for b in ShardStream(open_shards(shards), batch_size=6, shuffle=False, channels=3,
                                    image_size=8).iter_epoch(0) for k in b["key"]]
    raw = _cache_bytes(cfg.run_dir / "cache")
    ref = T.Compose([T.Resize(40), T.CenterCrop(32)])  # simsiam main_lincls.py val_loader, before ToTensor
    want = {}
    for k in order:
        with Image.open(io.BytesIO(raw[k])) as im:
            want[k] = torch.from_numpy(np.array(ref(im.convert("RGB")))).permute(2, 0, 1)
    for s, u in enumerate(users):
        asked = [k for i, k in enumerate(order) if i < 2 or (i - 2) % 2 == s]
        fed = torch.cat(victim.fed[u])
        assert fed.shape == (len(asked), 3, 32, 32)
        assert all(torch.equal(f, want[k]) for f, k in zip(fed, asked)), u
    # the old decode (full centre square at data.image_size) is another crop: a regression would be caught
    k0 = order[0]
    old = torch.from_numpy(np.array(decode_image(raw[k0], 3, 32))).permute(2, 0, 1)
    assert (old.float() - want[k0].float()).abs().mean() > 5

    # every cache records the victim's preprocessing, not inside "victim"
    for d in [cfg.run_dir / "cache"] + [cfg.run_dir / "sybils" / u for u in users]:
        meta = json.loads((d / "cache.json").read_text())
        assert meta["victim_preprocess"]["resize"] == 40 and meta["victim_preprocess"]["crop"] == 32, d
        assert "preprocess" not in meta["victim"]

    # the train phase decodes with the recorded view: the student's inputs are the victim's pixels
    seen: list[torch.Tensor] = []
    real = attacks.steal_step

    def spy(model: Any, raw_: Any, opt: Any, sched: Any, loss_fn: Any, images: torch.Tensor, *a: Any, **kw: Any) -> Any:
        seen.append(images.clone())
        return real(model, raw_, opt, sched, loss_fn, images, *a, **kw)

    monkeypatch.setattr(attacks, "steal_step", spy)
    res = run_train_phase(cfg, Accelerator(cpu=True))
    # (what launch/steal.py writes as steal.json)
    assert res["steps"] == 2 and res["train_view"]["resize"] == 40 and res["train_view"]["crop"] == 32
    as_set = lambda x: sorted(bytes(t.numpy().tobytes()) for t in x)  # noqa: E731
    assert as_set(torch.cat(seen)) == as_set(torch.stack(list(want.values())))

    # a rerun under other preprocessing (Resize 48) is refused before it pays, leaving the caches as they were
    spent = {u: api.ledger.spent(u) for u in users}
    before = {p: p.read_bytes() for p in cfg.run_dir.rglob("cache.json")}
    cfg48 = load_config(StealConfig, None, argv + ["victim.resize=48"])
    other = AccountRecorder(build_victim_api(cfg48.victim, cfg48.run_dir))
    assert other.describe()["preprocess"]["resize"] == 48  # really another victim preprocessing
    with pytest.raises(ValueError) as e:
        run_sybil_query_phase(cfg48, other, sybils=2, overlap=2)
    msg = str(e.value)
    assert "\n" not in msg and "victim preprocessing" in msg and "name=" in msg
    assert other.fed == {} and {u: api.ledger.spent(u) for u in users} == spent
    assert {p: p.read_bytes() for p in cfg.run_dir.rglob("cache.json")} == before

    # a cache made before the sybil phase decoded with the victim's geometry (its "victim" held the preprocess,
    # no victim_preprocess): its answers are about the full square; refused, before anything is paid
    for meta_path in cfg.run_dir.rglob("cache.json"):
        meta = json.loads(meta_path.read_text())
        meta["victim"]["preprocess"] = api.describe()["preprocess"]
        meta.pop("victim_preprocess")
        meta_path.write_text(json.dumps(meta))
    victim.fed.clear()
    with pytest.raises(ValueError) as e:
        run_sybil_query_phase(cfg, victim, sybils=2, overlap=2)
    msg = str(e.value)
    assert "\n" not in msg and "full centre square" in msg and "CenterCrop 32" in msg and "name=" in msg
    assert victim.fed == {} and {u: api.ledger.spent(u) for u in users} == spent
