"""One typed config object per job: YAML file + ``key=value`` overrides, validated up front.

Every job (steal, probe, train_victim) describes itself as nested dataclasses. ``load_config``
reads an optional YAML file, applies dotted ``section.key=value`` overrides (values parsed as
YAML scalars, then coerced to the field's declared type), and fails with a one-line error that
names the bad key and lists the valid ones. The resolved config is written into the run dir.

Each numeric key declares its allowed values in its type, next to the field: ``epochs:
PositiveInt = 30``, ``momentum: Momentum = 0.9``, ``channels: Channels = 1`` (aliases of
``Annotated[int, Range(ge=1)]`` …, or ``Annotated[float, Range(gt=0, le=1)]`` written out). They
are checked as the config is built, before any job starts (nothing is paid, queried or trained
on a bad value), with one line naming the key, the range and the default::

    train.epochs=-1 is out of range; set train.epochs to a value >= 1 (the default is train.epochs=30)

and ``--help`` shows them beside each key (``constraint_text``).

Example::

    cfg = load_config(StealConfig, "launch/configs/demo.yaml", ["train.lr=0.2", "seed=1"])
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable, TypeVar

import yaml

__all__ = ["ConfigError", "load_config", "read_yaml_mapping", "to_dict", "save_config", "apply_overrides", "choice",
           "Range", "OneOf", "constraint_text", "check_value", "PositiveInt", "NonNegInt", "PositiveFloat", "NonNegFloat",
           "Fraction", "Momentum", "Channels", "MixedPrecision", "check_victim_preprocess", "setting", "field_help",
           "JobHeader", "RunHeader", "ShardTrainHeader", "BackboneConfig", "OptimRecipe", "HEADER_MAY_CHANGE",
           "own_default"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed interval of a numeric config key, declared next to the field in its type::

        epochs: Annotated[int, Range(ge=1)] = 30      # or the alias PositiveInt
        momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9

    Checked when the config is built (before anything runs) and shown by ``--help``.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def ok(self, value: Any) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison; inf is no setting
            return False
        return not ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt))

    def text(self) -> str:
        lo = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}" if self.gt is not None else ""
        hi = f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}" if self.lt is not None else ""
        return " and ".join(t for t in (lo, hi) if t)


@dataclasses.dataclass(frozen=True)
class OneOf:
    """The allowed values of a config key (``Annotated[int, OneOf(1, 3)]``), checked and shown like a Range."""

    values: tuple[Any, ...]

    def __init__(self, *values: Any) -> None:
        object.__setattr__(self, "values", tuple(values))

    def ok(self, value: Any) -> bool:
        return value in self.values

    def text(self) -> str:
        return "one of " + ", ".join(str(v) for v in self.values)


PositiveInt = Annotated[int, Range(ge=1)]
NonNegInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
Momentum = Annotated[float, Range(ge=0, lt=1)]
Channels = Annotated[int, OneOf(1, 3)]  # grey or RGB images
MixedPrecision = Annotated[str, OneOf("auto", "no", "bf16", "fp16")]  # autocast of a training loop


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its ``--help`` text (kept in ``field.metadata["help"]``; ``launch.common.config_help``
    prints it beside the key, its default and its declared range)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def field_help(f: dataclasses.Field) -> str:
    """The help text a field was declared with ('' when none)."""
    return str(f.metadata.get("help", ""))


# -- shared config pieces: declared once, inherited by every job that has them ---------------------------
@dataclasses.dataclass
class JobHeader:
    """The keys every job starts with: its name, where it writes, its seed and the CPU switch.

    A job's config inherits it (or :class:`RunHeader`, for training loops): the keys stay top-level
    (``seed=1``), declared, ranged and documented in this one place.
    """

    name: str = setting("run", "run name: everything is written to <out_dir>/<name>")
    out_dir: str = setting("runs", "folder that holds the run folders")
    seed: NonNegInt = setting(0, "seed of initialisation, data order and augmentation")
    cpu: bool = setting(False, "run on the CPU even when an accelerator is present")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclasses.dataclass
class RunHeader(JobHeader):
    """:class:`JobHeader` plus what a training loop adds: resume, autocast and the loop's cadence
    (``class VictimTrainConfig(ShardTrainHeader)``; ``ckpt_every=50``)."""

    resume: str = setting("auto", "auto (newest valid checkpoint of this run), none, or a checkpoint path")
    resume_force: bool = setting(False, "resume even from a checkpoint written with other settings (they are listed)")
    mixed_precision: MixedPrecision = setting("auto", "autocast: auto (none on the CPU; bf16 on a GPU that has it, else fp16 with a GradScaler), no, bf16 or fp16")
    ckpt_every: PositiveInt = setting(200, "steps between checkpoints (and on preemption)")
    log_every: PositiveInt = setting(10, "steps between progress lines")


#: Keys of :class:`ShardTrainHeader` a resumed run may change (bookkeeping and speed, never the results);
#: each loop adds its own (``epochs``, ``test_data``, ...) to its allow-list.
HEADER_MAY_CHANGE = frozenset({"resume", "resume_force", "cpu", "out_dir", "workers", "mixed_precision", "ckpt_every",
                               "log_every"})


@dataclasses.dataclass
class ShardTrainHeader(RunHeader):
    """:class:`RunHeader` plus the training shards a victim trainer reads."""

    train_data: str = setting("runs/demo/data/animal_mnist/victim_train", "shard folder to train on (launch/make_shards.py)")
    image_size: PositiveInt = setting(32, "images are resized (shorter side) and centre-cropped to this size")
    channels: Channels = setting(1, "1 (grey) or 3 (RGB): what the images are decoded to")
    workers: NonNegInt = setting(0, "loader worker processes per rank (0: decode in the training process)")


@dataclasses.dataclass
class BackboneConfig:
    """The backbone keys (``model.arch``/``width``/``stem``) of the victim trainers and the classifier
    attack's clone, checked against ``victims.backbones`` at config time. ``SECTION`` is the section a
    subclass sits under (``clone``), named in its errors."""

    SECTION: typing.ClassVar[str] = "model"
    arch: str = setting("resnet18", "a victims.backbones name (resnet18, resnet50, ...) or timm:<model name>")
    width: PositiveInt = setting(32, "base width of the project's ResNets (64 is torchvision's); ResNets only")
    stem: str = setting("small", "small (3x3 conv, no max-pool: small images) or imagenet (7x7 + max-pool); ResNets only")

    def validate(self) -> None:
        from victims.backbones import BACKBONES, STEMS, TIMM_PREFIX

        if not self.arch.startswith(TIMM_PREFIX):
            choice(f"{self.SECTION}.arch", self.arch, list(BACKBONES) + [f"{TIMM_PREFIX}<model name>"])
            choice(f"{self.SECTION}.stem", self.stem, list(STEMS))


@dataclasses.dataclass
class OptimRecipe:
    """The optimisation keys the training loops share (the steal's ``train.*``, the victim trainers'), declared
    with their ranges and help once. The loops keep their own defaults and key order, so they redeclare each
    key with :func:`own_default` (``momentum: Momentum = own_default("momentum", 0.9, OptimRecipe)``) rather
    than inherit the piece; the learning rate is each loop's own (batch-scaled or not)."""

    batch_size: PositiveInt = setting(256, "images per step, per rank")
    weight_decay: NonNegFloat = setting(0.0, "weight decay (none on biases and norm weights)")
    momentum: Momentum = setting(0.9, "optimizer momentum")
    warmup_epochs: NonNegFloat = setting(0.0, "linear warmup of the learning rate, in epochs")


