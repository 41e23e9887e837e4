#!/usr/bin/env python
"""Cut a query set out of a pool of images: random, class-balanced or coverage-controlled.

    python launch/select_queries.py runs/demo/data/animal_mnist/query runs/queries/bal500 --n 500 --strategy class_balanced
    python launch/select_queries.py POOL OUT --n 500 --strategy coverage --spread 0.0 --centres 3 --features pixels
    python launch/select_queries.py --photo-patches runs/demo/data/photo_patches/query --n 3000   # another query source
    python launch/steal.py --config launch/configs/demo.yaml data.query=runs/queries/bal500 victim.budget=500

Writes a new shard folder whose manifest.json records the strategy and its source under
"selection" (see stealer/query_select.py for the strategies and the spread knob).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import fail  # noqa: E402
from stealer.query_select import FEATURE_BUDGET, FEATURES, STRATEGIES, select_queries, write_photo_patches  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pool", nargs="?", help="shard folder to select from")
    ap.add_argument("out", nargs="?", help="new shard folder")
    ap.add_argument("--n", type=int, required=True, help="images to select (or to make, with --photo-patches)")
    ap.add_argument("--strategy", default="random", choices=STRATEGIES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--features", choices=FEATURES, help="feature space for coverage (default pixels)")
    ap.add_argument("--centres", type=int, default=3, help="coverage: k-means centres")
    ap.add_argument("--spread", type=float, default=1.0, help="coverage: 0 = narrow (near the centres) .. 1 = broad (FPS)")
    ap.add_argument("--feature-budget-mib", type=float, default=FEATURE_BUDGET / 2**20,
                    help="MiB of computed features held at once; a larger pool is selected on a seeded subsample")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it holds a shard set")
    ap.add_argument("--photo-patches", metavar="OUT", help="write N grey 32x32 crops of scikit-learn's sample photos to OUT")
    a = ap.parse_args(argv)
    try:
        if a.photo_patches:
            m = write_photo_patches(a.photo_patches, a.n, seed=a.seed)
            print(f"{a.photo_patches}: {m['num_samples']} photo patches")
            return m
        if not a.pool or not a.out:
            fail("give POOL and OUT shard folders (or --photo-patches OUT)")
        m = select_queries(a.pool, a.out, a.n, a.strategy, a.seed, a.features, centres=a.centres, spread=a.spread,
                           overwrite=a.overwrite, feature_budget=int(a.feature_budget_mib * 2**20))
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        fail(str(e).splitlines()[0])
    print(json.dumps({"out": a.out, "num_samples": m["num_samples"], "selection": m["selection"]}, indent=1))
    return m


if __name__ == "__main__":
    main()
