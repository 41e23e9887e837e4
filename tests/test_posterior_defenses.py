"""Posterior defenses: hand-computed cases, closed forms against autograd, and property tests
(valid distributions, the ε ball, the argmax where promised) on random and real posteriors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from victims.classifier import build_classifier
from victims.defenses.posterior import (POSTERIOR_DEFENSES, am_mix, build_posterior_defense, build_posterior_defenses,
                                        dcp_perturb, distance, emma_apply, emma_fit, grad2_direction, grad2_perturb,
                                        mad_candidates, mad_objective, mad_perturb, reverse_sigmoid)
from victims.defenses.posterior.gradient import _mad_objective_jacobian, mad_jacobian
from victims.defenses.posterior.base import victim_outputs
from victims.ledger import QueryLedger
from victims.posterior_api import PosteriorAPI

T = torch.tensor
SIZES = {"animal_mnist": {"victim_train": 320, "query": 64, "probe_train": 32, "probe_test": 96}}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny classifier trained for a few seconds on real images, and real images to query."""
    from stealer.data import ShardStream, open_shards
    from stealer.shards import build_default_data

    root = tmp_path_factory.mktemp("postdef")
    build_default_data(root, image_size=16, sizes=SIZES)

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        s = ShardStream(open_shards(root / "animal_mnist" / split), batch_size=512, shuffle=False, channels=1, image_size=16)
        b = next(iter(s.iter_epoch(0)))
        return b["image"], b["label"]

    x, y = load("victim_train")
    xt, _ = load("probe_test")
    torch.manual_seed(0)
    model = build_classifier("resnet18", 10, 1, 16, width=8, stem="small")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(4):
        for i in range(0, len(x), 64):
            loss = F.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval().requires_grad_(False)
    return {"model": model, "fit": x[:160], "images": xt}


# ---------------------------------------------------------------- hand-computed cases
def test_noise_vertex_by_hand():
    d = build_posterior_defense({"name": "noise", "epsilon": 0.4, "norm": "l1"})
    imgs = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    # K=2: the only non-argmax vertex is e_1; ||e_1 - y||_1 = 1.6, a = 0.25
    assert torch.allclose(d(T([[0.8, 0.2]]), imgs, "u"), T([[0.6, 0.4]]), atol=1e-6)
    d2 = build_posterior_defense({"name": "noise", "epsilon": 0.2 * math.sqrt(2), "norm": "l2"})
    assert torch.allclose(d2(T([[0.8, 0.2]]), imgs, "u"), T([[0.6, 0.4]]), atol=1e-6)


def test_reverse_sigmoid_by_hand():
    # gamma=1: sigmoid(logit y) = y, r = 0.5 (y - 0.5) = [.05, -.1, -.2]; y - r = [.55, .4, .3] / 1.25
    # (Orekondy's unclamped logit, clamp="none")
    out = reverse_sigmoid(T([[0.6, 0.3, 0.1]]), beta=0.5, gamma=1.0, clamp="none")
    assert torch.allclose(out, T([[0.44, 0.32, 0.24]]), atol=1e-6)
    # default clamp="odds" (Mazeika / Khaled): odds 1.5 clamped to ~1, r(0.6) = 0: [.6, .4, .3] / 1.3
    out = reverse_sigmoid(T([[0.6, 0.3, 0.1]]), beta=0.5, gamma=1.0)
    assert torch.allclose(out, T([[0.6, 0.4, 0.3]]) / 1.3, atol=1e-6)
    # beta > 1 would go negative: clamped at 0, still a distribution
    out = reverse_sigmoid(T([[0.9, 0.05, 0.05]]), beta=3.0, gamma=5.0)
    assert (out >= 0).all() and torch.allclose(out.sum(1), T([1.0]))


def test_dcp_by_hand():
    # max 0.4 < beta 0.5: gate ~1, r = 0.5 (y - 0.5) = [-.05, -.075, -.125]; y - r = [.45, .425, .375] / 1.25
    out = dcp_perturb(T([[0.4, 0.35, 0.25], [0.8, 0.1, 0.1]]), beta=0.5, gamma=1.0, nu=1000.0)
    assert torch.allclose(out[0], T([0.36, 0.34, 0.30]), atol=1e-6)
    assert torch.allclose(out[1], T([0.8, 0.1, 0.1]), atol=1e-6)  # confident: untouched


