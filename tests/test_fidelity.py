"""Fidelity to the published code (issue 14, docs/fidelity.md).

Every expected value here comes from the published formula, computed by hand or in float64
inside the test (never from the reference code itself): the ICML'22 stealing losses
(cleverhans-lab/ssl-attacks-defenses @1d3874ff), Reverse Sigmoid under Orekondy's and
Mazeika's / Khaled's conventions, DCP (KacemKhaled/defending-extraction @a343cf3a), the
Adaptive Misinformation gate (both nu), and B4B's noise schedule
(stapaw/b4b-active-encoder-defense @f66dc825), including the edge cases the issue names:
near-one-hot rows, exact zeros, uniform rows, coverage 0 and 1.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from stealer.losses import (LOSS_DEFAULTS, LOSSES, default_temperature, infonce, infonce_sym, soft_ce, softnn,
                            supcon)
from victims.defenses import B4B, b4b_noise_std
from victims.defenses.base import generator
from victims.defenses.posterior import (POSTERIOR_DEFENSES, build_posterior_defense, dcp_perturb, reverse_sigmoid)
from victims.defenses.posterior.simple import AdaptiveMisinformation, am_mix

D64 = torch.float64


# ---------------------------------------------------------------- reference formulas, float64, by hand
def _ntxent_2b(s: torch.Tensor, t: torch.Tensor, temp: float) -> float:
    """NT-Xent over the 2B rows [s; t]: row a's positive is its other-side partner, its negatives
    every other row on both sides; CrossEntropy over [positive, negatives] with label 0, mean."""
    z = [r / r.norm() for r in torch.cat([s, t]).to(D64)]
    b = s.shape[0]
    total = 0.0
    for a in range(2 * b):
        pair = (a + b) % (2 * b)
        logits = [float(z[a] @ z[k]) / temp for k in range(2 * b) if k != a]
        total += -(float(z[a] @ z[pair]) / temp - math.log(sum(math.exp(v) for v in logits)))
    return total / (2 * b)


def _inv_sigmoid(p: float, clamp: str, f32: bool = False) -> float:
    if clamp == "odds":  # odds clamped into [1e-12, 1 - 1e-12]
        odds = math.inf if p == 1 else p / (1 - p)
        return math.log(min(max(odds, 1e-12), 1 - 1e-12))
    if clamp == "none":  # exact, +-inf at 1 and 0
        return math.inf if p == 1 else (-math.inf if p == 0 else math.log(p / (1 - p)))
    if f32 and p >= 1 - 1e-12:  # "p" in float32: 1 - 1e-12 rounds to 1, so p = 1 keeps its +inf logit
        return math.inf
    q = min(max(p, 1e-12), 1 - 1e-12)  # "p": the probability clamped
    return math.log(q) - math.log1p(-q)


def _sigmoid(x: float) -> float:
    return 0.0 if x == -math.inf else (1.0 if x == math.inf else 1 / (1 + math.exp(-x)))


def _rs_row(y: list[float], beta: float, gamma: float, clamp: str, gate: float = 1.0, f32: bool = False) -> list[float]:
    """Lee et al. Eq. 3-4 (with DCP's gate): y - gate * beta (sigmoid(gamma logit y) - 1/2), normalised."""
    out = [p - gate * beta * (_sigmoid(gamma * _inv_sigmoid(p, clamp, f32)) - 0.5) for p in y]
    return [v / sum(out) for v in out]


# ---------------------------------------------------------------- losses
def test_infonce_is_the_icml22_ntxent_over_2b_rows_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # normalised: e0, e1
    t = torch.tensor([[2.0, 0.0], [0.0, -1.0]])  # normalised: e0, -e1
    # T = 1, rows [e0, e1, e0, -e1]. Anchor e0 (s0 and t0): others' dots (0, 1, 0), positive 1:
    #   L = log(e + 2) - 1. Anchor e1 (s1): others (0, 0, -1), positive -1: L = 1 + log(2 + 1/e); -e1 the same.
    expected = (math.log(math.e + 2) + math.log(2 + 1 / math.e)) / 2
    assert infonce(s, t, temperature=1.0).item() == pytest.approx(expected, abs=1e-6)
    assert _ntxent_2b(s, t, 1.0) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("temp", [0.07, 0.1, 0.25])
def test_infonce_matches_float64_formula_and_departs_from_the_symmetric_form(temp: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    ref = _ntxent_2b(s, t, temp)
    assert infonce(s, t, temperature=temp).item() == pytest.approx(ref, rel=1e-5)
    # the symmetric B x B form (the old `infonce`, now `infonce_sym`) is another loss
    sym = infonce_sym(s, t, temperature=temp).item()
    assert abs(sym - ref) / ref > 0.03, (sym, ref)


def test_supcon_has_the_reference_t_over_base_t_scale() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for temp in (0.07, 0.2, 0.5):
        # SupConLoss(temperature=T) with its default base_temperature 0.07: loss = (T / 0.07) * NT-Xent
        assert supcon(s, t, temperature=temp).item() == pytest.approx(temp / 0.07 * _ntxent_2b(s, t, temp), rel=1e-5)
    assert inspect.signature(supcon).parameters["base_temperature"].default == 0.07


def test_softnn_default_temperature_is_the_reference_100() -> None:
    g = torch.Generator().manual_seed(2)
    s, t = 5 * torch.randn(4, 3, generator=g), 5 * torch.randn(4, 3, generator=g)
    x = torch.cat([s, t]).to(D64)
    n, temp, eps = 4, 100.0, 1e-9
    rows = []
    for a in range(2 * n):  # -log(eps + exp(-d_pair / T) / sum_{b != a} exp(-d_ab / T)), squared distances
        e = [math.exp(-float(((x[a] - x[b]) ** 2).sum()) / temp) for b in range(2 * n)]
        rows.append(-math.log(eps + e[(a + n) % (2 * n)] / (sum(e) - e[a])))
    ref = sum(rows) / len(rows)
    assert softnn(s, t).item() == pytest.approx(ref, rel=1e-6)  # no temperature passed
    assert default_temperature("softnn") == 100.0 and LOSS_DEFAULTS["softnn"] == {"temperature": 100.0}


def test_soft_ce_default_is_the_reference_without_temperature() -> None:
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 6, generator=g, dtype=D64), torch.randn(4, 6, generator=g, dtype=D64)
    # soft_cross_entropy(pred, soft_targets) = mean_i sum_j -q_ij log_softmax(pred)_ij, q = softmax(victim)
    ref = sum(-sum(float(qj) * math.log(float(pj)) for qj, pj in zip(F.softmax(t[i], 0), F.softmax(s[i], 0)))
              for i in range(4)) / 4
    assert soft_ce(s, t).item() == pytest.approx(ref, rel=1e-9)
    assert default_temperature("soft_ce") == 1.0
    # another T divides both sides (Hinton et al.'s convention), which the reference has no knob for
    assert soft_ce(s, t, temperature=0.5).item() == pytest.approx(soft_ce(2 * s, 2 * t).item(), rel=1e-9)


def test_default_temperature_of_every_loss() -> None:
    assert {n: default_temperature(n) for n in LOSSES} == {n: LOSS_DEFAULTS.get(n, {}).get("temperature", 0.2)
                                                            for n in LOSSES}
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        default_temperature("nope")


# ---------------------------------------------------------------- Reverse Sigmoid, DCP
ROWS = {
    "near_one_hot": [1 - 2e-20, 1e-20, 1e-20],
    "exact_zeros": [1.0, 0.0, 0.0],
    "uniform": [1 / 3, 1 / 3, 1 / 3],
    "low_confidence": [0.45, 0.35, 0.2],
    "above_half": [0.7, 0.2, 0.1],
}


@pytest.mark.parametrize("clamp", ["odds", "none", "p"])
@pytest.mark.parametrize("row", sorted(ROWS))
@pytest.mark.parametrize("beta,gamma", [(0.5, 0.1), (0.9, 1.0), (1.0, 1.0)])
def test_reverse_sigmoid_conventions_float64(clamp: str, row: str, beta: float, gamma: float) -> None:
    y = ROWS[row]
    want = torch.tensor([_rs_row(y, beta, gamma, clamp)], dtype=D64)
    got = reverse_sigmoid(torch.tensor([y], dtype=D64), beta, gamma, clamp)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    # the served defense (float32 posteriors) follows the same convention
    d = build_posterior_defense({"name": "reverse_sigmoid", "beta": beta, "gamma": gamma, "clamp": clamp})
    out = d(torch.tensor([y]), torch.zeros(1, 1, 2, 2, dtype=torch.uint8), "u")
    y32 = torch.tensor([y]).double()[0].tolist()
    want32 = torch.tensor([_rs_row(y32, beta, gamma, clamp, f32=True)], dtype=D64)
    torch.testing.assert_close(out.double(), want32, atol=2e-6, rtol=0)


def test_reverse_sigmoid_conventions_differ_where_the_issue_says() -> None:
    # exact zeros at the defaults (beta .5, gamma .1): odds / p give 0 the logit of 1e-12, Orekondy's -inf
    zeros = torch.tensor([[1.0, 0.0, 0.0]], dtype=D64)
    odds, none = reverse_sigmoid(zeros, 0.5, 0.1, "odds"), reverse_sigmoid(zeros, 0.5, 0.1, "none")
    assert torch.allclose(none, torch.tensor([[0.6, 0.2, 0.2]], dtype=D64))  # r = -+beta/2 at 0 and 1
    assert (odds - none).abs().max() > 0.09
    # entries >= 0.5: the odds clamp leaves them (r = 0), Orekondy's and ours before reduce them
    y = torch.tensor([[0.7, 0.2, 0.1]], dtype=D64)
    for clamp in ("none", "p"):
        assert (reverse_sigmoid(y, 0.5, 0.1, "odds") - reverse_sigmoid(y, 0.5, 0.1, clamp)).abs().max() > 3e-3
    # near-one-hot (1e-20 entries): p's clamp at 1e-12 vs Orekondy's exact logit, 5.0e-2 apart at beta 1 (float64)
    near = torch.tensor([ROWS["near_one_hot"]], dtype=D64)
    gap = (reverse_sigmoid(near, 1.0, 0.1, "p") - reverse_sigmoid(near, 1.0, 0.1, "none")).abs().max().item()
    assert gap == pytest.approx(0.0505, abs=1e-3)
    # uniform rows: every convention returns the row
    u = torch.full((1, 4), 0.25, dtype=D64)
    for clamp in ("odds", "none", "p"):
        torch.testing.assert_close(reverse_sigmoid(u, 0.5, 0.1, clamp), u)


def test_dcp_issue_example_matches_khaled_code_convention() -> None:
    y = torch.tensor([[0.7, 0.2, 0.1]], dtype=D64)
    # the gate: 1 / (1 + exp(1000 (0.7 - 0.9))) = 1 - e^-200; gamma 1: sigmoid(logit p) = p
    # odds: 0.7 untouched, r = .9 (p - .5) for .2, .1: [.7, .47, .46] / 1.63 = [.429, .288, .282]
    want = torch.tensor([[0.7, 0.47, 0.46]], dtype=D64) / 1.63
    torch.testing.assert_close(dcp_perturb(y, 0.9, 1.0, 1000.0), want, atol=1e-9, rtol=0)
    assert dcp_perturb(y, 0.9, 1.0, 1000.0).round(decimals=3).tolist() == [[0.429, 0.288, 0.282]]
    # without the odds clamp (Orekondy's / ours before): [.52, .47, .46] / 1.45 = [.359, .324, .317]
    for clamp in ("none", "p"):
        assert dcp_perturb(y, 0.9, 1.0, 1000.0, clamp).round(decimals=3).tolist() == [[0.359, 0.324, 0.317]]
    d = build_posterior_defense({"name": "dcp", "beta": 0.9, "gamma": 1.0})  # the served default
    out = d(y.float(), torch.zeros(1, 1, 2, 2, dtype=torch.uint8), "u")
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("clamp", ["odds", "none", "p"])
def test_dcp_float64_with_the_gate(clamp: str) -> None:
    rows = [ROWS[k] for k in sorted(ROWS)]
    beta, gamma, nu = 0.5, 0.1, 1000.0
    want = [_rs_row(y, beta, gamma, clamp, gate=1 / (1 + math.exp(nu * (max(y) - beta)))) for y in rows]
    got = dcp_perturb(torch.tensor(rows, dtype=D64), beta, gamma, nu, clamp)
    torch.testing.assert_close(got, torch.tensor(want, dtype=D64), atol=1e-9, rtol=0)


def test_clamp_is_validated_in_one_line() -> None:
    for name in ("reverse_sigmoid", "dcp"):
        with pytest.raises(ValueError, match=rf"^{name}: clamp must be one of odds, none, p; got 'logit'$"):
            build_posterior_defense({"name": name, "clamp": "logit"})
        assert build_posterior_defense({"name": name}).config()["clamp"] == "odds"


def _low_confidence_rows(n: int = 1000, k: int = 10) -> torch.Tensor:
    """n rows, softmax of N(0, 0.5²) logits (top probability ~0.2), one non-top entry set to 1e-10."""
    g = torch.Generator().manual_seed(0)
    y = F.softmax(0.5 * torch.randn(n, k, generator=g, dtype=D64), dim=1)
    top = y.argmax(dim=1)
    j = torch.randint(0, k - 1, (n,), generator=g)
    j = j + (j >= top).long()
    y[torch.arange(n), j] = 1e-10
    return y / y.sum(dim=1, keepdim=True)


def test_reverse_sigmoid_and_dcp_do_not_keep_top1_by_construction() -> None:
    y = _low_confidence_rows()
    assert y.max(dim=1).values.max() < 0.5  # all low confidence: DCP's gate is open on every row
    top = y.argmax(dim=1)
    kept = {}
    for clamp in ("odds", "none"):  # the two references' conventions, at the defaults beta .5, gamma .1
        want = sum(max(range(10), key=lambda c: _rs_row(r, 0.5, 0.1, clamp)[c]) == int(a)
                   for r, a in zip(y.tolist(), top))
        rs = int((reverse_sigmoid(y, 0.5, 0.1, clamp).argmax(dim=1) == top).sum())
        dcp = int((dcp_perturb(y, 0.5, 0.1, 1000.0, clamp).argmax(dim=1) == top).sum())
        assert rs == want and dcp == want  # the gate is ~1 on every row: DCP = Reverse Sigmoid here
        kept[clamp] = rs
    # the near-zero entry is raised by ~beta/2 * 0.82 = 0.2, above a top near 0.2: many rows lose top-1
    assert kept == {"odds": 729, "none": 729}, kept  # the figure the README quotes
    # the served float32 defenses agree with the float64 count
    d = build_posterior_defense({"name": "reverse_sigmoid"})
    out = d(y.float(), torch.zeros(len(y), 1, 2, 2, dtype=torch.uint8), "u")
    assert int((out.argmax(dim=1) == top).sum()) == kept["odds"]
    assert not POSTERIOR_DEFENSES["reverse_sigmoid"].keeps_top1 and not POSTERIOR_DEFENSES["dcp"].keeps_top1


# ---------------------------------------------------------------- Adaptive Misinformation
def test_am_gate_reproduces_both_references() -> None:
    y = torch.tensor([[0.5004, 0.4996], [0.4996, 0.5004]], dtype=D64)
    y_mis = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=D64)
    score, tau = y.max(dim=1).values, 0.5
    for nu in (1000.0, 10000.0):  # Mazeika's copy; Kariyappa's h = 1 / (1 + exp(-nu (delta - max y)))
        h = [1 / (1 + math.exp(-nu * (tau - float(m)))) for m in score]
        want = torch.stack([(1 - h[i]) * y[i] + h[i] * y_mis[i] for i in range(2)])
        torch.testing.assert_close(am_mix(y, y_mis, score, tau, nu), want, atol=1e-12, rtol=0)
    # 4e-4 above tau: nu 1000 still mixes in 40 % misinformation (sigmoid(-0.4)), nu 10000 1.8 % (sigmoid(-4))
    assert am_mix(y, y_mis, score, tau, 1000.0)[0, 1].item() == pytest.approx(0.4996 + 0.4013 * 0.5004, abs=1e-4)
    assert am_mix(y, y_mis, score, tau, 10000.0)[0, 1].item() == pytest.approx(0.4996 + 0.0180 * 0.5004, abs=1e-4)
    assert inspect.signature(AdaptiveMisinformation).parameters["nu"].default == 1000.0


