"""Stealing losses: hand-computed values, gradients, and descent under SGD."""

from __future__ import annotations

import math

import pytest
import torch

from stealer.losses import LOSSES, cosine, get_loss, infonce, mse


def test_mse_by_hand() -> None:
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # row 0: 1^2 + 2^2 = 5; row 1: 3^2 + 4^2 = 25; mean over rows = 15
    assert mse(s, t).item() == pytest.approx(15.0)
    # nn.MSELoss averages over all N*D = 4 elements: 30 / 4 = 7.5 = 15 / D
    assert torch.nn.MSELoss()(s, t).item() == pytest.approx(15.0 / 2)


def test_cosine_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-3.0, 0.0]])
    # cos = 0, 1, -1  ->  2 - 2cos = 2, 0, 4  ->  mean = 2
    assert cosine(s, t).item() == pytest.approx(2.0)


def test_infonce_by_hand() -> None:
    s = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: e0, e1
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # normalised: (1,1)/sqrt2, e1
    a = 1 / math.sqrt(2)
    # T = 1: logits_st = [[a, 0], [a, 1]], logits_ts = its transpose = [[a, a], [0, 1]]
    ce_st = [math.log(1 + math.exp(-a)), math.log(1 + math.exp(a - 1))]
    ce_ts = [math.log(2.0), math.log(1 + math.exp(-1))]
    expected = 0.5 * (sum(ce_st) / 2 + sum(ce_ts) / 2)
    assert infonce(s, t, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)
    # temperature divides the logits: T = 0.5 doubles them
    ce_st = [math.log(1 + math.exp(-2 * a)), math.log(1 + math.exp(2 * a - 2))]
    ce_ts = [math.log(2.0), math.log(1 + math.exp(-2))]
    expected = 0.5 * (sum(ce_st) / 2 + sum(ce_ts) / 2)
    assert infonce(s, t, temperature=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_infonce_matches_cross_entropy_form() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    sn, tn = torch.nn.functional.normalize(s, dim=1), torch.nn.functional.normalize(t, dim=1)
    logits = sn @ tn.T / 0.2
    labels = torch.arange(6)
    ref = 0.5 * (
        torch.nn.functional.cross_entropy(logits, labels)
        + torch.nn.functional.cross_entropy(logits.T, labels)
    )
    assert infonce(s, t, temperature=0.2).item() == pytest.approx(ref.item(), abs=1e-6)
    # gather=True is a no-op outside torch.distributed
    assert torch.equal(infonce(s, t, gather=True), infonce(s, t))


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("n", [1, 4, 7])
def test_gradient_shapes_and_no_target_grad(name: str, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    s = torch.randn(n, 8, generator=g, requires_grad=True)
    t = torch.randn(n, 8, generator=g, requires_grad=True)
    loss = get_loss(name)(s, t, temperature=0.2, gather=False, unused_option=3)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and s.grad.shape == (n, 8)
    assert t.grad is None  # the victim's response is detached


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_sgd_decreases_loss(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g)
    target = torch.randn(16, 4, generator=g)
    w = torch.nn.Parameter(0.1 * torch.randn(6, 4, generator=g))
    opt = torch.optim.SGD([w], lr=0.05)
    losses = []
    for _ in range(20):
        loss = get_loss(name)(x @ w, target, temperature=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_unknown_loss_lists_names() -> None:
    expected = r"unknown loss 'nope'; choose one of: cosine, infonce, mse"
    with pytest.raises(ValueError, match=expected):
        get_loss("nope")


def test_shape_mismatch_is_loud() -> None:
    with pytest.raises(ValueError, match="must both be"):
        mse(torch.zeros(2, 3), torch.zeros(2, 4))