def test_am_mix_by_hand():
    a = 1 / (1 + math.e)  # nu (S - tau) = 10 * 0.1
    out = am_mix(T([[0.6, 0.3, 0.1]]), T([[0.0, 0.0, 1.0]]), T([0.6]), tau=0.5, nu=10.0)
    want = T([[0.6 * (1 - a), 0.3 * (1 - a), 0.1 * (1 - a) + a]])
    assert torch.allclose(out, want, atol=1e-6)
    hard = am_mix(T([[0.3, 0.3, 0.4]]), T([[1.0, 0.0, 0.0]]), T([0.4]), tau=0.5, nu=1000.0)
    assert torch.allclose(hard, T([[1.0, 0.0, 0.0]]), atol=1e-6)  # OOD-like: all misinformation


def test_mad_by_hand():
    y, p = T([[0.5, 0.3, 0.2]]), T([[0.2, 0.3, 0.5]])
    obj = mad_objective(p, mad_candidates(y, "extreme"), y)
    assert torch.allclose(obj, T([[2 - 2 * 1.3 / 1.4, 2 - 2 * 0.3 / math.sqrt(1.56), 2 + 2 * 0.7 / math.sqrt(0.76)]]), atol=1e-5)
    # y* = e_2; ||y - e_2||_1 = 1.6, eps 0.4 -> a = 0.25
    assert torch.allclose(mad_perturb(y, p, epsilon=0.4, norm="l1"), T([[0.375, 0.225, 0.4]]), atol=1e-6)
    # argmax-preserving: sets {0}, {0,1}, {0,2}, {0,1,2}; best {0,2} -> [.5, 0, .5]; ||.||_1 = .6, eps .3 -> a = .5
    out = mad_perturb(y, p, epsilon=0.3, norm="l1", oracle="argmax")
    assert torch.allclose(out, T([[0.5, 0.15, 0.35]]), atol=1e-4) and out.argmax() == 0


def test_grad2_by_hand():
    y, g = T([[0.5, 0.3, 0.2]]), T([[3.0, 1.0, 2.0]])
    # give eps/2 = .25 to argmin g (class 1), taken from the largest g first (class 0)
    assert torch.allclose(grad2_perturb(y, g, 0.5), T([[0.25, 0.55, 0.2]]), atol=1e-6)
    # eps/2 = .6: class 0 gives all .5, then class 2 (g=2) gives .1
    assert torch.allclose(grad2_perturb(y, g, 1.2), T([[0.0, 0.9, 0.1]]), atol=1e-6)


