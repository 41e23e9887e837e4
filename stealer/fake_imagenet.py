"""Write a small ImageNet-shaped tree for rehearsals: the real layout, sizes and quirks, fake pixels.

``make_fake_imagenet(root, classes=4, train_per_class=6, val_images=8)`` writes::

    root/train/<wnid>/<wnid>_<n>.JPEG                 class folders, as ILSVRC2012_img_train.tar unpacks
    root/val/...                                      one of four val layouts (``val_layout``):
        "csv"      flat val/ILSVRC2012_val_%08d.JPEG + root/LOC_val_solution.csv and
                   root/LOC_synset_mapping.txt (the Kaggle "imagenet-object-localization-challenge" files)
        "devkit"   flat val/ + root/ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt
                   (ILSVRC2012_IDs, one line per val image) and meta.mat (the ID -> wnid table; IDs are not
                   in sorted-wnid order, as in the real devkit, so reading them as indices is caught)
        "synsets"  flat val/ + root/imagenet_2012_validation_synset_labels.txt (one wnid per val image, the
                   file of tensorflow/models' inception preprocessing)
        "folders"  val/<wnid>/ILSVRC2012_val_%08d.JPEG (what the common valprep.sh and
                   torchvision.datasets.ImageNet make)
    root/fake_imagenet.json                           what was written: wnids, val truth, quirky files

Sizes and aspect ratios follow ImageNet's: the longer side is 500 px for about three images in
four (500 x 375 and 500 x 333 being the commonest ImageNet shapes), else 200-500; width / height
drawn from 4:3 (most), 3:4, 1:1, 3:2, 1.8:1. The known quirks of ILSVRC2012 are planted at
deterministic places (with ``quirks=True``): in train one CMYK JPEG, one greyscale JPEG, one PNG
named ``.JPEG`` (as ``n02105855_2933.JPEG`` is in the real set), one truncated JPEG and one 0-byte
file; in val one CMYK and one greyscale JPEG.

Every image carries a class signal a linear probe can learn: the class's colour (hue k / K) and
stripes at the class's angle, plus per-image phase, brightness and noise. The same seed writes the
same bytes.

:func:`write_official_simsiam` writes the victim of the rehearsal: a random-weight SimSiam ResNet-50
in exactly the layout of the released ``checkpoint_0099.pth.tar`` (facebookresearch/simsiam).
"""

from __future__ import annotations

import colorsys
import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["QUIRK_KINDS", "VAL_LAYOUTS", "class_colour", "describe", "make_fake_imagenet", "wnids",
           "write_official_simsiam"]

#: Where the val labels live, by layout (see the module docstring).
VAL_LAYOUTS = ("csv", "devkit", "synsets", "folders")
#: The planted quirks, as named in ``fake_imagenet.json``.
QUIRK_KINDS = ("cmyk", "grey", "png_named_jpeg", "truncated", "empty")
_ASPECTS = (4 / 3, 3 / 4, 1.0, 3 / 2, 1.8)
_ASPECT_P = (0.6, 0.15, 0.1, 0.11, 0.04)


