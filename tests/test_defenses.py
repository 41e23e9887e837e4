"""victims/defenses/: hand-computed B4B maths, determinism, per-user isolation, persistence."""

from __future__ import annotations

import io
import math
import os
from typing import Any

import pytest
import torch

from victims.api import VictimAPI
from victims.defenses import (
    B4B,
    DEFENSES,
    TRANSFORMS,
    GaussianNoise,
    Poison,
    SimilarityNoise,
    b4b_noise_std,
    build_defenses,
    defense_params,
    lsh_bucket_ids,
)
from victims.ledger import QueryLedger
from victims.simsiam import random_victim

SPECS: dict[str, dict[str, Any]] = {
    "noise": {"sigma": 0.3, "seed": 3},
    "similarity_noise": {"threshold": 0.5, "memory": 8, "seed": 3},
    "b4b": {"n_bits": 4, "n_projections": 3, "lam": 1e-3, "alpha": 1.0, "beta": 0.5, "seed": 3},
    "poison": {"fraction": 0.5, "epsilon": 0.2, "memory": 8, "seed": 3},
}


def _reps(n: int = 6, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _images(n: int = 6) -> torch.Tensor:
    return torch.zeros(n, 1, 4, 4, dtype=torch.uint8)


def _run(defense: Any, batches: list[torch.Tensor], user: str = "u") -> list[torch.Tensor]:
    return [defense(b, _images(len(b)), user) for b in batches]


def _through_torch_save(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------- B4B maths by hand


def test_b4b_noise_std_hand_values() -> None:
    lam, alpha, beta = 1e-6, 0.8, 0.8  # the paper's code defaults (beta=80 %)
    assert b4b_noise_std(0.0, lam, alpha, beta) == 0.0
    assert b4b_noise_std(beta, lam, alpha, beta) == pytest.approx(alpha - lam, rel=1e-12)
    # halfway: lam * (sqrt(alpha / lam) - 1) = 1e-6 * (sqrt(800000) - 1) = 8.93427...e-4
    assert b4b_noise_std(0.4, lam, alpha, beta) == pytest.approx(1e-6 * (math.sqrt(8e5) - 1), rel=1e-12)
    assert b4b_noise_std(0.4, lam, alpha, beta) == pytest.approx(8.934271e-4, rel=1e-6)
    # round numbers: lam=0.01, alpha=1, beta=0.5, c=0.25 -> 0.01 * (10 - 1) = 0.09
    assert b4b_noise_std(0.25, 0.01, 1.0, 0.5) == pytest.approx(0.09, rel=1e-12)
    # past beta it keeps growing exponentially: c = 2 beta -> lam * ((alpha/lam)^2 - 1)
    assert b4b_noise_std(1.0, 0.01, 1.0, 0.5) == pytest.approx(0.01 * (100**2 - 1), rel=1e-12)


def test_lsh_bucket_ids_hand_chosen_hyperplanes() -> None:
    # set 0: normals e1 (bit 0) and e2 (bit 1); set 1: the same normals swapped
    planes = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])  # P=2, D=2, B=2
    reps = torch.tensor([[1.0, 1.0], [2.0, -1.0], [-1.0, 3.0], [-1.0, -1.0], [0.0, 1.0]])
    ids = lsh_bucket_ids(reps, planes)
    assert ids.dtype == torch.int64 and ids.shape == (2, 5)
    # (+,+) -> 1 + 2 = 3; (+,-) -> 1; (-,+) -> 2; (-,-) -> 0; (0,+): on plane 0 -> bit 0 off -> 2
    assert ids[0].tolist() == [3, 1, 2, 0, 2]
    assert ids[1].tolist() == [3, 2, 1, 0, 1]


