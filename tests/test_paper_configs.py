"""The papers' ImageNet configs load as StealConfigs and fail early, in one line, naming what is missing."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from stealer.config import load_config
from stealer.preflight import check_disk_space, check_inputs, check_probe_inputs, main as preflight_main
from stealer.steal import StealConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "launch" / "configs"
ICML = sorted(CONFIGS.glob("icml22_imagenet_infonce_t*.yaml"))
PAPER = ICML + [CONFIGS / "b4b_imagenet.yaml"]


def test_every_paper_config_states_the_papers_settings():
    assert len(ICML) == 4  # tau {0.1, 0.25} x student view {plain, augmented}
    for path in PAPER:
        cfg = load_config(StealConfig, path)
        assert cfg.victim.arch == cfg.student.arch == "resnet50" and cfg.victim.representation == "backbone"
        assert (cfg.data.image_size, cfg.data.channels, cfg.train.loss, cfg.train.optimizer) == (224, 3, "infonce", "lars")
        assert cfg.train.epochs == 100 and cfg.train.weight_decay == 0.0 and cfg.name == path.stem
        assert cfg.query.num_queries == cfg.victim.budget
        if path in ICML:
            tau = float(path.stem.split("_t")[1].split("_")[0])
            assert cfg.train.temperature == tau and cfg.train.augment == path.stem.endswith("_aug")
            assert cfg.query.num_queries == 100_000 and cfg.train.batch_size * 8 == 512 and cfg.train.lr == 0.2
        else:
            assert cfg.query.num_queries == 50_000 and cfg.train.temperature == 0.25 and not cfg.train.augment
            assert cfg.train.batch_size * 8 == 256 and cfg.train.lr == 0.1


def test_sweep_covers_queries_temperature_and_augmentation():
    from launch.sweep import expand

    rows = expand(CONFIGS / "icml22_imagenet_sweep.yaml")
    grid = {(r.settings["query.num_queries"], r.settings["train.temperature"], r.settings["train.augment"]) for r in rows}
    assert len(rows) == 8 and grid == {(q, t, a) for q in (100_000, 250_000) for t in (0.1, 0.25) for a in (False, True)}
    assert all(r.settings["victim.budget"] == r.settings["query.num_queries"] for r in rows)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_fails_early_naming_the_missing_file(path, tmp_path):
    from stealer.shards import array_samples, write_shards

    cfg = load_config(StealConfig, path)
    with pytest.raises(FileNotFoundError) as e:
        check_inputs(cfg)
    n = cfg.query.num_queries
    assert str(e.value) == (f"shard folder data/imagenet/query (data.query) does not exist; make it with: "
                            f"python launch/make_shards.py IMAGE_FOLDER data/imagenet --split query={n}")
    # with the shards there, the next missing input is the victim checkpoint
    imgs = np.zeros((6, 8, 8, 3), dtype=np.uint8)
    write_shards(array_samples(imgs, np.zeros(6, dtype=int), key_prefix="im"), tmp_path / "query", source="t",
                 classes=["x"], channels=3, image_size=[8, 8])
    small = [f"data.query={tmp_path / 'query'}", "query.num_queries=5", "victim.budget=5"]
    with pytest.raises(FileNotFoundError, match=r"^victim checkpoint data/imagenet/simsiam_r50/checkpoint_0099.pth.tar "
                                                r"\(victim.checkpoint\) does not exist; put the victim's SimSiam checkpoint"):
        check_inputs(load_config(StealConfig, path, small))
    ckpt = tmp_path / "ckpt.pth.tar"
    ckpt.write_bytes(b"x")
    ok = load_config(StealConfig, path, small + [f"victim.checkpoint={ckpt}", f"out_dir={tmp_path / 'runs'}"])
    got = check_inputs(ok)
    assert (got["images"], got["queries"]) == (5, 5)
    # the disk: 5 images x (their share of the query shards + a 2,048-float response and its tar member)
    shard_b = sum(f.stat().st_size for f in (tmp_path / "query").glob("*.tar")) / 6
    resp_b = 2048 * 4 + 1151 if ok.query.dtype == "float32" else 2048 * 2 + 1151
    assert got["cache_bytes"] == int(5 * (shard_b + resp_b))
    with pytest.raises(ValueError, match=r"needs about 0\.00 GiB \(5 images x .* KiB\) but .* has 0\.00 GiB free; "
                                         r"free space or set out_dir to a larger disk \(nothing was paid\)") as e:
        check_disk_space(ok, 5, 1, free_bytes=1000)
    assert "\n" not in str(e.value)
    assert check_disk_space(ok, 5, 1, free_bytes=got["cache_bytes"]) == got["cache_bytes"]
    # a resumed job: what the run's cache already holds needs no room
    from stealer.cache import ResponseCache

    ResponseCache(ok.run_dir / "cache").write_batch([f"k{i}" for i in range(3)], [("png", b"x")] * 3, [0] * 3,
                                                   np.zeros((3, 4), dtype=np.float32))
    assert check_disk_space(ok, 5, 1, free_bytes=0 + int(2 * (shard_b + resp_b))) == int(2 * (shard_b + resp_b))
    with pytest.raises(ValueError, match=r"victim.budget=4 is below the 5 queries this steal sends \(5 images x 1 per image\)"):
        check_inputs(load_config(StealConfig, path, small + [f"victim.checkpoint={ckpt}", "victim.budget=4"]))
    with pytest.raises(ValueError, match="holds 6 images but 7 are wanted"):
        check_inputs(load_config(StealConfig, path, small + ["query.num_queries=7"]))
    with pytest.raises(FileNotFoundError, match="response cache .* does not exist; run the query phase first"):
        check_inputs(load_config(StealConfig, path, [f"out_dir={tmp_path}", "phases=[train]"]))


def test_demo_hints_and_probe_inputs(tmp_path):
    cfg = load_config(StealConfig, None, [f"data.query={tmp_path}/data/animal_mnist/query"])
    with pytest.raises(FileNotFoundError, match=f"make it with: python launch/make_shards.py builtin:default {tmp_path}/data$"):
        check_inputs(cfg)
    from eval.run import ProbeConfig

    probe = load_config(ProbeConfig, None, [f"victim={tmp_path}/demo/victim/checkpoint.pth.tar"])
    with pytest.raises(FileNotFoundError, match="does not exist; python launch/demo.py"):
        check_probe_inputs(probe)


def test_preflight_command_and_paper_sbatch_stop_with_one_line(capsys):
    assert preflight_main(["--config", str(CONFIGS / "b4b_imagenet.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: shard folder data/imagenet/query (data.query) does not exist")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    p = subprocess.run(["bash", "slurm/paper.sbatch", "launch/configs/icml22_imagenet_infonce_t0.1.yaml"], cwd=REPO,
                       env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "error: shard folder data/imagenet/query (data.query) does not exist" in p.stderr
    assert "--split query=100000" in p.stderr and p.stdout == ""
