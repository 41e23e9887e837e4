"""Optimizers and schedule: a LARS step by hand, param groups, lr values."""

from __future__ import annotations

import math
import sys
import types
from typing import Any

import pytest
import torch
from timm.optim import Lars
from torch import nn

from stealer.optim import OPTIMIZERS, build_optimizer, build_schedule, param_groups

LR, WD, MOM, TC = 0.5, 0.1, 0.9, 0.05  # TC large so the update is well above 1e-6


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def test_param_groups_split_and_skip_frozen() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    model[2].bias.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.05)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [(3, 4), (2, 3)]
    assert {id(p) for p in no_decay["params"]} == {
        id(model[0].bias), id(model[1].weight), id(model[1].bias)
    }  # fmt: skip
    only_norm = param_groups(nn.LayerNorm(3), 0.05)  # empty groups are dropped
    assert len(only_norm) == 1 and only_norm[0]["weight_decay"] == 0.0


def test_lars_step_by_hand() -> None:
    model = _linear()
    opt = build_optimizer("lars", model, lr=LR, weight_decay=WD, momentum=MOM, trust_coeff=TC)
    assert isinstance(opt, Lars)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    g1 = [torch.tensor([[0.3, -0.2, 0.1], [0.5, 0.0, -0.4]]), torch.tensor([0.2, -0.1])]
    g2 = [torch.tensor([[-0.1, 0.2, 0.3], [0.0, 0.1, 0.2]]), torch.tensor([-0.3, 0.4])]

    def step(grads: list[torch.Tensor]) -> None:
        model.weight.grad, model.bias.grad = grads[0].clone(), grads[1].clone()
        opt.step()

    def lars_direction(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        # trust = tc * |w| / (|g| + wd * |w|)  (+ eps 1e-8 in the denominator)
        trust = TC * w.norm() / (g.norm() + WD * w.norm() + 1e-8)
        return (g + WD * w) * trust

    # step 1: momentum buffer starts as the first update
    step(g1)
    buf_w = lars_direction(w0, g1[0])
    w1 = w0 - LR * buf_w
    buf_b = g1[1]  # 1-D: plain SGD, no decay, no trust ratio
    b1 = b0 - LR * buf_b
    torch.testing.assert_close(model.weight.detach(), w1, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.bias.detach(), b1, atol=1e-6, rtol=0)

    # step 2: buf = momentum * buf + update
    step(g2)
    buf_w = MOM * buf_w + lars_direction(w1, g2[0])
    buf_b = MOM * buf_b + g2[1]
    torch.testing.assert_close(model.weight.detach(), w1 - LR * buf_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.bias.detach(), b1 - LR * buf_b, atol=1e-6, rtol=0)


def test_lars_bias_matches_plain_sgd() -> None:
    model, ref = _linear(), _linear()
    opt = build_optimizer("lars", model, lr=LR, weight_decay=WD, momentum=MOM)
    sgd = torch.optim.SGD([ref.bias], lr=LR, momentum=MOM, weight_decay=0.0)
    for k in range(3):
        g = torch.tensor([0.1 * k - 0.2, 0.3])
        model.bias.grad, ref.bias.grad = g.clone(), g.clone()
        model.weight.grad = torch.ones_like(model.weight)
        opt.step()
        sgd.step()
    torch.testing.assert_close(model.bias.detach(), ref.bias.detach(), atol=1e-7, rtol=0)


def test_lars_options() -> None:
    opt = build_optimizer("lars", _linear(), lr=1.0, weight_decay=WD, trust_clip=True)
    for group in opt.param_groups:
        assert group["trust_clip"] is True
        assert group["trust_coeff"] == 0.001
        assert group["always_adapt"] is False
        assert group["momentum"] == 0.9


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_other_optimizers_use_groups(name: str) -> None:
    opt = build_optimizer(name, _linear(), lr=0.1, weight_decay=WD)
    assert [g["weight_decay"] for g in opt.param_groups] == [WD, 0.0]


def test_unknown_optimizer_lists_names() -> None:
    with pytest.raises(ValueError, match="choose one of: " + ", ".join(sorted(OPTIMIZERS))):
        build_optimizer("lamb", _linear(), lr=0.1, weight_decay=0.0)


def test_torchlars_missing_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchlars", None)  # makes `import torchlars` fail
    with pytest.raises(ImportError, match=r"torchlars 0\.1\.2 .*torch 2\.x.*optimizer=lars"):
        build_optimizer("torchlars", _linear(), lr=0.1, weight_decay=WD)


def test_torchlars_wraps_sgd_when_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, Any] = {}

    def fake_lars(**kw: Any) -> Any:
        calls.update(kw)
        return kw["optimizer"]

    monkeypatch.setitem(sys.modules, "torchlars", types.SimpleNamespace(LARS=fake_lars))
    opt = build_optimizer("torchlars", _linear(), lr=0.1, weight_decay=WD)
    assert isinstance(calls["optimizer"], torch.optim.SGD) and opt is calls["optimizer"]
    assert calls["eps"] == 1e-8 and calls["trust_coef"] == 0.001