def test_b4b_coverage_fills_known_buckets() -> None:
    d = B4B(n_bits=2, n_projections=1, transform="none", seed=5)
    w = d.hyperplanes(2)[0]  # D x B normals, columns
    assert d.hyperplanes(2).shape == (1, 2, 2)

    def hitting(signs: tuple[float, float]) -> torch.Tensor:  # v with sign(v . w_b) = signs[b]
        return torch.linalg.solve(w.T, torch.tensor(signs, dtype=torch.float32))[None, :]

    assert d.coverage("u") == 0.0
    d(hitting((1, 1)), _images(1), "u")
    assert d.coverage("u") == 0.25
    d(torch.cat([hitting((1, 1)), 3 * hitting((1, 1))]), _images(2), "u")  # same bucket again
    assert d.coverage("u") == 0.25
    d(hitting((-1, 1)), _images(1), "u")
    assert d.coverage("u") == 0.5
    d(torch.cat([hitting((1, -1)), hitting((-1, -1))]), _images(2), "u")
    assert d.coverage("u") == 1.0
    assert d.noise_std("u") == pytest.approx(b4b_noise_std(1.0, 1e-6, 0.8, 0.8))


def test_b4b_coverage_averages_over_projections() -> None:
    d = B4B(n_bits=1, n_projections=3, transform="none", seed=1)  # D=1: one normal per set
    d(torch.tensor([[1.0]]), _images(1), "u")  # one of 2 buckets in each of 3 sets
    assert d.coverage("u") == 0.5
    d(torch.tensor([[-2.0]]), _images(1), "u")  # the other side everywhere
    assert d.coverage("u") == 1.0


def test_b4b_center_is_subtracted_before_hashing_only() -> None:
    # D=1, one hyperplane: raw points 3 and 5 share a side; around the center 4 they do not
    plain = B4B(n_bits=1, n_projections=1, transform="none", seed=1)
    centred = B4B(n_bits=1, n_projections=1, transform="none", center=[4.0], beta=100.0, seed=1)  # ~no noise
    x = torch.tensor([[3.0], [5.0]])
    out = centred(x, _images(2), "u")
    plain(x, _images(2), "u")
    assert plain.coverage("u") == 0.5 and centred.coverage("u") == 1.0
    assert torch.allclose(out, x, atol=1e-3)  # the answer itself is not shifted (tiny noise only)
    assert centred.config()["center"] == [4.0]
    with pytest.raises(ValueError, match="center"):
        B4B(center=["a"])
    with pytest.raises(ValueError, match="center has 1 dims"):
        centred(torch.ones(1, 3), _images(1), "v")


def test_b4b_noise_std_follows_coverage_online() -> None:
    lam, alpha, beta = 1e-2, 1.0, 0.5
    d = B4B(n_bits=1, n_projections=1, transform="none", lam=lam, alpha=alpha, beta=beta, seed=0)
    x = torch.zeros(1, 20_000)  # one query: 20k noise samples of one std
    x[0, 0] = float(torch.sign(d.hyperplanes(20_000)[0, 0, 0]))  # x . w = |w_0| > 0: bucket 1
    out = d(x, _images(1), "u")
    assert d.coverage("u") == 0.5
    want = b4b_noise_std(0.5, lam, alpha, beta)  # = alpha - lam = 0.99 (coverage = beta)
    assert (out - x).std().item() == pytest.approx(want, rel=0.03)
    out = d(-x, _images(1), "u")
    assert d.coverage("u") == 1.0
    assert (out + x).std().item() == pytest.approx(b4b_noise_std(1.0, lam, alpha, beta), rel=0.03)


def test_b4b_user_isolation() -> None:
    kw = SPECS["b4b"]
    shared, fresh = B4B(**kw), B4B(**kw)
    for seed in range(4):
        shared(_reps(16, seed=seed), _images(16), "alice")
    assert shared.coverage("alice") > 0 and shared.coverage("bob") == 0.0
    bob = _reps(5, seed=9)
    torch.testing.assert_close(shared(bob, _images(5), "bob"), fresh(bob, _images(5), "bob"), rtol=0, atol=0)
    assert shared.coverage("bob") == fresh.coverage("bob") < shared.coverage("alice")


