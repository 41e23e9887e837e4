#!/usr/bin/env python
"""Write a small ImageNet-shaped tree (real layout, sizes and quirks; fake pixels) for rehearsals.

    python launch/make_fake_imagenet.py runs/fake_imagenet --classes 4 --train-per-class 6 --val-images 8
    python launch/make_shards.py runs/fake_imagenet data/fake_imagenet --split query=16 --split probe_train=8

See stealer/fake_imagenet.py for the layout, the val label files and the planted quirks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stealer.fake_imagenet import VAL_LAYOUTS, describe, make_fake_imagenet, write_official_simsiam  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and write the tree; returns the exit status (2 on a bad argument)."""
    p = argparse.ArgumentParser(prog="python launch/make_fake_imagenet.py", description=__doc__.splitlines()[0])
    p.add_argument("root", metavar="ROOT", help="folder to write ROOT/train, ROOT/val and the label files into")
    p.add_argument("--classes", type=int, default=4, metavar="K", help="number of classes (default 4)")
    p.add_argument("--train-per-class", type=int, default=6, metavar="N", help="train images per class (default 6)")
    p.add_argument("--val-images", type=int, default=8, metavar="N", help="val images in all (default 8)")
    p.add_argument("--val-layout", choices=VAL_LAYOUTS, default="csv",
                   help="csv: flat val + LOC_val_solution.csv (Kaggle); devkit: flat val + ILSVRC2012 devkit "
                        "ground truth and meta.mat; synsets: flat val + imagenet_2012_validation_synset_labels.txt; "
                        "folders: val/<wnid>/ (valprep.sh) (default csv)")
    p.add_argument("--longer-side", type=int, default=500, metavar="PX", help="usual longer side in pixels (default 500, as ImageNet)")
    p.add_argument("--no-quirks", action="store_true", help="leave out the CMYK, grey, PNG-named, truncated and empty files")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same bytes (default 0)")
    p.add_argument("--victim", metavar="PATH", default=None,
                   help="also write a random-weight SimSiam ResNet-50 in the official checkpoint layout to PATH")
    args = p.parse_args(argv)
    try:
        summary = make_fake_imagenet(args.root, classes=args.classes, train_per_class=args.train_per_class,
                                     val_images=args.val_images, val_layout=args.val_layout,
                                     longer_side=args.longer_side, quirks=not args.no_quirks, seed=args.seed)
    except (OSError, ValueError) as exc:
        print(f"make_fake_imagenet: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(describe(summary, args.root)))
    if args.victim:
        write_official_simsiam(args.victim, seed=args.seed)
        print(f"{args.victim}: random SimSiam ResNet-50, official facebookresearch/simsiam checkpoint layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