def own_default(key: str, default: Any, piece: type = RunHeader) -> Any:
    """A key of a shared config piece redeclared with one job's own default, its ``--help`` text kept the piece's::

        class ProbeConfig(JobHeader):
            name: str = own_default("name", "probe")

    (a dataclass needs the annotation repeated; keep it the piece's, so the declared range stays one).
    """
    f = next((f for f in dataclasses.fields(piece) if f.name == key), None)
    if f is None:
        raise KeyError(f"{key!r} is no key of {piece.__name__}: {', '.join(f.name for f in dataclasses.fields(piece))}")
    return setting(default, field_help(f))


def _constraints(tp: Any) -> list[Any]:
    """The Range/OneOf declarations of a (possibly Optional / list-of) annotated type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return [m for m in tp.__metadata__ if isinstance(m, (Range, OneOf))]
    if origin in (typing.Union, types.UnionType, list, tuple):
        return [c for a in args for c in _constraints(a)]
    return []


def constraint_text(tp: Any) -> str:
    """``">= 1"``, ``"one of 1, 3"`` … for a field's type ('' when it declares none): what ``--help`` shows."""
    return "; ".join(c.text() for c in _constraints(tp))


def check_value(key: str, value: Any, constraint: Range | OneOf, default: Any = dataclasses.MISSING) -> None:
    """Raise a one-line ConfigError naming ``key``, the allowed range and a valid value when ``value`` is outside it."""
    if value is None or constraint.ok(value):
        return
    example = default if default is not dataclasses.MISSING and default is not None and constraint.ok(default) else None
    fix = f"set {key} to a value {constraint.text()}" if isinstance(constraint, Range) else f"set {key} to {constraint.text()}"
    if example is not None:
        fix += f" (the default is {key}={example})"
    raise ConfigError(f"{key}={value!r} is {'out of range' if isinstance(constraint, Range) else 'not valid'}; {fix}")


