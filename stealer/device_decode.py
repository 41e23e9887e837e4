"""Decode a batch of shard images on the accelerator: JPEGs by nvJPEG, the rest by PIL.

``data.decode=device`` moves image decoding out of the loader workers and onto the device the
step runs on: the stream hands over the encoded bytes of a batch, and :func:`decode_batch`
decodes every JPEG of it in one ``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG's
batched decoder on a CUDA device; libjpeg-turbo on the CPU), then resizes the shorter side to
``size`` (bilinear, antialiased) and centre-crops on the device -- the geometry of
:func:`stealer.decode.decode_image`. Formats nvJPEG cannot read (PNG, ...) are decoded by PIL on
the CPU and moved over. A sample that does not decode is dropped and counted as corrupt, with its
key, label, bytes and cached response, exactly as the CPU path does.

The pixels are close to, not equal to, the CPU path's: PIL decodes large JPEGs at a reduced
scale (``draft``) and resizes with its own filter. A run is deterministic within one path;
switching paths on resume is refused like any other data setting.

torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; ``decode_jpeg`` is
still the batched nvJPEG entry point in the pinned release, and this module is the one place to
change when it moves.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stealer.decode import decode_image, standard_strides  # not stealer.data: data imports this module, never the reverse

__all__ = ["decode_batch", "decode_batch_on_device", "resize_center_crop"]

log = logging.getLogger(__name__)
_JPEG = ("jpg", "jpeg")


def resize_center_crop(img: Tensor, size: int | None) -> Tensor:
    """uint8 ``[C, H, W]`` → ``[C, size, size]``: shorter side to ``size`` (bilinear, antialiased), centre crop."""
    if size is None or tuple(img.shape[1:]) == (size, size):
        return img
    h, w = int(img.shape[1]), int(img.shape[2])
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    x = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    left, top = (nw - size) // 2, (nh - size) // 2
    return x[:, top:top + size, left:left + size].round_().clamp_(0, 255).to(torch.uint8)


def _cpu_decode(data: bytes, channels: int) -> Tensor:
    return torch.from_numpy(np.array(decode_image(data, channels, None))).permute(2, 0, 1)  # a writable copy


def decode_batch(raw: list[tuple[str, bytes]], channels: int, size: int | None,
                 device: str | torch.device) -> tuple[Tensor, list[bool]]:
    """Decode ``[(ext, bytes), ...]`` to uint8 ``[N_ok, C, size, size]`` on ``device``; returns the
    images and, per input, whether it decoded (the failures are left out of the tensor)."""
    import warnings

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs for TorchCodec (not a dependency here)
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    out: list[Tensor | None] = [None] * len(raw)
    jpeg = [i for i, (ext, _) in enumerate(raw) if ext.lower() in _JPEG]
    if jpeg:
        data = [torch.frombuffer(bytearray(raw[i][1]), dtype=torch.uint8) for i in jpeg]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                imgs = decode_jpeg(data, mode=mode, device=device)
            except RuntimeError:  # one bad file fails the batched call: decode one by one to find it
                imgs = []
                for d in data:
                    try:
                        imgs.append(decode_jpeg(d, mode=mode, device=device))
                    except RuntimeError as e:
                        imgs.append(e)
        for i, img in zip(jpeg, imgs):
            out[i] = img if isinstance(img, Tensor) else None
    for i, (ext, data_b) in enumerate(raw):
        if ext.lower() in _JPEG:
            continue
        try:
            out[i] = _cpu_decode(data_b, channels).to(device, non_blocking=True)
        except Exception as e:  # noqa: BLE001 - corrupt: counted by the caller, never fatal
            log.warning("skipping corrupt image (%s)", e)
    ok = [t is not None for t in out]
    kept = [resize_center_crop(t, size) for t in out if t is not None]
    if not kept:
        return torch.empty(0, channels, size or 0, size or 0, dtype=torch.uint8, device=device), ok
    # row-major, as the CPU path's batches are (with one channel, convolutions pick kernels by the strides)
    return standard_strides(torch.stack(kept)), ok


def decode_batch_on_device(batch: dict[str, Any], channels: int, size: int | None,
                           device: str | torch.device) -> dict[str, Any]:
    """A stream batch with undecoded ``bytes`` → the same batch with ``image`` decoded on ``device``;
    samples that do not decode are removed (key, label, bytes, response) and counted in ``corrupt``."""
    images, ok = decode_batch(batch["bytes"], channels, size, device)
    if not all(ok):
        keep = [i for i, good in enumerate(ok) if good]
        idx = torch.tensor(keep, dtype=torch.long)
        batch = {**batch, "key": [batch["key"][i] for i in keep], "bytes": [batch["bytes"][i] for i in keep],
                 "label": batch["label"][idx], "corrupt": batch["corrupt"] + ok.count(False)}
        if "response" in batch:
            batch["response"] = batch["response"][idx]
    return {**batch, "image": images}