# ---------------------------------------------------------------- B4B
def test_b4b_noise_at_coverage_0_and_1() -> None:
    lam, alpha, beta = 1e-6, 0.8, 0.8
    assert b4b_noise_std(0.0, lam, alpha, beta) == 0.0
    # coverage 1 (100 %, beyond beta 80 %): lam (exp(ln(alpha / lam) * 1 / 0.8) - 1) = lam ((alpha / lam)^1.25 - 1)
    assert b4b_noise_std(1.0, lam, alpha, beta) == pytest.approx(lam * ((alpha / lam) ** 1.25 - 1), rel=1e-12)
    assert b4b_noise_std(1.0, lam, alpha, beta) == pytest.approx(23.93, abs=0.01)
    # the published constants are percent (beta 80): the same value with coverage 100
    assert b4b_noise_std(100.0, lam, alpha, 80.0) == pytest.approx(b4b_noise_std(1.0, lam, alpha, beta), rel=1e-12)


@pytest.mark.parametrize("noise_index", ["after", "half"])
def test_b4b_noise_index(noise_index: str) -> None:
    """Batch i's noise std is b4b_noise_std(coverage after batch i) ('after') or after batch i // 2 ('half',
    the reference's np.repeat(curve, 2)[i]); recovered exactly from the seeded noise draws."""
    params = dict(lam=0.01, alpha=1.0, beta=0.5, n_bits=3, n_projections=4, transform="none", seed=7)
    d = B4B(**params, noise_index=noise_index)
    cover = B4B(**params)  # tracks the coverage after each batch
    g = torch.Generator().manual_seed(3)
    stds, coverage = [], []
    for i in range(6):
        reps = torch.randn(4, 5, generator=g, dtype=D64).float()
        out = d(reps, torch.zeros(4, 1, 2, 2, dtype=torch.uint8), "u")
        cover(reps, torch.zeros(4, 1, 2, 2, dtype=torch.uint8), "u")
        coverage.append(cover.coverage("u"))
        z = torch.randn(reps.shape, generator=generator(7, "b4b", "noise", "u", i))
        stds.append(float(((out - reps) * z).sum() / (z * z).sum()))
    assert 0 < coverage[0] < coverage[-1] <= 1  # the coverage grows over the six batches
    idx = [i if noise_index == "after" else i // 2 for i in range(6)]
    want = [b4b_noise_std(coverage[j], 0.01, 1.0, 0.5) for j in idx]
    assert stds == pytest.approx(want, rel=1e-4)
    if noise_index == "half":
        assert stds[1] == pytest.approx(stds[0]) and stds[5] < b4b_noise_std(coverage[5], 0.01, 1.0, 0.5)
    # the option survives a state round trip; states saved without it still load into the default
    d2 = B4B(**params, noise_index=noise_index)
    d2.load_state_dict(d.state_dict())
    assert d2.noise_std("u") == pytest.approx(d.noise_std("u"))
    with pytest.raises(ValueError, match=r"^b4b: noise_index must be one of after, half; got 'i//2'$"):
        B4B(noise_index="i//2")


def test_train_loss_gets_its_reference_temperature_without_extra_arguments() -> None:
    from stealer.config import load_config
    from stealer.losses import get_loss
    from stealer.steal import StealConfig

    g = torch.Generator().manual_seed(4)
    s, t = 5 * torch.randn(6, 4, generator=g), 5 * torch.randn(6, 4, generator=g)
    for loss, temp in (("softnn", 100.0), ("soft_ce", 1.0), ("infonce", 0.2), ("infonce_sym", 0.2), ("mse", 0.2)):
        cfg = load_config(StealConfig, None, [f"train.loss={loss}"])
        assert cfg.train.temperature == temp
        # what the training step passes to the loss (stealer.attacks.steal_step)
        got = get_loss(cfg.train.loss)(s, t, **{"temperature": cfg.train.temperature, **cfg.train.loss_args})
        assert got.item() == pytest.approx(get_loss(loss)(s, t, temperature=temp).item(), rel=1e-6)
    assert load_config(StealConfig, None, ["train.loss=softnn", "train.temperature=7"]).train.temperature == 7.0
    assert load_config(StealConfig, "launch/configs/demo.yaml").train.loss == "infonce_sym"


def test_docs_fidelity_has_a_row_per_registered_method() -> None:
    from pathlib import Path

    from stealer import classifier_attacks
    from stealer.attacks import ENCODER_ATTACKS
    from victims.defenses import DEFENSES

    doc = (Path(__file__).resolve().parents[1] / "docs" / "fidelity.md").read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in doc.splitlines() if line.startswith("| `")}
    registered = set(LOSSES) | set(ENCODER_ATTACKS) | set(DEFENSES) | set(POSTERIOR_DEFENSES)
    assert registered <= rows, sorted(registered - rows)
    assert {"repeat_average", "coverage_control", "sybils"} <= rows
    for name in classifier_attacks.CLASSIFIER_ATTACKS:  # named in the classifier-attacks paragraph
        assert f"`{name}`" in doc, name
