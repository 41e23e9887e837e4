"""Result files are strict JSON: undefined metrics (a kNN top-5 with fewer than 5 classes, a ratio over a
zero top-1) are written as null, never NaN, and the readers of those fields take null."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _strict(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_strict_parser_refuses_nan() -> None:  # the check below can fail
    with pytest.raises(ValueError, match="not JSON: NaN"):
        _strict(json.dumps({"top5": float("nan")}))


def test_finite_and_dumps() -> None:
    from stealer.jsonsafe import dumps, finite

    obj = {"a": [1.0, float("inf"), (np.float32("nan"), -np.float64("inf"))], "b": {"c": float("nan"), "d": 2},
           "e": "NaN", "f": True, "g": None}
    assert finite(obj) == {"a": [1.0, None, [None, None]], "b": {"c": None, "d": 2}, "e": "NaN", "f": True, "g": None}
    assert _strict(dumps(obj)) == finite(obj)


def test_three_class_probe_results_are_strict_json(tmp_path: Path) -> None:
    from conftest import tiny_steal_assets
    from launch.make_shards import main as make_shards
    from launch.probe import main as probe

    root, victim = tiny_steal_assets(tmp_path, {"animal_mnist": {"victim_train": 4, "query": 4}})
    rng = np.random.default_rng(0)
    for i in range(15):  # 3 classes, 5 images each
        d = tmp_path / "imgs" / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(d / f"{i}.png")
    assert make_shards([str(tmp_path / "imgs"), str(tmp_path / "three"), "--split", "train=9", "--split", "test=6"]) == 0
    probe([f"out_dir={tmp_path}", "name=p", "cpu=true", f"victim={victim}", "random=false", "image_size=16",
           "channels=1", f"sets=[three:{tmp_path / 'three' / 'train'}:{tmp_path / 'three' / 'test'}]", "steps=5",
           "knn_k=3", "batch_size=16"])
    lines = (tmp_path / "p" / "results.jsonl").read_text().splitlines()
    rows = [_strict(line) for line in lines]
    knn = [r for r in rows if r["probe"] == "knn"]
    assert knn and all(r["top5"] is None and 0.0 <= r["top1"] <= 1.0 for r in knn)  # 3 classes: no top-5
    # the readers take the null: the curve loader and the seed/validation readers
    from eval.curves import load_records

    recs = load_records(tmp_path / "p" / "results.jsonl", encoders=("victim",))
    assert recs and all(math.isfinite(r["top1"]) for r in recs)


def test_report_and_validation_json_strict(tmp_path: Path) -> None:
    from eval.report import build_report, write_report
    from eval.validation import choose_by_validation, write_json

    results = {"victim": {"s": {"top1": 0.0}}, "stolen": {"s": {"top1": 0.2}}, "random": {"s": {"top1": 0.1}}}
    rep = build_report(results, primary_set="s", queries_spent=10, seconds={"train": 1.0})
    assert math.isnan(rep["ratio"])  # victim top-1 of 0: the ratio is undefined in memory ...
    write_report(rep, tmp_path)
    assert _strict((tmp_path / "report.json").read_text())["ratio"] is None  # ... and null on disk
    recs = [{"lr": 0.1, "set": "val", "probe": "linear", "top1": None},  # null from a strict file
            {"lr": 0.2, "set": "val", "probe": "linear", "top1": 0.4}]
    choice = choose_by_validation(recs)
    assert choice["chosen"] == 0.2
    write_json(tmp_path / "lr_choice.json", choose_by_validation(recs[:1]))
    assert _strict((tmp_path / "lr_choice.json").read_text())["top1"] is None  # -inf: undefined, null
