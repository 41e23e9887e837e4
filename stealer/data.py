"""Deterministic, exactly-once streaming of WebDataset shards for any ranks x workers.

The plan of an epoch is computed from the shard manifest alone (per-shard sample counts), so
every rank and every worker derives the same global picture without talking to each other:

1. the shard order is permuted by ``(seed, epoch)`` (or kept, for the query phase);
2. the N samples of that virtual sequence are cut into ``world x K`` batches of near-equal size
   (``K = ceil(N / (world * batch_size))``; sizes differ by at most one and never exceed
   ``batch_size``), so **every sample is seen exactly once per epoch and every rank runs exactly
   K steps** -- the DDP hang of unequal batch counts cannot happen. ``drop_last=True`` instead
   keeps every batch at exactly ``batch_size`` and drops the ``N mod (world*B)`` samples that
   the shuffle happened to put last;
3. rank r owns the contiguous batches ``[r*K, (r+1)*K)`` -- it opens only ~1/world of the shards
   (split by node) -- and splits them into contiguous chunks, one per worker (split by worker);
4. each worker reads its sample range (skipping, without decoding, the head of its first shard),
   shuffles raw bytes in a buffer seeded by ``(seed, epoch, rank, worker)``, then decodes;
5. batches are emitted in a canonical order (round-robin over workers), whatever order the
   DataLoader workers finish in, and carry their position ``index``: ``iter_epoch(e, start)``
   resumes an epoch at batch ``start`` and yields exactly what an uninterrupted run would have.

The result depends on ``(seed, epoch, world, workers, batch_size)``; resume with the same ones.
Do not ``accelerator.prepare()`` the loader: move batches to the device yourself.

Corrupt images are skipped and counted (``batch["corrupt"]``); a truncated shard counts its
unreadable tail as corrupt instead of shifting every later sample into another batch.
"""
from __future__ import annotations

import io
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stealer.decode import decode_image, standard_strides  # decode_image re-exported: stealer.data.decode_image is public

__all__ = ["ShardSet", "open_shards", "epoch_batches", "ShardStream", "decode_image", "load_npy", "ViewDecode",
           "view_decoder"]

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclass(frozen=True)
class ShardSet:
    """A folder (or URL prefix) of tar shards with their per-shard sample counts."""

    root: str
    names: tuple[str, ...]
    counts: tuple[int, ...]
    manifest: dict = field(default_factory=dict, compare=False)

    @property
    def num_samples(self) -> int:
        return int(sum(self.counts))

    def url(self, i: int) -> str:
        return os.path.join(self.root, self.names[i])


def open_shards(path: str | os.PathLike) -> ShardSet:
    """Open a shard folder written by ``launch/make_shards.py`` (or a response cache)."""
    from stealer.shards import read_manifest  # the writer owns the manifest format

    root = os.fspath(path)
    if not root:
        raise FileNotFoundError("no shard folder given; set the data path (e.g. data.query=runs/demo/data/animal_mnist/query)")
    if "://" not in root and not os.path.isdir(root):
        raise FileNotFoundError(f"shard folder {root} does not exist; make it with: python launch/make_shards.py SOURCE {root}")
    manifest = read_manifest(root)
    shards = manifest.get("shards") or []
    if not shards or sum(int(s["count"]) for s in shards) == 0:
        raise ValueError(f"shard folder {root} holds no samples (empty manifest); rebuild it with launch/make_shards.py")
    names = tuple(str(s["name"]) for s in shards)
    if "://" not in root:
        for n in names:
            if not os.path.isfile(os.path.join(root, n)):
                raise FileNotFoundError(
                    f"shard {os.path.join(root, n)} listed in the manifest is missing; restore it or rebuild the folder with launch/make_shards.py"
                )
    return ShardSet(root, names, tuple(int(s["count"]) for s in shards), manifest)


