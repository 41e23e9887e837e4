"""Stealing losses: hand-computed values, gradients, and descent under SGD."""

from __future__ import annotations

from conftest import free_port

import math
import os
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from stealer.losses import (
    LOSSES,
    barlow,
    bce,
    cosine,
    get_loss,
    infonce,
    infonce_sym,
    mse,
    mse_mean,
    soft_ce,
    softnn,
    supcon,
    symmetrized,
    wasserstein,
)


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


def test_infonce_sym_by_hand() -> None:
    s = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: e0, e1
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # normalised: (1,1)/sqrt2, e1
    a = 1 / math.sqrt(2)
    # T = 1: logits_st = [[a, 0], [a, 1]], logits_ts = its transpose = [[a, a], [0, 1]]
    ce_st = [math.log(1 + math.exp(-a)), math.log(1 + math.exp(a - 1))]
    ce_ts = [math.log(2.0), math.log(1 + math.exp(-1))]
    expected = 0.5 * (sum(ce_st) / 2 + sum(ce_ts) / 2)
    assert infonce_sym(s, t, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)
    # temperature divides the logits: T = 0.5 doubles them
    ce_st = [math.log(1 + math.exp(-2 * a)), math.log(1 + math.exp(2 * a - 2))]
    ce_ts = [math.log(2.0), math.log(1 + math.exp(-2))]
    expected = 0.5 * (sum(ce_st) / 2 + sum(ce_ts) / 2)
    assert infonce_sym(s, t, temperature=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_infonce_sym_matches_cross_entropy_form() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    sn, tn = torch.nn.functional.normalize(s, dim=1), torch.nn.functional.normalize(t, dim=1)
    logits = sn @ tn.T / 0.2
    labels = torch.arange(6)
    ref = 0.5 * (
        torch.nn.functional.cross_entropy(logits, labels)
        + torch.nn.functional.cross_entropy(logits.T, labels)
    )
    assert infonce_sym(s, t, temperature=0.2).item() == pytest.approx(ref.item(), abs=1e-6)
    # gather=True is a no-op outside torch.distributed
    assert torch.equal(infonce_sym(s, t, gather=True), infonce_sym(s, t))


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


# bce averages over N*D elements against hard 0/1 targets: small gradients
SGD_LR = {"bce": 1.0}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_sgd_decreases_loss(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g)
    target = torch.randn(16, 4, generator=g)
    w = torch.nn.Parameter(0.1 * torch.randn(6, 4, generator=g))
    opt = torch.optim.SGD([w], lr=SGD_LR.get(name, 0.05))
    losses = []
    for _ in range(20):
        loss = get_loss(name)(x @ w, target, temperature=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # a 10% decrease (of |L0|: symmetrized starts near 0 and goes negative)
    assert losses[-1] < losses[0] - 0.1 * abs(losses[0]), losses


def test_unknown_loss_lists_names() -> None:
    expected = (
        r"unknown loss 'nope'; choose one of: barlow, bce, cosine, infonce, infonce_sym, mse, "
        r"mse_mean, soft_ce, softnn, supcon, symmetrized, wasserstein"
    )
    with pytest.raises(ValueError, match=expected):
        get_loss("nope")


def test_shape_mismatch_is_loud() -> None:
    with pytest.raises(ValueError, match="must both be"):
        mse(torch.zeros(2, 3), torch.zeros(2, 4))


def test_registry_names_the_functions() -> None:
    expected = {
        "mse": mse, "mse_mean": mse_mean, "cosine": cosine, "symmetrized": symmetrized,
        "infonce": infonce, "infonce_sym": infonce_sym, "supcon": supcon, "softnn": softnn, "barlow": barlow,
        "soft_ce": soft_ce, "bce": bce, "wasserstein": wasserstein,
    }  # fmt: skip
    assert LOSSES == expected
    for name, fn in expected.items():
        assert get_loss(name) is fn
    with pytest.raises(ValueError, match="choose one of"):
        get_loss("MSE")  # names are case-sensitive
    with pytest.raises(ValueError, match="choose one of"):
        get_loss("soft-ce")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_rejects_shape_mismatch(name: str) -> None:
    with pytest.raises(ValueError, match="must both be"):
        get_loss(name)(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gather_is_a_no_op_outside_distributed(name: str) -> None:
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    fn = get_loss(name)
    assert torch.equal(fn(s, t, gather=True), fn(s, t))


# ---- mse_mean ------------------------------------------------------------------------


def test_mse_mean_by_hand() -> None:
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # (1 + 4 + 9 + 16) / (N*D = 4) = 7.5 = mse / D
    assert mse_mean(s, t).item() == pytest.approx(7.5)
    assert mse_mean(s, t).item() == pytest.approx(torch.nn.MSELoss()(s, t).item())
    assert mse_mean(s, t).item() == pytest.approx(mse(s, t).item() / 2)


# ---- symmetrized ---------------------------------------------------------------------


def test_symmetrized_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-3.0, 0.0]])
    # cos = 0, 1, -1  ->  -(cos + cos) / 2 = 0, -1, 1  ->  mean = 0
    assert symmetrized(s, t).item() == pytest.approx(0.0, abs=1e-7)
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    # cos = 1/sqrt2, 1/sqrt2  ->  -1/sqrt2
    assert symmetrized(s, t).item() == pytest.approx(-1 / math.sqrt(2))


