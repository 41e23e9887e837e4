"""The stolen encoder: any registered backbone + a linear head to the victim's dimension."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from stealer.augment import normalize, to_float
from victims.backbones import build_backbone

__all__ = ["StolenEncoder", "save_student", "load_student"]

FORMAT = "sslsteal-student/1"


class StolenEncoder(nn.Module):
    """``head(backbone(x))``; ``features(x)`` is the pooled backbone output.

    Args:
        arch, width, stem, in_chans: the backbone (see ``victims.backbones``).
        out_dim: the victim's representation size the head maps to.
        mean, std: input standardisation of the student (the attacker's choice).
    """

    def __init__(self, arch: str, out_dim: int, *, in_chans: int = 3, width: int = 64, stem: str = "imagenet",
                 mean: list[float] | None = None, std: list[float] | None = None, image_size: int | None = None) -> None:
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(arch, in_chans=in_chans, width=width, stem=stem)
        self.head = nn.Linear(self.feat_dim, out_dim)
        self.meta: dict[str, Any] = {"arch": arch, "out_dim": out_dim, "in_chans": in_chans, "width": width, "stem": stem,
                                     "mean": list(mean or [0.5] * in_chans), "std": list(std or [0.25] * in_chans),
                                     "image_size": image_size}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N,C,H,W]`` → standardised float."""
        return normalize(to_float(images), self.meta["mean"], self.meta["std"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # N x feat_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # N x out_dim


def save_student(model: StolenEncoder, path: str | os.PathLike) -> None:
    """Weights + the metadata needed to rebuild the encoder (atomic write)."""
    from stealer.ckpt import atomic_torch_save

    atomic_torch_save({"format": FORMAT, "meta": dict(model.meta), "state_dict": model.state_dict()}, path)


def load_student(path: str | os.PathLike) -> StolenEncoder:
    """Rebuild a StolenEncoder saved by ``save_student`` (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stolen encoder {path} not found; run launch/steal.py first")
    from victims.safe_load import load_untrusted

    obj = load_untrusted(path, "stolen encoder")  # a refused pickle: one line naming the object and the fix
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path} is not a stolen-encoder file ({FORMAT}); pass the student.pt a steal run wrote")
    m = obj["meta"]
    model = StolenEncoder(m["arch"], m["out_dim"], in_chans=m["in_chans"], width=m["width"], stem=m["stem"],
                          mean=m["mean"], std=m["std"], image_size=m.get("image_size"))
    missing, unexpected = model.load_state_dict(obj["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match arch {m['arch']}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()