def epoch_batches(num_samples: int, *, world: int, batch_size: int, drop_last: bool = False) -> list[int]:
    """Sizes of the ``world * K`` global batches of an epoch (rank r owns ``[r*K, (r+1)*K)``)."""
    if batch_size < 1 or world < 1:
        raise ValueError(f"batch_size and world size must be >= 1 (got {batch_size}, {world})")
    if drop_last:
        k = num_samples // (world * batch_size)
        if k == 0:
            raise ValueError(
                f"{num_samples} samples cannot fill one batch of {batch_size} on each of {world} ranks; lower the batch size or set drop_last=false"
            )
        return [batch_size] * (world * k)
    if num_samples < world:
        raise ValueError(f"{num_samples} samples cannot be split over {world} ranks")
    k = math.ceil(num_samples / (world * batch_size))
    total = world * k
    base, extra = divmod(num_samples, total)
    return [base + 1 if i < extra else base for i in range(total)]


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """Split range(n) into ``parts`` contiguous (start, stop) pieces of near-equal length."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _round_robin(counts: list[int]) -> list[tuple[int, int]]:
    """Canonical emission order: (worker, local batch) round-robin, skipping exhausted workers."""
    order, i = [], 0
    while len(order) < sum(counts):
        for w, c in enumerate(counts):
            if i < c:
                order.append((w, i))
        i += 1
    return order


@dataclass(frozen=True)
class ViewDecode:
    """``bytes -> uint8 [size, size, C]``: the field of view a victim was shown, at the student's ``size``.

    A victim with a declared geometry (``victims.preprocess``: torchvision ``Resize(resize)`` of the
    shorter side, then ``CenterCrop(crop)``) answered about the central ``crop / resize`` of each image;
    the student must be trained on that view, not on :func:`decode_image`'s full centre square. Per
    recorded geometry:

    * resize and crop: ``Resize(round(size * resize / crop))`` + ``CenterCrop(size)`` -- the same field
      of view (a JPEG much larger than that is decoded at reduced scale first, PIL ``draft``, as
      :func:`decode_image` does); when ``size == crop`` exactly the victim's ``Resize(resize)`` +
      ``CenterCrop(crop)``, so the pixels equal those the victim was fed (``victims.preprocess.ExactDecode``);
    * crop only: the central ``crop`` x ``crop`` pixels, resized to ``size`` x ``size`` when ``size != crop``;
    * resize only (the victim saw the whole, non-square image): the largest centred square,
      ``Resize(size)`` + ``CenterCrop(size)``.

    Picklable (loader workers run it). Built by :func:`view_decoder` from a cache's record.
    """

    channels: int
    size: int
    resize: int | None
    crop: int | None
    interpolation: str = "bilinear"

    def geometry(self) -> tuple[int | None, int | None, int | None]:
        """``(resize, crop, then)`` applied per image: torchvision Resize, CenterCrop, then a square resize (or None)."""
        r, c, s = self.resize, self.crop, self.size
        if c is None:
            return s, s, None
        if r is None:
            return None, c, (s if s != c else None)
        if s == c:
            return r, c, None
        return max(1, round(s * r / c)), s, None

    def __call__(self, data: bytes) -> np.ndarray:
        from victims.preprocess import ExactDecode

        resize, crop, then = self.geometry()
        if (resize, crop) == (self.resize, self.crop) or resize is None:  # the victim's own pixels (or its crop)
            arr = ExactDecode(self.channels, resize, crop, self.interpolation)(data)
        else:  # another size: the same field of view; a large JPEG is first decoded at reduced scale (as decode_image)
            from PIL import Image
            from torchvision.transforms import functional as TF

            from victims.preprocess import _mode

            mode = "L" if self.channels == 1 else "RGB"
            with Image.open(io.BytesIO(data)) as im:
                if im.format == "JPEG":
                    im.draft(mode, (resize, resize))  # never below resize on either side
                im = TF.center_crop(TF.resize(im.convert(mode), resize, interpolation=_mode(self.interpolation)), crop)
                arr = np.asarray(im)
            arr = arr[:, :, None] if arr.ndim == 2 else arr
        if then is not None:
            from PIL import Image
            from torchvision.transforms import functional as TF

            from victims.preprocess import _mode

            im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
            arr = np.asarray(TF.resize(im, [then, then], interpolation=_mode(self.interpolation)))
            arr = arr[:, :, None] if arr.ndim == 2 else arr
        return arr

    def record(self) -> dict[str, Any]:
        """What a checkpoint records of this view (a resume under another view is refused)."""
        resize, crop, then = self.geometry()
        return {"victim_resize": self.resize, "victim_crop": self.crop, "interpolation": self.interpolation,
                "size": self.size, "resize": resize, "crop": crop, "then": then}


def view_decoder(record: dict[str, Any] | None, channels: int, size: int) -> ViewDecode | None:
    """The student's decoder for images a victim answered under ``record`` (a response cache's
    ``victim_preprocess``, :func:`victims.preprocess.cache_record`); None when the record declares
    no geometry (the project's own victims, ``none``, caches made before it was recorded): the
    stream's :func:`decode_image` at ``size``, as before."""
    if not record:
        return None
    resize, crop = record.get("resize"), record.get("crop")
    if resize is None and crop is None:
        return None
    return ViewDecode(int(channels), int(size), None if resize is None else int(resize), None if crop is None else int(crop),
                      str(record.get("interpolation") or "bilinear"))


_WARNED_SHARDS: set[str] = set()  # damaged shards already named on this process's stderr


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def load_npy(data: bytes) -> np.ndarray:
    """The array of one in-memory ``.npy`` file, as ``np.load(io.BytesIO(data), allow_pickle=False)``
    returns it (read-only here), with the header parsed once per distinct header.

    Every response of a cache shares one header (dtype and shape), and ``np.load`` parses it with
    ``ast.literal_eval`` on every call: ~0.1 ms a sample, a few per cent of a CPU train epoch on cached
    answers. Headers this fast path does not know (format 3, Fortran order, object dtypes, a size that
    does not match) go to ``np.load``, which returns the array or raises as it always did.
    """
    if data[:6] == b"\x93NUMPY" and data[6:7] in (b"\x01", b"\x02"):
        start = 10 if data[6] == 1 else 12
        end = start + int.from_bytes(data[8:start], "little")
        head = bytes(data[:end])
        info = _NPY_HEADERS.get(head)
        if info is None:
            f = io.BytesIO(head)
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            if not fortran and not dtype.hasobject and len(_NPY_HEADERS) < 64:
                info = _NPY_HEADERS[head] = (dtype, tuple(shape), end)
        if info is not None:
            dtype, shape, offset = info
            count = math.prod(shape)
            if len(data) - offset == count * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    return np.load(io.BytesIO(data), allow_pickle=False)


_TAR_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def _nts(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _local_tar_members(path: str) -> list[tuple[str, int, int]] | None:
    """``(name, data offset, size)`` of every member of a plain local tar of regular files (what
    ``write_shards`` and the response cache write), read from its 512-byte headers alone; ``None``
    when the file holds anything else -- compression, pax or GNU extension headers, links or
    folders, base-256 sizes, a bad checksum, a member cut short -- which ``tarfile`` then reads
    as it always did (damage included)."""
    import tarfile

    try:
        total = os.path.getsize(path)
        f = open(path, "rb")
    except OSError:
        return None
    out: list[tuple[str, int, int]] = []
    with f:
        off = 0
        while off + 512 <= total:
            f.seek(off)
            h = f.read(512)
            if len(h) < 512:
                return None
            if h.count(0) == 512:
                return out  # the end-of-archive block
            kind = h[156:157]
            if h[257:262] != b"ustar" or kind not in (b"0", b"\0") or h[124] & 0x80:
                return None
            try:
                chksum = int(_nts(h[148:156]).strip() or "0", 8)
                size = int(_nts(h[124:136]).strip() or "0", 8)
            except ValueError:
                return None
            if chksum not in tarfile.calc_chksums(h):
                return None
            name, prefix = _nts(h[0:100]), _nts(h[345:500])
            if kind == b"\0" and name.endswith("/"):
                return None  # a V7 folder
            start = off + 512
            if start + size > total:
                return None
            out.append((prefix + "/" + name if prefix else name, start, size))
            off = start + (size + 511) // 512 * 512
    return out if off == total else None  # a file that ends inside a member's padding or a header: tarfile's


def _read_local_tar(url: str, members: list[tuple[str, int, int]]) -> Iterator[dict[str, Any]]:
    """What ``tar_file_expander(url_opener(...))`` yields for a local tar ``_local_tar_members`` read:
    ``{fname, data, __url__}`` per member but webdataset's metadata files, then ``{}`` (end of shard)."""
    import tarfile

    with open(url, "rb") as f:
        for name, start, size in members:
            if "/" not in name and name.startswith("__") and name.endswith("__") or _TAR_META.match(name):
                continue
            f.seek(start)
            data = f.read(size)
            if len(data) != size:  # cut short since the headers were read
                raise tarfile.ReadError(f"unexpected end of data @ {url}")
            yield {"fname": name, "data": data, "__url__": url}
    yield {}


def _iter_shard(url: str, expected: int) -> Iterator[dict | None]:
    """Raw samples (dicts of bytes) of one shard; a truncated tail yields ``None`` placeholders, and
    a shard that ends early (truncated copy, damaged tar) is named in one warning line per process.

    A local tar of plain members is read from its headers by ``_read_local_tar`` (~10x less CPU a
    member than ``tarfile``'s stream reader, the largest CPU cost of a small-image epoch after the
    step); every other shard, and every damaged one, goes through webdataset's tar reader. Both
    feed webdataset's ``group_by_keys``, so the samples are the same."""
    from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

    n, why = 0, ""
    try:
        members = None if "://" in url or url.startswith("pipe:") else _local_tar_members(url)
        files = _read_local_tar(url, members) if members is not None else tar_file_expander(url_opener([{"url": url}]))
        for sample in group_by_keys(files):
            if n >= expected:
                break
            n += 1
            yield sample
    except Exception as e:  # noqa: BLE001 - any tar/IO failure: count the rest as corrupt
        first = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)  # webdataset appends " @ <file>"
        why = f" ({' '.join(first.split(' @ ')[0].split())[:160]})"
    if n < expected and url not in _WARNED_SHARDS:  # tarfile ends a truncated stream silently: count, don't trust
        _WARNED_SHARDS.add(url)
        log.warning("shard %s is damaged or truncated: %d of the %d samples its manifest records were read%s; the "
                    "other %d are skipped and counted as corrupt; re-create it (launch/make_shards.py)",
                    url, n, expected, why, expected - n)
    for _ in range(expected - n):
        yield None


@dataclass
class _Spec:
    """Everything a worker needs to produce its batches (picklable)."""

    shards: ShardSet
    sizes: list[int]  # global batch sizes of the epoch
    order: list[int]  # shard order of the epoch
    rank: int
    world: int
    streams: int
    seed: int
    epoch: int
    shuffle_buffer: int
    channels: int
    image_size: int | None
    start_batch: int
    keep_bytes: bool = False
    decode: bool = True  # False: leave decoding to the consumer (data.decode=device), keep the bytes
    decoder: Any = None  # bytes -> uint8 [H, W, C] replacing decode_image (a victim's exact geometry)


def _stream_batches(spec: _Spec, stream: int) -> Iterator[dict[str, Any]]:
    """Batches of one stream (worker) in its local order, tagged with their canonical index."""
    k = len(spec.sizes) // spec.world
    rank_sizes = spec.sizes[spec.rank * k : (spec.rank + 1) * k]
    rank_start = sum(spec.sizes[: spec.rank * k])
    chunks = _chunks(k, spec.streams)
    counts = [b - a for a, b in chunks]
    canon = {wl: i for i, wl in enumerate(_round_robin(counts))}
    a, b = chunks[stream]
    if a == b:
        return
    my_sizes = rank_sizes[a:b]
    first = rank_start + sum(rank_sizes[:a])
    last = first + sum(my_sizes)

    def raw() -> Iterator[dict | None]:
        pos = 0
        for si in spec.order:
            c = spec.shards.counts[si]
            lo, hi = max(first, pos), min(last, pos + c)
            if lo < hi:
                for j, s in enumerate(_iter_shard(spec.shards.url(si), c)):
                    if j >= hi - pos:
                        break
                    if j >= lo - pos:
                        yield s
            pos += c
            if pos >= last:
                break

    def shuffled(it: Iterator[dict | None]) -> Iterator[dict | None]:
        if spec.shuffle_buffer <= 1:
            yield from it
            return
        rng = np.random.default_rng([spec.seed, spec.epoch, spec.rank, stream, 7])
        buf: list = []
        for s in it:
            if len(buf) < spec.shuffle_buffer:
                buf.append(s)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf

    it = shuffled(raw())
    for local, size in enumerate(my_sizes):
        samples = [next(it) for _ in range(size)]
        index = canon[(stream, local)]
        if index < spec.start_batch:
            continue  # resumed: consumed before the interruption (read, never decoded)
        yield _collate(samples, index, spec.channels, spec.image_size, spec.keep_bytes or not spec.decode, spec.decode,
                       spec.decoder)


def _collate(samples: list[dict | None], index: int, channels: int, size: int | None, keep_bytes: bool = False,
             decode: bool = True, decoder: Any = None) -> dict[str, Any]:
    images, labels, keys, responses, raw = [], [], [], [], []
    corrupt = 0
    for s in samples:
        if s is None:
            corrupt += 1
            continue
        ext = next((e for e in IMAGE_EXTS if e in s), None)
        try:
            if ext is None:
                raise ValueError("no image field")
            img = (decoder(s[ext]) if decoder is not None else decode_image(s[ext], channels, size)) if decode else None
            resp = None
            if "npy" in s:
                resp = load_npy(s["npy"])
        except Exception as e:  # noqa: BLE001 - a corrupt sample is skipped and counted, never fatal
            log.warning("skipping corrupt sample %s (%s)", s.get("__key__"), e)
            corrupt += 1
            continue
        images.append(img)
        labels.append(int(s["cls"]) if "cls" in s else -1)
        keys.append(str(s["__key__"]))
        if keep_bytes:
            raw.append((ext, bytes(s[ext])))
        if resp is not None:
            responses.append(resp)
    batch: dict[str, Any] = {
        "index": index,
        "key": keys,
        "label": torch.tensor(labels, dtype=torch.long),
        "corrupt": corrupt,
        "image": (standard_strides(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)) if images and decode
                  else torch.empty(0, channels, size or 0, size or 0, dtype=torch.uint8)),
    }
    if keep_bytes:
        batch["bytes"] = raw
    if responses:
        if len(responses) != len(images):
            raise ValueError(f"batch {index}: some samples carry a response and some do not; the cache is inconsistent")
        batch["response"] = torch.from_numpy(np.stack(responses).astype(np.float32, copy=False))  # one copy, one cast
    return batch


