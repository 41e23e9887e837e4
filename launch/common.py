"""Shared glue of the entry points: argument parsing, the accelerator, the in-process victim."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from stealer.dist import make_accelerator  # noqa: F401  (re-exported for the entry points)

T = TypeVar("T")

__all__ = ["parse_job_args", "make_accelerator", "build_victim_api", "queries_spent", "config_help", "fail"]


def queries_spent(api: Any, user: str) -> int:
    """What the victim has charged ``user`` (ledger in-process, usage endpoint over HTTP)."""
    if hasattr(api, "ledger"):
        return int(api.ledger.spent(user))
    return int(api.usage()["spent"])


def config_help(cls: type, prefix: str = "", section: Any = None) -> list[str]:
    """``key = default`` lines for every leaf of a config dataclass (with its declared range and help text, if any).

    ``section``: the default object a job's field builds for this section when it differs from ``cls()``
    (``augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(scale_min=0.5))``); its own values are
    shown where they differ."""
    from stealer.config import constraint_text, field_help

    lines = []
    hints = typing.get_type_hints(cls, include_extras=True)
    plain = cls() if section is not None else None
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            built = (getattr(section, f.name) if section is not None else
                     f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
            lines += config_help(tp, prefix + f.name + ".", built)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if section is not None and getattr(section, f.name) != getattr(plain, f.name):
                default = getattr(section, f.name)
            allowed, what = constraint_text(tp), field_help(f)
            lines.append(f"  {prefix}{f.name} = {default!r}" + (f"  ({allowed})" if allowed else "") + (f"  -- {what}" if what else ""))
    return lines


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error:`` line naming the fix (``--help``), exit 2, like every
    other user error of the entry points."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        fail(f"{message}; see {self.prog} --help")


def parse_job_args(cls: type[T], description: str, argv: Sequence[str] | None = None) -> T:
    """``--config FILE [--resume auto|none|PATH] key=value ...`` → a validated config object."""
    from stealer.config import ConfigError, load_config

    p = OneLineParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with key=value; allowed values in parentheses):\n" + "\n".join(config_help(cls)),
    )
    p.add_argument("--config", help="YAML file of config keys (see launch/configs/)")
    p.add_argument("--resume", help="auto (newest valid checkpoint of this run), none, or a checkpoint path")
    if any(f.name == "resume_force" for f in dataclasses.fields(cls)):
        p.add_argument("--resume-force", action="store_true",
                       help="resume even when the checkpoint was written with other settings (they are listed)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=0.5 victim.budget=3000")
    a = p.parse_intermixed_args(argv)  # options may come after key=value overrides
    overrides = list(a.overrides)
    if a.resume is not None:
        overrides.append(f"resume={a.resume}")
    if getattr(a, "resume_force", False):
        overrides.append("resume_force=true")
    try:
        return load_config(cls, a.config, overrides)
    except ConfigError as e:
        fail(str(e))
        raise  # unreachable


def _bar_active() -> bool:
    try:
        from tqdm import tqdm
    except ImportError:
        return False
    return any(not getattr(b, "disable", True) for b in list(getattr(tqdm, "_instances", [])))


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """Print a one-line error and exit."""
    # on a line of its own even when a progress bar was drawing on stderr
    print(f"\nerror: {message}" if _bar_active() else f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def exit_preempted(acc: Any, exc: BaseException) -> typing.NoReturn:
    """A job stopped by a preemption request after its checkpoint: say so once, exit 3
    (``stealer.preempt.PREEMPT_EXIT_CODE``: resumable; a requeued job resumes by itself)."""
    from stealer.preempt import PREEMPT_EXIT_CODE

    if acc.is_main_process:
        print(str(exc), flush=True)
    sys.exit(PREEMPT_EXIT_CODE)


def build_victim_api(vcfg: Any, run_dir: str | os.PathLike, device: Any = "cpu") -> Any:
    """The victim transport: an HTTP client when ``victim.url`` is set, else the in-process
    encoder behind a VictimAPI with a persistent per-user ledger."""
    if vcfg.url:
        from stealer.client import HTTPVictim, load_or_create_nonce, read_api_key

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        return HTTPVictim(vcfg.url, read_api_key(vcfg.api_key_file),
                          max_retries=vcfg.max_retries, nonce=load_or_create_nonce(Path(run_dir) / "client_nonce"))
    from victims.api import VictimAPI
    from victims.ledger import QueryLedger
    from victims.preprocess import preprocess_kwargs
    from victims.simsiam import load_victim_encoder, random_victim

    encoder = load_victim_encoder(vcfg.checkpoint, arch=vcfg.arch or None, representation=vcfg.representation,
                                  **preprocess_kwargs(vcfg, "victim."))
    if vcfg.random_init:
        encoder = random_victim(encoder)
    state = Path(vcfg.state_dir) if vcfg.state_dir else Path(run_dir) / "victim_state"
    state.mkdir(parents=True, exist_ok=True)
    ledger = QueryLedger(state / "ledger.sqlite")
    if vcfg.budget is not None:  # the defender's setting; None leaves the stored budget alone
        ledger.set_budget(vcfg.user, vcfg.budget)
    from victims.defenses import build_defenses

    return VictimAPI(encoder, ledger, defenses=build_defenses(list(vcfg.defenses)), device=device,
                     precision=getattr(vcfg, "precision", "fp32"))
