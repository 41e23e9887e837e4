"""Image backbones by name: small ResNets laid out like torchvision's, and any timm model.

``build_backbone(name, ...)`` returns ``(module, feature_dim)``: the module maps images
``[N, C, H, W]`` (float, normalised) to pooled features ``[N, feature_dim]``.

* ``resnet18``, ``resnet34``, ``resnet50`` — :class:`ResNet`, built from torchvision's
  ``BasicBlock``/``Bottleneck`` with torchvision's attribute names (``conv1, bn1, relu,
  maxpool, layer1..layer4, avgpool, fc``). At ``width=64, stem="imagenet", in_chans=3``
  its ``state_dict()`` matches ``torchvision.models.resnet50()`` key for key and shape for
  shape (minus ``fc.*``, which is ``nn.Identity()`` here), so official SimSiam checkpoints
  load into it. ``fc`` is kept as an attribute so a projector can be put there,
  SimSiam-style.
* ``timm:<model_name>`` — ``timm.create_model(model_name, num_classes=0, ...)``: already
  pooled, returned as timm builds it (it may have no ``fc``; :mod:`victims.simsiam` wraps
  it to add one). ``pretrained=True`` asks timm to download hub weights, which this
  offline machine cannot do; keep it False here.

Example::

    >>> net, dim = build_backbone("resnet18", width=32, stem="small")   # 32-px inputs
    >>> net(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 256])
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

__all__ = ["STEMS", "TIMM_PREFIX", "ResNet", "BACKBONES", "build_backbone", "infer_resnet_arch"]

#: Stem name → (conv kernel, conv stride, uses maxpool). Overall downsampling to layer4:
#: imagenet 32x, small 16x, cifar 8x.
STEMS: dict[str, tuple[int, int, bool]] = {
    "imagenet": (7, 2, True),  # 7x7/2 conv + 3x3/2 maxpool (torchvision)
    "cifar": (3, 1, False),  # 3x3/1 conv, no maxpool (SimSiam/SimCLR CIFAR variant)
    "small": (3, 2, False),  # 3x3/2 conv, no maxpool: cheap on 32-px inputs
}


class ResNet(nn.Module):
    """torchvision's ResNet with a configurable base width, stem and input channels.

    Args:
        block: ``torchvision.models.resnet.BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        width: base width; stage widths are ``width * (1, 2, 4, 8)`` (64 = standard).
        stem: one of :data:`STEMS`.
        in_chans: input image channels.
        num_classes: 0 gives ``fc = nn.Identity()`` (pooled features out); >0 a Linear
            classifier exactly like torchvision's.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        *,
        width: int = 64,
        stem: str = "imagenet",
        in_chans: int = 3,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; valid stems: {sorted(STEMS)}")
        if width < 1 or in_chans < 1:
            raise ValueError(
                f"width and in_chans must be >= 1; got width={width}, in_chans={in_chans}"
            )
        kernel, stride, use_maxpool = STEMS[stem]
        self.stem = stem
        self.width = width
        self.in_chans = in_chans
        self.inplanes = width
        self.conv1 = nn.Conv2d(
            in_chans, width, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False
        )
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if use_maxpool else nn.Identity()
        )
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = width * 8 * block.expansion
        self.fc: nn.Module = (
            nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        )
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and the four stages: ``[N, C, H, W]`` → ``[N, num_features, h, w]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W]`` → ``fc(pooled features)``; ``[N, num_features]`` when fc is Identity."""
        x = torch.flatten(self.avgpool(self.forward_features(x)), 1)  # N x num_features
        return self.fc(x)


def _resnet(
    block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int]
) -> Callable[..., ResNet]:
    def make(*, width: int = 64, stem: str = "imagenet", in_chans: int = 3) -> ResNet:
        return ResNet(block, layers, width=width, stem=stem, in_chans=in_chans)

    return make


#: Name → constructor ``(*, width, stem, in_chans) -> ResNet``. ``timm:<name>`` is
#: handled by :func:`build_backbone` on top of these.
BACKBONES: dict[str, Callable[..., ResNet]] = {
    "resnet18": _resnet(BasicBlock, (2, 2, 2, 2)),
    "resnet34": _resnet(BasicBlock, (3, 4, 6, 3)),
    "resnet50": _resnet(Bottleneck, (3, 4, 6, 3)),
}

TIMM_PREFIX = "timm:"


def build_backbone(
    name: str,
    *,
    in_chans: int = 3,
    stem: str = "imagenet",
    width: int = 64,
    pretrained: bool = False,
) -> tuple[nn.Module, int]:
    """Build a backbone whose output is its pooled features.

    Args:
        name: a key of :data:`BACKBONES`, or ``"timm:<model_name>"``.
        in_chans: input image channels.
        stem: ResNet stem (:data:`STEMS`); ResNets only.
        width: ResNet base width (64 = standard); ResNets only.
        pretrained: timm only; downloads hub weights, impossible offline.

    Returns:
        ``(module, feature_dim)``. ResNets have ``fc = nn.Identity()``.

    Raises:
        ValueError: unknown name, or stem/width/pretrained given where they do not apply.
    """
    if name.startswith(TIMM_PREFIX):
        if stem != "imagenet" or width != 64:
            raise ValueError(
                f"stem and width apply to {sorted(BACKBONES)} only; {name} got "
                f"stem={stem!r}, width={width} (leave them at 'imagenet', 64)"
            )
        import timm  # lazy: the victim server should not pay for timm unless asked

        model_name = name[len(TIMM_PREFIX):]
        try:
            model = timm.create_model(
                model_name, pretrained=pretrained, num_classes=0, in_chans=in_chans
            )
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise ValueError(
                f"unknown timm model {model_name!r} ({e}); see timm.list_models()"
            ) from None
        return model, int(model.num_features)
    if name not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; valid names: {sorted(BACKBONES)} "
            f"or 'timm:<model_name>' for any timm model (e.g. 'timm:resnet10t')"
        )
    if pretrained:
        raise ValueError(
            f"pretrained weights are not available for {name}; load a checkpoint instead "
            f"(victims.simsiam.load_victim_encoder)"
        )
    model = BACKBONES[name](width=width, stem=stem, in_chans=in_chans)
    return model, model.num_features


#: (block kind, blocks per stage) → torchvision's name, including depths not built here
_RESNET_DEPTHS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


def infer_resnet_arch(state: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """What ResNet a torchvision-layout state dict holds: ``(name, "Bottleneck blocks 3-4-6-3,
    width 64")``, or None when it is not a ResNet's (e.g. a timm model). The name is
    torchvision's (``resnet101`` too) or ``resnet(<kind> <blocks>)`` for other depths."""
    if "conv1.weight" not in state or not any(k.startswith("layer4.") for k in state):
        return None
    blocks = []
    for i in range(1, 5):
        idx = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.") and k.split(".")[1].isdigit()}
        blocks.append(max(idx) + 1 if idx else 0)
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    depth = tuple(blocks)
    width = int(state["conv1.weight"].shape[0])
    name = _RESNET_DEPTHS.get((kind, depth), f"resnet({kind} {'-'.join(map(str, depth))})")  # type: ignore[arg-type]
    kernel = int(state["conv1.weight"].shape[-1])
    stem = "imagenet stem" if kernel == 7 else f"{kernel}x{kernel} stem"
    return name, f"{'Bottleneck' if kind == 'bottleneck' else 'BasicBlock'} blocks {'-'.join(map(str, depth))}, width {width}, {stem}"