class _WorkerDataset(IterableDataset):
    def __init__(self, spec: _Spec) -> None:
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        torch.set_num_threads(1)
        yield from _stream_batches(self.spec, 0 if info is None else info.id)


class ShardStream:
    """Epochs of batches from a ShardSet for one rank; see the module docstring.

    Args:
        shards: the ShardSet to read.
        batch_size: the largest local batch (per rank).
        rank, world: this process and the number of processes.
        seed: base of every random choice (shard order, shuffle buffers).
        shuffle: permute shards per epoch and shuffle samples in a buffer.
        workers: DataLoader worker processes (0 = read in this process).
        channels, image_size: decode target (uint8 ``[C, S, S]``).
        limit: use only the first ``limit`` samples of the (permuted) sequence.
        keep_bytes: also return the undecoded ``(ext, bytes)`` of each image (for caches).
        decoder: picklable ``bytes -> uint8 [H, W, C]`` used instead of :func:`decode_image` (e.g. a
            victim's exact torchvision Resize + CenterCrop, ``victims.preprocess.ExactDecode``).
        decode_device: decode in the consuming process on this device instead of in the loader
            (``data.decode=device``; :mod:`stealer.device_decode`: nvJPEG on a GPU).
    """

    def __init__(
        self,
        shards: ShardSet,
        *,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        workers: int = 0,
        shuffle_buffer: int = 1000,
        channels: int = 3,
        image_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool = False,
        limit: int | None = None,
        keep_bytes: bool = False,
        decode_device: str | torch.device | None = None,
        decoder: Any = None,
    ) -> None:
        self.shards, self.batch_size, self.rank, self.world = shards, batch_size, rank, world
        self.decode_device = None if decode_device is None else torch.device(decode_device)
        self.seed, self.shuffle, self.workers = seed, shuffle, workers
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.channels, self.image_size, self.drop_last, self.pin_memory = channels, image_size, drop_last, pin_memory
        self.keep_bytes = keep_bytes
        if decoder is not None and self.decode_device is not None:
            raise ValueError("a per-image decoder (the victim's exact resize/crop) cannot run with data.decode=device; "
                             "use data.decode=cpu for this stream")
        self.decoder = decoder
        n = shards.num_samples if limit is None else min(int(limit), shards.num_samples)
        self._sizes = epoch_batches(n, world=world, batch_size=batch_size, drop_last=drop_last)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return len(self._sizes) // self.world

    @property
    def samples_per_epoch(self) -> int:
        return sum(self._sizes)

    def _spec(self, epoch: int, start_batch: int) -> _Spec:
        order = list(range(len(self.shards.names)))
        if self.shuffle:
            order = [int(i) for i in np.random.default_rng([self.seed, epoch, 3]).permutation(len(order))]
        streams = max(1, self.workers)
        return _Spec(self.shards, self._sizes, order, self.rank, self.world, streams, self.seed, epoch,
                     self.shuffle_buffer, self.channels, self.image_size, start_batch, self.keep_bytes,
                     self.decode_device is None, self.decoder)

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """Yield this rank's batches of ``epoch`` in canonical order, from ``start_batch`` on."""
        spec = self._spec(epoch, start_batch)
        if self.workers == 0:
            gen = _stream_batches(spec, 0)
            source: Iterator[dict[str, Any]] = gen
        else:
            loader = DataLoader(
                _WorkerDataset(spec), batch_size=None, num_workers=self.workers,
                pin_memory=self.pin_memory, prefetch_factor=2, persistent_workers=False,
            )
            source = iter(loader)
        pending: dict[int, dict[str, Any]] = {}
        nxt = start_batch
        for batch in source:
            pending[batch["index"]] = batch
            while nxt in pending:
                out = pending.pop(nxt)
                if self.decode_device is not None:
                    from stealer.device_decode import decode_batch_on_device

                    out = decode_batch_on_device(out, self.channels, self.image_size, self.decode_device)
                    if not self.keep_bytes:
                        out.pop("bytes", None)
                yield out
                nxt += 1
        if pending or nxt != len(self):
            raise RuntimeError(f"stream ended at batch {nxt} of {len(self)} with {len(pending)} out of order; this is a bug")
