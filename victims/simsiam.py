"""SimSiam victims: the model, its official checkpoint format, and the frozen query encoder.

:class:`SimSiam` is facebookresearch/simsiam ``simsiam/builder.py`` with a backbone by name
(:func:`victims.backbones.build_backbone`). Checkpoints are written in the official
``main_simsiam.py`` format::

    {'epoch': int, 'arch': str, 'optimizer': optimizer_state_or_None,
     'state_dict': {'module.encoder.conv1.weight': ..., 'module.encoder.fc.0.weight': ...,
                    'module.predictor.0.weight': ..., ...},
     'sslsteal': {'width': 32, 'stem': 'small', 'in_chans': 3, 'image_size': 32,
                  'mean': [...], 'std': [...], ...}}   # our additions, optional

so official ResNet checkpoints load here and ours load in the official ``main_lincls.py``.
:func:`load_victim_encoder` turns such a file into a :class:`VictimEncoder`: frozen, always
in eval mode, taking uint8 images and returning float representations — the thing the
query API serves — behind a declared preprocessing (:mod:`victims.preprocess`): the file's
``'sslsteal'`` record, or for a file without one (a released checkpoint) the ImageNet eval
transform of its repository, Resize 256 + CenterCrop 224 + ImageNet mean/std. ``timm:`` backbones are supported, wrapped as :class:`TimmEncoder` so the
projector still sits in ``encoder.fc``; format compatibility is promised for ResNets only.

Example::

    >>> model = SimSiam("resnet18", dim=512, pred_dim=128, width=32, stem="small")
    >>> save_simsiam_checkpoint(model, "runs/v/checkpoint.pth.tar", epoch=1, arch="resnet18",
    ...                         extra={"image_size": 32})
    >>> victim = load_victim_encoder("runs/v/checkpoint.pth.tar")   # representation="backbone"
    >>> victim(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)).shape
    torch.Size([4, 256])
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from victims.backbones import BACKBONES, TIMM_PREFIX, build_backbone, infer_resnet_arch
from victims.preprocess import PROJECT_DEFAULT_MEAN, PROJECT_DEFAULT_STD, Preprocess, resolve_preprocess

__all__ = [
    "REPRESENTATIONS",
    "TimmEncoder",
    "build_encoder",
    "projector",
    "predictor",
    "SimSiam",
    "simsiam_loss",
    "save_simsiam_checkpoint",
    "VictimEncoder",
    "load_victim_encoder",
    "random_victim",
]

#: What a victim returns: pooled backbone features (the usual attack target, as in
#: Dziedzic et al., ICML'22) or the projector output.
REPRESENTATIONS = ("backbone", "projector")
_BACKBONE_KEYS = ("in_chans", "stem", "width")
_DEFAULT_MEAN, _DEFAULT_STD = PROJECT_DEFAULT_MEAN, PROJECT_DEFAULT_STD
_TRAIN_HINT = "train one with launch/train_victim.py"


class TimmEncoder(nn.Module):
    """A timm backbone (``num_classes=0``, already pooled) followed by an ``fc`` slot.

    Gives timm models the ResNet shape SimSiam relies on: ``encoder.fc`` holds the
    projector, ``nn.Identity()`` gives the pooled features.
    """

    def __init__(self, backbone: nn.Module, fc: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc: nn.Module = fc if fc is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.backbone(x))  # N x C


def build_encoder(arch: str, **backbone_kwargs: Any) -> tuple[nn.Module, int]:
    """Backbone with an ``fc`` attribute (Identity) for any arch; returns (module, feature dim)."""
    net, feat_dim = build_backbone(arch, **backbone_kwargs)
    if arch.startswith(TIMM_PREFIX):
        net = TimmEncoder(net)
    return net, feat_dim


def projector(prev_dim: int, dim: int) -> nn.Sequential:
    """SimSiam's 3-layer projector; the last Linear's bias is frozen (it is followed by BN)."""
    proj = nn.Sequential(
        nn.Linear(prev_dim, prev_dim, bias=False),
        nn.BatchNorm1d(prev_dim),
        nn.ReLU(inplace=True),  # first layer
        nn.Linear(prev_dim, prev_dim, bias=False),
        nn.BatchNorm1d(prev_dim),
        nn.ReLU(inplace=True),  # second layer
        nn.Linear(prev_dim, dim),
        nn.BatchNorm1d(dim, affine=False),  # output layer
    )
    proj[6].bias.requires_grad = False  # hack: not use bias as it is followed by BN
    return proj


def predictor(dim: int, pred_dim: int) -> nn.Sequential:
    """SimSiam's 2-layer bottleneck predictor."""
    return nn.Sequential(
        nn.Linear(dim, pred_dim, bias=False),
        nn.BatchNorm1d(pred_dim),
        nn.ReLU(inplace=True),  # hidden layer
        nn.Linear(pred_dim, dim),  # output layer
    )


