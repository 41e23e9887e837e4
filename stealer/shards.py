"""Write image datasets as WebDataset shards in the ``sslsteal-shards/1`` format.

A shard folder holds ``{prefix}-{i:06d}.tar`` files and a ``manifest.json``.
Each sample in a tar is three members sharing one key::

    animal_mnist-000123.png   the image (PNG, mode L or RGB)  -- or .jpg for copied JPEGs
    animal_mnist-000123.cls   the class index as ASCII decimal text

Keys are unique across the whole set (and, for the sets written here, across all
splits cut from one source, because they carry the source's own index).
The manifest::

    {"format": "sslsteal-shards/1", "source": str, "num_samples": int,
     "classes": [names in index order], "channels": 1 | 3,
     "image_size": [H, W] or null if mixed, "image_ext": "png" | "jpg",
     "shards": [{"name": "train-000000.tar", "count": int}, ...],
     "skipped": int, "created": ISO-8601 time}

plus, for image folders, ``"quirks"``: what was converted or left out, by kind, each
``{"count": int, "files": [paths relative to the source, at most 1000]}`` -- ``unreadable``
(skipped: 0-byte, truncated, not an image), ``cmyk_to_rgb``, ``grey_to_rgb``, ``<mode>_to_rgb``,
``png_to_jpg`` (a non-JPEG, e.g. a PNG named ``.JPEG``, in a JPEG set), and for labelled flat
folders ``unlabelled`` / ``other_class`` (images the label file does not name, or names with a
class outside the set's; left out, not counted in ``skipped``).

is written last and atomically (temporary file + ``os.replace``), and each tar is
first written under a hidden temporary name and renamed into place, so a folder
without ``manifest.json`` is an unfinished set. Tar headers carry a fixed mtime,
uid/gid 0 and no user names, so the same samples give byte-identical shards.

Sources (used by ``launch/make_shards.py``): arrays (:func:`array_samples`), a
``.npz`` (:func:`load_npz`), an image-folder tree (:class:`ImageFolderSource`) and
the built-in datasets (:func:`build_default_data`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import itertools
import json
import os
import re
import shutil
import tarfile
import warnings
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from victims.atomic import atomic_open, atomic_write_json

from stealer.datasets import DEFAULT_SPLITS, OPTIONAL_SPLITS, load_builtin, optional_available, split_indices

__all__ = [
    "FORMAT",
    "IMAGE_EXTENSIONS",
    "MANIFEST_NAME",
    "ImageFolderSource",
    "ShardSourceError",
    "ShardWarning",
    "SkipCounter",
    "array_layout",
    "array_samples",
    "build_default_data",
    "encode_png",
    "load_npz",
    "make_manifest",
    "tar_writer",
    "read_manifest",
    "write_manifest",
    "resize_array",
    "sanitize_key_prefix",
    "write_shards",
]

FORMAT = "sslsteal-shards/1"
MANIFEST_NAME = "manifest.json"
#: File suffixes (lower case) treated as images in an image-folder source.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
_TAR_MTIME = 0
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
#: A folder is stored as JPEG (bytes copied, the rest re-encoded) when at least this share of its
#: readable images are JPEGs and no resize is asked for; ImageNet's one PNG named .JPEG stays a JPEG set.
JPEG_SET_MIN_FRACTION = 0.9
_QUIRK_NAMES = 1000  # file names kept per quirk kind in a manifest

#: One sample: (key, encoded image bytes, "png" | "jpg", class index).
Sample = tuple[str, bytes, str, int]


class ShardSourceError(ValueError):
    """A source (folder, npz, builtin name) cannot be turned into shards; the message says why and how to fix it."""


class ShardWarning(UserWarning):
    """Something was skipped while writing shards (e.g. an unreadable image)."""


# --------------------------------------------------------------------------- encoding


def encode_png(array: np.ndarray) -> bytes:
    """Encode a ``uint8`` image array as PNG bytes.

    Args:
        array: ``[H, W]`` or ``[H, W, 1]`` (stored as mode L) or ``[H, W, 3]`` (RGB).

    Returns:
        PNG bytes (no timestamps or other metadata, so encoding is deterministic).

    Raises:
        ValueError: wrong dtype or shape.
    """
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"encode_png needs an [H, W] or [H, W, 3] array, got shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def resize_array(array: np.ndarray, size: int | tuple[int, int] | None) -> np.ndarray:
    """Resize a ``uint8`` ``[H, W]`` / ``[H, W, 3]`` image to ``size`` (``S`` or ``(H, W)``) with PIL bilinear.

    The channel count is kept; ``None`` or an equal size returns the input unchanged.
    """
    if size is None:
        return array
    h, w = (size, size) if isinstance(size, int) else size
    if array.shape[:2] == (h, w):
        return array
    squeeze = array.ndim == 3 and array.shape[2] == 1
    src = array[:, :, 0] if squeeze else array
    out = np.asarray(Image.fromarray(np.ascontiguousarray(src)).resize((w, h), Image.Resampling.BILINEAR))
    return out[:, :, None] if squeeze else out


def sanitize_key_prefix(name: str) -> str:
    """Turn a source name into a key prefix that WebDataset groups correctly (no dots, no leading ``_``)."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_-")
    return clean or "img"


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(
            f"bad sample key {key!r}: keys must start with a letter or digit and contain only "
            "letters, digits, '_' and '-' (a '.' would split the key in WebDataset)"
        )