def _lrs(total: int, warmup: int, final: float, steps: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_schedule(opt, total_steps=total, warmup_steps=warmup, final_lr_fraction=final)
    lrs = []
    for _ in range(steps + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_schedule_values() -> None:
    lrs = _lrs(total=110, warmup=10, final=0.1, steps=110)
    assert lrs[0] == pytest.approx(2.0 * 1 / 10)  # step 0: first warmup step
    assert lrs[9] == pytest.approx(2.0)  # last warmup step
    assert lrs[10] == pytest.approx(2.0)  # end of warmup: peak
    assert lrs[60] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # cosine midpoint
    assert lrs[110] == pytest.approx(2.0 * 0.1)  # end: final_lr_fraction * lr
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay
    assert lrs[85] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75))))


def test_schedule_without_decay_phase() -> None:
    lrs = _lrs(total=5, warmup=10, final=0.0, steps=12)
    assert lrs[0] == pytest.approx(0.2) and lrs[9] == pytest.approx(2.0)
    assert lrs[10:] == [pytest.approx(2.0)] * 3
    assert _lrs(total=0, warmup=0, final=0.0, steps=2) == [2.0, 2.0, 2.0]


def test_fused_sgd_and_adamw_steps_match_the_plain_ones(tmp_path):
    """train.fused=true (torch's single-kernel step; CPU too in this release) trains the same student as
    false, up to float rounding; lars has no fused form and fused=true with it is refused in one line."""
    from conftest import tiny_steal_assets

    from launch.common import build_victim_api, make_accelerator
    from stealer.config import ConfigError, load_config
    from stealer.steal import StealConfig, run_query_phase, run_train_phase

    sizes = {"animal_mnist": {"victim_train": 16, "query": 64, "probe_train": 8, "probe_test": 8},
             "digits": {"probe_train": 8, "probe_test": 8}}
    root, victim = tiny_steal_assets(tmp_path, sizes)
    acc = make_accelerator(cpu=True)
    base = [f"out_dir={tmp_path}", f"victim.checkpoint={victim}", f"data.query={root}/data/animal_mnist/query",
            "data.image_size=16", "query.batch_size=32", "student.width=8", "train.batch_size=32", "train.epochs=2",
            "train.augment=false", "train.lr=0.05"]
    for optimizer in ("sgd", "adamw"):
        sds = {}
        for fused in ("false", "true"):
            cfg = load_config(StealConfig, None, base + [f"name={optimizer}_{fused}", f"train.optimizer={optimizer}",
                                                         f"train.fused={fused}"])
            run_query_phase(cfg, build_victim_api(cfg.victim, cfg.run_dir), acc)
            run_train_phase(cfg, acc)
            sds[fused] = torch.load(cfg.run_dir / "student.pt", weights_only=True)["state_dict"]
            opt_state = torch.load(sorted((cfg.run_dir / "ckpt").glob("ckpt-*.pt"))[-1], weights_only=True)["optimizer"]
            assert all(bool(g.get("fused")) == (fused == "true") for g in opt_state["param_groups"])
        # Adam's step is normalised by sqrt(v): where v is tiny, a rounding difference between the fused and
        # the plain kernel moves an element by up to ~lr in one step (seen on 2 threads: 1.2e-3 after 2 epochs
        # at lr 0.05), so AdamW is held to 5 % of one step's size; SGD to 1e-4
        atol = 1e-4 if optimizer == "sgd" else 0.05 * 0.05
        worst = max(((sds["false"][k].float() - sds["true"][k].float()).abs().max().item(), k) for k in sds["false"])
        assert all(torch.allclose(sds["false"][k].float(), sds["true"][k].float(), atol=atol, rtol=1e-3)
                   for k in sds["false"]), (optimizer, worst)
    with pytest.raises(ConfigError, match="train.fused=true needs train.optimizer in sgd, adamw \\(got lars\\)"):
        load_config(StealConfig, None, base + ["train.fused=true"])
    with pytest.raises(ConfigError, match="train.fused='yes please' is not valid; choose one of: auto, true, false"):
        load_config(StealConfig, None, base + ["train.fused=yes please"])