def wnids(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct WordNet-like ids (``n`` + 8 digits), sorted, deterministic for ``seed``."""
    rng = np.random.default_rng([seed, 1])
    ids = rng.choice(np.arange(1_000_000, 15_000_000), size=n, replace=False)
    return sorted(f"n{int(i):08d}" for i in ids)


def class_colour(k: int, num_classes: int) -> tuple[int, int, int]:
    """The mean RGB colour of class ``k`` (hue ``k / num_classes``, saturation 0.7, value 0.8)."""
    r, g, b = colorsys.hsv_to_rgb(k / num_classes, 0.7, 0.8)
    return round(r * 255), round(g * 255), round(b * 255)


def _size(rng: np.random.Generator, longer_side: int) -> tuple[int, int]:
    """``(width, height)`` shaped like an ImageNet photo; ``longer_side`` scales the whole distribution."""
    side = longer_side if rng.random() < 0.75 else int(rng.integers(int(longer_side * 0.4), longer_side + 1))
    aspect = float(rng.choice(_ASPECTS, p=_ASPECT_P))
    if aspect >= 1:
        return side, max(1, round(side / aspect))
    return max(1, round(side * aspect)), side


def _pixels(rng: np.random.Generator, k: int, num_classes: int, size: tuple[int, int]) -> np.ndarray:
    """An ``[H, W, 3]`` uint8 image of class ``k``: its colour, stripes at its angle, noise."""
    w, h = size
    colour = np.array(class_colour(k, num_classes), dtype=np.float32)
    angle = np.pi * k / num_classes + rng.normal(0, 0.05)
    cycles = 6.0 + 3.0 * (k % 3)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    wave = np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) / max(w, h) + rng.uniform(0, 2 * np.pi))
    img = colour * rng.uniform(0.85, 1.15) + 40.0 * wave[..., None]
    img += rng.normal(0, 12, size=(h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _encode(arr: np.ndarray, quirk: str | None) -> bytes:
    """The file bytes of one image, with its quirk (or a plain RGB JPEG)."""
    img = Image.fromarray(arr)
    if quirk == "cmyk":
        return _jpeg(img.convert("CMYK"))
    if quirk == "grey":
        return _jpeg(img.convert("L"))
    if quirk == "png_named_jpeg":
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()
    if quirk == "truncated":
        data = _jpeg(img)
        return data[: len(data) * 3 // 5]
    if quirk == "empty":
        return b""
    return _jpeg(img)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _write_meta_mat(path: Path, ids: dict[str, int], words: dict[str, str]) -> None:
    """A devkit ``meta.mat``: struct array ``synsets`` with the fields torchvision's ImageNet reads."""
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = sorted(ids.items(), key=lambda kv: kv[1])
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, (wnid, sid) in enumerate(rows):
        synsets[i, 0] = (np.array([[sid]], dtype=np.uint16), wnid, words[wnid], "", np.array([[0]], dtype=np.uint8),
                         np.zeros((1, 0)), np.array([[0]], dtype=np.uint8), np.array([[0]], dtype=np.uint16))
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"synsets": synsets})


