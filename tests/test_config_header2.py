"""The steal and the victim trainers take the shared config pieces of stealer/config.py (JobHeader, RunHeader's
resume keys and help, BackboneConfig under ``student.``) and every key of theirs has --help text, while the resolved
configs stay what they were: a checkpoint stores its resolved config and a resume compares it, so a run stopped
before the change must resume after it. tests/data/config_header2_golden.json holds the resolved configs and the
--help key lines as the code resolved them before (c754b0e; written by tests/data/make_config_header2_golden.py)."""
from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "data"))

import make_config_header2_golden as golden_src  # noqa: E402

GOLDEN = json.loads((ROOT / "tests" / "data" / "config_header2_golden.json").read_text())
CASES = [(c["job"], c["config"]) for c in GOLDEN["resolved"]]


def _golden(job: str, config: str | None) -> dict:
    return next(c["dict"] for c in GOLDEN["resolved"] if (c["job"], c["config"]) == (job, config))


def _shape(d: dict) -> list:
    """The keys of a nested dict in their order (what a YAML dump of the resolved config lists)."""
    return [(k, _shape(v) if isinstance(v, dict) else None) for k, v in d.items()]


def _may_change(job: str) -> set[str]:
    import stealer.pretrain
    import stealer.steal
    import stealer.train_classifier

    mod = {"steal": stealer.steal, "victim": stealer.pretrain, "classify": stealer.train_classifier}[job]
    return set(mod.RESUME_MAY_CHANGE)


def test_the_golden_covers_the_shipped_demo_and_paper_configs():
    configs = {c for _, c in CASES}
    assert {"demo.yaml", "demo_victim.yaml", "demo_classifier.yaml"} <= configs
    assert any(c and c.startswith("icml22_") for c in configs)
    assert {j for j, _ in CASES} == {"steal", "victim", "classify"}


@pytest.mark.parametrize("job,config", CASES)
def test_resolved_config_is_the_one_written_before(job, config):
    """Every key, value and its place, as the code before the shared pieces resolved them."""
    from stealer.ckpt import config_diff

    old, new = _golden(job, config), golden_src.resolve(job, config)
    assert config_diff(old, new) == [] and config_diff(new, old) == []  # no key added, lost or changed
    assert _shape(new) == _shape(old)  # nor moved
    assert new == old


@pytest.mark.parametrize("job,config", [("steal", "demo.yaml"), ("steal", "icml22_imagenet_infonce_t0.1.yaml"),
                                        ("victim", "demo_victim.yaml"), ("classify", "demo_classifier.yaml")])
def test_a_checkpoint_written_before_resumes(tmp_path, job, config):
    """A checkpoint holding the old resolved config resumes under today's config with the loop's own allow-list,
    and the same checkpoint is still refused for a changed result-bearing key (the comparison is live)."""
    import torch

    from stealer.config import load_config, to_dict
    from stealer.engine import RunState

    model = torch.nn.Linear(3, 2)
    old = _golden(job, config)
    if job == "steal":  # the train phase stores the view record beside the resolved config
        old = {**old, "train_view": None}
    s = RunState(None, tmp_path / "ckpt", config=old).track(model=model)
    s.save(5, epoch=0, batch=5)
    s.close()

    cls = golden_src.jobs()[job]
    path = ROOT / "launch" / "configs" / config

    def now(*overrides: str) -> dict:
        d = to_dict(load_config(cls, path, list(overrides)))
        return {**d, "train_view": None} if job == "steal" else d

    s = RunState(None, tmp_path / "ckpt", config=now(), may_change=_may_change(job)).track(model=model)
    assert s.resume("auto")["step"] == 5
    s.close()
    # allow-listed header keys may change (cpu, resume_force); the seed may not
    s = RunState(None, tmp_path / "ckpt", config=now("cpu=true", "resume_force=true"),
                 may_change=_may_change(job)).track(model=model)
    assert s.resume("auto")["step"] == 5
    s.close()
    s = RunState(None, tmp_path / "ckpt", config=now("seed=7"), may_change=_may_change(job)).track(model=model)
    with pytest.raises(ValueError, match=r"written with other settings \(seed 0 -> 7\)"):
        s.resume("auto")
    s.close()


@pytest.mark.parametrize("job", ["steal", "victim", "classify"])
def test_help_key_lines_unchanged_and_every_key_documented(job):
    """``--help`` lists the same keys, defaults and ranges as before; now each key (those of attack.* and augment.*,
    declared in stealer/attacks.py and stealer/augment.py, aside) carries its help text."""
    from launch.common import config_help

    lines = config_help(golden_src.jobs()[job])
    want = list(GOLDEN["help"][job])
    if job == "classify":  # the one deliberate change: the classifier's own augment defaults (c754b0e showed AugmentConfig's)
        want = [x.replace("augment.scale_min = 0.2", "augment.scale_min = 0.5").replace("augment.jitter_p = 0.8", "augment.jitter_p = 0.0")
                for x in want]
        assert want != GOLDEN["help"][job]
    assert [x.split("  -- ")[0] for x in lines] == want
    bare = [x.split(" = ")[0].strip() for x in lines if "  -- " not in x]
    assert [k for k in bare if not k.startswith(("attack.", "augment."))] == []


