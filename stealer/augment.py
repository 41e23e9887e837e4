"""Batched image augmentation on tensors (CPU or GPU): one affine grid per sample, no PIL.

All randomness comes from an explicit ``torch.Generator``, so a batch's views are a pure
function of ``(seed, epoch, rank, batch index)`` -- resume reproduces them exactly.

The image every view is drawn from is the one the stream decoded: in the steal's train phase, the
field of view the victim answered about (its recorded Resize + CenterCrop scaled to the student's
size, ``stealer.data.ViewDecode``). The un-augmented anchor is that view itself; random resized
crops are taken inside it, as the queried views of ``keyed_views`` are in the query phase, not from
the full image around it.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

from stealer.config import ConfigError, Fraction, NonNegFloat, PositiveFloat, Range

__all__ = ["AugmentConfig", "to_float", "normalize", "augment", "batch_generator", "key_generator", "keyed_views"]


@dataclass
class AugmentConfig:
    """SimSiam-style view parameters (scaled down for small images)."""

    scale_min: Annotated[float, Range(gt=0, le=1)] = 0.2  # area fraction of the random crop
    scale_max: Annotated[float, Range(gt=0, le=1)] = 1.0
    ratio_min: PositiveFloat = 3 / 4
    ratio_max: PositiveFloat = 4 / 3
    flip: bool = True
    brightness: NonNegFloat = 0.4
    contrast: NonNegFloat = 0.4
    jitter_p: Fraction = 0.8

    def validate(self) -> None:
        if self.scale_min > self.scale_max or self.ratio_min > self.ratio_max:
            raise ConfigError(f"augment.scale_min/scale_max={self.scale_min}/{self.scale_max} and ratio_min/ratio_max="
                              f"{self.ratio_min:g}/{self.ratio_max:g} must be ordered; set each min <= its max")


def batch_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from integers (e.g. seed, epoch, rank, batch index)."""
    g = torch.Generator()
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2**63 - 1)
    g.manual_seed(h)
    return g


def key_generator(seed: int, key: str, view: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, sample key, view index)``: the same view of the same
    image whatever batch, rank or run it falls in (a stable hash, not Python's salted ``hash``)."""
    digest = hashlib.blake2b(f"{int(seed)}/{key}/{int(view)}".encode(), digest_size=8).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return g


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N,C,H,W]`` in 0..255 → float in [0, 1]."""
    return images.float().div_(255.0)


def normalize(x: torch.Tensor, mean: float | list[float], std: float | list[float]) -> torch.Tensor:
    """Per-channel standardisation of a float batch."""
    c = x.shape[1]
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(-1, 1, 1).expand(c, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(-1, 1, 1).expand(c, 1, 1)
    return (x - m) / s


def _draw(n: int, gen: torch.Generator, cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The uniforms one ``augment`` call consumes, in its order: 6 per sample, then 3 for jitter."""
    u = torch.rand(n, 6, generator=gen)
    v = torch.rand(n, 3, generator=gen) if cfg.jitter_p > 0 and (cfg.brightness > 0 or cfg.contrast > 0) else None
    return u, v


def augment(x: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig | None = None) -> torch.Tensor:
    """Random resized crop + horizontal flip + brightness/contrast jitter of a float batch in [0,1]."""
    cfg = cfg or AugmentConfig()
    return _apply(x, *_draw(x.shape[0], gen, cfg), cfg)


def keyed_views(images: torch.Tensor, keys: list[str], seed: int, view: int, cfg: AugmentConfig | None = None) -> torch.Tensor:
    """View ``view`` of each uint8 image, drawn from ``key_generator(seed, key, view)``, as uint8.

    A pure function of (image, seed, key, view): the query phase and the train phase (or a
    rerun, on any number of ranks) rebuild bitwise the same views, so a cached response
    always belongs to the exact image the victim saw. Computed on the CPU for that reason.
    """
    cfg = cfg or AugmentConfig()
    if images.shape[0] != len(keys):
        raise ValueError(f"keyed_views: {images.shape[0]} images but {len(keys)} keys")
    if images.shape[0] == 0:
        return images.clone()
    draws = [_draw(1, key_generator(seed, k, view), cfg) for k in keys]
    u = torch.cat([d[0] for d in draws])
    v = torch.cat([d[1] for d in draws]) if draws[0][1] is not None else None
    out = _apply(images.cpu().float().div_(255.0), u, v, cfg)
    return out.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _apply(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None, cfg: AugmentConfig) -> torch.Tensor:
    n, _, h, w = x.shape
    u = u.to(x.device)
    area = cfg.scale_min + (cfg.scale_max - cfg.scale_min) * u[:, 0]
    logr = math.log(cfg.ratio_min) + (math.log(cfg.ratio_max) - math.log(cfg.ratio_min)) * u[:, 1]
    ar = torch.exp(logr)
    cw = torch.sqrt(area * ar).clamp(max=1.0)  # crop width as a fraction of the image
    ch = torch.sqrt(area / ar).clamp(max=1.0)
    cx = (2 * u[:, 2] - 1) * (1 - cw)  # crop centre in [-1, 1] coordinates
    cy = (2 * u[:, 3] - 1) * (1 - ch)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n, device=x.device)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = cw * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if v is not None:
        v = v.to(x.device)
        on = (v[:, 0] < cfg.jitter_p).to(x.dtype).view(n, 1, 1, 1)
        b = (1 + cfg.brightness * (2 * v[:, 1] - 1)).view(n, 1, 1, 1)
        c = (1 + cfg.contrast * (2 * v[:, 2] - 1)).view(n, 1, 1, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        jittered = ((out * b - mean * b) * c + mean * b).clamp(0, 1)
        out = on * jittered + (1 - on) * out
    return out
