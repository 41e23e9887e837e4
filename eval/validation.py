"""Model selection without the test split: a validation folder carved from probe-train, and the choice made on it.

The few-label probe trains on the first ``train_limit`` images of the probe-train folder and scores on the
probe-test folder. Hyper-parameters (an attack's learning rate) are chosen on a *validation* folder made of
probe-train images after those ``train_limit`` (:func:`carve_validation`): the probe head is trained on the same
first ``train_limit`` images and scored on the carved ones, so neither the probe's training labels are scored
nor is the test split ever read before the choice is fixed (:func:`choose_by_validation`).
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from stealer.jsonsafe import dumps as json_dumps

__all__ = ["carve_validation", "choose_by_validation", "sees_augmented_views"]


def carve_validation(train_dir: str | os.PathLike, out_dir: str | os.PathLike, *, skip: int, n: int) -> dict[str, Any]:
    """Write probe-train images ``skip .. skip + n`` (reader order, the order ``train_limit`` takes) as a new shard
    folder ``out_dir``; reuse it when it already holds exactly that cut. Returns its manifest.

    Streamed (probe-train may be all of ImageNet train): one pass (``stealer.query_select.scan_pool``) numbers
    the readable images -- an undecodable one is skipped as the reader skips it -- and stops after the first
    ``skip + n``; ``copy_samples`` then copies the cut's encoded bytes from the tars into ``out_dir``. Memory:
    8 bytes an image scanned plus one image, never the images; the set written is byte for byte the one the
    whole-pool read (``read_pool``) wrote.

    Raises ValueError (one line) when probe-train holds no image after the first ``skip``.
    """
    import tarfile

    import numpy as np

    from stealer.query_select import copy_samples, scan_pool
    from stealer.shards import MANIFEST_NAME, read_manifest, write_manifest

    if int(n) < 1 or int(skip) < 0:
        raise ValueError(f"validation cut skip={skip}, n={n}: need skip >= 0 and n >= 1 (set the sweep's n_val >= 1)")
    out = Path(out_dir)
    want = {"source": os.path.abspath(train_dir), "skip": int(skip), "n": int(n)}
    if (out / MANIFEST_NAME).is_file():
        m = read_manifest(out)
        if {k: m.get("validation", {}).get(k) for k in want} == want:
            return m
        shutil.rmtree(out)
    scan = scan_pool(train_dir, limit=int(skip) + int(n))  # counts every image when fewer: total exact below
    total = len(scan)
    idx = np.arange(skip, min(total, skip + n), dtype=np.int64)
    if not len(idx):
        raise ValueError(f"probe-train {train_dir} holds {total} images, none after the probe's first {skip} "
                         f"(train_limit): lower the probe's train_limit to leave a validation split")
    m = scan.manifest
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = copy_samples(scan, idx, tmp, out.parent / f".{out.name}.{os.getpid()}.spill",
                            source=f"validation: images {skip}..{skip + len(idx)} of {want['source']}",
                            classes=list(m.get("classes") or ["0"]))
    first: list[str] = []  # the cut's first keys, for the record: read from the first tar's headers
    with tarfile.open(tmp / manifest["shards"][0]["name"]) as tar:
        for member in tar:
            key = member.name.split(".", 1)[0]
            if key not in first:
                if len(first) == 3:
                    break
                first.append(key)
    manifest["validation"] = {**want, "kept": len(idx), "keys": first}
    write_manifest(tmp, manifest)
    os.rename(tmp, out)
    return manifest


def choose_by_validation(records: Iterable[dict[str, Any]], *, key: str = "lr", probe: str = "linear",
                         split: str = "val") -> dict[str, Any]:
    """The setting with the highest validation top-1 among ``records`` (one per candidate: ``{key: value, 'set',
    'probe', 'top1'}``); ties go to the first candidate. Records of any set other than ``split`` are refused
    (ValueError), so a choice can never have read the test split. Returns ``{'chosen', 'top1', 'candidates'}``."""
    cands: list[tuple[Any, float]] = []
    for r in records:
        if r.get("probe", "linear") != probe:
            continue
        if r.get("set") != split:
            raise ValueError(f"model selection read a '{r.get('set')}' record; it may only read the '{split}' split")
        top1 = math.nan if r.get("top1") is None else float(r["top1"])  # null (strict JSON) or NaN: undefined
        cands.append((r[key], -math.inf if math.isnan(top1) else top1))
    if not cands:
        raise ValueError(f"no '{split}' {probe} records to choose {key} from")
    best = max(range(len(cands)), key=lambda i: (cands[i][1], -i))
    return {"chosen": cands[best][0], "top1": cands[best][1], "candidates": [{key: c, "top1": t} for c, t in cands]}


def sees_augmented_views(attack: str, train_augment: bool) -> bool:
    """Whether a steal's student is trained on augmented views (then a random-teacher control belongs beside it):
    every attack but ``direct``, and ``direct`` with ``train.augment``."""
    return attack != "direct" or bool(train_augment)


def write_json(path: Path, obj: Any) -> None:
    from victims.atomic import atomic_write_text

    atomic_write_text(path, json_dumps(obj, indent=1))  # strict JSON: an undefined top-1 is null