def test_steal_inherits_the_job_header_and_the_backbone_keys():
    from stealer.config import BackboneConfig, ConfigError, JobHeader, RunHeader, field_help, load_config
    from stealer.steal import StealConfig, StudentConfig

    assert issubclass(StealConfig, JobHeader) and issubclass(StudentConfig, BackboneConfig)
    fields = {f.name: f for f in dataclasses.fields(StealConfig)}
    hints = typing.get_type_hints(StealConfig, include_extras=True)
    pieces = {**{f.name: (f, JobHeader) for f in dataclasses.fields(JobHeader)},
              **{k: (f, RunHeader) for f in dataclasses.fields(RunHeader) for k in ("resume", "resume_force") if f.name == k}}
    for key, (f, piece) in pieces.items():
        assert field_help(fields[key]) == field_help(f) != ""  # one help text, the piece's
        assert hints[key] == typing.get_type_hints(piece, include_extras=True)[key]  # one declared type and range
    assert (StealConfig().name, StealConfig().resume, StealConfig().resume_force) == ("steal", "auto", False)
    assert [f.name for f in dataclasses.fields(StudentConfig)] == ["arch", "width", "stem"]
    assert StudentConfig().width == BackboneConfig().width == 32
    cfg = load_config(StealConfig, None, ["student.width=8", "student.stem=imagenet", "seed=2"])
    assert (cfg.student.width, cfg.student.stem, cfg.seed, cfg.run_dir) == (8, "imagenet", 2, Path("runs") / "steal")
    for bad, msg in (("student.arch=resnet7", r"^student\.arch='resnet7' is not valid; choose one of: .*timm:<model name>"),
                     ("student.stem=huge", r"^student\.stem='huge' is not valid"),
                     ("student.width=0", r"^student\.width=0 is out of range; set student\.width to a value >= 1"),
                     ("seed=-1", r"^seed=-1 is out of range; set seed to a value >= 0 \(the default is seed=0\)$")):
        with pytest.raises(ConfigError, match=msg):
            load_config(StealConfig, None, [bad])


def test_the_victim_trainers_name_their_runs_with_the_header_help():
    from stealer.config import JobHeader, field_help
    from stealer.pretrain import VictimTrainConfig
    from stealer.train_classifier import ClassifierTrainConfig

    header = field_help(next(f for f in dataclasses.fields(JobHeader) if f.name == "name"))
    for cls, default in ((VictimTrainConfig, "victim"), (ClassifierTrainConfig, "victim_clf")):
        f = next(f for f in dataclasses.fields(cls) if f.name == "name")
        assert (f.default, field_help(f)) == (default, header)


@pytest.mark.parametrize("job", ["steal", "victim", "classify"])
def test_the_allow_lists_name_keys_the_config_has(job):
    """Every key a resumed run may change is a key of the resolved config (a renamed or moved key would leave the
    allow-list silently naming nothing)."""
    from stealer.config import to_dict

    def dotted(d: dict, prefix: str = "") -> set[str]:
        return {k for key, v in d.items() for k in (dotted(v, f"{prefix}{key}.") if isinstance(v, dict) else {prefix + key})}

    assert _may_change(job) - dotted(to_dict(golden_src.jobs()[job]())) == set()


def test_help_reaches_the_entry_point(capsys):
    """``launch/steal.py --help`` prints the header's and the sections' help texts beside their keys."""
    from launch.common import parse_job_args
    from stealer.config import JobHeader, field_help
    from stealer.steal import StealConfig

    with pytest.raises(SystemExit) as e:
        parse_job_args(StealConfig, "steal", ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    seed_help = field_help(next(f for f in dataclasses.fields(JobHeader) if f.name == "seed"))
    assert f"  seed = 0  (>= 0)  -- {seed_help}" in out
    assert "  student.width = 32  (>= 1)  -- base width of the project's ResNets" in out
    assert "  resume_force = False  -- resume even from a checkpoint written with other settings" in out


def test_help_shows_a_jobs_own_section_defaults():
    """A section a job builds with other defaults (the classifier's ``augment``) shows the job's, as it resolves."""
    from launch.common import config_help
    from stealer.config import to_dict
    from stealer.train_classifier import ClassifierTrainConfig

    resolved = to_dict(ClassifierTrainConfig())["augment"]
    lines = {x.split(" = ")[0].strip(): x.split(" = ")[1].split("  ")[0] for x in config_help(ClassifierTrainConfig)}
    for key, value in resolved.items():
        assert lines[f"augment.{key}"] == repr(value), key
    assert (resolved["scale_min"], resolved["jitter_p"]) == (0.5, 0.0)


@pytest.mark.parametrize("where", ["steal.train", "steal.data", "victim", "classify"])
def test_shared_keys_carry_their_pieces_range_and_help(where):
    """Keys redeclared with a job's own default (own_default) keep the piece's declared type (its range) and help:
    the steal's data.image_size/channels/workers are ShardTrainHeader's, the optimisation keys OptimRecipe's."""
    from stealer.config import OptimRecipe, ShardTrainHeader, field_help
    from stealer.steal import DataConfig, TrainConfig

    jobs = golden_src.jobs()
    cls, piece, keys = {"steal.train": (TrainConfig, OptimRecipe, ["batch_size", "weight_decay", "momentum", "warmup_epochs"]),
                        "steal.data": (DataConfig, ShardTrainHeader, ["image_size", "channels", "workers"]),
                        "victim": (jobs["victim"], OptimRecipe, ["batch_size", "weight_decay", "momentum", "warmup_epochs"]),
                        "classify": (jobs["classify"], OptimRecipe, ["batch_size", "weight_decay", "momentum", "warmup_epochs"])}[where]
    fields, hints = {f.name: f for f in dataclasses.fields(cls)}, typing.get_type_hints(cls, include_extras=True)
    piece_fields, piece_hints = {f.name: f for f in dataclasses.fields(piece)}, typing.get_type_hints(piece, include_extras=True)
    for key in keys:
        assert field_help(fields[key]) == field_help(piece_fields[key]) != "", key
        assert hints[key] == piece_hints[key], key