def choice(key: str, value: str, allowed: Iterable[str]) -> None:
    """Raise a ConfigError naming ``key`` and the allowed values when ``value`` is not one."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}")


def _example(where: str, default: Any) -> str:
    """``; e.g. key=<default>`` for a scalar default (the fix a type error names), else ''."""
    if isinstance(default, (bool, int, float, str)) and default != "":
        return f"; e.g. {where}={str(default).lower() if isinstance(default, bool) else default}"
    return ""


def _coerce(value: Any, tp: Any, where: str, default: Any = dataclasses.MISSING) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        out = _coerce(value, args[0], where, default)
        for c in _constraints(tp):
            for v in (out if isinstance(out, (list, tuple)) else [out]):
                check_value(where, v, c, default)
        return out
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, default)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, where) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of keys, got {value!r}")
        return _build(tp, value, where + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}{_example(where, default)}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}{_example(where, default)}")
        if isinstance(value, int):
            return value
        try:
            f = float(str(value).replace("_", ""))
        except ValueError:
            f = None
        if f is not None and f.is_integer():
            return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}{_example(where, default)}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}{_example(where, default)}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}{_example(where, default)}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls, include_extras=True)  # keep the Range/OneOf declarations
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in (data or {}).items():
        if key not in fields:
            where = f" under '{prefix[:-1]}'" if prefix else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys{where}: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(value, hints[key], prefix + key, fields[key].default)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML/JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=0.1)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def read_yaml_mapping(path: str | Path, what: str = "config file", error: type[Exception] = ConfigError,
                      not_found_hint: str = "; pass an existing YAML (see launch/configs/)") -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (empty → ``{}``); one-line ``error`` otherwise."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {p} not found{not_found_hint}")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise error(f"{what} {p} is not valid YAML: {' '.join(str(e).split())}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise error(f"{what} {p} must hold a mapping of keys at top level")
    return loaded or {}


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file and ``key=value`` overrides; validate it."""
    data: dict[str, Any] = read_yaml_mapping(path) if path else {}
    data = apply_overrides(data, overrides)
    return _build(cls, data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from victims.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def check_victim_preprocess(prefix: str, preset: str, interpolation: str, mean: Any, std: Any) -> None:
    """The victim-preprocessing keys (``<prefix>preprocess``, ``interpolation``, ``mean``, ``std``) hold known
    values (presets: :data:`victims.preprocess.PRESET_NAMES`); one-line ConfigError naming the key otherwise."""
    from victims.preprocess import INTERPOLATIONS, PRESET_NAMES

    choice(f"{prefix}preprocess", preset, PRESET_NAMES)
    if interpolation:
        choice(f"{prefix}interpolation", interpolation, INTERPOLATIONS)
    for name, value in (("mean", mean), ("std", std)):
        vals = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        if len(vals) not in (0, 1, 3):
            raise ConfigError(f"{prefix}{name}={value!r} has {len(vals)} values; give 1 or one per channel (3)")
        if name == "std" and any(v <= 0 for v in vals):
            raise ConfigError(f"{prefix}std={value!r} must be > 0 per channel (e.g. {prefix}std=[0.229,0.224,0.225])")
