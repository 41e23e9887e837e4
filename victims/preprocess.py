"""A victim's preprocessing: how an image becomes the tensor its encoder was trained to read.

A :class:`Preprocess` is a declared, recorded choice: resize (shorter side), centre crop,
interpolation, and per-channel ``mean``/``std`` applied to ``images / 255``. It has two
halves, applied where each can be exact:

* geometry (``resize``, ``crop``), per image, where the image is decoded:
  :meth:`Preprocess.decoder` returns a picklable ``bytes -> uint8 [H, W, C]`` function that
  runs torchvision's own ``Resize(resize)`` + ``CenterCrop(crop)`` on the PIL image, so the
  pixels equal those of ``torchvision.datasets.ImageFolder`` with the same transform. The query
  phase (``stealer/steal.py``) and the probe (``eval/run.py``) decode their shards with it.
  Images that reach the victim at another size than ``crop`` (a user batching its own
  tensors) get the same geometry on arrival, on tensors (antialiased; within a grey level of
  PIL's); images already ``crop`` x ``crop`` are taken as decoded this way.
* normalisation (``mean``, ``std``), on the victim's device, in float32 — ``ToTensor`` +
  ``Normalize`` in the same order of operations.

Presets (:data:`PRESETS`) for the released ImageNet families, each its own repository's evaluation
transform: ``imagenet`` = ``simsiam`` = ``mocov3`` is facebookresearch/simsiam ``main_lincls.py``
(commit a7bc1772896d0dad0806c51f0bb6f3b16d290468, ``val_loader``: ``Resize(256)``,
``CenterCrop(224)``, ``ToTensor()``, ``Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])``),
which facebookresearch/moco-v3 ``main_lincls.py`` (commit c5b2e602ebfe2384b38b9d21b42b37848b9d286a)
repeats. ``simclr`` is the released SimCLR ResNet-50s in PyTorch, which are tonylins/simclr-converter
ports of google-research/simclr's TF weights: its ``eval.py`` (commit
59bee347aefe2ed52e07268ebb3e16f9bb4e0412, ``val_loader``) feeds ``Resize(256)``, ``CenterCrop(256)``,
``ToTensor()`` and no normalisation ("the original model do not have normalization"); the TF
repository evaluates 224-px bicubic, also unnormalised (``victim.crop=224 victim.interpolation=bicubic``
comes close). ``none`` is no geometry and no normalisation (``images / 255``). ``project`` is the checkpoint's own ``'sslsteal'`` record
(``image_size``, ``mean``, ``std``: the project's decode at ``image_size``, shorter side
resized and centre-cropped). ``auto`` is ``project`` when the file has that record, else
``imagenet`` (said in one printed line).

Example::

    >>> p = resolve_preprocess("auto", None, source="checkpoint_0099.pth.tar")
    note: checkpoint_0099.pth.tar has no sslsteal record (a released checkpoint?): ...
    >>> p.describe()
    'imagenet: Resize 256 (bilinear) + CenterCrop 224, mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]'
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "PRESET_NAMES",
    "INTERPOLATIONS",
    "PROJECT_DEFAULT_MEAN",
    "PROJECT_DEFAULT_STD",
    "Preprocess",
    "ExactDecode",
    "resolve_preprocess",
    "cache_record",
    "preprocess_kwargs",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: what the project's own victims use when their record names no mean/std
PROJECT_DEFAULT_MEAN, PROJECT_DEFAULT_STD = 0.5, 0.25
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")

_IMAGENET = {"resize": 256, "crop": 224, "interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
#: preset name → geometry and normalisation (the released ImageNet families share one transform)
PRESETS: dict[str, dict[str, Any]] = {
    "imagenet": _IMAGENET,
    "simsiam": _IMAGENET,  # facebookresearch/simsiam main_lincls.py val_loader
    "mocov3": _IMAGENET,  # facebookresearch/moco-v3 main_lincls.py val_loader
    # tonylins/simclr-converter eval.py: the SimCLR weights were trained on unnormalised [0, 1] images
    "simclr": {"resize": 256, "crop": 256, "interpolation": "bilinear", "mean": (0.0,), "std": (1.0,)},
    "none": {"resize": None, "crop": None, "interpolation": "bilinear", "mean": (0.0,), "std": (1.0,)},
}
PRESET_NAMES = ("auto", "project", *PRESETS)
_OVERRIDABLE = ("mean", "std", "resize", "crop", "interpolation")


def _floats(value: Sequence[float] | float, channels: int, name: str, source: str) -> tuple[float, ...]:
    vals = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise ValueError(f"{name} has {len(vals)} values for {channels} channels ({source}); give 1 or {channels}")
    if name.endswith("std") and any(v <= 0 for v in vals):
        raise ValueError(f"{name} must be > 0 per channel; got {vals} ({source})")
    return tuple(vals)


@dataclass(frozen=True)
class Preprocess:
    """Resolved victim preprocessing; see the module docstring.

    Attributes:
        preset: where it came from: a :data:`PRESETS` name or ``project``.
        mean, std: per channel, applied to ``images / 255``.
        resize: shorter side resized to this (torchvision ``Resize(int)``); None = no resize.
        crop: centre crop to ``crop`` x ``crop`` (torchvision ``CenterCrop``); None = none.
        image_size: the project's own geometry (``resize``/``crop`` None): tensors of another
            size are resized to ``image_size`` squared; None = served at the size they come.
        interpolation: of the resize: bilinear | bicubic | nearest.
        overrides: which of mean/std/resize/crop/interpolation were set explicitly.
    """

    preset: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None
    crop: int | None = None
    image_size: int | None = None
    interpolation: str = "bilinear"
    overrides: tuple[str, ...] = field(default_factory=tuple)

    @property
    def input_size(self) -> int | None:
        """The side of the square the encoder reads (``crop``, else ``image_size``); None = any."""
        return self.crop if self.crop is not None else self.image_size

    @property
    def exact_geometry(self) -> bool:
        """True when images are resized/cropped the torchvision way where they are decoded."""
        return self.resize is not None or self.crop is not None

    def record(self) -> dict[str, Any]:
        """Plain JSON-able record (what ``describe()``, caches and result files hold)."""
        return {"preset": self.preset, "resize": self.resize, "crop": self.crop, "image_size": self.image_size,
                "interpolation": self.interpolation, "mean": [round(v, 8) for v in self.mean],
                "std": [round(v, 8) for v in self.std], "overrides": list(self.overrides)}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Preprocess:
        """Inverse of :meth:`record` (e.g. read from a server's ``/v1/describe``)."""
        return cls(preset=str(rec.get("preset", "custom")), mean=tuple(float(v) for v in rec["mean"]),
                   std=tuple(float(v) for v in rec["std"]), resize=rec.get("resize"), crop=rec.get("crop"),
                   image_size=rec.get("image_size"), interpolation=str(rec.get("interpolation", "bilinear")),
                   overrides=tuple(rec.get("overrides", ())))

    def describe(self) -> str:
        """One human line: ``imagenet: Resize 256 (bilinear) + CenterCrop 224, mean [...], std [...]``."""
        geo = []
        if self.resize is not None:
            geo.append(f"Resize {self.resize} ({self.interpolation})")
        if self.crop is not None:
            geo.append(f"CenterCrop {self.crop}")
        if not geo:
            geo.append(f"decoded at {self.image_size} px" if self.image_size else "no resize")
        over = f" (set: {', '.join(self.overrides)})" if self.overrides else ""
        return (f"{self.preset}{over}: {' + '.join(geo)}, mean {[round(v, 4) for v in self.mean]}, "
                f"std {[round(v, 4) for v in self.std]}")

    def decoder(self, channels: int) -> ExactDecode | None:
        """Per-image decoder applying this geometry exactly, or None (the stream's own decode)."""
        if not self.exact_geometry:
            return None
        return ExactDecode(channels, self.resize, self.crop, self.interpolation)

    def geometry(self, x: Tensor) -> Tensor:
        """Float ``[N, C, H, W]`` in [0, 1] → this geometry (tensor form, antialiased)."""
        from torchvision.transforms.v2 import functional as TF

        h, w = x.shape[-2:]
        if self.exact_geometry:
            if self.crop is not None and (h, w) == (self.crop, self.crop):
                return x  # already decoded with this geometry (ExactDecode)
            if self.resize is not None:
                x = TF.resize(x, [self.resize], interpolation=_mode(self.interpolation), antialias=True)
            if self.crop is not None:
                x = TF.center_crop(x, [self.crop, self.crop])
            return x
        s = self.image_size
        if s is not None and (h, w) != (s, s):
            x = torch.nn.functional.interpolate(x, size=(s, s), mode=self.interpolation, antialias=self.interpolation != "nearest",
                                                **({} if self.interpolation == "nearest" else {"align_corners": False}))
        return x


def _mode(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    return {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
            "nearest": InterpolationMode.NEAREST}[name]


@dataclass(frozen=True)
class ExactDecode:
    """``bytes -> uint8 [H, W, C]``: PIL decode, ``convert('RGB'|'L')``, torchvision ``Resize`` +
    ``CenterCrop`` on the PIL image — the pixels ``torchvision.datasets.ImageFolder`` gives with
    ``Compose([Resize(resize), CenterCrop(crop)])`` (no JPEG draft, no rounding of our own).
    Picklable, so loader worker processes can run it."""

    channels: int
    resize: int | None
    crop: int | None
    interpolation: str = "bilinear"

    def __call__(self, data: bytes) -> np.ndarray:
        from PIL import Image
        from torchvision.transforms import functional as TF

        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            if self.resize is not None:
                im = TF.resize(im, self.resize, interpolation=_mode(self.interpolation))
            if self.crop is not None:
                im = TF.center_crop(im, self.crop)
            arr = np.asarray(im)
        return arr[:, :, None] if arr.ndim == 2 else arr


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) or isinstance(b, tuple):
        return len(a) != len(b) or any(abs(float(x) - float(y)) > 1e-6 for x, y in zip(a, b))
    return a != b


def resolve_preprocess(
    preset: str,
    record: Mapping[str, Any] | None,
    *,
    channels: int = 3,
    source: str = "the checkpoint",
    key: str = "victim.preprocess",
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    resize: int | None = None,
    crop: int | None = None,
    interpolation: str | None = None,
    image_size: int | None = None,
    quiet: bool = False,
) -> Preprocess:
    """The preprocessing to serve a checkpoint with.

    Args:
        preset: one of :data:`PRESET_NAMES`.
        record: the checkpoint's ``'sslsteal'`` record (None or empty: not one of ours).
        source: the file, for messages. ``key``: the config key named in errors.
        mean, std, resize, crop, interpolation: explicit overrides (win over the preset;
            ``resize=0`` / ``crop=0`` mean none). ``image_size``: the project geometry's size.
        quiet: do not print the ``auto`` → ``imagenet`` line.

    Raises:
        ValueError: unknown preset; ``project`` for a file without a record; a preset whose
            normalisation or input size contradicts the record (one line naming ``key``).
    """
    if preset not in PRESET_NAMES:
        raise ValueError(f"{key}={preset!r} is not valid; choose one of: {', '.join(PRESET_NAMES)}")
    if interpolation not in (None, "") and interpolation not in INTERPOLATIONS:
        raise ValueError(f"{key.rsplit('preprocess', 1)[0]}interpolation={interpolation!r} is not valid; "
                         f"choose one of: {', '.join(INTERPOLATIONS)}")
    rec = dict(record or {})
    has_record = bool(rec)
    if preset == "auto":
        preset = "project" if has_record else "imagenet"
        if not has_record and not quiet and os.environ.get("RANK", "0") == "0":  # one line, not one per process
            p = PRESETS["imagenet"]
            print(f"note: {source} has no sslsteal record (a released checkpoint?): serving it with ImageNet "
                  f"preprocessing (Resize {p['resize']} + CenterCrop {p['crop']}, mean {list(p['mean'])}, std "
                  f"{list(p['std'])}); set {key}=project|none|imagenet or explicit mean/std/resize/crop to change",
                  flush=True)
    if preset == "project":
        if not has_record:
            raise ValueError(f"{key}=project but {source} has no sslsteal record (not trained by this project); use "
                             f"{key}=imagenet for released SimSiam/MoCo v3/SimCLR checkpoints, or none with explicit mean/std")
        base = {"resize": None, "crop": None, "interpolation": "bilinear",
                "mean": rec.get("mean", PROJECT_DEFAULT_MEAN), "std": rec.get("std", PROJECT_DEFAULT_STD),
                "image_size": rec.get("image_size")}
    else:
        base = {**PRESETS[preset], "image_size": None}
    out = Preprocess(preset=preset, mean=_floats(base["mean"], channels, "mean", source),
                     std=_floats(base["std"], channels, "std", source), resize=base["resize"], crop=base["crop"],
                     image_size=base["image_size"], interpolation=base["interpolation"])
    if has_record and preset != "project":  # a preset must agree with what the weights were trained on
        want = Preprocess(preset="project", mean=_floats(rec.get("mean", PROJECT_DEFAULT_MEAN), channels, "mean", source),
                          std=_floats(rec.get("std", PROJECT_DEFAULT_STD), channels, "std", source))
        size = rec.get("image_size")
        clash = [n for n in ("mean", "std") if _differs(getattr(out, n), getattr(want, n))]
        if size is not None and out.input_size not in (None, size):
            clash.append(f"input size {out.input_size} vs {size}")
        if clash:
            raise ValueError(f"{key}={preset} contradicts the record of {source} (trained with mean {list(want.mean)}, "
                             f"std {list(want.std)}, image_size {size}; differs in {', '.join(clash)}); drop {key} "
                             f"(auto uses the record) or set {key}=project")
    over: dict[str, Any] = {}
    if mean is not None:
        over["mean"] = _floats(mean, channels, "mean", source)
    if std is not None:
        over["std"] = _floats(std, channels, "std", source)
    for name, val in (("resize", resize), ("crop", crop)):
        if val is not None:
            if int(val) < 0:
                raise ValueError(f"{key.rsplit('preprocess', 1)[0]}{name}={val} must be >= 0 (0 = none)")
            over[name] = int(val) or None
    if interpolation:
        over["interpolation"] = interpolation
    if image_size is not None and out.image_size is None and not out.exact_geometry:
        out = replace(out, image_size=int(image_size))
    if over:
        changed = tuple(n for n in _OVERRIDABLE if n in over and _differs(over[n], getattr(out, n)))
        out = replace(out, **over, overrides=changed)
    return out


def cache_record(rec: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What a response cache records of a victim's preprocessing record (``describe()['preprocess']``).

    None for the project's own record unchanged (and for servers too old to say): caches made before
    preprocessing was recorded were made that way, so they stay valid. Anything else is recorded whole,
    the aliases of the ImageNet transform (simsiam, mocov3) under ``imagenet``.
    """
    if not rec or (rec.get("preset") == "project" and not rec.get("overrides")):
        return None
    out = dict(rec)
    if PRESETS.get(out.get("preset", "")) is _IMAGENET:  # simsiam, mocov3: one transform, one name
        out["preset"] = "imagenet"
    return out


def preprocess_kwargs(cfg: Any, key_prefix: str = "victim.", attr_prefix: str = "") -> dict[str, Any]:
    """``load_victim_encoder`` preprocessing arguments from a config object's fields ``<attr_prefix>preprocess``,
    ``mean``, ``std``, ``resize``, ``crop``, ``interpolation``; errors name the keys as ``<key_prefix>preprocess``
    (the steal config's ``victim.preprocess``, the probe's flat ``victim_preprocess``)."""
    def get(name: str) -> Any:
        return getattr(cfg, attr_prefix + name)

    return {"preprocess": get("preprocess"), "mean": get("mean"), "std": get("std"), "resize": get("resize"),
            "crop": get("crop"), "interpolation": get("interpolation") or None, "preprocess_key": key_prefix + "preprocess"}