# --------------------------------------------------------------------------- writing


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _TAR_MTIME
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


_SHARD_NAME_RE_CACHE: dict[str, re.Pattern[str]] = {}


def _shard_name_re(prefix: str) -> re.Pattern[str]:
    if prefix not in _SHARD_NAME_RE_CACHE:
        _SHARD_NAME_RE_CACHE[prefix] = re.compile(rf"^{re.escape(prefix)}-\d{{6,}}\.tar$")
    return _SHARD_NAME_RE_CACHE[prefix]


def _write_json_atomic(path: Path, obj: object) -> None:
    atomic_write_json(path, obj, indent=2)


@contextlib.contextmanager
def tar_writer(path: str | os.PathLike[str]) -> Iterator[Callable[[str, bytes], None]]:
    """Write one tar shard atomically (:func:`victims.atomic.atomic_open`): yields ``add(name, data)``,
    which appends a member with the format's fixed headers (mtime 0, mode 0444, uid/gid 0, no user
    names; same members, byte-identical tar); the tar exists under ``path`` only once it is complete.
    The one tar-member writer of the shard format (shard sets, the response cache)."""
    with atomic_open(path) as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
        yield lambda name, data: _tar_add(tar, name, data)


def make_manifest(*, source: str, classes: Sequence[str], channels: int | None, image_size: Sequence[int] | None,
                  image_ext: str | None, shards: Sequence[Mapping[str, Any]], **extra: Any) -> dict:
    """The ``sslsteal-shards/1`` manifest of a set (the one place its keys are made): the common keys
    from the arguments, ``num_samples`` summed over ``shards``, ``created`` now (UTC), then ``extra``
    (``skipped``, ``quirks``, a cache's ``responses``, ...), which cannot replace the format's keys."""
    manifest = {
        "format": FORMAT,
        "source": str(source),
        "num_samples": sum(int(s["count"]) for s in shards),
        "classes": [str(c) for c in classes],
        "channels": None if channels is None else int(channels),
        "image_size": None if image_size is None else [int(image_size[0]), int(image_size[1])],
        "image_ext": image_ext,
        "shards": [dict(s) for s in shards],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    clash = sorted(set(extra) & set(manifest))
    if clash:
        raise ValueError(f"extra manifest keys {clash} would replace the format's own keys")
    manifest.update(extra)
    return manifest


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike[str],
    *,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    source: str,
    classes: Sequence[str],
    channels: int,
    image_size: Sequence[int] | None,
    skipped: int | Callable[[], int] = 0,
    overwrite: bool = False,
    extra: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
) -> dict:
    """Write ``samples`` as WebDataset tar shards plus ``manifest.json`` into ``out_dir``.

    Args:
        samples: ``(key, image_bytes, ext, cls)`` tuples; keys unique and made of
            letters, digits, ``_``, ``-``; ``ext`` ``"png"`` or ``"jpg"`` (one
            extension for the whole set); ``0 <= cls < len(classes)``.
        out_dir: target folder (created if needed).
        prefix: shard file prefix: ``{prefix}-{i:06d}.tar``.
        samples_per_shard: samples per tar (the last one may hold fewer).
        source: free-text provenance stored in the manifest.
        classes: class names in index order.
        channels: 1 or 3 -- what the images decode to.
        image_size: ``[H, W]`` when every image has that size, else ``None``.
        skipped: number of source items left out, or a zero-argument callable
            read after ``samples`` is exhausted (for sources that skip as they go).
        overwrite: replace an existing set in ``out_dir``; otherwise an existing
            ``manifest.json`` is a ``FileExistsError``.
        extra: more manifest entries (e.g. ``quirks``), or a zero-argument callable giving
            them, read after ``samples`` is exhausted; they cannot replace the keys above.

    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``, last).

    Raises:
        FileExistsError: ``out_dir`` already holds a set and ``overwrite`` is false.
        ValueError: bad arguments, a bad or duplicate key, mixed extensions, a
            class index out of range, or no samples at all.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", prefix):
        raise ValueError(f"bad shard prefix {prefix!r}: use letters, digits, '_' and '-'")
    classes = [str(c) for c in classes]
    if not classes:
        raise ValueError("classes must not be empty")
    if image_size is not None:
        image_size = [int(image_size[0]), int(image_size[1])]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists():
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a shard set ({MANIFEST_NAME}); choose another folder or overwrite it"
            )
        manifest_path.unlink()  # from here on the folder is an unfinished set
    name_re = _shard_name_re(prefix)
    for old in out.iterdir():
        if name_re.match(old.name):
            old.unlink()

    shards: list[dict] = []
    seen: set[str] = set()
    set_ext: str | None = None
    it = iter(samples)
    for first in it:  # one tar per samples_per_shard samples, each renamed into place when complete
        name = f"{prefix}-{len(shards):06d}.tar"
        count = 0
        with tar_writer(out / name) as add:
            for key, data, ext, cls in itertools.chain([first], itertools.islice(it, samples_per_shard - 1)):
                _check_key(key)
                if key in seen:
                    raise ValueError(f"duplicate sample key {key!r}")
                seen.add(key)
                if ext not in ("png", "jpg"):
                    raise ValueError(f"sample {key!r}: image extension must be 'png' or 'jpg', got {ext!r}")
                if set_ext is None:
                    set_ext = ext
                elif ext != set_ext:
                    raise ValueError(f"sample {key!r} is {ext!r} but the set is {set_ext!r}: one extension per set")
                cls = int(cls)
                if not 0 <= cls < len(classes):
                    raise ValueError(f"sample {key!r}: class index {cls} outside 0..{len(classes) - 1}")
                if not isinstance(data, (bytes, bytearray)) or not data:
                    raise ValueError(f"sample {key!r}: image must be non-empty bytes")
                add(f"{key}.{ext}", bytes(data))
                add(f"{key}.cls", str(cls).encode("ascii"))
                count += 1
        shards.append({"name": name, "count": count})

    if not shards:
        raise ValueError(f"no samples to write to {out}")
    more = dict((extra() if callable(extra) else extra) or {})
    manifest = make_manifest(source=source, classes=classes, channels=channels, image_size=image_size,
                             image_ext=set_ext, shards=shards,
                             skipped=int(skipped() if callable(skipped) else skipped), **more)
    _write_json_atomic(manifest_path, manifest)
    return manifest


def write_manifest(directory: str | os.PathLike[str], manifest: dict) -> Path:
    """Write ``directory/manifest.json`` atomically (for sets written by other code, e.g. caches)."""
    path = Path(directory) / MANIFEST_NAME
    _write_json_atomic(path, manifest)
    return path


def read_manifest(directory: str | os.PathLike[str]) -> dict:
    """Read and check ``directory/manifest.json`` (a ``manifest.json`` path is accepted too).

    Raises:
        FileNotFoundError: there is no manifest (not a shard folder, or an unfinished one).
        ValueError: the manifest is not valid JSON or not in the ``sslsteal-shards/1`` format.
    """
    path = Path(directory)
    if path.name != MANIFEST_NAME or path.is_dir():
        path = path / MANIFEST_NAME
    folder = path.parent
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {folder}: not a shard folder; make one with "
            f"python launch/make_shards.py SOURCE {folder}"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); rebuild the set with python launch/make_shards.py") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} has format {got!r}, expected {FORMAT!r}")
    return manifest


# --------------------------------------------------------------------------- array sources


def array_samples(
    images: np.ndarray,
    labels: np.ndarray,
    indices: Iterable[int] | None = None,
    *,
    key_prefix: str,
    image_size: int | tuple[int, int] | None = None,
) -> Iterator[Sample]:
    """Yield ``(key, png_bytes, "png", cls)`` for ``images[indices]``.

    Keys are ``{key_prefix}-{index:06d}`` with the index into ``images``, so
    samples cut from one array into several splits never share a key.
    ``image_size`` resizes with PIL bilinear, keeping the channel count.
    """
    n = images.shape[0]
    width = max(6, len(str(max(n - 1, 0))))
    idx = range(n) if indices is None else indices
    for i in idx:
        i = int(i)
        img = resize_array(images[i], image_size)
        yield f"{key_prefix}-{i:0{width}d}", encode_png(img), "png", int(labels[i])


def array_layout(images: np.ndarray, what: str) -> tuple[np.ndarray, int]:
    """Check an image stack and return it as NHW / NHW3 with its channel count."""
    if images.dtype != np.uint8:
        raise ShardSourceError(f"{what}: images must be uint8, got {images.dtype}; convert with images.astype(np.uint8)")
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if images.ndim == 3:
        return images, 1
    if images.ndim == 4 and images.shape[3] == 3:
        return images, 3
    raise ShardSourceError(f"{what}: images must be N x H x W or N x H x W x 3, got shape {images.shape}")


def load_npz(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load ``images`` (uint8 NHW / NHWC) and ``labels`` (integers) from a ``.npz``.

    An optional ``classes`` array (strings) names the classes; otherwise they are
    ``"0" .. str(max label)``. Pickled objects are never loaded.

    Raises:
        FileNotFoundError: no such file.
        ShardSourceError: unreadable file, missing keys, or bad shapes/dtypes.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"source {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = [k for k in ("images", "labels") if k not in keys]
            if missing:
                raise ShardSourceError(
                    f"{p} has no {' / '.join(missing)} array (it has: {', '.join(sorted(keys)) or 'nothing'}); "
                    "save it with np.savez(path, images=uint8 NHW or NHWC, labels=int [N])"
                )
            images = npz["images"]
            labels = npz["labels"]
            classes_arr = npz["classes"] if "classes" in keys else None
    except ShardSourceError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise ShardSourceError(f"cannot read {p} as .npz ({exc}); write it with np.savez") from None
    images, _ = array_layout(images, str(p))
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or (labels.size and labels.dtype.kind not in "iu"):
        raise ShardSourceError(
            f"{p}: labels must be {images.shape[0]} integers (one per image), got {labels.dtype} {labels.shape}"
        )
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ShardSourceError(f"{p}: labels must be non-negative class indices")
    n_cls = int(labels.max()) + 1 if labels.size else 0
    if classes_arr is not None:
        classes = [str(c) for c in np.asarray(classes_arr).reshape(-1)]
        if len(classes) < n_cls:
            raise ShardSourceError(f"{p}: 'classes' names {len(classes)} classes but labels go up to {n_cls - 1}")
    else:
        classes = [str(i) for i in range(n_cls)]
    return images, labels, classes


# --------------------------------------------------------------------------- image folders


@dataclass
class SkipCounter:
    """A mutable count of skipped items, read by :func:`write_shards` once a source is exhausted.

    Image folders also log here, by kind, the files they converted or left out (``files``:
    kind -> paths relative to the source); :meth:`quirks` is the manifest's ``"quirks"`` entry.
    """

    n: int = 0
    files: dict[str, list[str]] = field(default_factory=dict)

    def __call__(self) -> int:
        """Return the count (so the counter itself can be passed as ``skipped=``)."""
        return self.n

    def log(self, kind: str, name: str) -> None:
        """Note that file ``name`` was converted or left out as ``kind`` (e.g. ``cmyk_to_rgb``)."""
        self.files.setdefault(kind, []).append(name)

    def quirks(self) -> dict[str, Any]:
        """``{"quirks": {kind: {"count": n, "files": [first 1000 names]}}}`` (empty when nothing happened)."""
        if not self.files:
            return {}
        return {"quirks": {k: {"count": len(v), "files": v[:_QUIRK_NAMES]} for k, v in sorted(self.files.items())}}


class _Lazy(Sequence):
    """``fn(0) .. fn(n - 1)`` as a sequence made on demand (a slice is a list): what :func:`_map_ordered` walks
    block by block, so a job list of N files is never held whole."""

    def __init__(self, n: int, fn: Callable[[int], Any]) -> None:
        self.n, self.fn = n, fn

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # noqa: ANN001, ANN204
        if isinstance(i, slice):
            return [self.fn(j) for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.fn(i % self.n)


@dataclass
class _FileTable:
    """The files of a source, packed: relative paths in one byte string with end offsets, class indices, and each
    file's header (format, mode) as codes into small tables -- a few dozen bytes per file, where a list of
    ``(Path, int)`` and a header tuple per file held about a kilobyte."""

    names: bytearray = field(default_factory=bytearray)
    ends: array = field(default_factory=lambda: array("q"))
    labels: array = field(default_factory=lambda: array("q"))
    fmt: bytearray = field(default_factory=bytearray)  # code into kinds; 0 = not read or unreadable
    mode: bytearray = field(default_factory=bytearray)
    kinds: list[str] = field(default_factory=lambda: [""])  # code -> format or mode name (code 0 unused)

    def __len__(self) -> int:
        return len(self.ends)

    def add(self, rel: str, label: int) -> None:
        self.names += os.fsencode(rel)
        self.ends.append(len(self.names))
        self.labels.append(label)

    def rel(self, i: int) -> str:
        return os.fsdecode(bytes(self.names[self.ends[i - 1] if i else 0:self.ends[i]]))

    def code(self, name: str) -> int:
        if name not in self.kinds:
            if len(self.kinds) == 256:
                raise ShardSourceError(f"more than 255 distinct image formats and modes ({name!r}); not an image set")
            self.kinds.append(name)
        return self.kinds.index(name)

    def set_head(self, head: tuple[str, str] | None) -> None:
        """Append file i's header, in file order (``None``: unreadable)."""
        self.fmt.append(0 if head is None else self.code(head[0]))
        self.mode.append(0 if head is None else self.code(head[1]))

    def head(self, i: int) -> tuple[str, str] | None:
        if i >= len(self.mode) or self.mode[i] == 0:
            return None
        return self.kinds[self.fmt[i]], self.kinds[self.mode[i]]


