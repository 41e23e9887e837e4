"""The defense x attack table on tiny real data, the similarity calibration, and describe() after B4B."""
from __future__ import annotations

import csv
import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from stealer.config import ConfigError, load_config

SIZES = {"animal_mnist": {"victim_train": 256, "query": 240, "probe_train": 48, "probe_test": 48},
         "digits": {"probe_train": 48, "probe_test": 32}}
VICTIM = ["image_size=16", "model.width=8", "model.dim=32", "model.pred_dim=16", "batch_size=64", "lr=0.5"]


@pytest.mark.parametrize("transform,dim", [("affine", 64), ("pad_shuffle", 128), ("affine_pad_shuffle", 128), ("binary", 128)])
def test_describe_reports_the_dim_after_b4b(tmp_path, transform, dim):
    from victims.api import VictimAPI
    from victims.defenses import B4B
    from victims.ledger import QueryLedger
    from victims.simsiam import random_victim

    enc = random_victim("resnet18", in_chans=1, width=8, stem="small", image_size=16)  # 64-dim features
    api = VictimAPI(enc, QueryLedger(tmp_path / "l.sqlite"), defenses=[B4B(transform=transform, seed=1)])
    x = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    assert api.describe()["out_dim"] == api.out_dim == dim == api.query(x, "u").shape[1]
    assert api.query(x[:0], "u").shape == (0, dim)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from launch.common import make_accelerator
    from stealer.pretrain import VictimTrainConfig, train_simsiam_victim
    from stealer.shards import build_default_data

    root = tmp_path_factory.mktemp("table")
    build_default_data(root / "data", image_size=16, sizes=SIZES)
    victim = train_simsiam_victim(load_config(VictimTrainConfig, None, VICTIM + [
        f"out_dir={root}", "name=v", f"train_data={root}/data/animal_mnist/victim_train", "epochs=2"]),
        make_accelerator(cpu=True))
    return root, victim


def test_similarity_threshold_calibration_flags_the_stated_share(tiny):
    from eval.features import extract_features
    from stealer.data import ShardStream, open_shards
    from victims.defenses import SimilarityNoise
    from victims.defenses.calibrate import similarity_threshold
    from victims.simsiam import load_victim_encoder

    root, victim = tiny
    enc = load_victim_encoder(victim)
    shards = f"{root}/data/animal_mnist/victim_train"
    thr = similarity_threshold(extract_features(enc, shards, channels=1, image_size=16, limit=200)[0], 0.9)
    assert 0 < thr < 1
    images = next(ShardStream(open_shards(shards), batch_size=200, shuffle=False, channels=1, image_size=16,
                              limit=200).iter_epoch(0))["image"]
    d = SimilarityNoise(threshold=thr, seed=0)
    for i in range(0, 200, 50):  # a user streaming the same images in batches is flagged ~10% of the time
        d(enc(images[i:i + 50]), images[i:i + 50], "u")
    assert abs(d.flagged("u") - 0.1 * 199) <= 3


