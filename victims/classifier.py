"""Classifier victims: a backbone by name plus a linear head, served as posteriors.

:class:`ClassifierVictim` is :func:`victims.backbones.build_backbone` (our torchvision-layout
ResNets or any ``timm:<name>`` model) followed by ``nn.Linear(feature_dim, num_classes)``.
It takes images as the query API receives them — uint8 ``[N, C, H, W]`` in 0..255 — and
normalises inside (``(x / 255 - mean) / std``, resized to ``image_size`` when needed), like
:class:`victims.simsiam.VictimEncoder`. Float images in ``[0, 1]`` are accepted too and stay
differentiable, so the same class can serve as a clone or a defender's surrogate.

Checkpoints are self-describing dicts (``format: sslsteal-classifier/1``) of plain types and
tensors, read back with ``torch.load(..., weights_only=True)``::

    {'format': 'sslsteal-classifier/1', 'arch': 'resnet18', 'num_classes': 10, 'in_chans': 1,
     'image_size': 32, 'mean': [0.5], 'std': [0.25], 'width': 32, 'stem': 'small',
     'classes': ['bear', ...] | None, 'state_dict': {...}, 'extra': {...}}

Example::

    >>> model = build_classifier("resnet18", 10, 1, 32, width=32, stem="small")
    >>> model(torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)).shape
    torch.Size([4, 10])
    >>> save_classifier(model, "runs/clf/classifier.pt", extra={"acc": 0.9})
    >>> load_classifier("runs/clf/classifier.pt").num_classes
    10
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from victims.backbones import BACKBONES, TIMM_PREFIX, build_backbone

__all__ = ["FORMAT", "ClassifierVictim", "build_classifier", "save_classifier", "load_classifier"]

FORMAT = "sslsteal-classifier/1"
_DEFAULT_MEAN, _DEFAULT_STD = 0.5, 0.25
_TRAIN_HINT = "train one with launch/train_victim.py --task classify"


def _per_channel(value: Sequence[float] | float, n: int, name: str) -> list[float]:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} values for {n} channels; give 1 or {n}")
    return [float(v) for v in t]


class ClassifierVictim(nn.Module):
    """Backbone + linear head; uint8 (or [0, 1] float) images in, logits out.

    Args:
        arch: a :data:`victims.backbones.BACKBONES` key or ``"timm:<name>"``.
        num_classes: outputs of the head.
        in_chans: image channels.
        image_size: inputs of another size are resized to ``image_size``² (bilinear,
            antialiased); None = no resize.
        mean, std: per-channel normalisation of ``images / 255`` (one value broadcast);
            default 0.5 / 0.25 (the repo's convention for the grey demo data).
        width, stem: ResNet base width and stem (ResNets only; None for timm).
        classes: optional class names (``len == num_classes``).

    Attributes: ``arch, num_classes, in_chans, image_size, mean, std`` (lists of floats),
    ``width, stem, feature_dim, classes``; modules ``backbone`` and ``head``.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        *,
        in_chans: int = 3,
        image_size: int | None = None,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        width: int | None = None,
        stem: str | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
        timm_arch = arch.startswith(TIMM_PREFIX)
        if timm_arch and (width is not None or stem is not None):
            raise ValueError(f"width and stem apply to {sorted(BACKBONES)} only; leave them unset for {arch}")
        if not timm_arch:
            width, stem = int(width if width is not None else 64), str(stem or "imagenet")
        kw: dict[str, Any] = {"in_chans": int(in_chans)}
        if not timm_arch:
            kw.update(width=width, stem=stem)
        self.backbone, self.feature_dim = build_backbone(arch, **kw)
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.arch, self.num_classes, self.in_chans = arch, int(num_classes), int(in_chans)
        self.image_size = int(image_size) if image_size is not None else None
        self.width, self.stem = width, stem
        self.mean = _per_channel(_DEFAULT_MEAN if mean is None else mean, self.in_chans, "mean")
        self.std = _per_channel(_DEFAULT_STD if std is None else std, self.in_chans, "std")
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0 per channel; got {self.std}")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"{len(classes)} class names for {num_classes} classes")
        self.classes = [str(c) for c in classes] if classes is not None else None
        self.register_buffer("norm_mean", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("norm_std", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False)

    def describe(self) -> dict[str, Any]:
        """Everything needed to rebuild the module (plain types)."""
        return {"arch": self.arch, "num_classes": self.num_classes, "in_chans": self.in_chans,
                "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "width": self.width, "stem": self.stem, "classes": self.classes}

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 ``[N, C, H, W]`` (0..255) or float in [0, 1] → normalised float32 at ``image_size``."""
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(
                f"classifier expects images [N, {self.in_chans}, H, W] (uint8 0..255 or float 0..1); "
                f"got {images.dtype} {list(images.shape)}"
            )
        if images.dtype == torch.uint8:
            x = images.to(self.norm_mean.device, non_blocking=True).float().div_(255.0)
        elif images.is_floating_point():
            x = images.to(self.norm_mean.device).float()
        else:
            raise ValueError(f"classifier expects uint8 or float images; got {images.dtype}")
        s = self.image_size
        if s is not None and tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.norm_mean) / self.norm_std

    def features(self, images: Tensor) -> Tensor:
        """Penultimate (pooled backbone) features ``[N, feature_dim]``."""
        return self.backbone(self.preprocess(images))

    def forward(self, images: Tensor) -> Tensor:
        """Images → logits ``[N, num_classes]`` (float32)."""
        return self.head(self.features(images)).float()


def build_classifier(
    arch: str,
    num_classes: int,
    in_chans: int = 3,
    image_size: int | None = None,
    *,
    width: int | None = None,
    stem: str | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    classes: Sequence[str] | None = None,
) -> ClassifierVictim:
    """A randomly initialised :class:`ClassifierVictim` (width/stem ignored for ``timm:`` archs)."""
    if arch.startswith(TIMM_PREFIX):
        width = stem = None
    return ClassifierVictim(arch, num_classes, in_chans=in_chans, image_size=image_size, mean=mean, std=std,
                            width=width, stem=stem, classes=classes)


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_classifier(model: nn.Module, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` (a :class:`ClassifierVictim`, maybe DDP-wrapped) as a self-describing
    checkpoint, atomically (:func:`victims.atomic.atomic_write`). ``extra`` holds plain values
    (e.g. accuracy, training steps)."""
    model = _unwrap(model)
    if not isinstance(model, ClassifierVictim):
        raise ValueError(f"save_classifier needs a ClassifierVictim; got {type(model).__name__}")
    ckpt = {"format": FORMAT, **model.describe(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "extra": dict(extra or {})}
    from victims.atomic import atomic_write

    atomic_write(path, lambda f: torch.save(ckpt, f))


def read_classifier_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint dict, validated; FileNotFoundError / one-line ValueError otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no classifier checkpoint at {path}; {_TRAIN_HINT}")
    from victims.safe_load import load_untrusted

    ckpt = load_untrusted(path, "classifier checkpoint")  # one line naming a refused pickled object and the fix
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = "a SimSiam checkpoint" if isinstance(ckpt, dict) and "state_dict" in ckpt else "not a classifier checkpoint"
        raise ValueError(f"{path} is {what} (no format {FORMAT!r}); {_TRAIN_HINT}")
    missing = [k for k in ("arch", "num_classes", "in_chans", "state_dict") if k not in ckpt]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; it is torn or was written by another tool")
    return ckpt


def load_classifier(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> ClassifierVictim:
    """Load a :func:`save_classifier` checkpoint (``weights_only=True``) as a ClassifierVictim in eval mode.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable, not a classifier checkpoint, or weights that do not fit the
            recorded architecture (one line naming the file and the problem).
    """
    ckpt = read_classifier_checkpoint(path)
    try:
        model = ClassifierVictim(
            ckpt["arch"], int(ckpt["num_classes"]), in_chans=int(ckpt["in_chans"]),
            image_size=ckpt.get("image_size"), mean=ckpt.get("mean"), std=ckpt.get("std"),
            width=ckpt.get("width"), stem=ckpt.get("stem"), classes=ckpt.get("classes"),
        )
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)} records an unbuildable classifier: {e}") from None
    want, got = model.state_dict(), ckpt["state_dict"]
    bad = [k for k in want if k not in got or got[k].shape != want[k].shape] + [k for k in got if k not in want]
    if bad:
        raise ValueError(f"{os.fspath(path)} weights do not fit {ckpt['arch']} ({len(bad)} keys differ, e.g. {bad[:3]}); "
                         f"the file is corrupt or edited")
    model.load_state_dict(got, strict=True)
    return model.to(map_location).eval()