def _resolved_kwargs(arch: str, kw: Mapping[str, Any]) -> dict[str, Any]:
    """Backbone kwargs with defaults filled in, so a checkpoint records them unambiguously."""
    out = {"in_chans": int(kw.get("in_chans", 3))}
    if not arch.startswith(TIMM_PREFIX):
        out["stem"] = str(kw.get("stem", "imagenet"))
        out["width"] = int(kw.get("width", 64))
    return out


class SimSiam(nn.Module):
    """SimSiam (Chen & He, CVPR'21) as in facebookresearch/simsiam ``builder.py``.

    Args:
        backbone_name: a :data:`victims.backbones.BACKBONES` key or ``"timm:<name>"``.
        dim: projector output (and predictor output) dimension.
        pred_dim: predictor hidden dimension.
        **backbone_kwargs: ``in_chans``, ``stem``, ``width`` for
            :func:`victims.backbones.build_backbone`.
    """

    def __init__(
        self, backbone_name: str = "resnet50", dim: int = 2048, pred_dim: int = 512,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        self.arch = backbone_name
        self.dim, self.pred_dim = dim, pred_dim
        self.backbone_kwargs = _resolved_kwargs(backbone_name, backbone_kwargs)
        # create the encoder; build a 3-layer projector in its fc slot
        self.encoder, prev_dim = build_encoder(backbone_name, **backbone_kwargs)
        self.feature_dim = prev_dim
        self.encoder.fc = projector(prev_dim, dim)
        # build a 2-layer predictor
        self.predictor = predictor(dim, pred_dim)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Two views ``[N, C, H, W]`` → ``p1, p2, z1.detach(), z2.detach()`` (each N x dim)."""
        z1 = self.encoder(x1)  # NxC
        z2 = self.encoder(x2)  # NxC

        p1 = self.predictor(z1)  # NxC
        p2 = self.predictor(z2)  # NxC

        return p1, p2, z1.detach(), z2.detach()


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """Symmetrised negative cosine similarity with stop-gradient on z.

    ``-(cos(p1, z2).mean() + cos(p2, z1).mean()) * 0.5``; in [-1, 1], -1 at perfect
    agreement. ``z`` is detached here too, so passing undetached targets cannot collapse.

    Args:
        p1, p2: predictor outputs [N, D].
        z1, z2: projector outputs [N, D].
    """
    cos = nn.functional.cosine_similarity
    return -(cos(p1, z2.detach(), dim=1).mean() + cos(p2, z1.detach(), dim=1).mean()) * 0.5


def _check_plain(obj: Any, where: str) -> None:
    """Reject values ``torch.load(weights_only=True)`` could not read back."""
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, f"{where} key")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__name__}; checkpoint extras must be plain Python "
        f"(None, bool, int, float, str, list, tuple, dict) or tensors"
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def save_simsiam_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    epoch: int,
    arch: str,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` in the official SimSiam checkpoint format, atomically.

    Keys get the ``module.`` prefix DDP gives them in ``main_simsiam.py`` (a model already
    wrapped in DDP or ``torch.compile`` is unwrapped first). For a :class:`SimSiam`, its
    backbone kwargs, ``dim`` and ``pred_dim`` are recorded under ``'sslsteal'``; ``extra``
    (e.g. ``image_size``, ``mean``, ``std``) is merged on top. Written through
    :func:`victims.atomic.atomic_write` (a temp of this process, fsync, rename), so a crash never
    leaves a half-written file at ``path``.
    """
    model = _unwrap(model)
    meta: dict[str, Any] = {"format": 1}
    if isinstance(model, SimSiam):
        meta.update(model.backbone_kwargs, dim=model.dim, pred_dim=model.pred_dim)
    meta.update(extra or {})
    _check_plain(meta, "extra")
    ckpt = {
        "epoch": int(epoch),
        "arch": str(arch),
        "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "sslsteal": meta,
    }
    from victims.atomic import atomic_write

    atomic_write(path, lambda f: torch.save(ckpt, f))


class VictimEncoder(nn.Module):
    """A frozen encoder behind its preprocessing: uint8 images in, representations out.

    Always in eval mode (``train()`` is a no-op that keeps eval) with ``requires_grad``
    off, and the forward runs under ``torch.no_grad()``: queries can never move weights
    or BatchNorm statistics. Outputs are ordinary tensors (not inference tensors), so an
    attacker may use them as loss targets.

    Args:
        encoder: maps normalised float ``[N, C, H, W]`` to ``[N, out_dim]``.
        out_dim: representation dimension.
        in_chans: image channels expected.
        image_size: inputs of another size are resized to ``image_size``² (bilinear,
            antialiased); None = no resize.
        mean, std: per-channel normalisation of ``images / 255`` (one value is broadcast);
            default 0.5 and 0.25.
        preprocessing: a resolved :class:`victims.preprocess.Preprocess` (e.g. the ImageNet
            preset: Resize 256 + CenterCrop 224 + ImageNet mean/std); when given it replaces
            ``image_size``, ``mean`` and ``std``.
        arch, representation, backbone_kwargs, proj_dim: description, used by
            :func:`random_victim` and ``VictimAPI.describe``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        out_dim: int,
        in_chans: int,
        image_size: int | None = None,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        preprocessing: Preprocess | None = None,
        arch: str = "custom",
        representation: str = "backbone",
        backbone_kwargs: Mapping[str, Any] | None = None,
        proj_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.out_dim = int(out_dim)
        self.in_chans = int(in_chans)
        if preprocessing is None:  # the project's own kind: decoded at image_size, 0.5/0.25 by default
            preprocessing = Preprocess(
                preset="project", image_size=int(image_size) if image_size is not None else None,
                mean=tuple(self._per_channel(_DEFAULT_MEAN if mean is None else mean, "mean").flatten().tolist()),
                std=tuple(self._per_channel(_DEFAULT_STD if std is None else std, "std").flatten().tolist()))
        self.preprocessing = preprocessing
        self.image_size = preprocessing.input_size
        self.arch = arch
        self.representation = representation
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.proj_dim = proj_dim
        mean_t = self._per_channel(preprocessing.mean, "mean")
        std_t = self._per_channel(preprocessing.std, "std")
        if (std_t <= 0).any():
            raise ValueError(f"std must be > 0 per channel; got {std_t.flatten().tolist()}")
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)
        self.encoder.requires_grad_(False)
        self.train(False)

    def _per_channel(self, value: Sequence[float] | float, name: str) -> Tensor:
        t = torch.as_tensor(value, dtype=torch.float32).flatten()
        if t.numel() == 1:
            t = t.expand(self.in_chans).clone()
        if t.numel() != self.in_chans:
            raise ValueError(f"{name} has {t.numel()} values for {self.in_chans} channels")
        return t.view(1, -1, 1, 1)

    def train(self, mode: bool = True) -> VictimEncoder:
        """Stay in eval mode whatever is asked: a victim never trains."""
        return super().train(False)

    @property
    def normalisation(self) -> tuple[list[float], list[float]]:
        """``(mean, std)`` per channel, as applied to ``images / 255``."""
        return self.mean.flatten().tolist(), self.std.flatten().tolist()

    def decoder(self) -> Any:
        """Per-image ``bytes -> uint8 [H, W, C]`` decoder with this victim's geometry, or None
        when the stream's own decode at ``image_size`` is this victim's (project victims)."""
        return self.preprocessing.decoder(self.in_chans)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 ``[N, C, H, W]`` (0..255) → float32 with the victim's geometry, normalised.

        As torchvision's ``ToTensor`` + ``Normalize``: ``(images / 255 - mean) / std`` in float32.
        Images already at the input size (``crop`` x ``crop``) are taken as decoded with the
        victim's geometry (:meth:`decoder`); others get it here, on tensors.
        """
        x = images.to(self.mean.device, non_blocking=True).float().div_(255.0)
        x = self.preprocessing.geometry(x)
        return (x - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        """uint8 images ``[N, C, H, W]`` → float32 representations ``[N, out_dim]``."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(
                f"victim expects uint8 images [N, {self.in_chans}, H, W]; got "
                f"{images.dtype} {list(images.shape)}"
            )
        for m in self.encoder.modules():  # cheap; undoes a stray encoder.train()
            m.training = False
        with torch.no_grad():
            return self.encoder(self.preprocess(images)).float()  # N x out_dim


def _make_victim(
    arch: str,
    *,
    representation: str,
    backbone_kwargs: Mapping[str, Any],
    proj_dim: int | None,
    image_size: int | None,
    mean: Sequence[float] | float | None,
    std: Sequence[float] | float | None,
    preprocessing: Preprocess | None = None,
) -> VictimEncoder:
    """A randomly initialised VictimEncoder of the given kind."""
    if representation not in REPRESENTATIONS:
        raise ValueError(
            f"unknown representation {representation!r}; valid: {list(REPRESENTATIONS)}"
        )
    encoder, feat_dim = build_encoder(arch, **backbone_kwargs)
    out_dim = feat_dim
    if representation == "projector":
        proj_dim = proj_dim or 2048
        encoder.fc = projector(feat_dim, proj_dim)
        out_dim = proj_dim
    return VictimEncoder(
        encoder, out_dim=out_dim, in_chans=backbone_kwargs.get("in_chans", 3),
        image_size=image_size, mean=mean, std=std, preprocessing=preprocessing, arch=arch,
        representation=representation, backbone_kwargs=_resolved_kwargs(arch, backbone_kwargs), proj_dim=proj_dim,
    )


def _encoder_state(sd: Mapping[str, Any]) -> dict[str, Tensor]:
    """The encoder's entries of a SimSiam state dict, prefixes stripped (as main_lincls.py)."""
    for prefix in ("module.encoder.", "encoder."):
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    # a bare backbone state dict (e.g. torchvision layout), possibly DDP-prefixed
    skip = ("predictor.", "module.predictor.")
    return {k.removeprefix("module."): v for k, v in sd.items() if not k.startswith(skip)}


def _first(keys: Sequence[str], n: int = 4) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + "]" + more


def load_victim_encoder(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    representation: str = "backbone",
    image_size: int | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    preprocess: str = "auto",
    resize: int | None = None,
    crop: int | None = None,
    interpolation: str | None = None,
    preprocess_key: str = "victim.preprocess",
    **backbone_kwargs: Any,
) -> VictimEncoder:
    """Load a SimSiam checkpoint as a frozen :class:`VictimEncoder`.

    Reads the official format (``module.encoder.*`` keys), the same without ``module.``,
    or a bare state dict. Backbone kwargs (``in_chans``, ``stem``, ``width``) come from the
    checkpoint's ``'sslsteal'`` record when it has them (they describe the weights; a
    conflicting argument is ignored with a warning), else from ``backbone_kwargs``. ``arch``
    defaults to ``ckpt['arch']``; a ResNet whose weights are of another depth or width than
    the arch named is refused in one line naming the arch found.

    Preprocessing (:func:`victims.preprocess.resolve_preprocess`): ``preprocess="auto"`` uses
    the checkpoint's record (``image_size``, ``mean``, ``std``) when it has one, else the
    ImageNet eval transform of the released checkpoints (Resize 256 + CenterCrop 224 + ImageNet
    mean/std), said in one printed line; a named preset (``imagenet``, ``simsiam``, ``mocov3``,
    ``simclr``, ``none``, ``project``) that contradicts the record is refused naming
    ``preprocess_key``. ``mean``, ``std``, ``resize``, ``crop``, ``interpolation`` and
    ``image_size`` override the preset.

    Args:
        path: checkpoint file.
        arch: backbone name; needed only for files without ``'arch'``.
        representation: ``"backbone"`` (pooled features) or ``"projector"`` (fc output).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a checkpoint, or its weights do not fit the arch (one line naming
            the missing, unexpected and mis-shaped keys), or a bad preprocessing choice.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no victim checkpoint at {path}; {_TRAIN_HINT}")
    if representation not in REPRESENTATIONS:
        raise ValueError(
            f"unknown representation {representation!r}; valid: {list(REPRESENTATIONS)}"
        )
    unknown = sorted(set(backbone_kwargs) - set(_BACKBONE_KEYS))
    if unknown:
        raise TypeError(
            f"load_victim_encoder got unknown arguments {unknown}; "
            f"backbone kwargs are {list(_BACKBONE_KEYS)}"
        )
    from victims.safe_load import load_untrusted

    ckpt = load_untrusted(path, "victim checkpoint")  # one line naming a refused pickled object and the fix
    named = arch
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        sd, meta = ckpt["state_dict"], ckpt.get("sslsteal") or {}
        arch = arch or ckpt.get("arch")
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
        sd, meta = ckpt, {}
    else:
        raise ValueError(
            f"{path} holds neither a SimSiam checkpoint ('state_dict' key) nor a state dict"
        )
    if not arch:
        raise ValueError(
            f"{path} does not record its arch; pass arch= "
            f"(one of {sorted(BACKBONES)} or 'timm:<name>')"
        )
    if named and isinstance(ckpt, dict) and ckpt.get("arch") and named != ckpt["arch"]:
        warnings.warn(f"{path} records arch {ckpt['arch']!r}; loading it as {named!r} as asked", stacklevel=2)
    state = _encoder_state(sd)

    kw = dict(backbone_kwargs)
    for key in _BACKBONE_KEYS:
        if key in meta:
            if key in kw and kw[key] != meta[key]:
                warnings.warn(
                    f"{path} was trained with {key}={meta[key]!r}; ignoring {key}={kw[key]!r}",
                    stacklevel=2,
                )
            kw[key] = meta[key]

    if representation == "backbone":
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        proj_dim = None
    elif "fc.6.weight" in state:
        proj_dim = int(state["fc.6.weight"].shape[0])
    else:
        raise ValueError(
            f"{path} has no projector weights (encoder.fc.*); use representation='backbone'"
        )

    pre = resolve_preprocess(
        preprocess, meta, channels=int(kw.get("in_chans", 3)), source=path, key=preprocess_key,
        mean=mean, std=std, resize=resize, crop=crop, interpolation=interpolation, image_size=image_size,
    )
    victim = _make_victim(
        arch, representation=representation, backbone_kwargs=kw, proj_dim=proj_dim,
        image_size=None, mean=None, std=None, preprocessing=pre,
    )
    want = victim.encoder.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(want[k].shape)}"
        for k in want if k in state and state[k].shape != want[k].shape
    ]
    if missing or unexpected or shapes:
        desc = ", ".join(f"{k} {v}" for k, v in victim.backbone_kwargs.items())
        rec_arch = ckpt.get("arch") if isinstance(ckpt, dict) else None
        recorded = f" (it records arch {rec_arch!r})" if rec_arch not in (None, arch) else ""
        found = infer_resnet_arch(state)  # what the weights are, when they are a ResNet's
        if found is not None and found[0] != arch:
            fix = (f"set victim.arch={found[0]}" if found[0] in BACKBONES
                   else f"it is not one of {sorted(BACKBONES)}; pass the arch it was trained with (victim.arch=...)")
            raise ValueError(
                f"checkpoint {path} holds {found[0]} weights ({found[1]}), not {arch}{recorded}: "
                f"missing encoder keys {_first(missing)}, unexpected {_first(unexpected)}; {fix}"
            )
        raise ValueError(
            f"checkpoint {path}{recorded} does not match arch {arch} ({desc}): "
            f"missing encoder keys {_first(missing)}, unexpected {_first(unexpected)}, "
            f"shape mismatches {_first(shapes, 3)}; pass the arch it was trained with "
            f"(victim.arch=...)"
        )
    victim.encoder.load_state_dict(state, strict=True)
    return victim


def random_victim(
    arch: str | VictimEncoder,
    *,
    representation: str | None = None,
    proj_dim: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    **backbone_kwargs: Any,
) -> VictimEncoder:
    """A randomly initialised victim: the skeptic's control (what does stealing noise give?).

    ``arch`` is a backbone name, or an existing :class:`VictimEncoder` whose kind (arch,
    representation, backbone kwargs, projector dim, preprocessing) is copied; explicit
    ``image_size``/``mean``/``std`` override it. Initialisation is deterministic in ``seed``
    and leaves the global RNG untouched.
    """
    preprocessing = None
    if isinstance(arch, VictimEncoder):
        ref = arch
        arch = ref.arch
        representation = representation or ref.representation
        proj_dim = proj_dim or ref.proj_dim
        if image_size is None and mean is None and std is None:
            preprocessing = ref.preprocessing
        else:
            image_size = image_size if image_size is not None else ref.image_size
            ref_mean, ref_std = ref.normalisation
            mean = mean if mean is not None else ref_mean
            std = std if std is not None else ref_std
        backbone_kwargs = {**ref.backbone_kwargs, **backbone_kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _make_victim(
            arch, representation=representation or "backbone",
            backbone_kwargs=backbone_kwargs, proj_dim=proj_dim,
            image_size=image_size, mean=mean, std=std, preprocessing=preprocessing,
        )