def test_calibration_maths_by_hand():
    """s_i = max_{j<i} cos(f_i, f_j) over the stream; the centre is the mean; 'calibrate' only where it can be fitted."""
    from victims.defenses import build_defenses
    from victims.defenses.calibrate import calibrate_chain, mean_center, placeholder_chain, similarity_threshold

    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    # s = [cos(r1, r0), max(cos(r2, r0), cos(r2, r1)), max(cos(r3, .))] = [1/sqrt2, 1/sqrt2, 0]
    assert similarity_threshold(f, 1.0) == pytest.approx(1 / math.sqrt(2))
    assert similarity_threshold(f, 0.5) == pytest.approx(1 / math.sqrt(2))  # median of [0, .707, .707]
    assert similarity_threshold(f, 0.25) == pytest.approx(0.5 / math.sqrt(2))  # linear between 0 and .707
    assert mean_center(f) == pytest.approx([0.25, 0.5])
    calls = []

    def feats():
        calls.append(1)
        return f

    chain = [{"name": "similarity_noise", "threshold": "calibrate"}, {"name": "b4b", "center": "calibrate", "n_bits": 5}]
    specs, fitted = calibrate_chain(chain, feats, quantile=1.0)
    assert specs[0]["threshold"] == pytest.approx(1 / math.sqrt(2)) and specs[1]["center"] == pytest.approx([0.25, 0.5])
    assert fitted == {"threshold": specs[0]["threshold"], "center": specs[1]["center"]} and chain[0]["threshold"] == "calibrate"
    assert calibrate_chain([{"name": "noise", "sigma": 0.5}], feats, quantile=0.9) == ([{"name": "noise", "sigma": 0.5}], {})
    assert len(calls) == 2  # one read per fitted value, none for a chain without 'calibrate'
    build_defenses(placeholder_chain(chain))  # a chain with 'calibrate' is checked before any data are read
    with pytest.raises(ValueError, match="sigma=calibrate cannot be fitted; only b4b.center, similarity_noise.threshold"):
        placeholder_chain([{"name": "noise", "sigma": "calibrate"}])
    with pytest.raises(ValueError, match="needs >= 2 representations"):
        similarity_threshold(f[:1], 0.9)


def _argv(root, victim, out):
    d = f"{root}/data"
    return [f"out_dir={out}", "name=t", "budget=120", f"victim={victim}", "image_size=16",
            "defenses={none: [], noise: [{name: noise, sigma: 0.5}], b4b: [{name: b4b, beta: 0.01, seed: 3}], "
            "similarity_noise: [{name: similarity_noise, threshold: calibrate}]}",
            "attacks=[direct,repeat_average,coverage_control,sybils]", "attack.repeats=2", "attack.sybils=2",
            "attack.overlap=30",
            f"steal={{data.query: {d}/animal_mnist/query, student.width: 8, train.epochs: 1, train.batch_size: 64, "
            f"query.batch_size: 50}}",
            f"probe.train={d}/animal_mnist/probe_train", f"probe.test={d}/animal_mnist/probe_test", "probe.n_train=null",
            "probe.steps=30", f"honest.train={d}/digits/probe_train", f"honest.test={d}/digits/probe_test",
            "honest.n_train=40", "honest.n_test=24", "honest.steps=30", f"calibration.data={d}/animal_mnist/victim_train",
            "calibration.n=120", f"watermark.victim={out}/t/victim_wm/checkpoint.pth.tar", "watermark.victim_config=",
            "watermark.random_nulls=2",
            f"watermark.victim_overrides=[{','.join(VICTIM)},train_data={d}/animal_mnist/victim_train,epochs=2,"
            f"watermark.size=64,watermark.batch_size=8,seed=1]"]