@dataclass
class ImageFolderSource:
    """An image-folder tree ``root/<class>/**/<image>`` scanned into a table of files.

    Class names are the sorted sub-folder names of ``root`` (index = position), or a given
    list (:meth:`scan` ``classes=``, e.g. the train set's, so a val set gets the same indices by
    name). :meth:`scan_labelled` reads a flat folder whose classes come from a label file.
    Files with an image suffix are found recursively, one folder at a time (each folder's files
    sorted, then its sub-folders sorted, recursively: the order of a sorted ``os.walk``; hidden
    entries and other suffixes ignored), and their headers read once to learn format, mode and
    size; per file only a packed path, class index and header codes are kept (:class:`_FileTable`),
    so memory grows by a few dozen bytes per file. A file whose header PIL cannot read stays listed (so it
    belongs to exactly one split) but is marked bad, warned about once
    (:class:`ShardWarning`) and counted as skipped by :meth:`samples`; files that
    fail to decode there are skipped and counted the same way. Pixels are only
    decoded in :meth:`samples`.

    Encoding rule (one extension per set): if no resize is asked for and at least
    :data:`JPEG_SET_MIN_FRACTION` of the readable images are JPEGs, the JPEG bytes are
    copied as they are, and the others -- a JPEG whose mode is not the set's (a grey or
    CMYK one in an RGB set), a PNG named ``.JPEG`` -- are converted and re-encoded as JPEG
    quality 95; otherwise every image is stored as PNG. The set is 1-channel if every
    image is greyscale, else RGB (alpha dropped). ``image_size`` resizes to ``S x S``
    (PIL bilinear, no crop). Every conversion and skip is logged by kind in the
    :class:`SkipCounter` given to :meth:`samples` (the manifest's ``quirks``).
    """

    root: Path
    image_size: int | None = None
    classes: list[str] = field(default_factory=list)
    table: _FileTable = field(default_factory=_FileTable)  # every listed file: path, class, header
    bad: set[int] = field(default_factory=set)
    channels: int = 3
    image_ext: str = "png"
    native_size: list[int] | None = None
    left_out: dict[str, list[str]] = field(default_factory=dict)  # kind -> names not listed

    def __len__(self) -> int:
        return len(self.table)

    def path(self, i: int) -> Path:
        """File ``i`` (as the listing found it: ``root`` / its relative path)."""
        return self.root / self.table.rel(i)

    @classmethod
    def scan(
        cls, root: str | os.PathLike[str], image_size: int | None = None, *, workers: int = 1,
        classes: Sequence[str] | None = None,
    ) -> ImageFolderSource:
        """Scan ``root``; raise ``FileNotFoundError``/``ShardSourceError`` (one line) if it is unusable.

        ``workers`` > 1 reads the image headers with that many threads (the scan of a large tree
        on a network file system is I/O bound); the result is the same as with one. ``classes``
        fixes the class list (index = position); a class folder not in it is left out with a
        warning (logged as ``other_class``).
        """
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"source {root} does not exist")
        if not root.is_dir():
            raise ShardSourceError(
                f"source {root} is not a folder, .npz or builtin:NAME; give an image-folder tree root/<class>/<image>"
            )
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        loose = [f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        if not class_dirs:
            hint = f" ({len(loose)} images lie directly in it; a flat ImageNet val folder also needs its label file)" if loose else ""
            raise ShardSourceError(f"{root} has no class sub-folders{hint}; put the images in {root}/<class name>/")
        if loose:
            warnings.warn(
                f"ignoring {len(loose)} images directly in {root} (not in a class folder)", ShardWarning, stacklevel=2
            )
        names = [d.name for d in class_dirs] if classes is None else [str(c) for c in classes]
        index = {n: i for i, n in enumerate(names)}
        src = cls(root=root, image_size=image_size, classes=names)
        for cdir in class_dirs:
            ci = index.get(cdir.name)
            if ci is None:
                found = list(_list_images(cdir, cdir.name + os.sep))
                if found:
                    src.left_out.setdefault("other_class", []).extend(found)
                    warnings.warn(f"class folder {cdir} is not among the {len(names)} classes; its {len(found)} "
                                  f"images are left out", ShardWarning, stacklevel=2)
                continue
            for rel in _list_images(cdir, cdir.name + os.sep):
                src.table.add(rel, ci)
        src._inspect(workers, [root / n for n in names if (root / n).is_dir()] if classes is None else
                     [root / n for n in names])
        return src

    @classmethod
    def scan_labelled(
        cls, root: str | os.PathLike[str], labels: Mapping[str, str], classes: Sequence[str],
        image_size: int | None = None, *, workers: int = 1,
    ) -> ImageFolderSource:
        """Scan a flat folder ``root/<image>`` whose class names come from ``labels`` (file name
        without suffix -> class name, e.g. read by :func:`stealer.imagenet.read_val_labels`).

        Images the labels do not name (``unlabelled``) or name with a class outside ``classes``
        (``other_class``) are left out, warned about in one line each kind and logged.
        """
        root = Path(root)
        index = {str(n): i for i, n in enumerate(classes)}
        src = cls(root=root, image_size=image_size, classes=[str(c) for c in classes])
        with os.scandir(root) as entries:  # one folder: its names sorted (as sorted(root.iterdir()) gave them)
            files = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file()
                           and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS)
        for fname in files:
            name = labels.get(Path(fname).stem)
            if name is None:
                src.left_out.setdefault("unlabelled", []).append(fname)
            elif name not in index:
                src.left_out.setdefault("other_class", []).append(fname)
            else:
                src.table.add(fname, index[name])
        del files
        for kind, what in (("unlabelled", "have no label"), ("other_class", "are labelled with a class outside the set's")):
            got = src.left_out.get(kind, [])
            if got:
                more = f", ... ({len(got)} in all)" if len(got) > 3 else ""
                warnings.warn(f"{len(got)} images in {root} {what} and are left out: {', '.join(got[:3])}{more}",
                              ShardWarning, stacklevel=2)
        src._inspect(workers, [])
        return src

    def _inspect(self, workers: int, class_dirs: Sequence[Path]) -> None:
        """Read every header; set ``bad``, the headers in ``table``, ``channels``, ``image_ext`` and ``native_size``."""
        sizes: set[tuple[int, int]] = set()
        modes: set[str] = set()
        jpegs = readable = 0
        found = [0] * len(self.classes)
        self.table.fmt, self.table.mode = bytearray(), bytearray()
        for i, head in enumerate(_map_ordered(_read_header, _Lazy(len(self), self.path), workers, threads=True)):
            if isinstance(head, BaseException):  # warned in file order, whatever order the threads ran in
                self.bad.add(i)
                self.table.set_head(None)
                _warn_skip(self.path(i), head)
                continue
            fmt, mode, (w, h) = head
            self.table.set_head((fmt, mode))
            readable += 1
            jpegs += fmt == "JPEG"
            sizes.add((h, w))
            modes.add(mode)
            found[self.table.labels[i]] += 1
        if readable == 0:
            what = "readable images" if len(self) else "images"
            where = "in its class folders" if class_dirs else "in it"
            raise ShardSourceError(
                f"no {what} under {self.root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} {where})"
            )
        for ci, cdir in enumerate(class_dirs):  # class_dirs[i] is class i's folder (a val set may lack some)
            if found[ci] == 0 and cdir.is_dir():
                warnings.warn(
                    f"class folder {cdir} holds no readable images (its class index is kept)", ShardWarning, stacklevel=3
                )
        self.channels = 1 if modes <= _GREY_MODES else 3
        as_jpeg = self.image_size is None and jpegs >= JPEG_SET_MIN_FRACTION * readable
        self.image_ext = "jpg" if as_jpeg else "png"
        if self.image_size is not None:
            self.native_size = [int(self.image_size), int(self.image_size)]
        elif len(sizes) == 1:
            h, w = next(iter(sizes))
            self.native_size = [h, w]

    @property
    def labels(self) -> np.ndarray:
        """Class index of every scanned file (readable or not), in file order."""
        return np.frombuffer(self.table.labels, dtype=np.int64).copy()

    def _quirk(self, i: int) -> str | None:
        """What :func:`_encode_image` does to readable file ``i`` beyond copying or plain re-encoding."""
        head = self.table.head(i)
        if head is None:
            return None
        fmt, mode = head
        want = "L" if self.channels == 1 else "RGB"
        if mode != want and not (want == "L" and mode in _GREY_MODES):
            name = "cmyk" if mode == "CMYK" else "grey" if mode in _GREY_MODES else mode.lower()
            return f"{name}_to_{want.lower()}"
        if self.image_ext == "jpg" and fmt != "JPEG":
            return f"{(fmt or 'unknown').lower()}_to_jpg"
        return None

    def samples(
        self,
        indices: Iterable[int] | None = None,
        *,
        key_prefix: str | None = None,
        skipped: SkipCounter | None = None,
        workers: int = 1,
    ) -> Iterator[Sample]:
        """Decode and yield ``(key, bytes, ext, cls)`` for the files at ``indices`` (all by default).

        Keys are ``{key_prefix}-{file index:06d}`` (``key_prefix`` defaults to the
        sanitised folder name). Bad files and files that fail to decode are left
        out, counted in ``skipped`` and logged there as ``unreadable``; converted files
        are logged by kind (``cmyk_to_rgb``, ``grey_to_rgb``, ``png_to_jpg``, ...).
        ``workers`` > 1 decodes and re-encodes in that many processes; samples, warnings
        and counts come out in the same order, so the shards are byte-for-byte those of one worker.
        """
        prefix = sanitize_key_prefix(key_prefix or self.root.resolve().name)
        counter = skipped if skipped is not None else SkipCounter()
        n = len(self)
        width = max(6, len(str(max(n - 1, 0))))
        want_mode = "L" if self.channels == 1 else "RGB"
        order = np.arange(n, dtype=np.int64) if indices is None else np.fromiter(map(int, indices), dtype=np.int64)
        todo = order[~np.isin(order, np.fromiter(self.bad, dtype=np.int64, count=len(self.bad)))]
        jobs = _Lazy(len(todo), lambda j: (str(self.path(int(todo[j]))), want_mode, self.image_ext, self.image_size))
        encoded = iter(_map_ordered(_encode_image, jobs, workers, threads=False))
        for i in map(int, order):
            path, cls, name = self.path(i), int(self.table.labels[i]), self.table.rel(i)
            if i in self.bad:
                counter.n += 1
                counter.log("unreadable", name)
                continue
            data = next(encoded)
            if isinstance(data, BaseException):
                self.bad.add(i)
                counter.n += 1
                counter.log("unreadable", name)
                _warn_skip(path, data)
                continue
            quirk = self._quirk(i)
            if quirk:
                counter.log(quirk, name)
            yield f"{prefix}-{i:0{width}d}", data, self.image_ext, cls


