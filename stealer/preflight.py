"""Check a job's inputs before it starts: one line naming the missing file and how to make it.

A steal on a cluster should not wait in a queue, load a ResNet-50 and then die on a typo. Before
any work ``check_inputs(cfg)`` verifies, for a ``StealConfig``:

* query phase: the query shard folder (``data.query``) holds a finished set (``manifest.json``
  and every tar it lists) with at least ``query.num_queries`` images; the victim checkpoint
  (``victim.checkpoint``) is a file, or, over HTTP, the API key file (``victim.api_key_file``)
  is; ``victim.budget`` covers what the steal will send (images x the attack's queries per image);
* train phase without the query phase: the run's response cache exists;
* disk: the file system of the run folder has room for the responses still to be cached
  (:func:`check_disk_space`), so a steal does not pay for answers it then cannot keep;
* settings the train phase would refuse only after the query phase has paid
  (:func:`check_train_settings`): ``train.sync_bn`` on CPU processes, a ``train.batch_size`` that
  leaves ``train.drop_last=true`` without a single step.

Ranges of single keys (``train.epochs >= 1`` …) are checked earlier, when the config is built
(:mod:`stealer.config`).

``check_probe_inputs(cfg)`` does the same for a probe config (victim, stolen encoders, the
train/test shard folders of every downstream set). Every failure is a ``FileNotFoundError`` or
``ValueError`` whose message is one line, e.g.::

    shard folder data/imagenet/query (data.query) does not exist; make it with: python launch/make_shards.py IMAGE_FOLDER data/imagenet --split query=250000

Command line (what ``slurm/paper.sbatch`` runs before launching)::

    python -m stealer.preflight --config launch/configs/icml22_imagenet_infonce_t0.1.yaml [key=value ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["check_inputs", "check_probe_inputs", "check_shards", "check_checkpoint", "check_disk_space",
           "check_train_settings", "main"]

_DEFAULT_DATASETS = ("animal_mnist", "digits")


def _shards_hint(path: Path, want: int | None) -> str:
    if path.parent.name in _DEFAULT_DATASETS:  # the default data layout: ROOT/<dataset>/<split>
        return f"python launch/make_shards.py builtin:default {path.parent.parent}"
    if path.parent.name == "photo_patches":
        return f"python launch/select_queries.py --photo-patches {path} --n {want or 3000}"
    return f"python launch/make_shards.py IMAGE_FOLDER {path.parent} --split {path.name}={want or 'N'}"


def check_shards(path: str | Path, key: str, want: int | None = None) -> int:
    """The shard folder ``path`` (config key ``key``) is finished and holds ``want`` images; returns its size."""
    from stealer.data import open_shards

    p = Path(path)
    if not str(path):
        raise FileNotFoundError(f"{key} is empty; set it to a shard folder (see launch/make_shards.py)")
    if not (p / "manifest.json").is_file():
        what = "does not exist" if not p.exists() else "holds no manifest.json (an unfinished or foreign folder)"
        raise FileNotFoundError(f"shard folder {p} ({key}) {what}; make it with: {_shards_hint(p, want)}")
    n = open_shards(p).num_samples  # also: every tar the manifest lists is there
    if want is not None and want > n:
        raise ValueError(f"shard folder {p} ({key}) holds {n} images but {want} are wanted; lower query.num_queries "
                         f"or make a larger set")
    return n


def check_checkpoint(path: str | Path, key: str) -> None:
    """The victim checkpoint ``path`` (config key ``key``) is a file."""
    p = Path(path)
    if p.is_file():
        return
    if p.parent.name == "victim" and "demo" in p.parts:
        how = "python launch/demo.py (or python launch/train_victim.py --config launch/configs/demo_victim.yaml)"
    else:
        how = ("put the victim's SimSiam checkpoint there (official format, e.g. the 100-epoch ResNet-50 "
               "checkpoint_0099.pth.tar of facebookresearch/simsiam) or train one with python launch/train_victim.py")
    raise FileNotFoundError(f"victim checkpoint {p} ({key}) does not exist; {how}")


#: the representation size assumed before the victim is loaded: a ResNet-50's 2,048 (the largest
#: common victim), so the estimate errs on the safe side for smaller ones
RESPONSE_DIM_ESTIMATE = 2048
_NPY_MEMBER = 512 + 128 + 511  # tar header + .npy header + worst-case padding of one response member


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_disk_space(cfg: Any, images: int, per_image: int, free_bytes: int | None = None) -> int:
    """Refuse a query phase whose response cache cannot fit on the run folder's file system.

    The estimate per image still to be cached: its share of the query shards' bytes (the encoded
    image is copied into the cache with its tar headers) plus ``per_image`` responses of
    :data:`RESPONSE_DIM_ESTIMATE` values in ``query.dtype``. Images already in the run's cache
    (a resumed job) need nothing. Returns the estimated bytes.
    """
    import shutil

    from stealer.data import open_shards

    shards = open_shards(cfg.data.query)
    root = Path(shards.root)
    shard_bytes = sum((root / n).stat().st_size for n in shards.names) if root.is_dir() else 0
    image_b = shard_bytes / max(shards.num_samples, 1)
    value_b = 2 if getattr(cfg.query, "dtype", "float32") == "float16" else 4
    resp_b = per_image * RESPONSE_DIM_ESTIMATE * value_b + _NPY_MEMBER
    cache_dir = Path(cfg.run_dir) / "cache"
    cached = 0
    if cache_dir.is_dir():
        from stealer.cache import ResponseCache

        cached = ResponseCache(cache_dir).num_cached()
    need = int(max(images - cached, 0) * (image_b + resp_b))
    where = _existing_ancestor(Path(cfg.run_dir))
    free = shutil.disk_usage(where).free if free_bytes is None else free_bytes
    if need > free:
        raise ValueError(f"the response cache of this steal needs about {need / 2**30:.2f} GiB "
                         f"({images - cached} images x {(image_b + resp_b) / 1024:.1f} KiB) but {where} has "
                         f"{free / 2**30:.2f} GiB free; free space or set out_dir to a larger disk (nothing was paid)")
    return need


def _check_loss_args(t: Any) -> None:
    """Every ``train.loss_args`` key is a keyword of ``train.loss`` (the losses take ``**kwargs``, so a typo
    such as ``lamda`` for ``lambd`` would otherwise be ignored without a word)."""
    import inspect

    from stealer.losses import LOSSES

    fn = LOSSES.get(getattr(t, "loss", ""))
    args = getattr(t, "loss_args", None)
    if fn is None or not isinstance(args, dict) or not args:
        return
    internal = {"gather", "labels"}  # set by the training loop, not by the user
    known = [n for n, prm in inspect.signature(fn).parameters.items()
             if prm.kind is inspect.Parameter.KEYWORD_ONLY and n not in internal]
    unknown = [k for k in args if k not in known]
    if unknown:
        raise ValueError(f"train.loss_args has {', '.join(map(repr, unknown))}, which loss {t.loss} does not take; "
                         f"use its arguments: {', '.join(known)} (nothing was paid)")


def check_train_settings(cfg: Any, images: int | None, world: int = 1, device_type: str = "cpu") -> None:
    """Refuse, before the query phase pays, train settings that the train phase would refuse (or run as a
    no-op) on ``world`` processes of ``device_type`` with ``images`` cached images (None = unknown)."""
    if "train" not in cfg.phases:
        return
    resume = str(getattr(cfg, "resume", "auto"))
    if resume not in ("", "auto", "none", "no", "false"):  # a checkpoint path: readable and ours, or say so now
        from stealer.ckpt import load_checkpoint

        try:
            load_checkpoint(resume)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{e} (the resume setting; nothing was paid)") from None
    t = cfg.train
    _check_loss_args(t)
    if getattr(t, "sync_bn", False) and world > 1 and device_type != "cuda":
        raise ValueError(f"train.sync_bn needs GPUs (DDP refuses SyncBatchNorm on {device_type} modules); "
                         f"set train.sync_bn=false for {world} {device_type} processes (nothing was paid)")
    if images is not None and getattr(t, "drop_last", False) and images < t.batch_size * world:
        raise ValueError(f"train.batch_size={t.batch_size} x {world} process(es) is more than the {images} images, so "
                         f"train.drop_last=true leaves no step to train; lower train.batch_size or set "
                         f"train.drop_last=false (nothing was paid)")


def check_inputs(cfg: Any, world: int = 1, device_type: str = "cpu") -> dict[str, Any]:
    """Fail early when a ``StealConfig``'s inputs are missing or its train settings cannot run on ``world``
    processes of ``device_type``; returns what was checked (images, queries)."""
    out: dict[str, Any] = {}
    if "query" in cfg.phases:
        per_image = 1
        if hasattr(cfg, "attack"):
            from stealer.attacks import queries_per_image

            per_image = queries_per_image(cfg.attack)
        n = check_shards(cfg.data.query, "data.query", cfg.query.num_queries)
        images = n if cfg.query.num_queries is None else min(n, cfg.query.num_queries)
        if cfg.victim.url:
            if not Path(cfg.victim.api_key_file).is_file():
                raise FileNotFoundError(f"API key file {cfg.victim.api_key_file} (victim.api_key_file) does not exist; "
                                        f"create a key with python launch/serve.py add-user NAME")
        else:
            check_checkpoint(cfg.victim.checkpoint, "victim.checkpoint")
        need = images * per_image
        if cfg.victim.budget is not None and need > cfg.victim.budget:
            raise ValueError(f"victim.budget={cfg.victim.budget} is below the {need} queries this steal sends "
                             f"({images} images x {per_image} per image); raise victim.budget or lower query.num_queries")
        check_train_settings(cfg, images, world, device_type)
        out.update(images=images, queries=need, cache_bytes=check_disk_space(cfg, images, per_image))
    elif "train" in cfg.phases:
        if not (cfg.run_dir / "cache" / "manifest.json").is_file():
            raise FileNotFoundError(f"response cache {cfg.run_dir / 'cache'} does not exist; run the query phase first "
                                    f"(phases=[query])")
        from stealer.data import open_shards

        check_train_settings(cfg, open_shards(cfg.run_dir / "cache").num_samples, world, device_type)
    return out


def check_probe_inputs(cfg: Any) -> None:
    """Fail early when a probe config's victim, stolen encoders or downstream shard folders are missing."""
    if cfg.victim:
        check_checkpoint(cfg.victim, "victim")
    for item in cfg.stolen:
        name, _, path = item.partition("=")
        if not Path(path).is_file():
            raise FileNotFoundError(f"stolen encoder {path} (stolen entry '{name}') does not exist; run the steal first "
                                    f"(python launch/steal.py ...) or fix the path")
    for spec in cfg.sets:
        name, train, test = spec.split(":")
        if name.endswith("?"):  # optional: probed only where it exists (eval.run.present_sets)
            continue
        check_shards(train, f"probe set {name} train")
        check_shards(test, f"probe set {name} test")


def main(argv: list[str] | None = None) -> int:
    """``python -m stealer.preflight --config FILE [key=value ...]``: 0 and a summary, or 2 and one error line."""
    from stealer.config import ConfigError, load_config
    from stealer.steal import StealConfig

    ap = argparse.ArgumentParser(description="Check a steal config's inputs (shards, checkpoint, budget).")
    ap.add_argument("--config", help="steal config YAML")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(StealConfig, a.config, a.overrides)
        got = check_inputs(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"preflight ok: {cfg.run_dir} " + " ".join(f"{k}={v}" for k, v in got.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