def test_table_one_command_end_to_end_and_rerun_pays_nothing(tiny, tmp_path, capsys):
    pytest.importorskip("stealer.query_select", reason="coverage_control needs stealer/query_select.py")
    from launch.defense_table import main
    from victims.ledger import QueryLedger

    root, victim = tiny
    main(_argv(root, victim, tmp_path))
    out = tmp_path / "t"
    for f in ("defense_table.md", "defense_table.csv", "utility_vs_stolen.png", "results.jsonl"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    rows = list(csv.DictReader((out / "defense_table.csv").open()))
    assert {(r["defense"], r["attack"]) for r in rows} == {
        (d, a) for d in ("none", "noise", "b4b", "similarity_noise", "watermark")
        for a in ("direct", "repeat_average", "coverage_control", "sybils")}
    assert all(int(r["queries_spent"]) == 120 for r in rows)  # every attack spends exactly the budget
    distinct = {r["attack"]: int(r["distinct_images"]) for r in rows if r["defense"] == "none"}
    assert distinct == {"direct": 120, "repeat_average": 60, "coverage_control": 120, "sybils": 90}
    # coverage control: the narrowest half of the 240-image pool (spread 0), not a broad subset
    sel = json.loads((out / "selections" / "coverage_120_s0" / "manifest.json").read_text())["selection"]
    assert (sel["n"], sel["source_samples"], sel["spread"]) == (120, 240, 0.0)
    by = {(r["defense"], r["attack"]): r for r in rows}
    for r in rows:
        assert 0 <= float(r["stolen_top1"]) <= 1 and 0 <= float(r["honest_top1"]) <= 1
    # perturbation: 0 undefended; Gaussian noise of sigma 0.5 in D = 64 dims has E||n|| ~ 0.5 * sqrt(64 - 1/2)
    assert float(by["none", "direct"]["perturbation_l2"]) == 0.0
    assert float(by["noise", "direct"]["perturbation_l2"]) == pytest.approx(0.5 * math.sqrt(63.5), rel=0.1)
    # B4B reports coverage for the attacker and the honest user; other rows do not
    assert float(by["b4b", "direct"]["attacker_coverage"]) > 0 and float(by["b4b", "direct"]["honest_coverage"]) > 0
    assert by["noise", "direct"]["attacker_coverage"] == ""
    assert by["watermark", "direct"]["wm_p_binomial"] != "" and by["none", "direct"]["wm_p_binomial"] == ""
    md = (out / "defense_table.md").read_text()
    assert "## Watermark verification" in md and "similarity_noise threshold calibrated" in md
    # every query was charged on the defense's ledger, per account
    ledger = QueryLedger(out / "b4b" / "ledger.sqlite")
    assert ledger.spent("attacker-direct") == 120 and ledger.spent("attacker-repeat_average") == 120
    assert ledger.spent("attacker-sybils-sybil0") + ledger.spent("attacker-sybils-sybil1") == 120
    assert ledger.spent("honest") == 64
    # a rerun pays for nothing and reproduces the table
    before = (out / "defense_table.csv").read_text()
    main(_argv(root, victim, tmp_path))
    assert QueryLedger(out / "b4b" / "ledger.sqlite").spent("attacker-direct") == 120
    assert (out / "defense_table.csv").read_text() == before
    summary = json.loads((out / "results.jsonl").read_text().splitlines()[-1])["summary"]
    assert summary["watermark"]["null_leave_one_out_false_positives"] is not None


@pytest.mark.parametrize("override,match", [
    ("attacks=[direct,steal_all]", "attacks entry 'steal_all' is not valid"),
    ("defenses={noise: [{name: noise}]}", "must include the undefended row 'none: \\[\\]'"),
    ("defenses={none: [], watermark: []}", "reserved for the watermarked victim"),
    ("defenses={none: [noise]}", "defenses.none must be a list"),
    ("attack.overlap=800", "leaves no image outside the sybil overlap"),
    ("attack.coverage_fraction=1.0", "attack.coverage_fraction=1.0 must be in \\(0, 1\\)"),
])
def test_config_errors_name_the_key(override, match):
    from launch.defense_table import DefenseTableConfig

    with pytest.raises(ConfigError, match=match):
        load_config(DefenseTableConfig, None, [override])


def test_unknown_defense_fails_in_one_line(tiny, tmp_path, capsys):
    from launch.defense_table import main

    root, victim = tiny
    with pytest.raises(SystemExit):
        main([f"out_dir={tmp_path}", f"victim={victim}", "defenses={none: [], x: [{name: nois}]}", "watermark.enabled=false"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown defense 'nois'") and "\n" not in err


@pytest.mark.parametrize("name", ["defense_table.yaml", "defense_table_b4b.yaml"])
def test_shipped_configs_load_and_every_chain_builds(name):
    from launch.defense_table import DefenseTableConfig
    from stealer.config import load_config
    from victims.defenses import build_defenses
    from victims.defenses.calibrate import placeholder_chain

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(DefenseTableConfig, repo / "launch" / "configs" / name, [])
    assert cfg.budget == 3000 and "none" in cfg.defenses
    for chain in cfg.defenses.values():  # 'calibrate' values are filled from the victim at run time
        build_defenses(placeholder_chain(chain))
    assert any(d.get("n_bits") == 5 and d.get("center") == "calibrate" for c in cfg.defenses.values() for d in c)


def test_table_per_seed_then_mean_std_and_noise(tiny, tmp_path, capsys):
    """seeds=[0,1]: the table runs once per seed (steal seed differs, cells cached per seed), and the seed table
    reads each cell as the mean ± sample std of the per-seed results."""
    import statistics

    import yaml

    from launch.defense_table import main

    root, victim = tiny
    d = f"{root}/data"
    argv = [f"out_dir={tmp_path}", "name=s", "budget=60", f"victim={victim}", "image_size=16", "seeds=[0,1]",
            "defenses={none: [], noise: [{name: noise, sigma: 0.5}]}", "attacks=[direct]", "watermark.enabled=false",
            f"steal={{data.query: {d}/animal_mnist/query, student.width: 8, train.epochs: 1, train.batch_size: 30, "
            f"query.batch_size: 60}}",
            f"probe.train={d}/animal_mnist/probe_train", f"probe.test={d}/animal_mnist/probe_test", "probe.n_train=null",
            "probe.steps=20", f"honest.train={d}/digits/probe_train", f"honest.test={d}/digits/probe_test",
            "honest.n_train=40", "honest.n_test=24", "honest.steps=20", f"calibration.data={d}/animal_mnist/victim_train",
            "calibration.n=60"]
    rows = main(argv)
    wrote = capsys.readouterr().out.strip().splitlines()[-1]  # the files it wrote: per seed, then the seed table
    assert f"{tmp_path}/s/seed1/defense_table.md" in wrote and wrote.endswith(f"{tmp_path}/s/defense_table_seeds.md")
    assert sorted((r["seed"], r["defense"]) for r in rows) == [(0, "noise"), (0, "none"), (1, "noise"), (1, "none")]
    out = tmp_path / "s"
    for s in (0, 1):  # each seed is a full table run with the steal at that seed
        assert yaml.safe_load((out / f"seed{s}" / "config.yaml").read_text())["seed"] == s  # its cells steal at seed s
        assert (out / f"seed{s}" / "defense_table.md").is_file()
    a = [r["stolen_top1"] for r in rows if r["defense"] == "noise"]
    md = (out / "defense_table_seeds.md").read_text()
    cell = f"{100 * statistics.mean(a):.1f} ± {100 * statistics.stdev(a):.1f} (2)"
    assert f"| noise | {cell}" in md or f"| noise | **{cell}**" in md
    assert "Seed noise: a difference exceeds seed noise when |Δ mean| > 2 × the pooled sample std" in md
    assert "- `direct`: beyond noise:" in md
    again = main(argv)  # every cell cached per seed: the same results
    assert sorted(r["stolen_top1"] for r in again) == sorted(r["stolen_top1"] for r in rows)


def _small_argv(root, victim, out, *extra):
    d = f"{root}/data"
    return [f"out_dir={out}", "name=g", "budget=60", f"victim={victim}", "image_size=16", "attacks=[direct]",
            "watermark.enabled=false", f"probe.train={d}/animal_mnist/probe_train", f"probe.test={d}/animal_mnist/probe_test",
            "probe.n_train=null", "probe.steps=20", f"honest.train={d}/digits/probe_train", f"honest.test={d}/digits/probe_test",
            "honest.n_train=40", "honest.n_test=24", "honest.steps=20", f"calibration.data={d}/animal_mnist/victim_train",
            "calibration.n=60", *extra]


def test_identity_geometry_decodes_as_before(tiny, tmp_path):
    """The project's own victim (no resize/crop): the rows decode with the stream's own decode (decoder None), so the
    honest and calibration images are those the table read before it followed the query phase's decode."""
    from stealer.defense_table import DefenseRow, DefenseTableConfig, load_table_victim

    root, victim = tiny
    cfg = load_config(DefenseTableConfig, None, _small_argv(root, victim, tmp_path))
    enc = load_table_victim(cfg, victim)
    assert not enc.preprocessing.exact_geometry and DefenseRow(cfg, "none", victim, enc, []).decoder is None


def test_victim_geometry_is_honoured_by_honest_user_and_calibration(tiny, tmp_path):
    """steal={victim.resize: 20, victim.crop: 18}: the query phase decodes every image with the victim's exact
    Resize 20 + CenterCrop 18; the honest user's images and the calibration stream must be decoded the same way
    (not at image_size 16 and resized on arrival, which gives other answers)."""
    from eval.features import extract_features
    from eval.defense_probe import encode, load_images
    from launch.defense_table import main
    from victims.defenses.calibrate import similarity_threshold
    from victims.preprocess import ExactDecode
    from victims.safe_load import load_untrusted
    from victims.simsiam import load_victim_encoder

    root, victim = tiny
    d = f"{root}/data"
    main(_small_argv(root, victim, tmp_path, "defenses={none: [], sim: [{name: similarity_noise, threshold: calibrate}]}",
                     f"steal={{data.query: {d}/animal_mnist/query, student.width: 8, train.epochs: 1, train.batch_size: 30, "
                     f"query.batch_size: 60, victim.resize: 20, victim.crop: 18}}"))
    out = tmp_path / "g"
    # the steal's query phase answered on the victim's geometry (recorded in its cache)
    pre = json.loads((out / "none" / "direct" / "cache" / "cache.json").read_text())["victim_preprocess"]
    assert (pre["resize"], pre["crop"]) == (20, 18)
    enc = load_victim_encoder(victim, resize=20, crop=18)
    exact = ExactDecode(1, 20, 18)
    kw = dict(channels=1, image_size=16)
    xtr = load_images(f"{d}/digits/probe_train", 40, decoder=exact, **kw)[0]
    xte = load_images(f"{d}/digits/probe_test", 24, decoder=exact, **kw)[0]
    assert xtr.shape[-2:] == (18, 18)
    answers = load_untrusted(out / "none" / "honest" / "answers.pt")
    assert torch.equal(answers, encode(enc, torch.cat([xtr, xte])))
    square = torch.cat([load_images(f"{d}/digits/probe_train", 40, **kw)[0], load_images(f"{d}/digits/probe_test", 24, **kw)[0]])
    assert not torch.allclose(answers, encode(enc, square), atol=1e-4)  # the old decode gives other answers
    summary = json.loads((out / "results.jsonl").read_text().splitlines()[-1])["summary"]
    own = f"{d}/animal_mnist/victim_train"
    want = similarity_threshold(extract_features(enc, own, limit=60, decoder=exact, **kw)[0], 0.99)
    assert summary["similarity_threshold"] == pytest.approx(want, abs=1e-9)
    assert summary["similarity_threshold"] != pytest.approx(similarity_threshold(extract_features(enc, own, limit=60, **kw)[0], 0.99), abs=1e-6)


class Opaque:  # a pickled global a safe load refuses
    pass


def test_refused_pickle_in_a_row_state_is_one_line(tiny, tmp_path, capsys):
    from launch.defense_table import main

    root, victim = tiny
    bad = tmp_path / "g" / "none" / "defense_state.pt"
    bad.parent.mkdir(parents=True)
    torch.save([Opaque()], bad)
    with pytest.raises(pickle.UnpicklingError):  # the pickle really is refused by a safe load
        torch.load(bad, weights_only=True)
    with pytest.raises(SystemExit):
        main(_small_argv(root, victim, tmp_path, "defenses={none: []}"))
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "\x1b" not in err, err
    assert err.startswith(f"error: defense state {bad} holds a pickled Python object ({Opaque.__module__}.Opaque)"), err
    assert not (tmp_path / "g" / "none" / "ledger.sqlite").exists()  # refused before any account was opened
