"""One owner per cross-cutting job: the atomic write, the shard format, one BudgetExceeded, no import circle."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tarfile
import typing
from pathlib import Path

import numpy as np
import pytest

from victims.atomic import atomic_write, atomic_write_json, atomic_write_text, create_once

ROOT = Path(__file__).resolve().parents[1]


def _hammer(target: str, tag: int, rounds: int) -> None:
    for i in range(rounds):  # each write is a whole, self-checking document of 64 KiB
        body = {"tag": tag, "i": i, "pad": f"{tag}" * 65536}
        atomic_write_json(target, body)


def test_two_processes_writing_one_target_never_tear_it_or_leave_a_temp(tmp_path):
    target = tmp_path / "state.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(target), tag, 60)) for tag in (1, 2)]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs):  # read while both write: every read is a whole document
        if target.exists():
            doc = json.loads(target.read_text())
            assert doc["pad"] == str(doc["tag"]) * 65536
            reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    doc = json.loads(target.read_text())
    assert doc["i"] == 59 and doc["pad"] == str(doc["tag"]) * 65536
    assert reads > 0
    assert sorted(os.listdir(tmp_path)) == ["state.json"], "a temp file was left behind"


def _write_big_under_fsize_limit(target: str) -> None:
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: write() fails with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    try:
        atomic_write(target, lambda f: f.write(b"x" * 100_000))
    except OSError as e:
        sys.exit(7 if e.errno == 27 else 8)  # EFBIG
    sys.exit(0)


def test_a_write_over_rlimit_fsize_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"old")
    p = mp.get_context("fork").Process(target=_write_big_under_fsize_limit, args=(str(target),))
    p.start()
    p.join()
    assert p.exitcode == 7, "the write did not hit the file-size limit"
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ckpt.bin"]


def test_a_raising_serializer_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_text(target, "old\n")
    seen = []

    def half_then_fail(f):
        f.write(b"half a document")
        seen.extend(p.name for p in tmp_path.iterdir())  # the temp really existed, with a per-process name
        raise RuntimeError("serializer broke")

    with pytest.raises(RuntimeError, match="serializer broke"):
        atomic_write(target, half_then_fail)
    assert any(n.startswith(".m.json.") and f".{os.getpid()}." in n for n in seen)
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["m.json"]


def test_create_once_keeps_the_first_writer(tmp_path):
    p = tmp_path / "run_id"
    assert create_once(p, "aaa") == "aaa"
    assert create_once(p, "bbb") == "aaa"
    assert os.listdir(tmp_path) == ["run_id"]


def test_stealer_reexports_the_one_helper():
    import stealer.ckpt
    import victims.atomic

    assert stealer.ckpt.atomic_write is victims.atomic.atomic_write
    assert stealer.ckpt.atomic_write_json is victims.atomic.atomic_write_json


def test_victims_never_import_stealer():
    code = ("import sys, victims.atomic, victims.ledger, victims.api, victims.simsiam, victims.classifier, "
            "victims.watermark; bad = [m for m in sys.modules if m == 'stealer' or m.startswith('stealer.')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# -- the shard format has one owner ------------------------------------------------------------
def _tar_headers(path: Path) -> list[tuple[str, int, int, int, str]]:
    with tarfile.open(path) as t:
        return [(m.name, m.mtime, m.mode, m.uid, m.uname) for m in t.getmembers()]


def test_the_response_cache_writes_shards_with_the_shard_writer(tmp_path):
    from stealer.cache import ResponseCache
    from stealer.data import open_shards
    from stealer.shards import read_manifest, write_shards

    cache = ResponseCache(tmp_path / "cache", dtype="float32")
    cache.write_meta({"victim": "v", "out_dim": 3, "channels": 1, "image_size": [4, 4], "classes": ["a", "b"],
                      "image_ext": "png"})
    keys = ["k0", "k1"]
    tar = cache.write_batch(keys, [("png", b"\x89PNG0"), ("png", b"\x89PNG1")], [0, 1], np.eye(2, 3, dtype=np.float32))
    write_shards([("k0", b"\x89PNG0", "png", 0)], tmp_path / "set", source="t", classes=["a", "b"], channels=1,
                 image_size=[4, 4])
    # the same headers (fixed mtime, mode, uid, no user names) from the one tar-member writer
    assert {h[1:] for h in _tar_headers(tar)} == {h[1:] for h in _tar_headers(tmp_path / "set" / "train-000000.tar")}
    man = cache.finalize()
    assert read_manifest(cache.root) == man
    ref = read_manifest(tmp_path / "set")
    assert set(ref) - {"skipped"} <= set(man) and man["format"] == ref["format"] and man["num_samples"] == 2
    assert open_shards(cache.root).num_samples == 2
    assert not [p for p in cache.root.iterdir() if p.name.endswith(".tmp")]


def test_a_shard_set_that_fails_midway_leaves_no_temp(tmp_path):
    from stealer.shards import write_shards

    def samples():
        yield ("a", b"img", "png", 0)
        yield ("b", b"img", "png", 5)  # class out of range: raises while the first tar is open

    with pytest.raises(ValueError, match="class index 5"):
        write_shards(samples(), tmp_path, source="t", classes=["x"], channels=1, image_size=None)
    assert os.listdir(tmp_path) == []


# -- one name per concept ----------------------------------------------------------------------
def test_one_budget_exceeded_class_for_both_transports():
    import stealer.client
    import victims.ledger

    assert stealer.client.BudgetExceeded is victims.ledger.BudgetExceeded
    e = victims.ledger.BudgetExceeded("u", 10, 8, 4)
    assert "8 of 10 spent (2 left)" in str(e)
    e = victims.ledger.BudgetExceeded(None, None, None, 3, message="server said no")
    assert str(e) == "server said no" and e.requested == 3


def test_data_and_device_decode_do_not_import_each_other():
    """``stealer.data`` → ``stealer.device_decode`` only; both take the CPU decoder from ``stealer.decode``."""
    import ast

    def imports(name: str) -> set[str]:
        tree = ast.parse((ROOT / "stealer" / f"{name}.py").read_text())
        return ({n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
                | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names})

    assert "stealer.data" not in imports("device_decode")
    assert "stealer.decode" in imports("device_decode") and "stealer.decode" in imports("data")
    import stealer.data
    import stealer.decode

    assert stealer.data.decode_image is stealer.decode.decode_image


# -- shared config pieces ----------------------------------------------------------------------
@pytest.mark.parametrize("job", ["pretrain", "classifier"])
def test_the_victim_trainers_share_the_run_header_and_backbone_pieces(job):
    import dataclasses

    from launch.common import config_help
    from stealer.config import BackboneConfig, ConfigError, RunHeader, ShardTrainHeader, load_config

    if job == "pretrain":
        from stealer.pretrain import VictimTrainConfig as cls
    else:
        from stealer.train_classifier import ClassifierTrainConfig as cls
    assert issubclass(cls, ShardTrainHeader) and issubclass(cls, RunHeader)
    assert issubclass(typing.get_type_hints(cls)["model"], BackboneConfig)
    help_lines = config_help(cls)
    for f in dataclasses.fields(ShardTrainHeader):  # every shared key is shown with its help text
        line = next(x for x in help_lines if x.strip().startswith(f"{f.name} ="))
        assert f.metadata["help"] and f.metadata["help"] in line
    assert any(x.strip().startswith("model.stem =") and "imagenet" in x for x in help_lines)
    cfg = load_config(cls, None, ["seed=3", "ckpt_every=7", "model.width=16"])
    assert (cfg.seed, cfg.ckpt_every, cfg.model.width) == (3, 7, 16)
    assert cfg.run_dir.name == cfg.name
    for bad, key in (("seed=-1", "seed=-1 is out of range"), ("log_every=0", "log_every=0 is out of range"),
                     ("mixed_precision=fp8", "mixed_precision='fp8' is not valid"),
                     ("model.arch=resnet7", "model.arch='resnet7' is not valid"),
                     ("model.stem=huge", "model.stem='huge' is not valid"), ("channels=2", "channels=2 is not valid")):
        with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
            load_config(cls, None, [bad])


def test_launch_steal_catches_the_budget_refusal_by_type(tmp_path, capsys):
    """A ledger already nearly spent: the query phase hits victims.ledger.BudgetExceeded and launch/steal.py
    turns it into one error line (exit 2) naming the fix, the cache kept."""
    import runpy

    from conftest import tiny_steal_assets
    from victims.ledger import QueryLedger

    root, victim = tiny_steal_assets(tmp_path, {"animal_mnist": {"victim_train": 8, "query": 40, "probe_train": 8,
                                                                  "probe_test": 8}, "digits": {"probe_train": 8, "probe_test": 8}})
    ledger = QueryLedger(tmp_path / "s" / "victim_state" / "ledger.sqlite")
    ledger.set_budget("attacker", 40)
    ledger.charge("attacker", 30)  # someone else's spend: the preflight's count of 40 fits the budget, the ledger does not
    argv = ["steal.py", f"out_dir={tmp_path}", "name=s", "cpu=true", f"data.query={root}/data/animal_mnist/query",
            f"victim.checkpoint={victim}", "data.image_size=16", "victim.budget=40", "victim.user=attacker",
            "phases=[query]", "query.batch_size=8"]
    old = sys.argv
    sys.argv = argv
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / "launch" / "steal.py"), run_name="__main__")
    finally:
        sys.argv = old
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "query budget exceeded for user 'attacker'" in err[0] and "raise victim.budget" in err[0]
    assert ledger.spent("attacker") == 38  # one batch of 8 bought, the next refused uncharged
