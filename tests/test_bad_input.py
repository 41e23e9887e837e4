"""Bad input, as a new user types it: one line naming the key and the fix, exit 2, no traceback,
and nothing paid, queried, trained or written first (issue 13, item 6).

One case per entry point runs the real script as a subprocess (exit code, stderr, nothing written);
the other cases call the same script's ``main(argv)`` in this process (the interpreter start-up of a
torch job costs seconds each on a busy CPU). Every check happens when the config is built.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import tarfile
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_entry(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def run_main(script: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess[str]:
    """``launch/<script>``'s ``main(argv)`` in this process, as a CompletedProcess (exit code, stdout, stderr)."""
    import importlib

    module = importlib.import_module(f"launch.{script.removesuffix('.py')}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    out = capsys.readouterr()
    return subprocess.CompletedProcess([script, *argv], e.value.code, out.out, out.err)


def one_error_line(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, exactly one non-empty stderr line, starting 'error:', holding every needle; no traceback."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "\x1b" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---------------------------------------------------------------- steal: checked before the query phase pays
@pytest.mark.parametrize("override, key, fix", [
    ("train.epochs=-1", "train.epochs=-1", "set train.epochs to a value >= 1"),
    ("train.temperature=0", "train.temperature=0.0", "set train.temperature to a value > 0"),
    ("train.batch_size=0", "train.batch_size=0", "set train.batch_size to a value >= 1"),
    ("train.lr=-1", "train.lr=-1.0", "set train.lr to a value > 0"),
    ("data.channels=2", "data.channels=2", "set data.channels to one of 1, 3"),
    ("victim.budget=-5", "victim.budget=-5", "set victim.budget to a value >= 0"),
])
def test_steal_refuses_out_of_range_before_paying(tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str,
                                                  key: str, fix: str) -> None:
    argv = ["--config", "launch/configs/demo.yaml", f"out_dir={tmp_path}", "name=bad", override]
    r = run_entry("steal.py", *argv) if override == "train.epochs=-1" else run_main("steal.py", argv, capsys)
    one_error_line(r, key, fix)
    # nothing paid, queried or written: no run folder, hence no ledger, cache, checkpoint or student
    assert not (tmp_path / "bad").exists(), sorted(p.name for p in (tmp_path / "bad").rglob("*"))


# ---------------------------------------------------------------- victim training: checked before training
@pytest.mark.parametrize("task, override, fix", [
    ("simsiam", "epochs=0", "set epochs to a value >= 1"),
    ("simsiam", "channels=2", "set channels to one of 1, 3"),
    ("simsiam", "lr=-1", "set lr to a value > 0"),
    ("classify", "epochs=0", "set epochs to a value >= 1"),
    ("classify", "channels=2", "set channels to one of 1, 3"),
])
def test_train_victim_refuses_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str], task: str, override: str,
                                           fix: str) -> None:
    argv = ["--task", task, f"out_dir={tmp_path}", "name=v", override]
    subprocess_case = (task, override) == ("simsiam", "channels=2")
    r = run_entry("train_victim.py", *argv) if subprocess_case else run_main("train_victim.py", argv, capsys)
    one_error_line(r, override.split("=")[0], fix)
    assert not (tmp_path / "v").exists()  # no checkpoint of untrained weights, no config, nothing


# ---------------------------------------------------------------- probe
def test_probe_refuses_zero_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = run_main("probe.py", [f"out_dir={tmp_path}", "name=p", "steps=0"], capsys)
    one_error_line(r, "steps=0", "set steps to a value >= 1")
    assert not (tmp_path / "p").exists()


class Net:  # a pickled class a weights_only load must refuse (its global is this module's Net)
    pass


def test_probe_names_a_refused_pickle_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "student.pt"
    torch.save({"format": "sslsteal-student/1", "meta": Net(), "state_dict": {}}, bad)
    with pytest.raises(Exception, match="Unsupported global"):  # the pickle really is refused by a safe load
        torch.load(bad, weights_only=True)
    r = run_entry("probe.py", f"out_dir={tmp_path}", "name=p", "victim=", f"stolen=[s={bad}]")
    line = one_error_line(r, str(bad), f"{Net.__module__}.Net", "torch.save(model.state_dict(), path)")
    assert "weights_only" in line


def test_refused_pickle_message_for_checkpoints(tmp_path: Path) -> None:
    from stealer.ckpt import load_checkpoint

    bad = tmp_path / "ckpt-000000001.pt"
    torch.save({"format": "sslsteal-ckpt/1", "model": Net()}, bad)
    with pytest.raises(ValueError) as e:
        load_checkpoint(bad)
    msg = str(e.value)
    assert "\n" not in msg and "\x1b" not in msg
    assert str(bad) in msg and f"{Net.__module__}.Net" in msg and "state_dict" in msg


