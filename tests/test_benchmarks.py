"""Every script under benchmarks/ runs end to end at a tiny size and prints its ratios.

Timings are never asserted; what is checked is that each script finishes, measures what it says
(positive rates, both sides of each ratio) and that its correctness checks hold (the parallel
folder converter writes the same bytes as one worker).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _stdout(script: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p.stdout


def _run(script: str, *args: str, timeout: int = 300) -> tuple[dict, str]:
    out = _stdout(script, *args, timeout=timeout)
    start = out.index("{")  # the JSON block the script prints first, then its ratio lines
    end = out.index("\n}", start) + 2
    return json.loads(out[start:end]), out[end:]


def test_steal_step_benchmark():
    out, text = _run("steal_step.py", "--width", "8", "--batch", "16", "--steps", "2", "--warmup", "1",
                     "--queries", "64", "--epoch-repeats", "2", "--cpu")
    for k in ("steal_step_s", "plain_step_s", "online_step_s", "query_phase_img_s", "plain_inference_img_s"):
        assert out[k] > 0, k
    assert out["steal_step_ratio"] == pytest.approx(out["steal_step_s"] / out["plain_step_s"], rel=0.01)
    assert "steal step / plain supervised step" in text and "query phase / plain inference" in text
    # the train-epoch section: two cached-answer runs and two plain runs, both sides measured
    assert len(out["train_run_cpu_s"]) == len(out["plain_run_cpu_s"]) == 2
    assert all(t > 0 for t in out["train_run_cpu_s"] + out["plain_run_cpu_s"] + out["train_run_wall_s"] + out["plain_run_wall_s"])
    for key in ("train_epoch_ratio",):
        for clock in ("wall", "cpu"):
            lo, hi = out[f"{key}_{clock}_spread"]
            assert 0 < lo <= out[f"{key}_{clock}"] <= hi, (key, clock)
    assert out["train_epoch_ratio_cpu_fastest"] == pytest.approx(min(out["train_run_cpu_s"]) / min(out["plain_run_cpu_s"]), rel=0.01)
    assert "cached-answer train run / plain supervised run" in text


def test_reader_benchmark():
    out, text = _run("reader.py", "--n", "128", "--size", "16", "--batch", "32", "--workers", "1")
    assert out["images"] == 128 and out["shard_img_s"] > 0 and out["folder_img_s"] > 0
    assert out["ratio"] == pytest.approx(out["shard_img_s"] / out["folder_img_s"], rel=0.01)
    assert "shard reader / image-folder reader" in text


def test_make_shards_benchmark_outputs_are_identical():
    out, text = _run("make_shards.py", "--n", "60", "--src-size", "64", "--size", "16", "--workers", "2")
    assert out["identical"] is True and out["images"] == 60 and out["img_per_s_1"] > 0 and out["img_per_s_2"] > 0
    assert "byte-for-byte equal" in text


def test_server_load_benchmark():
    import re

    text = _stdout("server_load.py", "--clients", "2", "--requests", "5", "--batch", "4")
    assert "10 ok, 0 errors" in text  # every request of the bounded load answered
    rate = re.search(r"requests/s ([0-9.]+) .* p99 ([0-9.]+) ms", text)
    ratio = re.search(r"ratio served / in-process images/s = ([0-9.]+)x", text)
    assert rate and ratio and float(rate.group(1)) > 0 and float(rate.group(2)) > 0 and float(ratio.group(1)) > 0


def test_quantized_victim_benchmark(tmp_path):
    import torch

    from stealer.shards import build_default_data
    from victims.classifier import build_classifier, save_classifier

    sizes = {"animal_mnist": {"victim_train": 40, "query": 10, "probe_train": 10, "probe_test": 30},
             "digits": {"probe_train": 10, "probe_test": 10}}
    build_default_data(tmp_path / "data", image_size=16, sizes=sizes)
    torch.manual_seed(0)
    save_classifier(build_classifier("resnet18", 10, 1, 16, width=4, stem="small").eval(), tmp_path / "clf.pt")
    d = tmp_path / "data" / "animal_mnist"
    out, text = _run("quantized_victim.py", "--checkpoint", str(tmp_path / "clf.pt"), "--test", str(d / "probe_test"),
                     "--calib", str(d / "victim_train"), "--calib-size", "16", "--batch", "8", "--repeats", "1",
                     "--latency-images", "8")
    assert out["test_images"] == 30 and out["int8_weight_fraction"] == 1.0  # every conv/linear weight is qint8
    assert 0 <= out["accuracy"]["top1_agreement"] <= 1
    lat = out["latency_ms_per_image"]
    assert lat["fp32"] > 0 and lat["int8"] > 0 and lat["int8_over_fp32"] == pytest.approx(lat["int8"] / lat["fp32"])
    assert set(out["query_latency_ms_per_image"]) == {"none", "dcp", "mad", "mad_reference_autograd"}
    assert out["mad_over_dcp"]["closed_form"] > 0


GPU_SUITE_ROWS = ["online_step", "cached_step", "query_phase", "loader_cpu", "loader_device", "compile", "memory_256",
                  "max_batch", "multi_gpu"]


def test_gpu_suite_tiny_on_cpu(tmp_path):
    """benchmarks/gpu_suite.py at --tiny size on the CPU: every row is measured on both sides
    (positive numbers, the ratio is theirs) or names why it was skipped -- here only the
    CUDA-only rows; the multi-GPU row runs its torchrun path with 2 CPU processes."""
    _stdout("gpu_suite.py", "--tiny", "--cpu", "--ddp-procs", "2", "--out", str(tmp_path), timeout=240)
    res = json.loads((tmp_path / "suite.json").read_text())
    rows = res["rows"]
    assert list(rows) == GPU_SUITE_ROWS and res["tiny"] is True
    skipped = {name for name, r in rows.items() if r["skip"]}
    assert skipped == {"compile", "memory_256", "max_batch"}, {n: rows[n]["skip"] for n in skipped}
    assert "CPU" in rows["compile"]["skip"] and "CUDA only" in rows["memory_256"]["skip"]
    for name, r in rows.items():
        if name in skipped:
            assert r["ratio"] is None and not r["measured"]
            continue
        assert len(r["measured"]) >= 2 and all(v > 0 for v in r["measured"].values()), (name, r)
        assert r["ratio"] > 0, name
    m = {n: rows[n]["measured"] for n in rows}
    assert rows["cached_step"]["ratio"] == pytest.approx(m["cached_step"]["cached_step_s"] / m["cached_step"]["plain_step_s"], rel=1e-3)
    assert rows["online_step"]["ratio"] == pytest.approx(m["online_step"]["online_step_s"] / m["online_step"]["plain_step_s"], rel=1e-3)
    assert rows["query_phase"]["ratio"] == pytest.approx(
        m["query_phase"]["query_phase_img_s"] / m["query_phase"]["plain_inference_img_s"], rel=1e-3)
    for name in ("loader_cpu", "loader_device"):
        assert m[name]["step_img_s"] == m["cached_step"]["cached_img_s"]  # the same run's step is the baseline
    assert m["multi_gpu"]["processes"] == 2 and m["multi_gpu"]["one_img_s"] == m["cached_step"]["cached_img_s"]
    md = (tmp_path / "suite.md").read_text()
    assert all(r["label"] in md for r in rows.values()) and md.count("skipped:") == 3


def test_gpu_suite_budget_guard(monkeypatch):
    """Past the time budget the suite starts no section, and every row says so; a timed loop
    stops at its cap (a 50 ms call, 100 asked, 0.25 s cap)."""
    import argparse
    import time

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_suite

    calls = []

    def slow() -> None:
        calls.append(1)
        time.sleep(0.05)

    per_call, timed = gpu_suite.timed_steps(slow, 100, 0, lambda: None, 0.25)
    assert 1 <= timed < 100 and len(calls) == timed and per_call == pytest.approx(0.05, abs=0.04)

    a = argparse.Namespace(tiny=True, cpu=True, budget=480.0, batch=None, steps=None, warmup=None, queries=None,
                           workers=None, compile=False, ddp_procs=None, cpu_precision="no", child_ddp=None)
    suite = gpu_suite.Suite(a)
    monkeypatch.setattr(suite.budget, "left", lambda: 10.0)  # as if 470 of the 480 s were spent
    res = suite.run()
    assert list(res["rows"]) == GPU_SUITE_ROWS
    assert all(r["skip"] == "out of time (budget 480 s)" for r in res["rows"].values()), res["rows"]
    assert "skipped: out of time" in gpu_suite.markdown(res)
    shutil.rmtree(suite.tmp)


def test_scale_benchmark_tiny(tmp_path):
    """benchmarks/scale.py at N = 100, 200: every phase runs in its own process and gets a row; the meter
    sees memory that grows with N (the hidden ``alloc`` phase holds 2 MiB per sample)."""
    phases = ["folder", "query", "train", "extract", "probe", "knn", "select", "ledger", "cache", "alloc"]
    out = _stdout("scale.py", "--n", "100,200", "--phases", ",".join(phases), "--n-test", "50", "--shard-rows", "64",
                  "--probe-batch", "32", "--batch", "50", "--json", str(tmp_path / "s.json"), timeout=600)
    rows = json.loads((tmp_path / "s.json").read_text())
    assert [(r["phase"], r["n"]) for r in rows] == [(p, n) for n in (100, 200) for p in phases]
    assert all(r["seconds"] > 0 and r["peak_rss_mib"] > 20 for r in rows), rows
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| phase | N | us/sample |") and len(table) == 1 + len(rows)  # the header and a row each
    alloc = {r["n"]: r for r in rows if r["phase"] == "alloc"}
    grown = alloc[200]["peak_rss_mib"] - alloc[100]["peak_rss_mib"]
    assert 170 < grown < 250, grown  # 200 MiB more held: the per-phase peak RSS is the child's own
    assert not alloc[200]["flat"] and alloc[200]["rss_ratio"] > 1.2
