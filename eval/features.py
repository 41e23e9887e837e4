"""Frozen-encoder features, extracted sharded over ranks and gathered in dataset order."""
from __future__ import annotations

from typing import Any, Callable

import torch

from stealer.data import ShardStream, open_shards
from stealer.dist import gather_nograd

__all__ = ["extract_features"]


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    shard_dir: str,
    *,
    channels: int,
    image_size: int,
    batch_size: int = 256,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    workers: int = 0,
    limit: int | None = None,
    decoder: Callable[[bytes], Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encode(uint8 images) -> [N, D]`` over a shard folder; every rank gets all features.

    Each rank reads its contiguous part of the (unshuffled) set; the gather concatenates in
    rank order, so row i is sample i of the folder on every rank. Returns float32 features and
    int64 labels, on CPU. ``limit`` keeps only the first N samples of the folder. ``decoder``
    (``bytes -> uint8 [H, W, C]``) replaces the stream's decode at ``image_size``: a victim's exact
    resize/crop (``VictimEncoder.decoder()``), so its features are those of its own eval transform.
    """
    stream = ShardStream(open_shards(shard_dir), batch_size=batch_size, rank=rank, world=world, shuffle=False,
                         workers=workers, channels=channels, image_size=image_size, limit=limit, decoder=decoder)
    feats, labels = [], []
    for batch in stream.iter_epoch(0):
        x = batch["image"].to(device)
        feats.append(encode(x).float())
        labels.append(batch["label"].to(device))
    f = torch.cat(feats) if feats else torch.empty(0, 0, device=device)
    y = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=device)
    if world > 1:
        f = gather_nograd(f.contiguous())
        y = gather_nograd(y.unsqueeze(1)).squeeze(1)
    return f.cpu(), y.cpu()