def test_symmetrized_vs_cosine() -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 5, generator=g, requires_grad=True)
    t = torch.randn(6, 5, generator=g)
    sym = symmetrized(s, t)
    (g_sym,) = torch.autograd.grad(sym, s)
    cos = cosine(s, t)
    (g_cos,) = torch.autograd.grad(cos, s)
    # cosine = 2 - 2 cos = 2 + 2 * symmetrized: same minimiser, half the gradient
    assert cos.item() == pytest.approx(2 + 2 * sym.item(), abs=1e-6)
    torch.testing.assert_close(g_cos, 2 * g_sym)


def test_symmetrized_two_views_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # s1 = e0, s2 = e1
    t = torch.tensor([[0.0, 3.0], [1.0, 1.0]])  # t1 = e1, t2 = (1,1)/sqrt2
    # cos(s1, t2) = 1/sqrt2, cos(s2, t1) = 1  ->  -(1/sqrt2 + 1) / 2
    expected = -(1 / math.sqrt(2) + 1) / 2
    assert symmetrized(s, t, two_views=True).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="even batch"):
        symmetrized(torch.zeros(3, 2), torch.zeros(3, 2), two_views=True)


# ---- supcon --------------------------------------------------------------------------


def _ref_supcon_rows(
    s: torch.Tensor, t: torch.Tensor, temp: float, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-anchor SupCon (Khosla et al., eq. 2) over rows [s; t], written as loops."""
    z = torch.cat([F.normalize(s, dim=1), F.normalize(t, dim=1)])
    n = s.shape[0]
    lab = torch.arange(n) if labels is None else labels
    lab2 = torch.cat([lab, lab])
    rows = []
    for a in range(2 * n):
        others = [k for k in range(2 * n) if k != a]
        log_den = torch.logsumexp(torch.stack([z[a] @ z[k] / temp for k in others]), 0)
        pos = [p for p in others if lab2[p] == lab2[a]]
        rows.append(-torch.stack([z[a] @ z[p] / temp - log_den for p in pos]).mean())
    return torch.stack(rows)


def test_supcon_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # normalised: e0, e1
    t = torch.tensor([[2.0, 0.0], [0.0, -1.0]])  # normalised: e0, -e1
    # T = 1. Anchor s0 = e0: dots with (s1, t0, t1) = (0, 1, 0), positive t0:
    #   L = -(1 - log(1 + e + 1)) = log(e + 2) - 1;   t0 = e0 is the same.
    # Anchor s1 = e1: dots with (s0, t0, t1) = (0, 0, -1), positive t1:
    #   L = -(-1 - log(2 + 1/e)) = 1 + log(2 + 1/e);  t1 = -e1 is the same.
    # mean over 4 anchors = (log(e + 2) + log(2 + 1/e)) / 2
    expected = (math.log(math.e + 2) + math.log(2 + 1 / math.e)) / 2
    assert supcon(s, t, temperature=1.0, base_temperature=None).item() == pytest.approx(expected, abs=1e-6)
    # the default T_base 0.07 (the reference's) scales by T / 0.07
    assert supcon(s, t, temperature=1.0).item() == pytest.approx(expected / 0.07, rel=1e-6)
    # labels [0, 1] give the same positives; base_temperature scales by T / T_base
    labels = torch.tensor([0, 1])
    assert supcon(s, t, temperature=1.0, labels=labels, base_temperature=1.0).item() == pytest.approx(expected)
    scaled = supcon(s, t, temperature=1.0, base_temperature=0.5)
    assert scaled.item() == pytest.approx(2 * expected, abs=1e-6)
    # labels [0, 0]: s0's positives are (s1, t0, t1), dots (0, 1, 0):
    #   L = -(1/3 - log(e + 2)); s1's are (s0, t0, t1), dots (0, 0, -1):
    #   L = -(-1/3 - log(2 + 1/e)); the 1/3 cancel in the mean: same value
    same = supcon(s, t, temperature=1.0, labels=torch.tensor([0, 0]), base_temperature=None)
    assert same.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("use_labels", [False, True])
def test_supcon_matches_loop_reference(use_labels: bool) -> None:
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0]) if use_labels else None
    ref = _ref_supcon_rows(s, t, 0.3, labels).mean()
    got = supcon(s, t, temperature=0.3, labels=labels, base_temperature=None)
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)


def test_supcon_differs_from_infonce_sym_by_same_view_negatives() -> None:
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    # same positives, but supcon's denominators add the same-view rows: strictly larger
    sc = supcon(s, t, temperature=0.3, base_temperature=None)
    assert sc.item() > infonce_sym(s, t, temperature=0.3).item()
    # ... and without labels at scale 1 it is the ICML'22 infonce (NT-Xent over [s; t])
    assert sc.item() == pytest.approx(infonce(s, t, temperature=0.3).item(), abs=1e-6)
    with pytest.raises(ValueError, match="labels must have 6"):
        supcon(s, t, labels=torch.zeros(5, dtype=torch.long))


# ---- softnn --------------------------------------------------------------------------


def _ref_softnn_rows(
    s: torch.Tensor, t: torch.Tensor, temp: float, eps: float
) -> torch.Tensor:
    """Per-row soft nearest-neighbour loss over rows [s; t] (pair of a = a ± N), as loops."""
    x = torch.cat([s, t]).double()
    n = s.shape[0]

    def kernel(a: int, b: int) -> torch.Tensor:
        return torch.exp(-((x[a] - x[b]) ** 2).sum() / temp)

    rows = []
    for a in range(2 * n):
        num = kernel(a, (a + n) % (2 * n))
        den = torch.stack([kernel(a, b) for b in range(2 * n) if b != a]).sum()
        rows.append(-torch.log(eps + num / den))
    return torch.stack(rows)


def test_softnn_by_hand() -> None:
    s = torch.tensor([[0.0], [1.0]])
    t = torch.tensor([[0.0], [2.0]])
    # rows x = (s0, s1, t0, t1) = (0, 1, 0, 2); pairs s0-t0, s1-t1; squared distances:
    #   s0: s1 1, t0 0, t1 4  ->  L = -log(e^0 / (e^-1 + e^0 + e^-4)) = log(1 + e^-1 + e^-4)
    #   s1: s0 1, t0 1, t1 1  ->  L = log 3
    #   t0: s0 0, s1 1, t1 4  ->  L = log(1 + e^-1 + e^-4)
    #   t1: s0 4, s1 1, t0 4  ->  L = -log(e^-1 / (e^-4 + e^-1 + e^-4)) = log(1 + 2 e^-3)
    a = math.log(1 + math.exp(-1) + math.exp(-4))
    expected = (2 * a + math.log(3) + math.log(1 + 2 * math.exp(-3))) / 4
    assert softnn(s, t, temperature=1.0, eps=0.0).item() == pytest.approx(expected, abs=1e-6)
    # T = 2 halves every exponent
    a = math.log(1 + math.exp(-0.5) + math.exp(-2))
    expected = (2 * a + math.log(3) + math.log(1 + 2 * math.exp(-1.5))) / 4
    assert softnn(s, t, temperature=2.0, eps=0.0).item() == pytest.approx(expected, abs=1e-6)
    # the default eps = 1e-9 is added to each ratio inside the log (as in the ICML'22 code)
    ratios = [
        1 / (1 + math.exp(-1) + math.exp(-4)), 1 / 3,
        1 / (1 + math.exp(-1) + math.exp(-4)), 1 / (1 + 2 * math.exp(-3)),
    ]  # fmt: skip
    expected = -sum(math.log(1e-9 + r) for r in ratios) / 4
    assert softnn(s, t, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("eps", [0.0, 1e-9])
def test_softnn_matches_loop_reference(eps: float) -> None:
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    ref = _ref_softnn_rows(s, t, 3.0, eps).mean()
    got = softnn(s, t, temperature=3.0, eps=eps)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)


def test_softnn_is_stable_where_the_ratio_underflows() -> None:
    g = torch.Generator().manual_seed(7)
    s = 100 * torch.randn(6, 4, generator=g, requires_grad=True)
    t = 100 * torch.randn(6, 4, generator=g)
    # exp(-d / T) underflows to 0 for every pair: the plain ratio is 0/0
    plain = softnn(s, t, temperature=0.01, eps=0.0)
    capped = softnn(s, t, temperature=0.01)
    assert torch.isfinite(plain) and plain.item() > 1e3
    assert capped.item() == pytest.approx(-math.log(1e-9), rel=1e-6)  # eps caps each row
    (grad,) = torch.autograd.grad(plain, s)
    assert torch.isfinite(grad).all()


# ---- barlow --------------------------------------------------------------------------


def test_barlow_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    t = torch.tensor([[0.0, 5.0], [4.0, 1.0]])
    # per dimension: s has mean (2, 1), biased var (1, 1); t has mean (2, 3), var (4, 4).
    # bn(s) = a * [[-1, -1], [1, 1]] with a = 1 / sqrt(1 + 1e-5)
    # bn(t) = b * [[-1, 1], [1, -1]] with b = 2 / sqrt(4 + 1e-5)
    # C = bn(s)^T bn(t) / 2 = ab * [[1, -1], [1, -1]]
    # loss = (1 - ab)^2 + (1 + ab)^2 + lambd * ((-ab)^2 + (ab)^2) = 2 + (2 + 2 lambd)(ab)^2
    ab = 1 / math.sqrt(1 + 1e-5) * 2 / math.sqrt(4 + 1e-5)
    assert barlow(s, t).item() == pytest.approx(2 + (2 + 2 * 5e-3) * ab**2, abs=1e-5)
    assert barlow(s, t, lambd=1.0).item() == pytest.approx(2 + 4 * ab**2, abs=1e-5)
    # identical, decorrelated inputs: C = I, loss 0
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert barlow(x, x).item() == pytest.approx(0.0, abs=1e-4)


def test_barlow_matches_batchnorm_reference() -> None:
    g = torch.Generator().manual_seed(8)
    s, t = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    bn = torch.nn.BatchNorm1d(5, affine=False)  # training mode: batch statistics
    c = bn(s).T @ bn(t) / 7
    off = ~torch.eye(5, dtype=torch.bool)
    ref = (torch.diagonal(c) - 1).pow(2).sum() + 0.02 * c[off].pow(2).sum()
    assert barlow(s, t, lambd=0.02).item() == pytest.approx(ref.item(), abs=1e-5)


# ---- soft_ce -------------------------------------------------------------------------


def test_soft_ce_by_hand() -> None:
    ln3 = math.log(3)
    s = torch.tensor([[0.0, 0.0], [ln3, 0.0]])
    t = torch.tensor([[ln3, 0.0], [0.0, 0.0]])
    # T = 1. Row 0: p = softmax(ln3, 0) = (3/4, 1/4), log_softmax(0, 0) = (-ln2, -ln2): ln 2
    # Row 1: p = (1/2, 1/2), log_softmax(ln3, 0) = (ln 3/4, ln 1/4):
    #        -(ln(3/4) + ln(1/4)) / 2
    expected = (math.log(2) - (math.log(0.75) + math.log(0.25)) / 2) / 2
    assert soft_ce(s, t, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)
    # T = 1/2 doubles the logits: row 0 still ln 2;
    # row 1: log_softmax(2 ln3, 0) = (ln 9/10, ln 1/10)
    expected = (math.log(2) - (math.log(0.9) + math.log(0.1)) / 2) / 2
    assert soft_ce(s, t, temperature=0.5).item() == pytest.approx(expected, abs=1e-6)


def test_soft_ce_is_cross_entropy_with_probability_targets() -> None:
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    ref = F.cross_entropy(s / 0.3, F.softmax(t / 0.3, dim=1))
    assert soft_ce(s, t, temperature=0.3).item() == pytest.approx(ref.item(), abs=1e-6)


# ---- bce -----------------------------------------------------------------------------


def test_bce_by_hand() -> None:
    s = torch.tensor([[0.0, math.log(3)]])
    t = torch.tensor([[2.0, 0.0]])
    # y = round(sigmoid(t)) = (1, round(0.5) = 0)
    # element 0: -log sigmoid(0) = ln 2; element 1: -log(1 - sigmoid(ln 3)) = -log(1/4) = ln 4
    # mean over N*D = 2 elements: (ln 2 + ln 4) / 2 = 1.5 ln 2
    assert bce(s, t).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    # soft targets y = (sigmoid(2), 1/2):
    # element 0: sigmoid(0) = 1/2, so -[y ln(1/2) + (1-y) ln(1/2)] = ln 2 for any y
    # element 1: -[ln(3/4) + ln(1/4)] / 2
    expected = (math.log(2) - (math.log(0.75) + math.log(0.25)) / 2) / 2
    assert bce(s, t, binarize=False).item() == pytest.approx(expected, abs=1e-6)


# ---- wasserstein ---------------------------------------------------------------------


def test_wasserstein_by_hand() -> None:
    s = torch.tensor([[1.0, 1.0, 2.0], [3.0, 0.0, 1.0]])
    t = torch.tensor([[0.0, 2.0, 2.0], [1.0, 1.0, 0.0]])
    # row 0: s / 4 = (.25, .25, .5) -> cdf (.25, .5, 1); t / 4 = (0, .5, .5) -> cdf (0, .5, 1)
    #        |diff| summed: .25
    # row 1: s / 4 = (.75, 0, .25) -> cdf (.75, .75, 1); t / 2 = (.5, .5, 0) -> cdf (.5, 1, 1)
    #        |diff| summed: .25 + .25 = .5
    assert wasserstein(s, t).item() == pytest.approx(0.375, abs=1e-6)
    # each row is normalised by its sum: invariant to a positive scale per row
    assert wasserstein(3 * s, t).item() == pytest.approx(0.375, abs=1e-6)
    assert wasserstein(t, t).item() == 0.0


# ---- gather=True under a real 2-process gloo group ---------------------------------

WORLD = 2
GATHER_SIZES = [[3, 5], [4, 4], [0, 3]]
GATHER_TEMP = 1.5
GATHER_LABELS = [0, 1, 0, 2, 1, 1, 0, 2]  # enough for the largest total batch


GatherCase = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _gather_cases() -> dict[str, GatherCase]:
    """name -> fn(student, target, labels), gather=True, for losses with batch statistics."""
    return {
        "softnn": lambda s, t, lab: softnn(s, t, temperature=GATHER_TEMP, gather=True),
        "supcon": lambda s, t, lab: supcon(s, t, temperature=0.4, base_temperature=None, gather=True),
        "supcon_labels": lambda s, t, lab: supcon(
            s, t, temperature=0.4, labels=lab, base_temperature=None, gather=True
        ),
        "infonce": lambda s, t, lab: infonce(s, t, temperature=0.4, gather=True),
        "barlow": lambda s, t, lab: barlow(s, t, lambd=0.1, gather=True),
    }


def _gather_data(sizes: list[int]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(10 + sum(sizes))
    m = sum(sizes)
    x = torch.randn(m, 3, generator=g, dtype=torch.float64)
    target = torch.randn(m, 3, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 3, generator=g, dtype=torch.float64)
    return x, target, weight, torch.tensor(GATHER_LABELS[:m])


def _gather_worker(rank: int, port: int, out_dir: str) -> None:
    torch_dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        results = {}
        for sizes in GATHER_SIZES:
            start = sum(sizes[:rank])
            local = slice(start, start + sizes[rank])
            x, target, weight, labels = _gather_data(sizes)
            for name, fn in _gather_cases().items():
                s = x[local].clone().requires_grad_(True)
                loss = fn(s, target[local], labels[local])
                loss.backward()
                w = weight.clone().requires_grad_(True)
                fn(x[local] @ w, target[local], labels[local]).backward()
                results[(tuple(sizes), name)] = {
                    "loss": loss.detach(), "s_grad": s.grad, "w_grad": w.grad,
                }  # fmt: skip
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()




@pytest.fixture(scope="module")
def gather_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("loss_gather")
    ctx = mp.spawn(_gather_worker, args=(free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process gloo test timed out (a collective hung)")
    return [torch.load(Path(out, f"rank{r}.pt")) for r in range(WORLD)]


def _reference_per_rank(
    name: str, s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, sizes: list[int]
) -> torch.Tensor:
    """What each rank's loss should be, from single-process loop references."""
    if name == "barlow":  # global statistics: every rank returns the whole-batch loss
        return barlow(s, t, lambd=0.1).expand(len(sizes))
    if name == "softnn":
        rows = _ref_softnn_rows(s, t, GATHER_TEMP, 1e-9)
    else:
        rows = _ref_supcon_rows(s, t, 0.4, labels if name == "supcon_labels" else None)
    m = s.shape[0]
    per_rank, start = [], 0
    for n in sizes:  # rank r's anchors: its students and its targets
        mine = torch.cat([rows[start : start + n], rows[m + start : m + start + n]])
        per_rank.append(mine.sum() / max(len(mine), 1))
        start += n
    return torch.stack(per_rank)


@pytest.mark.parametrize("name", sorted(_gather_cases()))
@pytest.mark.parametrize("sizes", GATHER_SIZES, ids=lambda s: f"sizes{s[0]}-{s[1]}")
def test_two_rank_gather_matches_single_process(
    gather_results: list[dict], sizes: list[int], name: str
) -> None:
    ranks = [r[(tuple(sizes), name)] for r in gather_results]
    x, target, weight, labels = _gather_data(sizes)
    s = x.clone().requires_grad_(True)
    per_rank = _reference_per_rank(name, s, target, labels, sizes)
    per_rank.mean().backward()
    w = weight.clone().requires_grad_(True)
    _reference_per_rank(name, x @ w, target, labels, sizes).mean().backward()
    assert s.grad is not None and w.grad is not None

    tol = 1e-10
    losses = torch.stack([r["loss"] for r in ranks])
    torch.testing.assert_close(losses, per_rank.detach(), atol=tol, rtol=0)
    # rank r holds d(sum_r' L_r')/d s_r (see tests/test_dist.py): concatenate, / W
    s_grad = torch.cat([r["s_grad"] for r in ranks]) / WORLD
    torch.testing.assert_close(s_grad, s.grad, atol=tol, rtol=0)
    w_grad = sum(r["w_grad"] for r in ranks) / WORLD  # DDP's all-reduce-mean
    torch.testing.assert_close(w_grad, w.grad, atol=tol, rtol=0)
