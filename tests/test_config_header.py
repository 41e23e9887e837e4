"""The run header (name, out_dir, seed, cpu) and the backbone keys are declared once, in stealer/config.py:
every job that has them inherits them, with the header's ranges and --help text, and the shipped configs
load unchanged."""
from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _jobs():
    from eval.run import ProbeConfig
    from launch.classifier_sweep import ClassifierSweepConfig
    from stealer.classifier.config import ClassifierStealConfig

    return {"steal_classifier": ClassifierStealConfig, "probe": ProbeConfig, "classifier_sweep": ClassifierSweepConfig}


@pytest.mark.parametrize("job,default_name,default_out", [("steal_classifier", "steal_classifier", "runs"),
                                                          ("probe", "probe", "runs"),
                                                          ("classifier_sweep", "classifier_sweep", "runs/demo")])
def test_jobs_inherit_the_one_header_with_its_ranges_and_help(job, default_name, default_out):
    from launch.common import config_help
    from stealer.config import ConfigError, JobHeader, load_config

    cls = _jobs()[job]
    assert issubclass(cls, JobHeader)
    header = {f.name: f for f in dataclasses.fields(JobHeader)}
    fields = [f.name for f in dataclasses.fields(cls)]
    assert fields[:4] == list(header)  # the YAML keys keep their place (resolved configs and reuse checks unchanged)
    hints, header_hints = typing.get_type_hints(cls, include_extras=True), typing.get_type_hints(JobHeader, include_extras=True)
    lines = config_help(cls)
    for key, f in header.items():
        assert hints[key] == header_hints[key]  # the declared type (and its range) is the header's
        line = next(x for x in lines if x.strip().startswith(f"{key} ="))
        assert f.metadata["help"] and f.metadata["help"] in line
    cfg = cls()
    assert (cfg.name, cfg.out_dir, cfg.seed, cfg.cpu) == (default_name, default_out, 0, False)
    cfg = load_config(cls, None, ["seed=4", "cpu=true", "name=x", "out_dir=o"])
    assert (cfg.seed, cfg.cpu, cfg.run_dir) == (4, True, Path("o") / "x")
    with pytest.raises(ConfigError, match=r"^seed=-1 is out of range; set seed to a value >= 0 \(the default is seed=0\)$"):
        load_config(cls, None, ["seed=-1"])


@pytest.mark.parametrize("cls_name,config", [("classifier_sweep", "classifier_sweep.yaml"), ("probe", "demo_probe.yaml"),
                                             ("probe", "curves_seeds_probe.yaml"), ("probe", "icml22_imagenet_probe.yaml")])
def test_shipped_configs_load_unchanged(cls_name, config):
    import yaml

    from stealer.config import load_config, to_dict

    path = ROOT / "launch" / "configs" / config
    cfg = load_config(_jobs()[cls_name], path)
    resolved = to_dict(cfg)
    for key, value in yaml.safe_load(path.read_text()).items():  # every key of the file reaches the config as written
        assert resolved[key] == value, key


def test_the_sweep_rows_build_classifier_steal_configs():
    """Each sweep row's overrides (header keys included) load into the classifier steal's config."""
    from launch.classifier_sweep import row_overrides
    from stealer.classifier.config import ClassifierStealConfig
    from stealer.config import load_config

    sweep = _jobs()["classifier_sweep"]
    cfg = load_config(sweep, ROOT / "launch" / "configs" / "classifier_sweep.yaml", ["seed=3", "cpu=true"])
    name, over = row_overrides(cfg, cfg.defenses[0], cfg.defenses[0]["values"][0])
    steal = load_config(ClassifierStealConfig, None, over)
    assert (steal.name, steal.seed, steal.cpu) == (name, 3, True)
    assert steal.run_dir == cfg.run_dir / "runs" / name


def test_the_clone_shares_the_backbone_keys():
    from stealer.classifier.config import ClassifierStealConfig, CloneConfig
    from stealer.config import BackboneConfig, ConfigError, load_config

    assert issubclass(CloneConfig, BackboneConfig)
    assert [f.name for f in dataclasses.fields(CloneConfig)] == ["arch", "width", "stem"]
    assert CloneConfig().width == 16 and BackboneConfig().width == 32
    assert load_config(ClassifierStealConfig, None, ["clone.width=8"]).clone.width == 8
    for bad, msg in (("clone.arch=resnet7", "clone.arch='resnet7' is not valid"), ("clone.stem=huge", "clone.stem='huge' is not valid"),
                     ("clone.width=0", "clone.width=0 is out of range")):
        with pytest.raises(ConfigError, match=msg):
            load_config(ClassifierStealConfig, None, [bad])


def test_own_default_refuses_an_unknown_key():
    from stealer.config import own_default

    with pytest.raises(KeyError, match="'nmae' is no key of RunHeader"):
        own_default("nmae", "x")