def make_fake_imagenet(
    root: str | os.PathLike[str],
    *,
    classes: int = 4,
    train_per_class: int = 6,
    val_images: int = 8,
    val_layout: str = "csv",
    longer_side: int = 500,
    quirks: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Write an ImageNet-layout tree under ``root`` (see the module docstring); return its summary.

    Args:
        root: folder to write (created; must not hold a ``train/`` or ``val/`` already).
        classes: number of classes (wnids).
        train_per_class: training images per class.
        val_images: val images in all, classes assigned round-robin then shuffled.
        val_layout: ``csv`` | ``devkit`` | ``synsets`` | ``folders``.
        longer_side: the usual longer side (500 as in ImageNet; smaller for quick tests).
        quirks: plant the ILSVRC2012 quirks (needs ``classes * train_per_class >= 10`` and
            ``val_images >= 2``).
        seed: the same seed writes the same bytes.

    Returns:
        The summary also written to ``root/fake_imagenet.json``: ``wnids``, ``val_layout``,
        ``train`` / ``val`` counts, ``val_labels`` (file name -> wnid), ``quirks``
        (kind -> paths relative to ``root``, for ``train`` and ``val``), ``mean_size`` [w, h].

    Raises:
        ValueError: a bad argument or an existing tree (one line, naming it).
    """
    if val_layout not in VAL_LAYOUTS:
        raise ValueError(f"val_layout must be one of {', '.join(VAL_LAYOUTS)}, got {val_layout!r}")
    if classes < 1 or train_per_class < 1 or val_images < 0 or longer_side < 8:
        raise ValueError("classes and train_per_class must be >= 1, val_images >= 0 and longer_side >= 8")
    if quirks and (classes * train_per_class < 10 or val_images < 2):
        raise ValueError("quirks=True needs classes * train_per_class >= 10 and val_images >= 2; or leave the quirks out (quirks=False, --no-quirks)")
    out = Path(root)
    for sub in ("train", "val"):
        if (out / sub).exists():
            raise ValueError(f"{out / sub} already exists; choose an empty folder for the fake ImageNet")
    rng = np.random.default_rng(seed)
    ids = wnids(classes, seed)
    words = {w: f"fake class {k}" for k, w in enumerate(ids)}

    # quirky train files: distinct (class, image) places drawn with the seed
    train_quirks: dict[tuple[int, int], str] = {}
    if quirks:
        places = [(k, n) for k in range(classes) for n in range(train_per_class)]
        order = rng.permutation(len(places))
        for kind, j in zip(QUIRK_KINDS, order[: len(QUIRK_KINDS)]):
            train_quirks[places[int(j)]] = kind
    summary_quirks: dict[str, list[str]] = {kind: [] for kind in QUIRK_KINDS}
    sizes: list[tuple[int, int]] = []
    for k, wnid in enumerate(ids):
        for n in range(train_per_class):
            size = _size(rng, longer_side)
            sizes.append(size)
            kind = train_quirks.get((k, n))
            rel = f"train/{wnid}/{wnid}_{n + 1}.JPEG"
            _write(out / rel, _encode(_pixels(rng, k, classes, size), kind))
            if kind:
                summary_quirks[kind].append(rel)

    val_cls = rng.permutation(np.arange(val_images) % classes) if val_images else np.zeros(0, dtype=int)
    val_quirk = {0: "cmyk", 1: "grey"} if quirks else {}
    val_quirks: dict[str, list[str]] = {"cmyk": [], "grey": []}
    val_labels: dict[str, str] = {}
    for i, k in enumerate(val_cls):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        wnid = ids[int(k)]
        val_labels[name] = wnid
        size = _size(rng, longer_side)
        sizes.append(size)
        rel = f"val/{wnid}/{name}.JPEG" if val_layout == "folders" else f"val/{name}.JPEG"
        kind = val_quirk.get(i)
        _write(out / rel, _encode(_pixels(rng, int(k), classes, size), kind))
        if kind:
            val_quirks[kind].append(rel)
    (out / "val").mkdir(parents=True, exist_ok=True)
    names = list(val_labels)
    if val_layout == "csv":
        with open(out / "LOC_val_solution.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["ImageId", "PredictionString"])
            for name in rng.permutation(names):  # the Kaggle file is not in image order; a box per line
                writer.writerow([name, f"{val_labels[name]} 0 0 99 79 "])
        (out / "LOC_synset_mapping.txt").write_text("".join(f"{w} {words[w]}\n" for w in ids), encoding="utf-8")
    elif val_layout == "devkit":
        ilsvrc_id = {w: int(i) + 1 for w, i in zip(ids, rng.permutation(classes))}  # not sorted-wnid order
        data = out / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True, exist_ok=True)
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{ilsvrc_id[val_labels[n]]}\n" for n in names), encoding="ascii")
        _write_meta_mat(data / "meta.mat", ilsvrc_id, words)
    elif val_layout == "synsets":
        (out / "imagenet_2012_validation_synset_labels.txt").write_text(
            "".join(f"{val_labels[n]}\n" for n in names), encoding="ascii")

    summary = {
        "seed": seed,
        "wnids": ids,
        "val_layout": val_layout,
        "train": {"classes": classes, "per_class": train_per_class, "images": classes * train_per_class},
        "val": {"images": val_images},
        "val_labels": val_labels,
        "quirks": {"train": summary_quirks, "val": val_quirks},
        "mean_size": [round(float(np.mean([s[0] for s in sizes])), 1), round(float(np.mean([s[1] for s in sizes])), 1)],
    }
    (out / "fake_imagenet.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def describe(summary: dict[str, Any], root: str | os.PathLike[str]) -> Sequence[str]:
    """Lines for the command line: counts, mean size and the quirky files."""
    lines = [
        f"{root}: {summary['train']['images']} train images in {summary['train']['classes']} classes, "
        f"{summary['val']['images']} val images ({summary['val_layout']} layout), mean size "
        f"{summary['mean_size'][0]:.0f} x {summary['mean_size'][1]:.0f} (w x h)"
    ]
    for part, kinds in summary["quirks"].items():
        for kind, files in kinds.items():
            if files:
                lines.append(f"  {part} {kind}: {', '.join(files)}")
    return lines


def write_official_simsiam(path: str | os.PathLike[str], arch: str = "resnet50", seed: int = 0) -> None:
    """A random-weight SimSiam checkpoint exactly as facebookresearch/simsiam writes it.

    The layout of ``main_simsiam.py`` ``save_checkpoint`` (facebookresearch/simsiam, commit
    a7bc1772896d0dad0806c51f0bb6f3b16d290468): ``{'epoch', 'arch', 'state_dict', 'optimizer'}``
    (the optimizer state left out as ``None``) with DDP's ``module.`` prefix on ``encoder.*`` (torchvision ResNet, projector in ``encoder.fc``)
    and ``predictor.*`` keys, dim 2048, pred_dim 512, and no record of this project -- what a user
    downloading the released ``checkpoint_0099.pth.tar`` holds.
    """
    import torch

    from victims.simsiam import SimSiam

    torch.manual_seed(seed)
    model = SimSiam(arch, dim=2048, pred_dim=512)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    from victims.atomic import atomic_write

    atomic_write(path, lambda f: torch.save({"epoch": 100, "arch": arch, "state_dict": state, "optimizer": None}, f))