def test_emma_apply_by_hand():
    y = T([[0.6, 0.3, 0.1]])
    t = T([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(emma_apply(y, t, 1.0), T([[0.3, 0.6, 0.1]]), atol=1e-6)  # y T is within the ball
    assert torch.allclose(emma_apply(y, t, 0.3), T([[0.45, 0.45, 0.1]]), atol=1e-6)  # ||yT - y||_1 = .6 -> a = .5


# ---------------------------------------------------------------- closed forms vs autograd
def test_mad_closed_form_equals_reference_jacobian(real):
    sur = build_classifier("resnet18", 10, 1, 16, width=8, stem="small").eval()
    imgs = real["images"][:6]
    y = torch.softmax(real["model"](imgs), 1)
    with torch.no_grad():
        p = torch.softmax(sur(imgs), 1)
    G = mad_jacobian(sur, imgs)  # N x K x (K*F), by autograd
    for oracle in ("extreme", "argmax"):
        cand = mad_candidates(y, oracle)
        for objective in ("angular", "surrogate"):
            ref = _mad_objective_jacobian(G, cand, y, objective)
            mine = mad_objective(p, cand, y, objective)
            if objective == "surrogate":  # ours leaves out the |h|^2 factor
                mine = mine * sur.features(imgs).pow(2).sum(1, keepdim=True).detach()
            assert torch.allclose(mine, ref, rtol=1e-3, atol=1e-5), (oracle, objective)
            assert torch.equal(mine.argmax(1), ref.argmax(1))


def test_grad2_direction_equals_double_backprop():
    torch.manual_seed(0)
    n, f, k = 5, 7, 4
    h, w, b = torch.randn(n, f), torch.randn(k, f), torch.randn(k)
    y = torch.softmax(torch.randn(n, k) * 2, 1)
    ytil = y.clone().requires_grad_(True)
    wp, bp = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    logp = torch.log_softmax(h @ wp.T + bp, 1)
    gw, gb = torch.autograd.grad((ytil * logp).sum(1).mean(), (wp, bp), create_graph=True)
    obj = (gw * gw.detach()).sum() + (gb * gb.detach()).sum()  # <G^T y~, G^T y> at y~ = y
    g_auto = torch.autograd.grad(obj, ytil)[0] * n
    g = grad2_direction(torch.softmax(h @ w.T + b, 1), h, y)
    center = lambda v: v - v.mean(1, keepdim=True)  # noqa: E731 - equal up to a per-row constant
    p = torch.softmax(h @ w.T + b, 1)
    shift = (p * g).sum(1, keepdim=True)  # the constant is p_i^T g_i
    assert torch.allclose(g - shift, g_auto, atol=1e-5)
    assert torch.allclose(center(g), center(g_auto), atol=1e-5)


def _fresh_clone_ce(h: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, steps: int = 150) -> float:
    """Distil a fresh linear clone on (h, targets) by SGD; its cross-entropy on the victim's labels."""
    h = h / h.norm(dim=1).mean()
    w = torch.zeros(targets.shape[1], h.shape[1], requires_grad=True)
    b = torch.zeros(targets.shape[1], requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=1.0)
    for _ in range(steps):
        loss = -(targets * torch.log_softmax(h @ w.T + b, 1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(h @ w.T + b, labels))


def test_emma_fit_learns_a_stochastic_matrix_that_hurts_a_clone(real):
    feats, probs = victim_outputs(real["model"], real["fit"], "cpu")
    t, stats = emma_fit(feats, probs, epsilon=0.6, steps=60, inner_steps=3, inner_lr=1.0, lr=0.1, fidelity=0.5)
    assert (t >= 0).all() and torch.allclose(t.sum(1), torch.ones(10), atol=1e-5)
    assert not torch.allclose(t, torch.eye(10), atol=0.05)
    perturbed = emma_apply(probs, t, 0.6)
    assert ((perturbed - probs).abs().sum(1) <= 0.6 + 1e-5).all()
    labels = probs.argmax(1)
    clean_ce, defended_ce = _fresh_clone_ce(feats, probs, labels), _fresh_clone_ce(feats, perturbed, labels)
    assert defended_ce > clean_ce + 0.1, (clean_ce, defended_ce)


# ---------------------------------------------------------------- properties
SPECS = [
    {"name": "none"},
    {"name": "noise", "epsilon": 0.3, "norm": "l1"},
    {"name": "noise", "epsilon": 0.2, "norm": "l2", "target": "simplex"},
    {"name": "noise", "epsilon": 0.1, "norm": "kl"},
    {"name": "reverse_sigmoid", "beta": 0.5, "gamma": 0.1},
    {"name": "dcp", "beta": 0.6, "gamma": 0.1},
    {"name": "am", "tau": 0.6, "epochs": 20},
    {"name": "mad", "epsilon": 0.5, "norm": "l1"},
    {"name": "mad", "epsilon": 0.3, "norm": "l2", "oracle": "argmax"},
    {"name": "mad", "epsilon": 0.2, "norm": "kl", "objective": "surrogate"},
    {"name": "mad", "epsilon": 0.4, "oracle": "argmax", "surrogate": "distill", "surrogate_epochs": 1},
    {"name": "grad2", "epsilon": 0.5},
    {"name": "emma", "epsilon": 0.4, "steps": 30},
]


def _random_posteriors(k: int, n: int = 64) -> torch.Tensor:
    """Dirichlet rows from very peaked (0.05) to flat (10), plus a one-hot and a uniform row."""
    rng = np.random.default_rng(1)
    rows = [rng.dirichlet(np.full(k, c)) for c in (0.05, 0.3, 1.0, 10.0) for _ in range(n // 4)]
    p = torch.tensor(np.stack(rows), dtype=torch.float32)
    p = p / p.sum(1, keepdim=True)
    p[0] = F.one_hot(torch.tensor(3), k).float()  # a one-hot row
    p[1] = torch.full((k,), 1 / k)  # a uniform row (ties everywhere)
    return p


def _check(d, y, out):
    assert out.shape == y.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out >= 0).all(), d.name
    assert torch.allclose(out.sum(1), torch.ones(len(out)), atol=1e-5), d.name
    if d.epsilon is not None:
        dist = distance(y, out, d.norm)
        assert (dist <= d.epsilon + 1e-5).all(), (d.name, d.norm, float(dist.max()), d.epsilon)
    if d.keeps_top1:
        assert torch.equal(out.argmax(1), y.argmax(1)), d.name


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_defense_properties_on_real_and_random_posteriors(real, spec, tmp_path):
    model = real["model"]
    defenses = build_posterior_defenses([spec], model, fit_data=real["fit"])
    d = defenses[0]
    assert d.name == spec["name"] and (d.epsilon == spec.get("epsilon"))
    # real posteriors, through the API: every row a distribution, every image paid for
    api = PosteriorAPI(model, QueryLedger(tmp_path / "l.sqlite"), defenses=defenses)
    imgs = real["images"]
    out = api.query(imgs, "eve")
    _check(d, torch.softmax(model(imgs), 1), out)
    assert api.ledger.spent("eve") == len(imgs)
    # random posteriors (peaked, flat, one-hot, uniform), straight into the defense
    y = _random_posteriors(10)
    _check(d, y, d(y, imgs[: len(y)], "mallory"))


def test_undefended_posteriors_differ_from_defended_ones(real):
    model, imgs = real["model"], real["images"][:32]
    y = torch.softmax(model(imgs), 1)
    for spec in SPECS[1:]:
        if spec["name"] in ("dcp", "am"):  # gated: confident in-distribution queries may pass unchanged
            continue
        d = build_posterior_defense(spec, model, fit_data=real["fit"])
        assert (d(y, imgs, "u") - y).abs().sum(1).max() > 1e-3, spec


# ---------------------------------------------------------------- registry and state
def test_registry_names_and_errors(real):
    assert set(POSTERIOR_DEFENSES) == {"none", "noise", "reverse_sigmoid", "am", "mad", "grad2", "dcp", "emma"}
    with pytest.raises(ValueError, match="unknown posterior defense 'madd'; valid names: none, noise"):
        build_posterior_defenses([{"name": "madd"}], real["model"])
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) 'eps' for posterior defense 'mad'; valid: epsilon=0.5"):
        build_posterior_defenses([{"name": "mad", "eps": 0.1}], real["model"])
    with pytest.raises(ValueError, match="mad: norm must be one of l1, l2, kl; got 'l3'"):
        build_posterior_defenses([{"name": "mad", "norm": "l3"}], real["model"])
    with pytest.raises(ValueError, match="emma defense needs fit_data"):
        build_posterior_defenses([{"name": "emma"}], real["model"])
    with pytest.raises(ValueError, match="needs the victim classifier"):
        build_posterior_defenses([{"name": "am"}])
    with pytest.raises(ValueError, match="must be a list of dicts"):
        build_posterior_defenses({"name": "mad"}, real["model"])
    with pytest.raises(ValueError, match=r"expects float posteriors \[N, K\]"):
        build_posterior_defense({"name": "dcp"})(torch.ones(3), torch.zeros(3, 1, 4, 4, dtype=torch.uint8), "u")


@pytest.mark.parametrize("spec", [{"name": "noise", "target": "simplex"}, {"name": "mad", "oracle": "random"},
                                  {"name": "am", "epochs": 5}, {"name": "emma", "steps": 10}], ids=lambda s: s["name"])
def test_state_dict_round_trip_through_weights_only_file(real, spec, tmp_path):
    model, imgs = real["model"], real["images"][:16]
    y = torch.softmax(model(imgs), 1)
    d1 = build_posterior_defense(spec, model, fit_data=real["fit"])
    d1(y, imgs, "u")  # advance u's counters
    torch.save(d1.state_dict(), tmp_path / "state.pt")
    want = d1(y, imgs, "u")
    d2 = POSTERIOR_DEFENSES[spec["name"]](**{k: v for k, v in spec.items() if k != "name"})
    d2.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    if hasattr(d2, "bind"):
        d2.bind(model)
    assert torch.allclose(d2(y, imgs, "u"), want, atol=1e-6)
    other = POSTERIOR_DEFENSES[spec["name"]](**{**{k: v for k, v in spec.items() if k != "name"}, "seed": 99})
    with pytest.raises(ValueError, match="saved with other parameters"):
        other.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
