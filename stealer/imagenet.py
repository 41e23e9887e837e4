"""Read the ImageNet (ILSVRC2012) folder layouts users actually have: which val image is which class.

The train part is always class folders (``train/<wnid>/<wnid>_<n>.JPEG``). The val part comes as

* class folders ``val/<wnid>/ILSVRC2012_val_%08d.JPEG`` -- what the common ``valprep.sh`` and
  ``torchvision.datasets.ImageNet`` (``parse_val_archive``) make: read as any image folder;
* a flat ``val/ILSVRC2012_val_%08d.JPEG`` (as ``ILSVRC2012_img_val.tar`` unpacks) plus one label file:

  ``LOC_val_solution.csv``
      Kaggle's "imagenet-object-localization-challenge": ``ImageId,PredictionString``, the first
      token of PredictionString is the wnid (``LOC_synset_mapping.txt`` beside it lists the classes);
  ``ILSVRC2012_validation_ground_truth.txt``
      the ILSVRC2012 devkit (``ILSVRC2012_devkit_t12/data/``): one ILSVRC2012_ID per val image in
      file order. The IDs are *not* sorted-wnid indices; ``meta.mat`` beside it maps ID -> wnid (read
      as torchvision's ``parse_devkit_archive`` does: the ``synsets`` struct, leaf synsets only);
  ``imagenet_2012_validation_synset_labels.txt``
      tensorflow/models' inception preprocessing: one wnid per val image in file order.

:func:`find_val_labels` looks for these files in the val folder and up to four folders above it
(and in ``ILSVRC2012_devkit_t12/data`` there); :func:`read_val_labels` returns image name -> wnid.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

__all__ = ["VAL_LABEL_FILES", "LabelFileError", "find_val_labels", "is_imagenet_root", "read_val_labels"]

#: Label files of a flat val folder, in the order they are looked for.
VAL_LABEL_FILES = (
    "LOC_val_solution.csv",
    "ILSVRC2012_validation_ground_truth.txt",
    "imagenet_2012_validation_synset_labels.txt",
)
_DEVKIT_DIRS = ("", "ILSVRC2012_devkit_t12/data", "data")
_VAL_NAME = "ILSVRC2012_val_{:08d}"
_WNID_RE = re.compile(r"^n\d{8}$")


def is_imagenet_root(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` holds ``train/`` with class sub-folders and a ``val/`` folder (the ImageNet root)."""
    p = Path(path)
    train, val = p / "train", p / "val"
    if not (train.is_dir() and val.is_dir()):
        return False
    return any(d.is_dir() and not d.name.startswith(".") for d in train.iterdir())


def find_val_labels(val_dir: str | os.PathLike[str], levels: int = 4) -> Path | None:
    """The first known label file (:data:`VAL_LABEL_FILES`) in ``val_dir`` or up to ``levels`` folders above."""
    d = Path(val_dir).resolve()
    for _ in range(levels + 1):
        for name in VAL_LABEL_FILES:
            for sub in _DEVKIT_DIRS:
                cand = d / sub / name if sub else d / name
                if cand.is_file():
                    return cand
        if d.parent == d:
            break
        d = d.parent
    return None


class LabelFileError(ValueError):
    """A val label file cannot be read; the message names the file, the line and the fix."""


def read_val_labels(path: str | os.PathLike[str]) -> tuple[dict[str, str], list[str] | None]:
    """Read a val label file: ``({image name without suffix: wnid}, class wnids or None)``.

    The class list is the full list the file's distribution declares (``LOC_synset_mapping.txt``
    beside the csv; the leaf synsets of the devkit's ``meta.mat``), sorted; ``None`` when the
    format has none (the synset-labels file).

    Raises:
        LabelFileError: an unknown file name, a malformed line, or a devkit without ``meta.mat``.
    """
    p = Path(path)
    if p.name == "LOC_val_solution.csv":
        return _read_kaggle(p)
    if p.name == "ILSVRC2012_validation_ground_truth.txt":
        return _read_devkit(p)
    if p.name == "imagenet_2012_validation_synset_labels.txt":
        lines = _lines(p)
        for i, w in enumerate(lines):
            _check_wnid(w, p, i + 1)
        return {_VAL_NAME.format(i + 1): w for i, w in enumerate(lines)}, None
    raise LabelFileError(f"{p}: unknown val label file; give one of {', '.join(VAL_LABEL_FILES)}")


def _lines(p: Path) -> list[str]:
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelFileError(f"{p}: cannot read it ({exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_wnid(w: str, p: Path, line: int) -> None:
    if not _WNID_RE.match(w):
        raise LabelFileError(f"{p} line {line}: {w!r} is not a WordNet id like n01440764; is this the right file?")


def _read_kaggle(p: Path) -> tuple[dict[str, str], list[str] | None]:
    out: dict[str, str] = {}
    try:
        with open(p, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelFileError(f"{p}: cannot read it as CSV ({exc})") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise LabelFileError(f"{p}: the first line must be 'ImageId,PredictionString' (Kaggle's LOC_val_solution.csv)")
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        tokens = row[1].split() if len(row) > 1 else []
        if not tokens:
            raise LabelFileError(f"{p} line {n}: no PredictionString for {row[0]!r}")
        _check_wnid(tokens[0], p, n)
        out[row[0].strip()] = tokens[0]
    classes = None
    mapping = p.with_name("LOC_synset_mapping.txt")
    if mapping.is_file():
        classes = sorted(line.split()[0] for line in _lines(mapping))
    return out, classes


def _read_devkit(p: Path) -> tuple[dict[str, str], list[str] | None]:
    meta = p.with_name("meta.mat")
    if not meta.is_file():
        raise LabelFileError(
            f"{p} holds ILSVRC2012_IDs, which need the devkit's {meta.name} beside it to become classes; "
            f"unpack the whole ILSVRC2012_devkit_t12 (its data/ folder) or give LOC_val_solution.csv instead"
        )
    try:
        from scipy.io import loadmat
    except ImportError:
        raise LabelFileError(f"reading {meta} needs scipy: pip install scipy") from None
    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        rows = [tuple(s)[:5] for s in synsets.reshape(-1)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LabelFileError(f"{meta}: not a devkit meta.mat with a 'synsets' table ({exc})") from None
    by_id = {int(sid): str(wnid) for sid, wnid, _words, _gloss, children in rows if int(children) == 0}
    out: dict[str, str] = {}
    for i, line in enumerate(_lines(p)):
        try:
            out[_VAL_NAME.format(i + 1)] = by_id[int(line)]
        except (ValueError, KeyError):
            raise LabelFileError(f"{p} line {i + 1}: {line!r} is not an ILSVRC2012_ID of a class in {meta}") from None
    return out, sorted(by_id.values())
