"""Turn an image dataset into WebDataset shards (``sslsteal-shards/1``): ``python launch/make_shards.py SOURCE OUT_DIR``.

Parses the command line and runs :func:`stealer.make_shards.make_shards` (the source kinds are listed there and
under ``--help``); warnings are one line each, errors one line with exit status 2.
Importable: :func:`main` takes an argv list.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Sequence

from stealer.make_shards import make_shards
from stealer.shards import ShardWarning

__all__ = ["main", "parse_split"]

_PROG = "make_shards"
_SPLIT_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]*)=(\d+)$")


def parse_split(text: str) -> tuple[str, int]:
    """Parse ``NAME=COUNT`` (NAME: letters, digits, ``_``, ``-``; COUNT: a non-negative integer)."""
    m = _SPLIT_RE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(
            f"bad --split {text!r}: write NAME=COUNT, e.g. --split query=3000 (NAME: letters, digits, '_', '-')"
        )
    return m.group(1), int(m.group(2))


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
