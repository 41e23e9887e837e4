"""Frozen-encoder features on disk: extracted once, data-parallel, read back a shard at a time.

A feature folder holds ``.npy`` shards of at most ``shard_rows`` rows (``feat-rRRR-IIIIII.npy``,
float16 or float32 ``[n, D]``, with ``lab-rRRR-IIIIII.npy`` int64 labels) and a ``manifest.json``
listing them in dataset order. Rank ``r`` of ``W`` encodes its contiguous part of the unshuffled
image shards (:class:`stealer.data.ShardStream`: rank r owns batches ``[r*K, (r+1)*K)``) and writes
its own feature shards; rank 0 writes the manifest last, once every rank is done, so a folder with a
manifest is complete and the concatenation of its shards is the folder's samples in order whatever
the number of ranks that wrote it. Every file goes through :func:`stealer.ckpt.atomic_write` (temp
file, fsync, rename): a kill leaves no torn shard and no manifest, and the next run extracts again.

Nothing here holds more than one shard (``shard_rows x D``) of features, so memory does not grow
with the number of samples. A folder whose manifest matches the request (source folder and its
sample count, encoder name, limit, dtype) is reused instead of encoding again.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from stealer.ckpt import atomic_write, atomic_write_json
from stealer.data import ShardStream, open_shards

__all__ = ["FORMAT", "FeatureShards", "write_feature_shards", "write_feature_arrays", "barrier"]

FORMAT = "sslsteal-features-1"
DTYPES = {"float16": np.float16, "float32": np.float32}


def barrier(world: int) -> None:
    """Wait for every rank (a no-op in one process)."""
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


class FeatureShards:
    """A complete feature folder (one with a manifest); shards are read whole, one at a time."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"feature folder {self.dir} has no manifest.json (extraction did not finish); "
                                    f"rerun the probe to extract again")
        try:
            m = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); delete {self.dir} and rerun the probe") from None
        if m.get("format") != FORMAT:
            raise ValueError(f"{path} is not a feature manifest (format {FORMAT}); delete {self.dir} and rerun the probe")
        self.manifest: dict[str, Any] = m
        self.names: list[str] = [s["feat"] for s in m["shards"]]
        self.label_names: list[str] = [s["label"] for s in m["shards"]]
        self.counts: list[int] = [int(s["count"]) for s in m["shards"]]
        self.dim = int(m["dim"])
        self.num_samples = int(sum(self.counts))
        self.num_classes = int(m.get("num_classes", 0))
        for name in self.names + self.label_names:
            if not (self.dir / name).is_file():
                raise FileNotFoundError(f"feature shard {self.dir / name} listed in the manifest is missing; "
                                        f"delete {self.dir} and rerun the probe")

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard ``i``: float32 features ``[n, D]`` and int64 labels ``[n]`` (read whole, no mmap)."""
        x = np.load(self.dir / self.names[i], allow_pickle=False)
        y = np.load(self.dir / self.label_names[i], allow_pickle=False)
        if x.shape != (self.counts[i], self.dim) or y.shape != (self.counts[i],):
            raise ValueError(f"feature shard {self.dir / self.names[i]} has shape {x.shape}, the manifest says "
                             f"({self.counts[i]}, {self.dim}); delete {self.dir} and rerun the probe")
        return x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)

    def read_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[start, stop)`` of the folder (across shards; each shard mapped only while sliced)."""
        xs, ys = [], []
        first = 0
        for i, n in enumerate(self.counts):
            lo, hi = max(start, first), min(stop, first + n)
            if lo < hi:
                x = np.load(self.dir / self.names[i], mmap_mode="r", allow_pickle=False)
                xs.append(np.array(x[lo - first:hi - first], dtype=np.float32))
                del x
                y = np.load(self.dir / self.label_names[i], mmap_mode="r", allow_pickle=False)
                ys.append(np.array(y[lo - first:hi - first], dtype=np.int64))
                del y
            first += n
            if first >= stop:
                break
        if not xs:
            return np.empty((0, self.dim), np.float32), np.empty(0, np.int64)
        return np.concatenate(xs), np.concatenate(ys)

    def chunks(self, rows: int | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(first_row, x, y)`` over the whole folder in order, ``rows`` at a time (default: a shard)."""
        start = 0
        for i in range(len(self)):
            x, y = self.read(i)
            step = rows or max(1, len(y))
            for j in range(0, len(y), step):
                yield start + j, torch.from_numpy(x[j:j + step]), torch.from_numpy(y[j:j + step])
            start += len(y)

    def load_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All features and labels in memory (for the test set, whose size does not grow with N)."""
        xs, ys = [], []
        for _, x, y in self.chunks():
            xs.append(x)
            ys.append(y)
        if not xs:
            return torch.empty(0, self.dim), torch.empty(0, dtype=torch.long)
        return torch.cat(xs), torch.cat(ys)


def _matches(directory: Path, want: dict[str, Any]) -> bool:
    try:
        have = FeatureShards(directory).manifest
    except (FileNotFoundError, ValueError, KeyError):
        return False
    return all(have.get(k) == v for k, v in want.items())


@torch.no_grad()
def write_feature_shards(
    encode: Callable[[torch.Tensor], torch.Tensor],
    shard_dir: str,
    out_dir: str | Path,
    *,
    encoder: str,
    channels: int,
    image_size: int,
    batch_size: int = 256,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    workers: int = 0,
    limit: int | None = None,
    shard_rows: int = 8192,
    dtype: str = "float32",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    decode_size: int | None = None,
    decoder: Any = None,
) -> FeatureShards:
    """Encode the images of ``shard_dir`` into the feature folder ``out_dir`` (collective: call on every rank).

    Args:
        encode: ``uint8 images [B, C, S, S] -> features [B, D]`` (a frozen encoder).
        encoder: its name, recorded in the manifest (a folder of another encoder is not reused).
        limit: only the first ``limit`` samples of the folder.
        shard_rows: rows per feature shard (the memory bound of every reader).
        dtype: ``float16`` halves the disk; ``float32`` keeps the features exact.
        transform: applied to each uint8 batch before ``encode`` (e.g. the centre crop of the
            linear-evaluation protocol); ``decode_size`` is then the size images are decoded at.
        decoder: ``bytes -> uint8 [H, W, C]`` replacing the stream's decode (a victim's own geometry).
    Returns the folder (reused without encoding when its manifest matches the request).
    """
    if dtype not in DTYPES:
        raise ValueError(f"feature dtype {dtype!r} is not one of {sorted(DTYPES)} (probe key feature_dtype)")
    out = Path(out_dir)
    source = open_shards(shard_dir)
    n = source.num_samples if limit is None else min(int(limit), source.num_samples)
    want = {"format": FORMAT, "source": str(Path(shard_dir).resolve()) if "://" not in shard_dir else shard_dir,
            "num_samples": n, "encoder": encoder, "dtype": dtype, "image_size": image_size,
            "decode_size": decode_size or image_size, "decoder": type(decoder).__name__ if decoder is not None else ""}
    reuse = _matches(out, want)
    barrier(world)  # every rank decided before rank 0 may start rewriting the folder
    if reuse:
        return FeatureShards(out)
    if rank == 0:
        (out / "manifest.json").unlink(missing_ok=True)
    barrier(world)
    extra = {"decoder": decoder} if decoder is not None else {}
    stream = ShardStream(source, batch_size=batch_size, rank=rank, world=world, shuffle=False, workers=workers,
                         channels=channels, image_size=decode_size or image_size, limit=limit, **extra)
    written: list[dict[str, Any]] = []
    bx: list[np.ndarray] = []
    by: list[np.ndarray] = []
    held = 0
    dim = -1

    def flush(upto: int) -> None:
        nonlocal bx, by, held
        x, y = np.concatenate(bx), np.concatenate(by)
        while len(y) >= upto and len(y) > 0:
            i = len(written)
            fx, fy = f"feat-r{rank:03d}-{i:06d}.npy", f"lab-r{rank:03d}-{i:06d}.npy"
            take = min(shard_rows, len(y))
            _save_npy(out / fx, np.ascontiguousarray(x[:take].astype(DTYPES[dtype])))
            _save_npy(out / fy, np.ascontiguousarray(y[:take].astype(np.int64)))
            written.append({"feat": fx, "label": fy, "count": take})
            x, y = x[take:], y[take:]
        bx, by, held = [x], [y], len(y)

    num_classes = 0
    for batch in stream.iter_epoch(0):
        imgs = batch["image"].to(device)
        if transform is not None:
            imgs = transform(imgs)
        f = encode(imgs).float().cpu().numpy()
        dim = f.shape[1]
        bx.append(f)
        by.append(batch["label"].numpy())
        if len(by[-1]):
            num_classes = max(num_classes, int(by[-1].max()) + 1)
        held += len(f)
        if held >= shard_rows:
            flush(shard_rows)
    if bx:
        flush(1)
    parts = [{"rank": rank, "shards": written, "dim": dim, "num_classes": num_classes}]
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, parts[0])
        parts = gathered
    if rank == 0:
        shards = [s for p in parts for s in p["shards"]]
        dims = {p["dim"] for p in parts if p["shards"]}
        manifest = {**want, "dim": dims.pop() if dims else 0, "world": world, "shard_rows": shard_rows,
                    "num_classes": max(p["num_classes"] for p in parts), "shards": shards}
        keep = {s["feat"] for s in shards} | {s["label"] for s in shards}
        for old in list(out.glob("feat-r*.npy")) + list(out.glob("lab-r*.npy")):
            if old.name not in keep:  # left by an earlier extraction with more ranks or rows
                old.unlink(missing_ok=True)
        atomic_write_json(out / "manifest.json", manifest)
    barrier(world)
    return FeatureShards(out)


