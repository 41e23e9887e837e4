"""Image datasets as WebDataset shards (``sslsteal-shards/1``): the library behind ``launch/make_shards.py``.

:func:`make_shards` takes a SOURCE, one of:

* an image-folder tree ``SOURCE/<class>/**/<image>`` (jpg/jpeg/png/bmp/gif/tif/webp/ppm/pgm;
  class index = position of the sorted class-folder name);
* an ImageNet root ``SOURCE/train/<wnid>/`` + ``SOURCE/val/`` (val as class folders, or flat with
  its label file -- Kaggle ``LOC_val_solution.csv``, the devkit's ground truth + ``meta.mat``, or
  ``imagenet_2012_validation_synset_labels.txt``; see :mod:`stealer.imagenet`): train is written
  as ``OUT_DIR/train`` (or one folder per split), val as ``OUT_DIR/val`` with the train
  classes' indices (matched by wnid);
* a flat folder of images with such a label file (found beside it or up to four folders above,
  or given as ``val_labels``);
* a ``.npz`` with ``images`` (uint8, N x H x W or N x H x W x 3), ``labels`` (ints) and
  optionally ``classes`` (names);
* ``builtin:animal_mnist`` or ``builtin:digits`` (datasets that ship inside pip packages), or
  ``builtin:default`` = every split of the default experiments
  (:func:`stealer.shards.build_default_data`).

The shard format and the manifest are described in :mod:`stealer.shards`, which also scans image folders
(:class:`stealer.shards.ImageFolderSource`) and writes the tars; this module picks the source kind and writes
it as one set or as splits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from stealer.datasets import BUILTIN_DATASETS, OPTIONAL_DATASETS, load_builtin, split_indices
from stealer.imagenet import VAL_LABEL_FILES, find_val_labels, is_imagenet_root, read_val_labels
from stealer.shards import (
    IMAGE_EXTENSIONS,
    ImageFolderSource,
    ShardSourceError,
    SkipCounter,
    array_layout,
    array_samples,
    build_default_data,
    load_npz,
    read_manifest,
    sanitize_key_prefix,
    write_shards,
)

__all__ = ["make_shards"]

# the names builtin:NAME accepts
_BUILTIN_CHOICES = [*sorted(BUILTIN_DATASETS), *sorted(OPTIONAL_DATASETS), "default"]


def _write_set(samples, out_dir: Path, *, skipped, overwrite: bool, **kw) -> dict:
    if isinstance(skipped, SkipCounter):
        kw["extra"] = skipped.quirks
    try:
        return write_shards(samples, out_dir, skipped=skipped, overwrite=overwrite, **kw)
    except FileExistsError:
        raise FileExistsError(
            f"{out_dir} already holds a shard set (manifest.json); pass --overwrite or choose another OUT_DIR"
        ) from None


def make_shards(
    source: str,
    out_dir: str | os.PathLike[str],
    *,
    samples_per_shard: int = 1000,
    image_size: int | None = None,
    splits: Mapping[str, int] | None = None,
    seed: int = 0,
    prefix: str = "train",
    overwrite: bool = False,
    keep_order: bool = False,
    workers: int = 1,
    val_labels: str | os.PathLike[str] | None = None,
) -> dict[str, dict]:
    """Write ``source`` as shards into ``out_dir`` (or one sub-folder per split).

    Args:
        source: image-folder path, ``.npz`` path, or ``builtin:NAME``
            (``animal_mnist``, ``digits``, ``default``).
        out_dir: output folder.
        samples_per_shard: samples per tar file.
        image_size: resize every image to ``S x S`` (PIL bilinear, channels kept);
            ``None`` keeps native sizes (``builtin:default`` then uses 32).
        splits: split name -> count; writes ``out_dir/NAME`` per split, disjoint and
            class-stratified (:func:`stealer.datasets.split_indices`).
        seed: seed for the splits and for the sample order.
        prefix: shard file prefix (``{prefix}-{i:06d}.tar``).
        overwrite: replace existing shard sets instead of failing.
        keep_order: write samples in source order instead of a seeded shuffle
            (source order is usually class-sorted, which hurts streaming readers).
        workers: image folders only: read headers with this many threads and decode /
            re-encode in this many processes; the shards are byte-for-byte the same.
        val_labels: the label file of a flat folder (an ImageNet root's flat ``val/``, or
            ``source`` itself); found automatically when ``None`` (:func:`stealer.imagenet.find_val_labels`).

    Returns:
        output folder (as a string) -> its manifest. For ``builtin:default`` the
        manifests of all default splits (existing ones are kept, not rewritten).

    Raises:
        FileNotFoundError, FileExistsError, ShardSourceError, ValueError, ImportError:
            with a one-line message naming the problem and the fix.
    """
    out = Path(out_dir)
    splits = dict(splits or {})
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {image_size}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")

    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name == "default":
            if splits:
                raise ValueError("builtin:default has its own splits; drop --split (or use builtin:animal_mnist)")
            paths = build_default_data(
                out,
                seed=seed,
                image_size=32 if image_size is None else image_size,
                samples_per_shard=samples_per_shard,
                prefix=prefix,
            )
            return {str(p): read_manifest(p) for p in paths.values()}
        if name not in BUILTIN_DATASETS and name not in OPTIONAL_DATASETS:
            raise ValueError(f"unknown source {source!r}; choose one of: {', '.join('builtin:' + c for c in _BUILTIN_CHOICES)}")
        images, labels, classes = load_builtin(name)
        images, channels = array_layout(images, source)
        return _write_arrays(
            images, labels, classes, channels, out, source=source, key_prefix=name, image_size=image_size,
            splits=splits, seed=seed, prefix=prefix, samples_per_shard=samples_per_shard,
            overwrite=overwrite, keep_order=keep_order,
        )

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"source {path} does not exist; give an image folder, a .npz file or "
            f"{'|'.join('builtin:' + c for c in _BUILTIN_CHOICES)}"
        )
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise ShardSourceError(f"source {path} is a file but not a .npz; give a .npz, an image folder or builtin:NAME")
        images, labels, classes = load_npz(path)
        images, channels = array_layout(images, str(path))
        return _write_arrays(
            images, labels, classes, channels, out, source=str(path), key_prefix=sanitize_key_prefix(path.stem),
            image_size=image_size, splits=splits, seed=seed, prefix=prefix,
            samples_per_shard=samples_per_shard, overwrite=overwrite, keep_order=keep_order,
        )

    if out.resolve().is_relative_to(path.resolve()):
        raise ValueError(f"OUT_DIR {out} lies inside SOURCE {path}; write the shards somewhere else")
    kw = dict(image_size=image_size, splits=splits, seed=seed, prefix=prefix, samples_per_shard=samples_per_shard,
              overwrite=overwrite, keep_order=keep_order, workers=workers)
    if is_imagenet_root(path):
        if "val" in splits:
            raise ValueError("--split val would overwrite the ImageNet val set written to OUT_DIR/val; name the split otherwise")
        train = ImageFolderSource.scan(path / "train", image_size=image_size, workers=workers)
        val, labels_file = _scan_val(path / "val", train.classes, image_size, workers, val_labels)  # before any writing
        result = _write_folder(train, path / "train", out if splits else out / "train", **kw)
        result.update(_write_folder(val, path / "val", out / "val", labels_file=labels_file,
                                    **{**kw, "splits": {}, "prefix": "val" if prefix == "train" else prefix}))
        return result
    if _is_flat(path):
        labels_file = Path(val_labels) if val_labels else find_val_labels(path)
        if labels_file is None:
            raise ShardSourceError(
                f"{path} holds images but no class sub-folders, and no label file was found in it or four folders "
                f"above ({', '.join(VAL_LABEL_FILES)}); pass --val-labels FILE or put the images in {path}/<class name>/"
            )
        folder, labels_file = _scan_val(path, None, image_size, workers, labels_file)
        return _write_folder(folder, path, out, labels_file=labels_file, **kw)
    if val_labels:
        raise ValueError(f"--val-labels is for a flat folder or an ImageNet root (train/ + val/); {path} has class folders")
    folder = ImageFolderSource.scan(path, image_size=image_size, workers=workers)
    return _write_folder(folder, path, out, **kw)


def _is_flat(path: Path) -> bool:
    """A folder with images directly in it and no class sub-folders."""
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    return not any(e.is_dir() for e in entries) and any(
        e.is_file() and e.suffix.lower() in IMAGE_EXTENSIONS for e in entries)


def _scan_val(
    folder: Path, classes: Sequence[str] | None, image_size: int | None, workers: int,
    val_labels: str | os.PathLike[str] | None,
) -> tuple[ImageFolderSource, Path | None]:
    """A val folder as a source: class folders (named as ``classes``) or flat with its label file."""
    if not _is_flat(folder):
        if val_labels:
            raise ValueError(f"--val-labels given but {folder} is sorted into class folders; drop --val-labels")
        return ImageFolderSource.scan(folder, image_size=image_size, workers=workers, classes=classes), None
    labels_file = Path(val_labels) if val_labels else find_val_labels(folder)
    if labels_file is None:
        raise ShardSourceError(
            f"{folder} is a flat val folder but no label file was found in it or four folders above "
            f"({', '.join(VAL_LABEL_FILES)}); pass --val-labels FILE or sort it into class folders (valprep.sh)"
        )
    if not labels_file.is_file():
        raise FileNotFoundError(f"--val-labels {labels_file} does not exist")
    labels, declared = read_val_labels(labels_file)
    if classes is None:
        classes = declared or sorted(set(labels.values()))
    return ImageFolderSource.scan_labelled(folder, labels, classes, image_size=image_size, workers=workers), labels_file


def _write_folder(
    folder: ImageFolderSource, path: Path, out: Path, *, labels_file: Path | None = None,
    image_size: int | None, splits: Mapping[str, int], seed: int, prefix: str, samples_per_shard: int,
    overwrite: bool, keep_order: bool, workers: int,
) -> dict[str, dict]:
    """Write a scanned folder as one set or as splits; quirks and left-out files go into each manifest."""
    common = dict(
        prefix=prefix, samples_per_shard=samples_per_shard, classes=folder.classes,
        channels=folder.channels, image_size=folder.native_size,
    )
    note = f" labels={labels_file}" if labels_file else ""
    result: dict[str, dict] = {}
    for sub, indices, label in _plan(folder.labels, splits, seed, keep_order, out):
        counter = SkipCounter(files={k: list(v) for k, v in folder.left_out.items()})
        result[str(sub)] = _write_set(
            folder.samples(indices, skipped=counter, workers=workers), sub, skipped=counter, overwrite=overwrite,
            source=f"{path}{note}{label}", **common,
        )
    return result


def _plan(labels: np.ndarray, splits: Mapping[str, int], seed: int, keep_order: bool, out: Path):
    """Yield ``(folder, indices, source-suffix)`` for the whole set or for each split."""
    if splits:
        for name, idx in split_indices(labels, splits, seed).items():
            yield out / name, idx, f" split={name} seed={seed}"
    elif keep_order:
        yield out, np.arange(labels.shape[0]), ""
    else:
        yield out, np.random.default_rng(seed).permutation(labels.shape[0]), ""


def _write_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    channels: int,
    out: Path,
    *,
    source: str,
    key_prefix: str,
    image_size: int | None,
    splits: Mapping[str, int],
    seed: int,
    prefix: str,
    samples_per_shard: int,
    overwrite: bool,
    keep_order: bool,
) -> dict[str, dict]:
    size = [image_size, image_size] if image_size is not None else [int(images.shape[1]), int(images.shape[2])]
    result: dict[str, dict] = {}
    for sub, indices, label in _plan(labels, splits, seed, keep_order, out):
        result[str(sub)] = _write_set(
            array_samples(images, labels, indices, key_prefix=key_prefix, image_size=image_size),
            sub, skipped=0, overwrite=overwrite, source=f"{source}{label}", prefix=prefix,
            samples_per_shard=samples_per_shard, classes=classes, channels=channels, image_size=size,
        )
    return result