def test_b4b_transforms() -> None:
    reps = _reps(5, d=6)
    quiet = {"lam": 1e-9, "alpha": 1e-8, "n_bits": 3, "n_projections": 2, "seed": 2}  # noise ~1e-9
    plain = B4B(transform="none", **quiet)(reps, _images(5), "u")
    torch.testing.assert_close(plain, reps, atol=1e-6, rtol=0)

    affine = B4B(transform="affine", **quiet)
    a, b = affine(reps, _images(5), "alice"), affine(reps, _images(5), "bob")
    torch.testing.assert_close(torch.cdist(a, a), torch.cdist(reps, reps), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, b, atol=1e-2)  # every user has their own secret map
    q, bias = affine._secret("affine", "alice", 6)
    torch.testing.assert_close(q.T @ q, torch.eye(6), atol=1e-5, rtol=0)
    assert bias.abs().max() <= 1

    pad = B4B(transform="pad_shuffle", pad_dim=3, **quiet)
    out = pad(reps, _images(5), "u")
    assert out.shape == (5, 9) and pad.out_dim(6) == 9
    pad_values, perm = pad._secret("pad_shuffle", "u", 6)
    inverse = torch.argsort(perm)
    torch.testing.assert_close(out[:, inverse][:, :6], reps, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, inverse][:, 6:], pad_values.expand(5, -1), atol=0, rtol=0)
    assert B4B(transform="affine_pad_shuffle", **quiet)(reps, _images(5), "u").shape == (5, 12)

    binary = B4B(transform="binary", binary_factor=1.5, **quiet)
    out = binary(reps.abs(), _images(5), "u")
    assert out.shape == (5, 9) and binary.out_dim(6) == 9
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    slopes, intercepts = binary._secret("binary", "u", 6)
    assert torch.equal(slopes[-1], torch.ones(9, dtype=torch.float64))  # normal (-tan a, 1)
    want = (reps.abs().double() @ slopes > intercepts).float()
    torch.testing.assert_close(out, want, atol=0, rtol=0)


# ---------------------------------------------------------------- the other defenses


def test_noise_adds_gaussian_with_mean_and_sigma() -> None:
    reps = torch.zeros(200, 100)
    out = GaussianNoise(sigma=0.5, mean=2.0, seed=1)(reps, _images(200), "u")
    assert out.mean().item() == pytest.approx(2.0, abs=0.01)
    assert out.std().item() == pytest.approx(0.5, rel=0.02)
    assert torch.equal(GaussianNoise(sigma=0.0)(reps, _images(200), "u"), reps)


def test_similarity_noise_replaces_near_duplicates() -> None:
    x, y = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    near = torch.tensor([1.0, 1.0, 0.0])  # cos with x = 0.7071
    d = SimilarityNoise(threshold=0.6, sigma=0.5, mean=1000.0, memory=4, seed=0)
    out = d(torch.stack([x, 2 * x, y, near]), _images(4), "u")
    torch.testing.assert_close(out[0], x)  # nothing earlier
    assert (out[1] - 1000).abs().max() < 5  # cos 1 with row 0: pure N(1000, 0.25) instead
    torch.testing.assert_close(out[2], y)  # cos 0
    assert (out[3] - 1000).abs().max() < 5  # cos 0.707 > 0.6 with x
    assert d.flagged("u") == 2
    # the memory spans batches (the repo's does not: memory=0)...
    assert (d(x[None], _images(1), "u") - 1000).abs().max() < 5
    forgetful = SimilarityNoise(threshold=0.6, memory=0)
    forgetful(x[None], _images(1), "u")
    torch.testing.assert_close(forgetful(x[None], _images(1), "u"), x[None])
    # ...is per user, and the threshold is strict
    torch.testing.assert_close(d(x[None], _images(1), "v"), x[None])
    strict = SimilarityNoise(threshold=0.0)
    pair = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1e-3, 1.0]])  # cos 0 (kept), then > 0
    assert strict.similarity(pair, "w")[1].item() == 0.0
    out = strict(pair, _images(3), "w")
    torch.testing.assert_close(out[:2], pair[:2])
    assert (out[2] - 1000).abs().max() < 5


def test_similarity_noise_memory_is_bounded() -> None:
    d = SimilarityNoise(threshold=0.99, memory=3)
    basis = torch.eye(5)
    d(basis, _images(5), "u")  # orthogonal: none flagged, only the last 3 remembered
    assert d.flagged("u") == 0 and d.state_dict()["users"]["u"]["bank"].shape == (3, 5)
    torch.testing.assert_close(d(basis[:1], _images(1), "u"), basis[:1])  # e1 was forgotten
    assert (d(basis[4:], _images(1), "u") - 1000).abs().max() < 5  # e5 is remembered


