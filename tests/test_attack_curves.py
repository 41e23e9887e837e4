"""The accuracy-vs-queries command on tiny real data: 2 attack rows x 2 budgets, ledger, report, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from launch.attack_curves import CurvesConfig, main, plan_rows, registered_attacks
from stealer.config import ConfigError, load_config
from victims.ledger import QueryLedger

SIZES = {"animal_mnist": {"victim_train": 10, "query": 120, "probe_train": 100, "probe_test": 60},
         "digits": {"probe_train": 10, "probe_test": 10}}
SECOND = "head_recreation" if "head_recreation" in registered_attacks() else "direct"  # 2 queries per image


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from stealer.shards import build_default_data
    from victims.simsiam import SimSiam, save_simsiam_checkpoint

    root = tmp_path_factory.mktemp("curves")
    data = root / "data"
    build_default_data(data, seed=0, image_size=16, sizes=SIZES)
    torch.manual_seed(0)
    victim = root / "victim.pth.tar"
    save_simsiam_checkpoint(SimSiam("resnet18", dim=32, pred_dim=16, in_chans=1, width=8, stem="small"), victim, epoch=0,
                            arch="resnet18", extra={"in_chans": 1, "width": 8, "stem": "small", "image_size": 16,
                                                    "mean": [0.5], "std": [0.25]})
    steal = root / "steal.yaml"
    steal.write_text(yaml.safe_dump({
        "cpu": True, "data": {"query": str(data / "animal_mnist" / "query"), "image_size": 16, "channels": 1},
        "victim": {"checkpoint": str(victim)}, "query": {"batch_size": 60},
        "student": {"arch": "resnet18", "width": 8, "stem": "small"},
        "train": {"batch_size": 32, "epochs": 1, "warmup_epochs": 0, "ckpt_every": 100, "lr": 0.5}}))
    probe = root / "probe.yaml"
    probe.write_text(yaml.safe_dump({"cpu": True, "steps": 20, "knn_k": 5, "image_size": 16, "channels": 1,
                                     "sets": [f"animal:{data / 'animal_mnist' / 'probe_train'}:{data / 'animal_mnist' / 'probe_test'}"]}))
    cfg = root / "curves.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "tiny", "out_dir": str(root / "out"), "steal_config": str(steal), "probe_config": str(probe),
        "budgets": [40, 80], "train_steps": 3, "registry": False, "random_seeds": 1, "threads": 1,
        "attacks": [{"name": "infonce", "args": ["train.loss=infonce"]},
                    {"name": "second", "args": [f"attack.name={SECOND}", "train.loss=mse"],
                     "queries": {"strategy": "class_balanced"}}]}))
    return root, cfg


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]


def test_curves_rows_ledger_report_and_resume(setup):
    root, cfg = setup
    out = root / "out" / "tiny"
    s = main(["--config", str(cfg)])
    assert s["rows"] == 4 and s["stolen"] == 4 and s["probed"] == 1
    per_image = 2 if SECOND == "head_recreation" else 1
    recs = _records(out)
    stolen = [r for r in recs if r["encoder"] == "stolen"]
    assert {(r["attack"], r["queries"], r["probe"]) for r in stolen} == {
        (a, q, p) for a in ("infonce", "second") for q in (40, 80) for p in ("linear", "knn")}
    for r in stolen:
        assert r["budget"] == r["queries"] and 0 <= r["top1"] <= 1 and r["set"] == "animal"
        run = Path(r["run"])
        # the victim's own ledger charged this steal exactly its budget: images x queries per image
        assert QueryLedger(run / "victim_state" / "ledger.sqlite").spent("attacker") == r["budget"]
        n_img = json.loads((run / "steal.json").read_text())["train"]["samples"]
        assert n_img == r["images"] == r["budget"] // (per_image if r["attack"] == "second" else 1)
    bal = [r for r in stolen if r["attack"] == "second" and r["queries"] == 40][0]
    sel = json.loads((Path(bal["query_set"]) / "manifest.json").read_text())["selection"]
    assert sel["strategy"] == "class_balanced" and sorted(sel["class_counts"].values()) == [bal["images"] // 10] * 10
    # references: the victim, each random-init student seed and the random-init copy of the victim's architecture
    assert {r["encoder"] for r in recs} == {"stolen", "victim", "random_0", "control_teacher"}
    md = (out / "curves.md").read_text()
    assert "| random-init victim arch (reference) |" in md and "| random init (reference) |" in md
    assert "| infonce |" in md and "| second |" in md and "victim (reference)" in md and "| 40 | 80 |" in md
    assert (out / "accuracy_vs_queries_animal_linear.png").stat().st_size > 1000
    assert (out / "attack_second_animal_linear.png").is_file() and "second,none,40" in (out / "curves.csv").read_text()

    again = main(["--config", str(cfg)])  # everything finished: nothing stolen, nothing probed
    assert again["stolen"] == 0 and again["probed"] == 0 and _records(out) == recs
    assert all(v == {"steal": "done before"} for v in again["status"].values())

    one = out / "runs" / "tiny_infonce_q80" / "curve_records.jsonl"
    one.unlink()  # a row whose probe was lost is probed again, and only it; its steal is kept
    third = main(["--config", str(cfg)])
    assert third["stolen"] == 0 and third["probed"] == 1 and one.is_file()
    def key(rs):  # what the report reads (timings differ between runs)
        return sorted((r["encoder"], r.get("attack", ""), r.get("queries", 0), r["probe"], round(r["top1"], 6)) for r in rs)

    assert key(_records(out)) == key(recs)


def test_rows_fail_early_naming_the_row_or_the_file(setup, capsys):
    root, cfg = setup
    base = yaml.safe_load(cfg.read_text())
    rows = plan_rows(load_config(CurvesConfig, cfg, ["out_dir=" + str(root / "plan")]))
    assert [(r.label, r.budget, r.images) for r in rows] == [
        ("infonce", 40, 40), ("infonce", 80, 80), ("second", 40, 40 // (2 if SECOND == "head_recreation" else 1)),
        ("second", 80, 80 // (2 if SECOND == "head_recreation" else 1))]
    with pytest.raises(ConfigError, match=r"attack row 'infonce' at budget 40: unknown config key 'train.lossy'"):
        plan_rows(load_config(CurvesConfig, cfg, ["attacks=[{name: infonce, args: [train.lossy=mse]}]"]))
    with pytest.raises(ConfigError, match="budgets=\\[\\] is not valid"):
        load_config(CurvesConfig, cfg, ["budgets=[]"])
    bad = root / "bad.yaml"
    bad.write_text(yaml.safe_dump({**base, "out_dir": str(root / "bad"),
                                   "steal_args": [f"victim.checkpoint={root / 'missing.pth.tar'}"]}))
    with pytest.raises(SystemExit):
        main(["--config", str(bad)])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: victim checkpoint {root / 'missing.pth.tar'} (victim.checkpoint) does not exist")
    assert not (root / "bad").exists()  # nothing was started
    with pytest.raises(SystemExit):
        main(["--config", str(cfg), "budgets=[40,500]", f"out_dir={root / 'bad'}"])
    assert "needs 500 query images but" in capsys.readouterr().err
