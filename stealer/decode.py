"""CPU image decoding of the shard format: bytes → uint8 ``[size, size, C]``.

The one CPU decoder both the loader workers (:mod:`stealer.data`) and the device path's
fallback for formats nvJPEG cannot read (:mod:`stealer.device_decode`) use. It sits in its own
module so those two import it and never each other (``data`` → ``device_decode`` only).
"""
from __future__ import annotations

import io

import numpy as np
import torch

__all__ = ["decode_image"]


def decode_image(data: bytes, channels: int, size: int | None) -> np.ndarray:
    """Decode image bytes to uint8 ``[size, size, C]`` (shorter side resized, centre-cropped).

    PIL does the work (JPEGs are decoded at reduced scale with ``draft`` when they are much
    larger than ``size``); batches are stacked and turned into ``[N, C, H, W]`` tensors once.
    """
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(data)) as im:
        if size is not None and im.format == "JPEG":
            im.draft(mode, (size, size))
        im = im.convert(mode)
        if size is not None and im.size != (size, size):
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def standard_strides(x: torch.Tensor) -> torch.Tensor:
    """``x`` with row-major strides. ``.contiguous()`` is not enough: a single-channel ``[N, 1, S, S]``
    permuted from HWC has strides ``(S*S, 1, S, 1)``, "contiguous" and "channels_last" at once, and
    oneDNN's CPU convolution backward on such a batch corrupted the heap (torch 2.14.1,
    OMP_NUM_THREADS=1: "corrupted double-linked list"; tests/test_classifier_attacks.py)."""
    if x.stride() == torch.empty(x.shape, dtype=x.dtype, device="meta").stride():
        return x
    return x.clone(memory_format=torch.contiguous_format)