def test_poison_swaps_and_tilts() -> None:
    reps = _reps(6)
    assert torch.equal(Poison(fraction=0.0, epsilon=0.0)(reps, _images(6), "u"), reps)
    swapper = Poison(fraction=1.0, epsilon=0.0, memory=4, seed=1)
    first = swapper(reps, _images(6), "u")
    for i in range(6):  # each answer is another input's representation, never its own
        matches = [j for j in range(6) if torch.equal(first[i], reps[j])]
        assert matches and i not in matches
    assert swapper.state_dict()["users"]["u"]["swapped"] == 6
    later = swapper(reps[:1] + 10, _images(1), "u")  # a single query: swapped with the memory
    memory = reps[2:]  # the last 4 of the first batch
    assert any(torch.equal(later[0], row) for row in memory)
    lone = Poison(fraction=1.0, epsilon=0.0)
    torch.testing.assert_close(lone(reps[:1], _images(1), "v"), reps[:1])  # nothing to swap with

    tilt = Poison(fraction=0.0, epsilon=0.2, seed=2)
    out = tilt(reps, _images(6), "u")
    delta = out - reps
    torch.testing.assert_close(delta.norm(dim=1), 0.2 * reps.norm(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((delta * reps).sum(dim=1), torch.zeros(6), atol=1e-5, rtol=0)
    t = tilt.direction("u", 8)
    assert ((delta / delta.norm(dim=1, keepdim=True)) @ t > 0).all()  # toward the secret t_u


# ---------------------------------------------------------------- every defense


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_shape_dtype_and_determinism(name: str) -> None:
    batches = [_reps(6, seed=s) for s in range(3)]
    a = _run(DEFENSES[name](**SPECS[name]), batches)
    b = _run(DEFENSES[name](**SPECS[name]), batches)
    c = _run(DEFENSES[name](**{**SPECS[name], "seed": 4}), batches)
    for x, y, z in zip(a, b, c):
        assert x.shape == (6, 8) and x.dtype == torch.float32
        assert torch.equal(x, y)
    assert any(not torch.equal(x, z) for x, z in zip(a, c))
    assert not all(torch.equal(x, r) for x, r in zip(a, batches))  # it does something
    double = DEFENSES[name](**SPECS[name])(batches[0].double(), _images(6), "u")
    assert double.dtype == torch.float64 and double.shape == (6, 8)
    empty = DEFENSES[name](**SPECS[name])(batches[0][:0], _images(0), "u")
    assert empty.shape == (0, 8)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_state_dict_round_trip_reproduces_later_answers(name: str) -> None:
    before, after = [_reps(6, seed=s) for s in range(3)], [_reps(6, seed=s) for s in range(10, 13)]
    original = DEFENSES[name](**SPECS[name])
    _run(original, before, "alice")
    _run(original, before[:1], "bob")
    state = _through_torch_save(original.state_dict())  # plain types and tensors only
    assert state["name"] == name and set(state["users"]) == {"alice", "bob"}
    restored = DEFENSES[name](**SPECS[name])
    restored.load_state_dict(state)
    for user in ("alice", "bob", "carol"):
        for x, y in zip(_run(original, after, user), _run(restored, after, user)):
            assert torch.equal(x, y)
    if name == "b4b":
        assert restored.coverage("alice") == original.coverage("alice") > 0

    other = DEFENSES[name](**{**SPECS[name], "seed": 99})
    with pytest.raises(ValueError, match="seed") as e:
        other.load_state_dict(state)
    assert "\n" not in str(e.value)
    another = next(n for n in sorted(DEFENSES) if n != name)
    with pytest.raises(ValueError, match="state is for defense"):
        DEFENSES[another](**SPECS[another]).load_state_dict(state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_cuda_answers_match_cpu_and_state_moves(name: str) -> None:
    batches = [_reps(6, seed=s) for s in range(3)]
    on_cpu, on_gpu = DEFENSES[name](**SPECS[name]), DEFENSES[name](**SPECS[name])
    for x, y in zip(_run(on_cpu, batches), _run(on_gpu, [b.cuda() for b in batches])):
        assert y.device.type == "cuda"
        torch.testing.assert_close(y.cpu(), x, atol=1e-4, rtol=1e-4)
    restored = DEFENSES[name](**SPECS[name])
    restored.load_state_dict(_through_torch_save(on_gpu.state_dict()))  # CUDA state -> CPU
    later = _reps(6, seed=20)
    torch.testing.assert_close(restored(later, _images(6), "u"), on_cpu(later, _images(6), "u"))


# ---------------------------------------------------------------- registry


def test_build_defenses_composes_in_order() -> None:
    specs = [{"name": "noise", "sigma": 0.1, "seed": 1}, {"name": "b4b", "transform": "none", "n_bits": 4}]
    chain = build_defenses(specs)
    assert [type(d) for d in chain] == [GaussianNoise, B4B]
    assert chain[0].config() == {"sigma": 0.1, "mean": 0.0, "seed": 1}
    reps = _reps()
    out = reps
    for d in chain:
        out = d(out, _images(6), "u")
    first, second = GaussianNoise(sigma=0.1, seed=1), B4B(transform="none", n_bits=4)
    assert torch.equal(out, second(first(reps, _images(6), "u"), _images(6), "u"))
    assert build_defenses([]) == []
    assert set(defense_params("b4b")) == {
        "lam", "alpha", "beta", "n_bits", "n_projections", "transform", "pad_dim", "binary_factor", "noise_index", "center", "seed",
    }
    assert set(TRANSFORMS) == {"none", "affine", "pad_shuffle", "affine_pad_shuffle", "binary"}


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        ([{"name": "watermark"}], "unknown defense 'watermark'; valid names: b4b, noise, poison, similarity_noise"),
        ([{"sigma": 1.0}], "has no 'name'; valid names: b4b, noise"),
        ([{"name": "noise", "std": 1.0}], "unknown parameter.*'std'.*valid: sigma=0.5, mean=0.0, seed=0"),
        ([{"name": "b4b", "lambda": 1.0}], "unknown parameter.*'lambda'.*lam=1e-06"),
        ([{"name": "b4b", "transform": "rotate"}], "transform must be one of none, affine"),
        ([{"name": "noise", "sigma": -1}], "sigma must be a number >= 0"),
        ([{"name": "similarity_noise", "threshold": 2}], r"threshold must be in \[-1, 1\]"),
        ([{"name": "poison", "fraction": 1.5}], r"fraction must be in \[0, 1\]"),
        ({"name": "noise"}, "must be a list of dicts"),
    ],
)
def test_bad_specs_fail_in_one_line(specs: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        build_defenses(specs)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- through the API


def test_end_to_end_through_victim_api(tmp_path: os.PathLike[str]) -> None:
    victim = random_victim("resnet18", in_chans=1, width=8, stem="small", image_size=16)
    ledger = QueryLedger(tmp_path / "l.sqlite")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=g) for n in (3, 4, 1)]
    clean_api = VictimAPI(victim, QueryLedger(tmp_path / "clean.sqlite"))
    chain = build_defenses([{"name": "similarity_noise"}, {"name": "b4b", "seed": 7}, {"name": "noise", "sigma": 0.1}])
    api = VictimAPI(victim, ledger, defenses=chain)
    for images in batches:
        clean = clean_api.query(images, user="mallory")
        defended = api.query(images, user="mallory")
        assert defended.shape == clean.shape == (len(images), victim.out_dim)
        assert defended.dtype == torch.float32
        assert not torch.allclose(defended, clean, atol=1e-3)
    assert ledger.spent("mallory") == 8  # every image charged, defenses or not
    assert chain[1].coverage("mallory") > 0 and chain[1].coverage("alice") == 0.0
    flagged = chain[0].flagged("mallory")
    api.query(batches[0], user="mallory")  # exact repeats: replaced by noise, still paid
    assert chain[0].flagged("mallory") == flagged + 3 and ledger.spent("mallory") == 11