# ---------------------------------------------------------------- the victim server
@pytest.mark.parametrize("args, needle", [
    (["--port", "99999"], "pass --port with a value >= 1 and <= 65535"),
    (["--rate", "-1"], "pass --rate with a value >= 0 (0 = no limit)"),
    (["--burst", "0"], "pass --burst with a value >= 1"),
])
def test_serve_refuses_bad_port_and_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                        needle: str) -> None:
    state = tmp_path / "server"
    argv = ["--checkpoint", str(tmp_path / "absent.pth.tar"), "--state-dir", str(state), *args]
    r = run_entry("serve.py", *argv) if args[0] == "--port" else run_main("serve.py", argv, capsys)
    one_error_line(r, args[0], needle)
    assert not state.exists()  # refused before the state folder (keys, ledger) was touched


def test_token_bucket_refuses_negative_rate() -> None:
    from victims.server import TokenBucket

    with pytest.raises(ValueError, match=r"rate limit -1\.0 is not valid"):
        TokenBucket(-1.0, 40)
    assert TokenBucket(0.0, 40).take("u") == 0.0  # 0 still means no limit


# ---------------------------------------------------------------- a damaged shard: one warning line naming it
def test_truncated_shard_is_named_in_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from stealer.data import _WARNED_SHARDS, ShardStream, open_shards
    from stealer.shards import encode_png, write_shards

    rng = np.random.default_rng(0)
    samples = [(f"s-{i:04d}", encode_png(rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)), "png", i % 2)
               for i in range(400)]
    out = tmp_path / "shards"
    write_shards(iter(samples), out, source="test", classes=["a", "b"], channels=1, image_size=(16, 16),
                 samples_per_shard=400)
    shard = next(out.glob("*.tar"))
    full = shard.read_bytes()
    shard.write_bytes(full[: int(len(full) * 0.4)])  # a copy cut at 40 %
    with tarfile.open(shard, "r|") as t:  # the cut is real: the tar ends early
        members = 0
        try:
            for _ in t:
                members += 1
        except tarfile.ReadError:
            pass
    assert 0 < members < 2 * 400
    _WARNED_SHARDS.discard(str(shard))
    stream = ShardStream(open_shards(out), batch_size=64, channels=1, image_size=16, seed=0)
    with caplog.at_level(logging.WARNING, logger="stealer.data"):
        counts = []
        for epoch in range(2):
            n = corrupt = 0
            for b in stream.iter_epoch(epoch):
                n, corrupt = n + len(b["key"]), corrupt + b["corrupt"]
            counts.append((n, corrupt))
    assert counts[0] == counts[1] and counts[0][0] + counts[0][1] == 400 and counts[0][1] > 0
    named = [r.getMessage() for r in caplog.records if shard.name in r.getMessage()]
    assert len(named) == 1, named  # once per process, not once per epoch
    assert "\n" not in named[0] and "damaged or truncated" in named[0] and "of the 400 samples" in named[0]
    assert f"the other {counts[0][1]} are skipped" in named[0] and "launch/make_shards.py" in named[0]


# ---------------------------------------------------------------- declarations
def _leaf_fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, typing.Any, typing.Any]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, prefix + f.name + ".")
        elif f.default is not dataclasses.MISSING:
            yield prefix + f.name, tp, f.default


def test_every_numeric_key_declares_a_range_its_default_satisfies() -> None:
    from eval.run import ProbeConfig
    from launch.attack_curves import CurvesConfig
    from launch.classifier_sweep import ClassifierSweepConfig
    from launch.defense_table import DefenseTableConfig
    from launch.steal_classifier import ClassifierStealConfig
    from stealer.config import _constraints, check_value
    from stealer.pretrain import VictimTrainConfig
    from stealer.steal import StealConfig
    from stealer.train_classifier import ClassifierTrainConfig

    undeclared = []
    for cls in (StealConfig, VictimTrainConfig, ClassifierTrainConfig, ProbeConfig, ClassifierStealConfig,
                DefenseTableConfig, CurvesConfig, ClassifierSweepConfig):
        for key, tp, default in _leaf_fields(cls):
            cons = _constraints(tp)
            base = {a for a in typing.get_args(tp) if a is not type(None)} or {tp}
            if not cons and base <= {int, float}:  # plain numbers (lists and mixed types have their own checks)
                undeclared.append(f"{cls.__name__}.{key}")
            for c in cons:
                check_value(key, default, c)  # raises when a default is outside its own range
    assert undeclared == [], undeclared


def test_help_shows_declared_ranges() -> None:
    from launch.common import config_help
    from stealer.steal import StealConfig

    lines = [line.split("  -- ")[0] for line in config_help(StealConfig)]  # each key's help text follows its " -- "
    assert "  train.epochs = 30  (>= 1)" in lines
    assert "  train.momentum = 0.9  (>= 0 and < 1)" in lines
    assert "  data.channels = 1  (one of 1, 3)" in lines


