#!/usr/bin/env python
"""Serve a victim encoder over HTTP (victims/server.py), and manage its API keys.

    python launch/serve.py --checkpoint runs/demo/victim/checkpoint.pth.tar --state-dir runs/server \\
        [--representation backbone] [--defense '{"name": "noise", "sigma": 0.1}' ...] \\
        [--host 127.0.0.1] [--port 8000] [--rate 20] [--burst 40] [--max-batch 1024]
    python launch/serve.py add-user alice --budget 3000 --state-dir runs/server > alice.key
    python launch/serve.py usage --state-dir runs/server
    python launch/serve.py revoke alice --state-dir runs/server

The state folder holds ``ledger.sqlite`` (budgets, spent) and ``server.sqlite`` (hashed keys,
idempotency store, per-user defense state): stop and restart the server on the same folder
and nothing is lost. ``add-user`` prints the key once, on stdout, alone. One server process
per state folder (the defense state lives in it). Binds to 127.0.0.1 unless told otherwise:
plain HTTP sends keys in clear, so put a TLS proxy in front of anything not on loopback.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_STATE = "runs/server"
COMMANDS = ("add-user", "usage", "revoke")


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block) and exits 2."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        _fail(f"{message}; see {self.prog} --help")
        raise SystemExit(2)  # unreachable


def _number(kind: type, flag: str, *, lo: float, hi: float | None = None, lo_open: bool = False,
            meaning: str = "") -> Callable[[str], Any]:
    """An argparse type: ``kind`` within [lo, hi] (``lo_open``: > lo), else a one-line error naming ``flag``."""
    rng = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}; "
                                             f"pass {flag} with a value {rng}{meaning}") from None
        if not math.isfinite(value) or (value <= lo if lo_open else value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range; pass {flag} with a value {rng}{meaning}")
        return value
    return parse


def _budget(text: str) -> int | None:
    if text.lower() in ("none", "unlimited"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be an int >= 0 or 'unlimited'; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"budget must be >= 0; got {value}")
    return value


def _defense(text: str) -> dict[str, Any]:
    import yaml

    try:
        spec = yaml.safe_load(text)  # JSON, or YAML flow style {name: noise, sigma: 0.1}
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"--defense {text!r} is not JSON/YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict) or "name" not in spec:
        raise argparse.ArgumentTypeError(f"--defense must be a mapping with a name, e.g. '{{\"name\": \"noise\", \"sigma\": 0.1}}'; got {text!r}")
    return spec


def serve_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="serve.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="victim checkpoint (official SimSiam format)")
    p.add_argument("--arch", default="", help="backbone name for checkpoints without one ('' = from the file)")
    p.add_argument("--representation", default="backbone", choices=["backbone", "projector"])
    p.add_argument("--random-init", action="store_true", help="serve a random-init victim of the checkpoint's kind (a control)")
    p.add_argument("--defense", action="append", type=_defense, default=[], metavar="SPEC",
                   help='a defense of the chain, in order, e.g. \'{"name": "b4b", "seed": 1234}\' (repeat for several)')
    p.add_argument("--state-dir", default=DEFAULT_STATE, help=f"ledger, keys and defense state (default {DEFAULT_STATE})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_number(int, "--port", lo=1, hi=65535), default=8000, help="TCP port, 1..65535")
    p.add_argument("--rate", type=_number(float, "--rate", lo=0, meaning=" (0 = no limit)"), default=20.0,
                   help="query requests per second per user, >= 0 (0 = no limit)")
    p.add_argument("--burst", type=_number(int, "--burst", lo=1), default=40, help="requests a user may send at once, >= 1")
    p.add_argument("--max-batch", type=_number(int, "--max-batch", lo=1), default=1024, help="images per request, >= 1")
    p.add_argument("--max-request-mb", type=_number(float, "--max-request-mb", lo=0.001), default=64.0,
                   help="request body limit in MiB, >= 0.001")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="default answer dtype")
    p.add_argument("--device", default="cpu", help="where the encoder runs (cpu, cuda, cuda:1)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the encoder's forward: auto = bf16 on GPUs that have it, fp16 on others, fp32 on the CPU")
    p.add_argument("--preprocess", default="auto", choices=["auto", "project", "imagenet", "simsiam", "mocov3", "simclr", "none"],
                   help="how the victim reads images: auto = the checkpoint's own record, else ImageNet's eval transform "
                        "(Resize 256 + CenterCrop 224 + ImageNet mean/std, as the released SimSiam/MoCo v3 = simsiam = mocov3); "
                        "simclr = Resize 256 + CenterCrop 256 unnormalised (simclr-converter); project = the record; "
                        "none = images / 255 as they come (victims/preprocess.py)")
    p.add_argument("--mean", type=_float_list("--mean"), default=None, help="per-channel mean on images / 255, e.g. 0.485,0.456,0.406 (overrides the preset)")
    p.add_argument("--std", type=_float_list("--std"), default=None, help="per-channel std, e.g. 0.229,0.224,0.225 (overrides the preset)")
    p.add_argument("--resize", type=_number(int, "--resize", lo=0, meaning=" (0 = no resize)"), default=None,
                   help="shorter side resized to this before the crop (0 = none; overrides the preset)")
    p.add_argument("--crop", type=_number(int, "--crop", lo=0, meaning=" (0 = none)"), default=None,
                   help="centre crop (0 = none; overrides the preset)")
    p.add_argument("--interpolation", default=None, choices=["bilinear", "bicubic", "nearest"], help="of the resize (default: the preset's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def _float_list(flag: str) -> Any:
    def parse(text: str) -> list[float]:
        try:
            vals = [float(v) for v in text.replace(" ", "").strip("[]").split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be numbers separated by commas (e.g. 0.485,0.456,0.406); got {text!r}") from None
        if len(vals) not in (1, 3):
            raise argparse.ArgumentTypeError(f"{flag} takes 1 or 3 values; got {text!r}")
        return vals
    return parse


def build_app(a: argparse.Namespace) -> Any:
    """The app ``serve`` would run for parsed arguments ``a`` (importable for tests)."""
    from victims.api import VictimAPI
    from victims.defenses import build_defenses
    from victims.ledger import QueryLedger
    from victims.server import create_app, state_paths
    from victims.simsiam import load_victim_encoder, random_victim

    keys_db, ledger_db = state_paths(a.state_dir)
    encoder = load_victim_encoder(a.checkpoint, arch=a.arch or None, representation=a.representation,
                                  preprocess=getattr(a, "preprocess", "auto"), mean=getattr(a, "mean", None),
                                  std=getattr(a, "std", None), resize=getattr(a, "resize", None), crop=getattr(a, "crop", None),
                                  interpolation=getattr(a, "interpolation", None), preprocess_key="--preprocess")
    if a.random_init:
        encoder = random_victim(encoder)
    api = VictimAPI(encoder, QueryLedger(ledger_db), defenses=build_defenses(a.defense), device=a.device,
                    precision=a.precision)
    return create_app(api, keys_db=keys_db, rate_limit_per_s=a.rate, burst=a.burst,
                      max_request_bytes=int(a.max_request_mb * (1 << 20)), max_batch=a.max_batch,
                      response_dtype=a.dtype)


def serve(argv: Sequence[str]) -> None:
    a = serve_parser().parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        app = build_app(a)
    except (FileNotFoundError, ValueError, ImportError) as e:
        _fail(str(e).splitlines()[0])
        return
    from victims.server import list_users

    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {a.host}: plain HTTP sends API keys in clear; put a TLS proxy in front", file=sys.stderr)
    desc = app.state.service.api.describe()
    users = list_users(Path(a.state_dir) / "server.sqlite")
    print(f"serving {desc['arch']} ({desc['representation']}, dim {desc['out_dim']}) with "
          f"{len(a.defense)} defense(s) on http://{a.host}:{a.port}; preprocessing "
          f"{app.state.service.api.encoder.preprocessing.describe()}; state in {a.state_dir}; "
          f"{sum(1 for n in users.values() if n)} user(s) with keys", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, workers=1)


def admin(argv: Sequence[str]) -> None:
    from victims.ledger import QueryLedger
    from victims.server import add_user, list_users, revoke_user, state_paths

    cmd, rest = argv[0], argv[1:]
    p = _Parser(prog=f"serve.py {cmd}")
    if cmd in ("add-user", "revoke"):
        p.add_argument("name")
    if cmd == "add-user":
        p.add_argument("--budget", type=_budget, required=True, help="images the user may query in all, or 'unlimited'")
        p.add_argument("--replace", action="store_true", help="revoke the user's earlier keys")
    p.add_argument("--state-dir", default=DEFAULT_STATE)
    a = p.parse_args(rest)
    keys_db, ledger_db = state_paths(a.state_dir)
    if cmd == "add-user":
        try:
            key = add_user(keys_db, a.name, a.budget, ledger=ledger_db, replace=a.replace)
        except ValueError as e:
            _fail(str(e))
        budget = "unlimited" if a.budget is None else a.budget
        print(f"created a key for {a.name!r} (budget {budget}) in {a.state_dir}; it is shown once:", file=sys.stderr)
        print(key, flush=True)
    elif cmd == "revoke":
        n = revoke_user(keys_db, a.name)
        print(f"revoked {n} key(s) of {a.name!r}", file=sys.stderr)
    else:
        keys = list_users(keys_db)
        usage = QueryLedger(ledger_db).usage()
        out = {u: {**usage.get(u, {"budget": None, "spent": 0, "remaining": None}), "active_keys": keys.get(u, 0)}
               for u in sorted(set(keys) | set(usage))}
        print(json.dumps(out, indent=1))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        admin(argv)
    else:
        serve(argv)


if __name__ == "__main__":
    main()