def write_feature_arrays(out_dir: str | Path, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, *,
                         shard_rows: int = 8192, dtype: str = "float32", encoder: str = "arrays",
                         num_classes: int | None = None) -> FeatureShards:
    """Write in-memory features (one process) as a feature folder: tests and benchmarks."""
    out = Path(out_dir)
    xa = np.asarray(x, dtype=np.float32)
    ya = np.asarray(y, dtype=np.int64)
    (out / "manifest.json").unlink(missing_ok=True)
    shards = []
    for i, start in enumerate(range(0, len(ya), shard_rows)):
        fx, fy = f"feat-r000-{i:06d}.npy", f"lab-r000-{i:06d}.npy"
        _save_npy(out / fx, np.ascontiguousarray(xa[start:start + shard_rows].astype(DTYPES[dtype])))
        _save_npy(out / fy, np.ascontiguousarray(ya[start:start + shard_rows]))
        shards.append({"feat": fx, "label": fy, "count": int(min(shard_rows, len(ya) - start))})
    atomic_write_json(out / "manifest.json", {
        "format": FORMAT, "source": "arrays", "num_samples": int(len(ya)), "encoder": encoder, "dtype": dtype,
        "dim": int(xa.shape[1]), "world": 1, "shard_rows": shard_rows,
        "num_classes": int(num_classes if num_classes is not None else (ya.max() + 1 if len(ya) else 0)),
        "shards": shards})
    return FeatureShards(out)
