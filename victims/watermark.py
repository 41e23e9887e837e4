"""Rotation-prediction watermark of a victim encoder: the head, its loss, and its file.

Dziedzic, Dhawan, Kaleem, Guan, Papernot, "On the Difficulty of Defending Self-Supervised
Learning against Model Extraction", ICML 2022, Sec. "Watermarking" (code:
cleverhans-lab/ssl-attacks-defenses, ``WatermarkMLP``, ``WatermarkDataset``): the victim is
trained with an extra task on a *watermark set* — predict how an image was rotated from its
representation — so the representations of rotated watermark images carry a signature that a
copy made by querying the victim inherits. The defender keeps the head; to verify a suspect it
applies the head to the suspect's representations of the rotated watermark set
(:mod:`eval.watermark`).

Choices and where they come from: the repo's task is binary (a random rotation in 0-180 vs
180-360 degrees, ``RandomRotation``); here it is the 4-way rotation of RotNet (Gidaris et al.,
ICLR'18; 0/90/180/270 degrees, exact on square images, no interpolation). The repo's head is a
2-layer MLP on the representation (``WatermarkMLP(512, 2)``); ours puts a parameter-free
BatchNorm (``affine=False``, always batch statistics) in front, so the head standardises the
representations of the set it is shown. That makes a verification invariant to a shift and a
per-coordinate scale of the suspect's space (a stolen encoder trained with InfoNCE matches the
victim's directions only up to such a shift).

Example::

    >>> head = RotationHead(256)
    >>> x, k = rotation_batch(images_uint8)            # 4N rotated copies, labels 0..3
    >>> loss = rotation_loss(head, victim_reps_of(x), k)
    >>> save_watermark(head, watermark_path("runs/v/checkpoint.pth.tar"), meta={...})
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ROTATIONS", "FORMAT", "RotationHead", "rotate", "rotation_batch", "rotation_loss",
           "watermark_path", "save_watermark", "load_watermark"]

#: number of rotation classes: k * 90 degrees counter-clockwise, k = 0..3
ROTATIONS = 4
FORMAT = "sslsteal-watermark/1"


def rotate(images: Tensor, k: int) -> Tensor:
    """``images [N, C, H, W]`` rotated by ``k * 90`` degrees counter-clockwise (square images)."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotation needs square images [N, C, H, H]; got {list(images.shape)}")
    return torch.rot90(images, k % ROTATIONS, dims=(2, 3))


def rotation_batch(images: Tensor) -> tuple[Tensor, Tensor]:
    """All four rotations of every image: ``[4N, C, H, W]`` (rotation-major) and labels ``[4N]``."""
    x = torch.cat([rotate(images, k) for k in range(ROTATIONS)])
    y = torch.arange(ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return x, y


class RotationHead(nn.Module):
    """``BN(affine=False, batch statistics) -> Linear(dim, hidden) -> ReLU -> Linear(hidden, 4)``.

    Args:
        dim: representation dimension of the victim (what the API serves).
        hidden: width of the hidden layer (default 256; the repo's ``WatermarkMLP`` uses 2x dim).
    """

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.dim, self.hidden = int(dim), int(hidden)
        self.norm = nn.BatchNorm1d(dim, affine=False, track_running_stats=False)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, ROTATIONS))

    def forward(self, reps: Tensor) -> Tensor:
        """``reps [N, dim]`` (N >= 2: standardised over this set) -> logits ``[N, 4]``."""
        if reps.ndim != 2 or reps.shape[1] != self.dim:
            raise ValueError(f"watermark head expects representations [N, {self.dim}]; got {list(reps.shape)}")
        return self.mlp(self.norm(reps.float()))


def rotation_loss(head: RotationHead, reps: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the head's rotation prediction (the watermark task's loss)."""
    return F.cross_entropy(head(reps), labels)


def watermark_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the head of a watermarked victim lives: ``watermark.pt`` next to its checkpoint."""
    return Path(checkpoint).with_name("watermark.pt")


def save_watermark(head: RotationHead, path: str | os.PathLike[str], meta: dict[str, Any]) -> None:
    """Write the head and ``meta`` (plain values: the watermark set, its size, ...) atomically."""
    from victims.atomic import atomic_write

    obj = {"format": FORMAT, "dim": head.dim, "hidden": head.hidden, "meta": dict(meta),
           "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}}
    atomic_write(path, lambda f: torch.save(obj, f))


def load_watermark(path: str | os.PathLike[str]) -> tuple[RotationHead, dict[str, Any]]:
    """The head (eval mode) and its meta from :func:`save_watermark`'s file (``weights_only=True``).

    Raises:
        FileNotFoundError: no file (the victim was trained without ``watermark.enabled=true``).
        ValueError: the file is not a watermark head.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no watermark head at {path}; train the victim with watermark.enabled=true "
                                f"(launch/train_victim.py)")
    from victims.safe_load import load_untrusted

    obj = load_untrusted(path, "watermark head")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path} is not a watermark head ({FORMAT}); pass the watermark.pt a victim training wrote")
    head = RotationHead(int(obj["dim"]), int(obj["hidden"]))
    head.load_state_dict(obj["state_dict"])
    return head.eval(), dict(obj["meta"])
