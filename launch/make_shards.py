"""Turn an image dataset into WebDataset shards (``sslsteal-shards/1``): ``python launch/make_shards.py SOURCE OUT_DIR``.

SOURCE is one of:

* an image-folder tree ``SOURCE/<class>/**/<image>`` (jpg/jpeg/png/bmp/gif/tif/webp/ppm/pgm;
  class index = position of the sorted class-folder name);
* an ImageNet root ``SOURCE/train/<wnid>/`` + ``SOURCE/val/`` (val as class folders, or flat with
  its label file -- Kaggle ``LOC_val_solution.csv``, the devkit's ground truth + ``meta.mat``, or
  ``imagenet_2012_validation_synset_labels.txt``; see :mod:`stealer.imagenet`): train is written
  as ``OUT_DIR/train`` (or one folder per ``--split``), val as ``OUT_DIR/val`` with the train
  classes' indices (matched by wnid);
* a flat folder of images with such a label file (found beside it or up to four folders above,
  or given with ``--val-labels``);
* a ``.npz`` with ``images`` (uint8, N x H x W or N x H x W x 3), ``labels`` (ints) and
  optionally ``classes`` (names);
* ``builtin:animal_mnist`` or ``builtin:digits`` (datasets that ship inside pip packages), or
  ``builtin:default`` = every split of the default experiments
  (:func:`stealer.shards.build_default_data`).

The shard format and the manifest are described in :mod:`stealer.shards`.
Importable: :func:`make_shards` does what the command does; :func:`main` takes an argv list.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from stealer.datasets import BUILTIN_DATASETS, OPTIONAL_DATASETS, load_builtin, split_indices
from stealer.imagenet import VAL_LABEL_FILES, find_val_labels, is_imagenet_root, read_val_labels
from stealer.shards import (
    IMAGE_EXTENSIONS,
    ImageFolderSource,
    ShardSourceError,
    ShardWarning,
    SkipCounter,
    array_layout,
    array_samples,
    build_default_data,
    load_npz,
    read_manifest,
    sanitize_key_prefix,
    write_shards,
)

__all__ = ["main", "make_shards", "parse_split"]

_PROG = "make_shards"
_SPLIT_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]*)=(\d+)$")
_BUILTIN_CHOICES = [*sorted(BUILTIN_DATASETS), *sorted(OPTIONAL_DATASETS), "default"]


def parse_split(text: str) -> tuple[str, int]:
    """Parse ``NAME=COUNT`` (NAME: letters, digits, ``_``, ``-``; COUNT: a non-negative integer)."""
    m = _SPLIT_RE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"bad --split {text!r}: write NAME=COUNT, e.g. --split query=3000 (NAME: letters, digits, '_', '-')"
        )
    return m.group(1), int(m.group(2))


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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python launch/make_shards.py",
        description=(
            "Write an image dataset as WebDataset shards (sslsteal-shards/1): OUT_DIR/PREFIX-000000.tar ...\n"
            "plus OUT_DIR/manifest.json, written last (a folder without it is unfinished). Each sample is\n"
            "KEY.png (mode L or RGB; or KEY.jpg for JPEGs copied as they are) and KEY.cls (class index as text).\n"
            "Keys are unique across the set and across its splits. Errors are one line, exit status 2."
        ),
        epilog=(
            "SOURCE kinds:\n"
            "  DIR                  image-folder tree DIR/<class>/**/<image> (jpg jpeg png bmp gif tif tiff webp\n"
            "                       ppm pgm pbm pnm). Classes = sorted sub-folder names. If >= 90% of the images\n"
            "                       are JPEGs and --image-size is not given, the JPEG bytes are copied as they are\n"
            "                       (the others re-encoded as JPEG, quality 95); otherwise all images are stored as\n"
            "                       PNG. Grey if every image is grey, else RGB.\n"
            "                       Unreadable images are skipped with a warning and counted in the manifest\n"
            "                       as \"skipped\"; converted (CMYK/grey -> RGB, a PNG named .JPEG -> JPEG) and\n"
            "                       skipped files are listed by kind under \"quirks\".\n"
            "  IMAGENET_ROOT        ROOT/train/<wnid>/ and ROOT/val/ (class folders, or flat with LOC_val_solution.csv,\n"
            "                       the devkit's ILSVRC2012_validation_ground_truth.txt + meta.mat, or\n"
            "                       imagenet_2012_validation_synset_labels.txt): train -> OUT_DIR/train (or the\n"
            "                       --split folders), val -> OUT_DIR/val with train's class indices (by wnid).\n"
            "  FLAT_DIR             images with one of those label files (--val-labels FILE, or found nearby).\n"
            "  FILE.npz             arrays images (uint8 N,H,W or N,H,W,3), labels (ints), optional classes.\n"
            "  builtin:animal_mnist Animal-MNIST, 10000 x 28x28 grey, 10 animal classes (pip package animal-mnist).\n"
            "  builtin:digits       scikit-learn digits, 1797 x 8x8 grey scaled to 0..255.\n"
            "  builtin:default      the default experiment data: OUT_DIR/animal_mnist/{victim_train,query,\n"
            "                       probe_train,probe_test} and OUT_DIR/digits/{probe_train,probe_test}, 32x32\n"
            "                       unless --image-size; splits that already have a manifest are kept.\n"
            "\n"
            "examples:\n"
            "  python launch/make_shards.py builtin:default data/\n"
            "  python launch/make_shards.py ~/images/pets data/pets --image-size 64 --split train=8000 --split test=2000\n"
            "  python launch/make_shards.py faces.npz data/faces --samples-per-shard 500\n"
            "  python launch/make_shards.py $IMAGENET data/imagenet --split query=250000 --split probe_train=50000 --workers 16\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="image folder, .npz file, or builtin:animal_mnist|digits|fashion_mnist|default (fashion_mnist: apt-get install dataset-fashion-mnist)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created); with --split, one sub-folder per split")
    parser.add_argument("--samples-per-shard", type=int, default=1000, metavar="N", help="samples per tar file (default 1000)")
    parser.add_argument(
        "--image-size", type=int, default=None, metavar="S",
        help="resize every image to S x S (PIL bilinear, no crop, channels kept) and store PNG; "
        "default: native size (32 for builtin:default)",
    )
    parser.add_argument(
        "--split", type=parse_split, action="append", default=[], metavar="NAME=COUNT",
        help="repeatable: write OUT_DIR/NAME with COUNT samples; splits are disjoint and class-stratified "
        "(COUNTs may add up to at most the number of images)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the splits and the sample order (default 0)")
    parser.add_argument("--prefix", default="train", metavar="P", help="shard file prefix: P-000000.tar ... (default train)")
    parser.add_argument("--overwrite", action="store_true", help="replace shard sets already in OUT_DIR instead of failing")
    parser.add_argument(
        "--keep-order", action="store_true",
        help="write samples in source order (default: shuffled with --seed, since source order is often class-sorted)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="image folders: read headers with N threads and decode/encode in N processes (e.g. the node's cores); "
        "the output is byte-for-byte that of 1 worker (default 1)",
    )
    parser.add_argument(
        "--val-labels", default=None, metavar="FILE",
        help="label file of a flat folder (an ImageNet root's val/ or SOURCE itself): LOC_val_solution.csv, "
        "ILSVRC2012_validation_ground_truth.txt (with meta.mat beside it) or imagenet_2012_validation_synset_labels.txt; "
        "default: looked for in the folder and four folders above",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 on a usage or source error)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    names = [n for n, _ in args.split]
    if len(set(names)) != len(names):
        parser.error(f"--split names must differ, got {', '.join(names)}")

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        print(f"{_PROG}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", ShardWarning)
        warnings.showwarning = show
        try:
            result = make_shards(
                args.source, args.out_dir, samples_per_shard=args.samples_per_shard, image_size=args.image_size,
                splits=dict(args.split), seed=args.seed, prefix=args.prefix, overwrite=args.overwrite,
                keep_order=args.keep_order, workers=args.workers, val_labels=args.val_labels,
            )
        except (OSError, ValueError, ImportError) as exc:
            print(f"{_PROG}: error: {exc}", file=sys.stderr)
            return 2
    for folder, manifest in result.items():
        skipped = manifest.get("skipped", 0)
        extra = f", skipped {skipped} unreadable" if skipped else ""
        print(f"{folder}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards{extra}")
        for kind, got in manifest.get("quirks", {}).items():
            names = ", ".join(got["files"][:3]) + (f", ... (all in {folder}/manifest.json)" if got["count"] > 3 else "")
            print(f"  {kind}: {got['count']} ({names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
