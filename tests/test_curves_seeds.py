"""Honest comparisons (issue 14 item 3): seeds, seed-noise marking, lr chosen on a validation split, controls."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from eval.curves import build_tables, load_records, markdown
from eval.report import SeedStat, beyond_noise, noise_comparisons, seed_table_markdown
from eval.validation import carve_validation, choose_by_validation, sees_augmented_views
from launch.attack_curves import CurvesConfig, main, plan_rows
from stealer.config import load_config
from tests.conftest import tiny_steal_assets
from victims.ledger import QueryLedger

SIZES = {"animal_mnist": {"victim_train": 10, "query": 60, "probe_train": 60, "probe_test": 30}}


# ----------------------------------------------------------------------------- the rule, by hand
def test_seed_stat_and_noise_rule_by_hand():
    a, b = SeedStat([0.60, 0.62, 0.64]), SeedStat([0.50, 0.53, 0.56])
    assert a.mean == pytest.approx(0.62) and a.std == pytest.approx(0.02) and b.std == pytest.approx(0.03)
    # pooled std sqrt((2 * 0.02² + 2 * 0.03²) / 4) = 0.02550; |Δ| 0.09 > 2 × 0.0255 → beyond noise
    assert beyond_noise(a, b) is True
    c = SeedStat([0.58, 0.61, 0.64])  # |Δ| 0.01 vs a: within noise
    assert beyond_noise(a, c) is False
    assert beyond_noise(a, SeedStat([0.1])) is None  # one seed: no noise estimate, not judged
    # a difference of exactly 2 pooled stds is not "more than": 0.62 vs 0.58 with std 0.02 each
    assert beyond_noise(a, SeedStat([0.56, 0.58, 0.60])) is False
    pairs = noise_comparisons({"x": b, "y": a, "z": c})
    assert [(p["a"], p["b"], p["beyond_noise"]) for p in pairs] == [("y", "x", True), ("z", "x", True), ("y", "z", False)]
    md = "\n".join(seed_table_markdown({"x": {"q": b}, "y": {"q": a}, "z": {"q": c}}, ["q"]))
    assert "| y | **0.620 ± 0.020 (3)** |" in md and "| z | 0.610 ± 0.030 (3) ≈ |" in md and "| x | 0.530 ± 0.030 (3) |" in md
    assert "beyond noise: y > x (Δ 0.090); z > x (Δ 0.080). Within noise: 1 pairs." in md


def test_curve_cells_aggregate_seeds_and_mark_noise(tmp_path):
    recs = [{"attack": "a", "queries": 100, "set": "s", "top1": v, "seed": i} for i, v in enumerate([0.60, 0.62, 0.64])]
    recs += [{"attack": "b", "queries": 100, "set": "s", "top1": v, "seed": i} for i, v in enumerate([0.50, 0.53, 0.56])]
    recs += [{"encoder": "victim", "set": "s", "top1": 0.80}, {"encoder": "control_teacher", "set": "s", "top1": 0.40}]
    recs += [{"encoder": f"random_{i}", "set": "s", "top1": v} for i, v in enumerate([0.30, 0.40])]
    recs += [{"encoder": "random", "set": "s", "top1": 0.35}]  # the probe's mean: replaced by the seeds
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (t,) = build_tables(load_records(path))
    assert t.references["random"].values == [0.30, 0.40] and t.references["victim_random"].values == [0.40]
    md = markdown([t])
    assert "| a | 0.620 ± 0.020 (3) |" in md and "| random-init victim arch (reference) | 0.400 |" in md
    assert "- 100 queries: beyond noise: a > b (Δ 0.090)" in md
    # gain recovered per seed vs random init (0.35): (0.60 − 0.35) / 0.45 = 0.556 ... mean 0.600
    assert "| a | 0.600 ± 0.044 (3) |" in md


# ----------------------------------------------------------------------------- validation split and lr choice
def test_validation_split_is_carved_after_train_limit_and_choice_never_reads_test(tmp_path):
    from stealer.query_select import read_pool

    root, _ = tiny_steal_assets(tmp_path, SIZES)
    train = root / "data" / "animal_mnist" / "probe_train"
    test = root / "data" / "animal_mnist" / "probe_test"
    m = carve_validation(train, tmp_path / "val", skip=40, n=15)
    pool, val = read_pool(train), read_pool(tmp_path / "val")
    assert val["keys"] == pool["keys"][40:55]  # the images after the probe's first 40, in the reader's order
    assert not set(val["keys"]) & set(pool["keys"][:40]) and not set(val["keys"]) & set(read_pool(test)["keys"])
    assert m["validation"]["kept"] == 15
    assert carve_validation(train, tmp_path / "val", skip=40, n=15)["validation"] == m["validation"]  # reused
    with pytest.raises(ValueError, match="none after the probe's first 60"):
        carve_validation(train, tmp_path / "val2", skip=60, n=5)
    recs = [{"lr": 0.3, "set": "val", "top1": 0.5}, {"lr": 1.0, "set": "val", "top1": 0.7},
            {"lr": 3.0, "set": "val", "top1": 0.7}, {"lr": 9.0, "set": "val", "top1": math.nan},
            {"lr": 0.3, "set": "val", "probe": "knn", "top1": 0.99}]
    c = choose_by_validation(recs)
    assert c["chosen"] == 1.0 and c["top1"] == 0.7 and len(c["candidates"]) == 4  # tie → the first; knn not read
    with pytest.raises(ValueError, match="read a 'animal' record"):
        choose_by_validation(recs + [{"lr": 5.0, "set": "animal", "top1": 0.9}])
    assert sees_augmented_views("direct", False) is False and sees_augmented_views("direct", True)
    assert all(sees_augmented_views(a, False) for a in ("stolenencoder", "contsteal", "rda", "head_recreation"))


# ----------------------------------------------------------------------------- end to end, tiny
@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root, victim = tiny_steal_assets(tmp_path_factory.mktemp("seeds"), SIZES)
    data = root / "data" / "animal_mnist"
    steal = root / "steal.yaml"
    steal.write_text(yaml.safe_dump({
        "cpu": True, "data": {"query": str(data / "query"), "image_size": 16, "channels": 1},
        "victim": {"checkpoint": str(victim)}, "query": {"batch_size": 60},
        "student": {"arch": "resnet18", "width": 4, "stem": "small"},
        "train": {"batch_size": 20, "epochs": 1, "warmup_epochs": 0, "ckpt_every": 100, "lr": 0.5}}))
    probe = root / "probe.yaml"
    probe.write_text(yaml.safe_dump({"cpu": True, "steps": 10, "knn_k": 3, "image_size": 16, "channels": 1,
                                     "train_limit": 40, "sets": [f"animal:{data / 'probe_train'}:{data / 'probe_test'}"]}))
    cfg = root / "curves.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "s", "out_dir": str(root / "out"), "steal_config": str(steal), "probe_config": str(probe),
        "budgets": [40], "train_steps": 2, "registry": False, "random_seeds": 2, "threads": 1, "seeds": [0, 1],
        "controls": True, "n_val": 20,
        "attacks": [{"name": "se", "args": ["attack.name=stolenencoder", "attack.k=1"], "lr_grid": [0.05, 2.0]}]}))
    return root, cfg


def test_plan_seeds_controls_and_lr_rows(seeded):
    root, cfg = seeded
    c = load_config(CurvesConfig, cfg)
    sel = plan_rows(c, select=True)
    assert [(r.label, r.lr, r.seed, r.budget) for r in sel] == [("se", 0.05, 0, 40), ("se", 2.0, 0, 40)]
    rows = plan_rows(c, {"se": 2.0})
    assert [(r.label, r.seed, r.control) for r in rows] == [
        ("se", 0, False), ("se", 1, False), ("se+random_teacher", 0, True), ("se+random_teacher", 1, True)]
    assert rows[0].tag == sel[1].tag  # the chosen candidate is reused as the (budget, first seed) cell
    for r in rows:
        assert "train.lr=2.0" in r.steal_argv and f"seed={r.seed}" in r.steal_argv
        assert ("victim.random_init=true" in r.steal_argv) == r.control
    direct = load_config(CurvesConfig, cfg, ["attacks=[{name: d, args: [attack.name=direct, train.augment=false]}]"])
    assert [r.label for r in plan_rows(direct)] == ["d", "d"]  # plain direct: the student sees no augmented view


def test_seeded_curves_choose_lr_on_validation_and_run_controls(seeded):
    root, cfg = seeded
    out = root / "out" / "s"
    s = main(["--config", str(cfg)])
    choice = json.loads((out / "lr_choice.json").read_text())["se"]
    assert {x["lr"] for x in choice["candidates"]} == {0.05, 2.0} and choice["validation"].endswith("animal_after40_n20")
    val = [json.loads(ln) for r in sorted((out / "runs").glob("s_se_lr*_q40")) for ln in (r / "val_records.jsonl").read_text().splitlines()]
    assert val and {v["set"] for v in val} == {"val"}  # selection read the carved split only
    best = max((v for v in val if v["probe"] == "linear"), key=lambda v: v["top1"])
    assert choice["chosen"] == best["lr"]
    assert s["rows"] == 4 and s["stolen"] == 5  # 2 candidates (one reused as seed 0) + seed 1 + 2 controls
    recs = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    stolen = [r for r in recs if r["encoder"] == "stolen" and r["probe"] == "linear"]
    assert sorted((r["attack"], r["seed"], r["lr"]) for r in stolen) == [
        ("se", 0, choice["chosen"]), ("se", 1, choice["chosen"]),
        ("se+random_teacher", 0, choice["chosen"]), ("se+random_teacher", 1, choice["chosen"])]
    assert {r["set"] for r in stolen} == {"animal"}  # the report reads the test split
    for r in stolen:  # the control's ledger was charged like the attack's; its victim was the random-init one
        assert QueryLedger(Path(r["run"]) / "victim_state" / "ledger.sqlite").spent("attacker") == 40
        cfg_run = yaml.safe_load((Path(r["run"]) / "config.yaml").read_text())
        assert cfg_run["victim"]["random_init"] is r["control"] and cfg_run["seed"] == r["seed"]
    md = (out / "curves.md").read_text()
    assert "| se | " in md and " (2) |" in md and "| se+random_teacher |" in md
    assert "Learning rates chosen on the validation split" in md and "random-init victim arch (reference)" in md
    again = main(["--config", str(cfg)])  # every cell cached: nothing stolen or probed again
    assert again["stolen"] == 0 and again["probed"] == 0


@pytest.mark.parametrize("name,rows,select", [("curves_seeds.yaml", 60, 12), ("curves_attacks_seeds.yaml", 90, 18)])
def test_shipped_seeded_configs_plan(name, rows, select):
    repo = Path(__file__).resolve().parents[1]
    c = load_config(CurvesConfig, repo / "launch" / "configs" / name)
    planned = plan_rows(c)
    assert len(planned) == rows and len(plan_rows(c, select=True)) == select and c.seed_list == [0, 1, 2]
    assert {r.budget for r in planned} >= {160, 800}  # 1/25 and 1/5 of the victim's 4,000 training images
    assert all(r.images * r.per_image <= r.budget for r in planned)