def _list_images(folder: Path, rel: str) -> Iterator[str]:
    """``rel`` + the relative path of every image file under ``folder``, one folder listed at a time: its files
    (sorted), then each sub-folder (sorted), recursively, following links -- the order of a sorted
    ``os.walk(folder, followlinks=True)``; hidden entries and other suffixes left out, an unreadable folder
    skipped (as ``os.walk`` does). Only one folder's names are held at once."""
    try:
        with os.scandir(folder) as it:
            entries = sorted((e.name, _is_dir(e)) for e in it if not e.name.startswith("."))
    except OSError:
        return
    dirs = [name for name, is_dir in entries if is_dir]
    files = [rel + name for name, is_dir in entries if not is_dir and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    del entries
    yield from files
    del files
    for d in dirs:
        yield from _list_images(folder / d, rel + d + os.sep)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _read_header(path: Path) -> tuple[str, str, tuple[int, int]] | BaseException:
    """``(format, mode, (w, h))`` of an image file, or the decode error (returned, not raised)."""
    try:
        with Image.open(path) as im:
            return im.format or "", im.mode, im.size
    except _DECODE_ERRORS as exc:
        try:
            if path.stat().st_size == 0:
                return OSError("empty file, 0 bytes")
        except OSError:
            pass
        return exc


def _encode_image(job: tuple[str, str, str, int | None]) -> bytes | BaseException:
    """The shard bytes of one image file (see :class:`ImageFolderSource`), or the decode error.

    A top-level function of plain arguments, so worker processes can run it.
    """
    path, want_mode, image_ext, image_size = job
    try:
        raw = Path(path).read_bytes()
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            if image_ext == "jpg" and im.format == "JPEG" and im.mode == want_mode:
                return raw
            conv = im.convert(want_mode)
        if image_size is not None:
            conv = conv.resize((image_size, image_size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        if image_ext == "jpg":
            conv.save(buf, format="JPEG", quality=95)
        else:
            conv.save(buf, format="PNG")
        return buf.getvalue()
    except _DECODE_ERRORS as exc:
        return type(exc)(str(exc))  # a plain copy: tracebacks and file handles do not cross processes


def _map_ordered(fn: Callable[[Any], Any], items: Sequence[Any], workers: int, *, threads: bool) -> Iterator[Any]:
    """``fn`` over ``items`` in order: in this process (``workers`` <= 1), in a thread pool, or in a
    process pool; results stream in input order.

    The process pool forks from a ``forkserver`` (with this module preloaded), never from the caller:
    a plain ``fork`` of a process that runs other threads (torch's pools, a cache writer, a test
    runner's) copies whatever locks those threads hold, and the workers hung on one of them
    (seen: the ImageNet rehearsal test stuck in ``futex_wait`` for minutes inside a pytest session)."""
    if workers <= 1 or len(items) < 2:
        yield from map(fn, items)
        return
    chunk = max(1, min(64, len(items) // (workers * 4)))
    block = workers * chunk * 16  # results in flight stay bounded (a block), whatever the set's size
    if threads:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as tpool:
            for start in range(0, len(items), block):
                yield from tpool.map(fn, items[start:start + block])
        return
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:
        ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as ppool:
        for start in range(0, len(items), block):
            yield from ppool.imap(fn, items[start:start + block], chunksize=chunk)


_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def _warn_skip(path: Path, exc: BaseException) -> None:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    warnings.warn(f"skipping unreadable image {path} ({text})", ShardWarning, stacklevel=3)


# --------------------------------------------------------------------------- default data


def _source_name(builtin: str, split: str | None) -> str:
    return f"builtin:{builtin}" + (f" split={split}" if split else "")


def build_default_data(
    out_root: str | os.PathLike[str],
    seed: int = 0,
    image_size: int | None = 32,
    samples_per_shard: int = 1000,
    *,
    sizes: Mapping[str, Mapping[str, int]] | None = None,
    prefix: str = "train",
) -> dict[str, Path]:
    """Write the default experiment data as one shard folder per split, skipping finished ones.

    Layout: ``out_root/animal_mnist/{victim_train,query,probe_train,probe_test}``
    and ``out_root/digits/{probe_train,probe_test}`` (see
    :data:`stealer.datasets.DEFAULT_SPLITS`), plus, when ``sizes`` is ``None`` and
    the set is installed, each optional set of
    :data:`stealer.datasets.OPTIONAL_SPLITS` (``out_root/fashion_mnist/{probe_train,
    probe_test}``; absent sets are skipped silently): disjoint, class-stratified splits
    drawn with ``seed``, images resized to ``image_size`` x ``image_size``
    (PIL bilinear, 1 channel kept; ``None`` keeps the native size), keys
    ``{dataset}-{index:06d}`` so keys never repeat across splits.

    A split whose ``manifest.json`` already exists is left alone (a dataset whose
    splits all exist is not even loaded). Each split is written into a hidden
    temporary folder and renamed into place, so concurrent callers (e.g. several
    ranks) never see or produce a half-written split.

    Args:
        out_root: root folder.
        seed: split seed.
        image_size: output side length, or ``None`` for the native size.
        samples_per_shard: samples per tar.
        sizes: per-dataset split sizes overriding :data:`DEFAULT_SPLITS`
            (e.g. tiny splits for tests); default datasets not named keep the
            defaults, optional ones are made only if named (then they must be installed).
        prefix: shard file prefix.

    Returns:
        ``"{dataset}/{split}"`` -> split folder, for every split.
    """
    root = Path(out_root)
    plan = {name: dict(splits) for name, splits in DEFAULT_SPLITS.items()}
    if sizes is None:
        plan.update({name: dict(splits) for name, splits in OPTIONAL_SPLITS.items() if optional_available(name)})
    for name, splits in (sizes or {}).items():
        if name not in DEFAULT_SPLITS and name not in OPTIONAL_SPLITS:
            raise ValueError(
                f"sizes names unknown dataset {name!r}; choose from {', '.join([*DEFAULT_SPLITS, *OPTIONAL_SPLITS])}"
            )
        plan[name] = dict(splits)
    result: dict[str, Path] = {}
    for name, splits in plan.items():
        dirs = {split: root / name / split for split in splits}
        result.update({f"{name}/{split}": d for split, d in dirs.items()})
        todo = [split for split, d in dirs.items() if not (d / MANIFEST_NAME).is_file()]
        if not todo:
            continue
        images, labels, classes = load_builtin(name)
        images, channels = array_layout(images, f"builtin:{name}")
        index_sets = split_indices(labels, splits, seed)
        out_size = [image_size, image_size] if image_size is not None else list(images.shape[1:3])
        for split in todo:
            final = dirs[split]
            tmp = final.parent / f".{split}.{os.getpid()}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            write_shards(
                array_samples(images, labels, index_sets[split], key_prefix=name, image_size=image_size),
                tmp,
                prefix=prefix,
                samples_per_shard=samples_per_shard,
                source=_source_name(name, split) + f" seed={seed}",
                classes=classes,
                channels=channels,
                image_size=out_size,
            )
            _move_into_place(tmp, final)
    return result


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename a finished split folder to ``final`` unless another writer got there first."""
    if (final / MANIFEST_NAME).is_file():
        shutil.rmtree(tmp)  # someone else finished it meanwhile
        return
    if final.exists():
        shutil.rmtree(final)  # leftovers of an unfinished set (no manifest)
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / MANIFEST_NAME).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