# ---------------------------------------------------------------- train settings refused before the query phase pays
def test_preflight_refuses_train_settings_before_paying(tmp_path: Path) -> None:
    from conftest import tiny_steal_assets
    from stealer.config import load_config
    from stealer.preflight import check_inputs
    from stealer.steal import StealConfig

    root, victim = tiny_steal_assets(tmp_path, {"animal_mnist": {"victim_train": 8, "query": 40, "probe_train": 8,
                                                                  "probe_test": 8}, "digits": {"probe_train": 8, "probe_test": 8}})
    base = [f"out_dir={tmp_path}", "name=s", f"data.query={root}/data/animal_mnist/query", f"victim.checkpoint={victim}",
            "data.image_size=16"]
    ok = load_config(StealConfig, None, base + ["train.batch_size=16", "train.drop_last=true"])
    assert check_inputs(ok, world=2)["images"] == 40  # 2 x 16 <= 40: a step per epoch
    with pytest.raises(ValueError, match=r"train\.sync_bn needs GPUs .* set train\.sync_bn=false for 2 cpu processes"):
        check_inputs(load_config(StealConfig, None, base + ["train.sync_bn=true"]), world=2, device_type="cpu")
    check_inputs(load_config(StealConfig, None, base + ["train.sync_bn=true"]), world=1)  # one process: no sync needed
    with pytest.raises(ValueError, match=r"train\.batch_size=32 x 2 process\(es\) is more than the 40 images.*"
                                         r"set train\.drop_last=false"):
        check_inputs(load_config(StealConfig, None, base + ["train.batch_size=32", "train.drop_last=true"]), world=2)
    assert not (tmp_path / "s").exists()  # no ledger, no cache: nothing was paid


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    one_error_line(run_main("steal.py", ["--resume"], capsys), "--resume", "expected one argument", "--help")
    one_error_line(run_main("probe.py", ["--bogus"], capsys), "unrecognized arguments: --bogus")


def test_preflight_checks_a_resume_path_before_paying(tmp_path: Path) -> None:
    from stealer.config import load_config
    from stealer.preflight import check_train_settings
    from stealer.steal import StealConfig

    pickled = tmp_path / "ckpt.pt"
    torch.save({"format": "sslsteal-ckpt/1", "model": Net()}, pickled)
    for resume, needle in [(tmp_path / "absent.pt", "absent.pt not found"), (pickled, f"({Net.__module__}.Net)")]:
        cfg = load_config(StealConfig, None, [f"out_dir={tmp_path}", f"resume={resume}"])
        with pytest.raises((FileNotFoundError, ValueError)) as e:
            check_train_settings(cfg, None)
        assert needle in str(e.value) and "nothing was paid" in str(e.value) and "\n" not in str(e.value)


def test_range_refuses_nan_inf_and_bad_list_entries() -> None:
    from launch.attack_curves import CurvesConfig
    from stealer.config import ConfigError, load_config
    from stealer.steal import StealConfig

    for override, needle in [("train.lr=nan", "train.lr=nan is out of range; set train.lr to a value > 0"),
                             ("train.weight_decay=.inf", "train.weight_decay=inf is out of range"),
                             ("victim.budget=-1", "set victim.budget to a value >= 0")]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config(StealConfig, None, [override])
    with pytest.raises(ConfigError, match=r"budgets=-5 is out of range; set budgets to a value >= 1"):
        load_config(CurvesConfig, None, ["budgets=[100,-5]"])
    with pytest.raises(ConfigError, match=r"phases=\[\] runs nothing; set phases=\[query,train\]"):
        load_config(StealConfig, None, ["phases=[]"])
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer, got 'abc'; e\.g\. train\.epochs=30"):
        load_config(StealConfig, None, ["train.epochs=abc"])
    cfg = load_config(StealConfig, None, ["victim.budget=null", "train.lr=0.5", "train.momentum=0"])  # in range: kept
    assert (cfg.victim.budget, cfg.train.lr, cfg.train.momentum) == (None, 0.5, 0.0)


def test_preflight_refuses_unknown_loss_args() -> None:
    from stealer.config import load_config
    from stealer.preflight import check_train_settings
    from stealer.steal import StealConfig

    with pytest.raises(ValueError, match=r"train\.loss_args has 'lamda', which loss barlow does not take; use its "
                                         r"arguments: temperature, lambd \(nothing was paid\)"):
        check_train_settings(load_config(StealConfig, None, ["train.loss=barlow", "train.loss_args={lamda: 0.01}"]), None)
    check_train_settings(load_config(StealConfig, None, ["train.loss=barlow", "train.loss_args={lambd: 0.01}"]), None)
    check_train_settings(load_config(StealConfig, None, ["train.loss=softnn", "train.loss_args={temperature: 100}"]), None)


def test_probe_refuses_nothing_to_probe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one_error_line(run_main("probe.py", [f"out_dir={tmp_path}", "victim=", "stolen=[]"], capsys), "leave nothing to probe",
                   "set victim=CHECKPOINT or stolen=[NAME=student.pt]")
    one_error_line(run_main("probe.py", [f"out_dir={tmp_path}", "sets=[]"], capsys), "sets=[] probes nothing")
    assert not (tmp_path / "probe").exists()
