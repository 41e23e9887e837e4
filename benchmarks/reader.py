#!/usr/bin/env python
"""Our shard reader vs an image-folder reader, same images, same decode, same workers, one run.

Writes N images both as an ImageFolder tree (one file per image) and as shards, then times one
epoch of ``ShardStream`` against torchvision's ``ImageFolder`` + ``DataLoader`` (PIL decode,
resize/centre-crop to the same size, uint8 tensors). Prints images/s and the ratio (ideal: ≥ 1;
shards win more on network file systems, where per-file opens dominate).

    python benchmarks/reader.py --n 4000 --size 64 --workers 2
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stealer.data import ShardStream, open_shards  # noqa: E402
from stealer.shards import encode_png, write_shards  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    from torchvision import datasets, transforms

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        samples = []
        for i in range(a.n):
            # smooth random images (noise would make PNGs unrealistically large)
            small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            img = np.asarray(Image.fromarray(small).resize((a.size, a.size), Image.BILINEAR))
            cls = i % 10
            d = root / "folder" / f"c{cls}"
            d.mkdir(parents=True, exist_ok=True)
            data = encode_png(img)
            (d / f"{i:06d}.png").write_bytes(data)
            samples.append((f"img-{i:06d}", data, "png", cls))
        write_shards(samples, root / "shards", samples_per_shard=1000, source="bench",
                     classes=[f"c{i}" for i in range(10)], channels=3, image_size=[a.size, a.size])

        stream = ShardStream(open_shards(root / "shards"), batch_size=a.batch, workers=a.workers, channels=3,
                             image_size=a.size, shuffle=True)
        t = time.perf_counter()
        n_shard = sum(len(b["key"]) for b in stream.iter_epoch(0))
        shard_ips = n_shard / (time.perf_counter() - t)

        tf = transforms.Compose([transforms.Resize(a.size), transforms.CenterCrop(a.size), transforms.PILToTensor()])
        loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root / "folder"), transform=tf),
                                             batch_size=a.batch, shuffle=True, num_workers=a.workers)
        t = time.perf_counter()
        n_folder = sum(x.shape[0] for x, _ in loader)
        folder_ips = n_folder / (time.perf_counter() - t)

    out = {"images": a.n, "size": a.size, "workers": a.workers, "shard_img_s": round(shard_ips, 1),
           "folder_img_s": round(folder_ips, 1), "ratio": round(shard_ips / folder_ips, 3)}
    print(json.dumps(out, indent=1))
    print(f"shard reader / image-folder reader = {out['ratio']:.2f}x  (ideal >= 1)")


if __name__ == "__main__":
    main()
