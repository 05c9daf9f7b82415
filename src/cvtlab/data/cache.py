"""The decoded cache: every image of a dataset decoded once to a memory-mapped uint8 array.

Layout of one cache entry (a folder under ``$CVTLAB_CACHE/decoded``, default
``~/.cache/cvtlab/decoded``): ``images.npy`` (N×H×W×3 uint8), ``labels.npy`` (N int64, -1 for
unlabelled) and ``manifest.json`` (source fingerprint, class names, split ranges, file names,
grayscale counts, skipped files). An entry is built in a temporary folder and renamed into place
in one step, so a build killed half-way leaves nothing a later run trusts; a changed source
(another fingerprint) is rebuilt. A lock file makes concurrent processes wait for one build.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: builds are not serialised between processes there
    fcntl = None

import numpy as np

from ..errors import CvtLabError
from .decode import GRAY_MODES, Crop, DecodeError, decode_image, resized_side
from .image_folder import index_image_folder
from .index import DatasetIndex
from .sources import Source, open_source
from .tiny_imagenet import index_tiny_imagenet, looks_like_tiny_imagenet

log = logging.getLogger("cvtlab.data")

# The version of what an entry holds: bumped when decoding or the choice of files changes.
# 3: EXIF orientation applied, large JPEGs decoded at reduced scale (decode.py).
# 4: TIFF, GIF, JFIF and PNM images read; images in subfolders of a class folder and zips made
#    on macOS (their __MACOSX/ tree left out) indexed (image_folder.py, sources.py).
FORMAT_VERSION = 4
_CHUNK = 2048
# Decoding workers are forked on Linux (no start-up cost); elsewhere they are spawned, since
# macOS's system libraries are not safe to use in a child forked from a threaded process, the
# reason Python spawns there by default, and Windows cannot fork.
_START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def cache_root() -> Path:
    return Path(os.environ.get("CVTLAB_CACHE") or "~/.cache/cvtlab").expanduser()


def reopenable(images: np.ndarray) -> np.ndarray | str:
    """What to pickle for ``images``: the file of a whole memory-mapped ``.npy``, else the
    array itself (a slice of one is copied, as numpy pickles it)."""
    filename = getattr(images, "filename", None) if isinstance(images, np.memmap) else None
    if filename:
        whole = np.load(filename, mmap_mode="r")
        if (whole.shape, whole.strides) == (images.shape, images.strides):
            return str(filename)
    return images


def reopened(images: np.ndarray | str) -> np.ndarray:
    return np.load(images, mmap_mode="r") if isinstance(images, str) else images


def load_index(path: str | Path | Source) -> DatasetIndex:
    """Index a dataset (Tiny ImageNet layout or an image folder, zipped or not)."""
    source = path if isinstance(path, Source) else open_source(path)
    if looks_like_tiny_imagenet(source.files()):
        return index_tiny_imagenet(source)
    return index_image_folder(source)


@dataclass
class DecodedDataset:
    """A built cache entry: arrays are memory-mapped, shared by every process that opens them."""

    root: Path
    images: np.ndarray
    labels: np.ndarray
    manifest: dict
    built_now: bool = False  # True when this call decoded the source (not reused)

    # Pickled, a memory map would be a full copy of its data (1.3 GB for Tiny ImageNet at 64 px)
    # sent to every process that is spawned rather than forked (DataLoader workers on macOS and
    # Windows, Lightning's ddp_spawn); they open the same file instead.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "images": reopenable(self.images)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, images=reopened(state["images"]))

    @property
    def img_size(self) -> int:
        """The side the images are stored at (below the size asked for where
        ``open_decoded(..., upscale=False)`` kept them at their own)."""
        return self.manifest["img_size"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    @property
    def splits(self) -> dict[str, int]:
        return {k: b - a for k, (a, b) in self.manifest["splits"].items()}

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Images (n×H×W×3) and labels of one on-disk split, as views into the cache."""
        if name not in self.manifest["splits"]:
            raise CvtLabError(
                f"the dataset has no split {name!r} (it has {', '.join(self.manifest['splits'])})"
            )
        a, b = self.manifest["splits"][name]
        return self.images[a:b], self.labels[a:b]

    def files(self, name: str) -> list[str]:
        a, b = self.manifest["splits"][name]
        return self.manifest["files"][a:b]


def _cache_name(source: Source, key_text: str = "") -> tuple[str, str]:
    """The name the cache gives ``source`` (its folder or zip's name) and a 12-digit key of its
    location and ``key_text``."""
    location = str(getattr(source, "path", source.location))
    key = hashlib.sha1(f"{location}{key_text}".encode()).hexdigest()[:12]
    return Path(location).name.replace(".zip", "") or "dataset", key


def _entry_dir(source: Source, size: int, crop: Crop = 1.0) -> Path:
    # The whole-shorter-side entries keep the names they had before crops could be chosen.
    view = "" if crop == 1.0 else f"-{crop}" if crop == "squash" else f"-crop{crop:g}"
    stem, key = _cache_name(source, f"|{size}|{FORMAT_VERSION}" + (f"|{crop}" if view else ""))
    return cache_root() / "decoded" / f"{stem}-{size}px{view}-{key}"


def _read_manifest(entry: Path) -> dict | None:
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if manifest.get("format") == FORMAT_VERSION else None


class _DamagedEntry(Exception):
    """A cache entry whose files do not match its manifest (a disk error, a hand edit)."""


def _open(entry: Path, manifest: dict) -> DecodedDataset:
    try:
        images = np.load(entry / "images.npy", mmap_mode="r")
        labels = np.load(entry / "labels.npy")
        rows = max((end for _, end in manifest["splits"].values()), default=0)
        size = manifest["img_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _DamagedEntry(f"{type(e).__name__}: {e}") from None
    if images.shape != (rows, size, size, 3) or labels.shape != (rows,):
        raise _DamagedEntry(f"{images.shape[0]} images and {labels.shape[0]} labels for {rows}")
    return DecodedDataset(entry, images, labels, manifest)


def _decode_chunk(
    source: Source, npy: str, start: int, paths: list[str], size: int, crop: Crop = 1.0
):
    images = np.load(npy, mmap_mode="r+")
    failed, gray = [], []
    modes: Counter = Counter()
    sizes: Counter = Counter()
    for offset, path in enumerate(paths):
        i = start + offset
        try:
            images[i], mode, (w, h) = decode_image(source.read(path), size, crop)
        except DecodeError as e:
            failed.append((i, str(e)))
        except CvtLabError as e:
            failed.append((i, str(e).rsplit(": ", 1)[-1]))
        else:
            modes[mode] += 1
            sizes[f"{w}x{h}"] += 1
            if mode in GRAY_MODES:
                gray.append(i)
    images.flush()
    return failed, gray, modes, sizes


def _reserve_space(npy: Path, entry: Path) -> None:
    """Allocate the whole image array on disk before decoding into it. The array is written
    through a memory map, and a memory-mapped write that finds the disk full kills the process
    (SIGBUS) without a word; allocating first turns that into one line, before any work."""
    free = shutil.disk_usage(entry.parent).free
    with open(npy, "r+b") as f:
        length = os.fstat(f.fileno()).st_size
        allocate = getattr(os, "posix_fallocate", None)  # not on macOS or Windows
        try:
            if allocate is not None:
                allocate(f.fileno(), 0, length)
            elif length > free:  # without allocation, the free space is the best guess
                raise OSError(errno.ENOSPC, "not enough free space")
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                return  # a file system without allocation: decode and hope, as before
            raise CvtLabError(
                f"{entry.parent}: no room for the decoded cache ({_size(length)} needed,"
                f" {_size(free)} free); free space there or set CVTLAB_CACHE to a folder on a"
                " larger disk"
            ) from None


def _sync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def _build(
    index: DatasetIndex, entry: Path, size: int, fingerprint: str, workers: int, crop: Crop = 1.0
) -> None:
    # Under the entry's lock no other process is building it: a build folder left beside it
    # belongs to a process that was killed (or died on a full disk) and holds its partial copy.
    for orphan in entry.parent.glob(f"{entry.name}.tmp-*"):
        shutil.rmtree(orphan, ignore_errors=True)
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        items = [
            (split, path, label) for split, pairs in index.splits.items() for path, label in pairs
        ]
        n = len(items)
        npy = tmp / "images.npy"
        np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(n, size, size, 3)).flush()
        _reserve_space(npy, entry)
        chunks = [(s, [p for _, p, _ in items[s : s + _CHUNK]]) for s in range(0, n, _CHUNK)]
        failed: list[tuple[int, str]] = []
        gray: set[int] = set()
        modes: Counter = Counter()
        sizes: Counter = Counter()
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"decoding {index.source.location}", unit="img", disable=None)
        if workers > 1 and n > _CHUNK:
            pool = ProcessPoolExecutor(workers, mp_context=get_context(_START_METHOD))
            try:
                futures = [
                    pool.submit(_decode_chunk, index.source, str(npy), s, ps, size, crop)
                    for s, ps in chunks
                ]
                results = ((fut.result(), len(ps)) for fut, (_, ps) in zip(futures, chunks))
                for (f, g, m, z), count in results:
                    failed += f
                    gray.update(g)
                    modes.update(m)
                    sizes.update(z)
                    bar.update(count)
            finally:
                # On Ctrl-C (or a failed chunk) the chunks not yet started are dropped: leaving
                # the pool's `with` block would decode every one of them before stopping.
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for s, ps in chunks:
                f, g, m, z = _decode_chunk(index.source, str(npy), s, ps, size, crop)
                failed += f
                gray.update(g)
                modes.update(m)
                sizes.update(z)
                bar.update(len(ps))
        bar.close()

        bad = {i for i, _ in failed}
        for i, reason in sorted(failed):
            index.skip(items[i][1], reason)
            log.warning("skipped %s: %s", index.source.describe(items[i][1]), reason)
        keep = [i for i in range(n) if i not in bad]
        if bad:
            # Rare: rewrite without the failed rows so that every row is a real image.
            old = np.load(npy, mmap_mode="r")
            compact = np.lib.format.open_memmap(
                tmp / "images.compact.npy",
                mode="w+",
                dtype=np.uint8,
                shape=(len(keep), size, size, 3),
            )
            for a in range(0, len(keep), _CHUNK):
                compact[a : a + _CHUNK] = old[keep[a : a + _CHUNK]]
            compact.flush()
            del old, compact
            os.replace(tmp / "images.compact.npy", npy)
        labels = np.array([items[i][2] for i in keep], dtype=np.int64)
        np.save(tmp / "labels.npy", labels)

        splits, grayscale, start = {}, {}, 0
        for split in index.splits:
            count = sum(1 for i in keep if items[i][0] == split)
            splits[split] = [start, start + count]
            grayscale[split] = sum(1 for i in gray if items[i][0] == split)
            start += count
        manifest = {
            "format": FORMAT_VERSION,
            "source": index.source.location,
            "kind": index.kind,
            "fingerprint": fingerprint,
            "img_size": size,
            "crop": crop,
            "classes": index.classes,
            "class_names": index.class_names,
            "splits": splits,
            "grayscale": grayscale,
            "modes": dict(modes.most_common()),
            "sizes": dict(sizes.most_common(20)),
            "files": [items[i][1] for i in keep],
            "skipped": index.skipped,
        }
        # The manifest is written last: an entry without one is never trusted. The arrays reach
        # the disk first, so that after a power cut a manifest never vouches for lost images.
        for written in tmp.iterdir():
            _sync_file(written)
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        _sync_file(tmp / "manifest.json")
        if entry.exists():
            stale = entry.with_name(f"{entry.name}.stale-{os.getpid()}")
            os.replace(entry, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_older_formats(entry: Path, manifest: dict) -> None:
    """Delete this dataset's entries at this size written by an older cvtlab (another format,
    hence another folder): each holds a full decoded copy (1.3 GB for Tiny ImageNet at 64 px)
    that nothing will read again."""
    prefix = entry.name.rsplit("-", 1)[0] + "-"
    for other in entry.parent.glob(prefix + "*"):
        key = other.name[len(prefix) :]
        if other == entry or not re.fullmatch(r"[0-9a-f]{12}", key) or not other.is_dir():
            continue  # this entry; lock files; other processes' builds in progress
        try:
            old = json.loads((other / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        same = (old.get("source"), old.get("img_size"), old.get("crop", 1.0)) == (
            manifest["source"],
            manifest["img_size"],
            manifest.get("crop", 1.0),
        )
        if same and old.get("format") != FORMAT_VERSION:
            shutil.rmtree(other, ignore_errors=True)
            other.with_name(other.name + ".lock").unlink(missing_ok=True)


# Tiny ImageNet's images are all 64x64 (the dataset's definition; checked after decoding).
TINY_IMAGENET_SIDE = 64
# Enough of a file for Pillow to read an image's size from its header.
_HEADER_BYTES = 1 << 16


def open_decoded(
    path: str | Path,
    img_size: int = 64,
    workers: int | None = None,
    crop: Crop = 1.0,
    upscale: bool = True,
) -> DecodedDataset:
    """The decoded cache of the dataset at ``path`` (zip or folder) at ``img_size`` px: built on
    first use, reused by later runs and other processes, rebuilt when the source changes.
    ``crop``: how each image becomes a square (:func:`~cvtlab.data.decode.decode_image`); each
    choice is an entry of its own.

    ``upscale=False``: a dataset whose images are all one square size that ``img_size`` and
    ``crop`` would upscale (Tiny ImageNet's 64x64, a CIFAR folder's 32x32) is kept at that size,
    its whole-image entry, and ``DecodedDataset.img_size`` says so; the caller brings batches to
    ``img_size`` and ``crop`` with :func:`~cvtlab.data.augment.resize_images`. At 224 px that
    stores Tiny ImageNet in 1.3 GB instead of 16.9, in the entry its 64-px runs use."""
    source = open_source(path)
    fingerprint = source.fingerprint()
    if not upscale:
        resized = img_size if crop in (1.0, "squash") else resized_side(img_size, crop)
        side = _square_side(source, fingerprint)
        if side is not None and resized >= side:
            data = _open_or_build(source, side, workers, 1.0, fingerprint)
            if set(data.manifest.get("sizes", {})) == {f"{side}x{side}"}:
                return data
            log.info(
                "%s: not every image is %dx%d; decoding at %d px",
                source.location,
                side,
                side,
                img_size,
            )
    return _open_or_build(source, img_size, workers, crop, fingerprint)


def _square_side(source: Source, fingerprint: str) -> int | None:
    """S where every image of the dataset is S×S, else None: Tiny ImageNet's 64 by its layout,
    any other dataset from its images' headers (reading stops at the first that differs, so a
    folder of photos costs one header). The answer is kept beside the cache entries until the
    source changes."""
    if looks_like_tiny_imagenet(source.files()):
        return TINY_IMAGENET_SIDE
    stem, key = _cache_name(source)
    record = cache_root() / "decoded" / f"{stem}-square-side-{key}.json"
    try:
        known = json.loads(record.read_text())
        if known.get("fingerprint") == fingerprint:
            return known.get("side")
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    side = _side_from_headers(source)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f"{record.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "side": side}))
        os.replace(tmp, record)
    except OSError:
        pass  # an unwritable cache is reported where the entry is made
    return side


def _side_from_headers(source: Source) -> int | None:
    from PIL import Image

    side = None
    for pairs in load_index(source).splits.values():
        for path, _ in pairs:
            try:
                with Image.open(io.BytesIO(source.read_head(path, _HEADER_BYTES))) as img:
                    width, height = img.size
            except (OSError, SyntaxError, ValueError, CvtLabError, Image.DecompressionBombError):
                continue  # decoding will skip it, or read it in full
            if width != height or (side is not None and width != side):
                return None
            side = width
    return side


def _open_or_build(
    source: Source, img_size: int, workers: int | None, crop: Crop, fingerprint: str
) -> DecodedDataset:
    entry = _entry_dir(source, img_size, crop)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CvtLabError(
            f"{entry.parent}: the decoded cache cannot be made there ({e.strerror}); set "
            "CVTLAB_CACHE to a folder this user can write"
        ) from None
    with open(entry.with_name(entry.name + ".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = _read_manifest(entry)
        data = None
        if manifest is not None and manifest["fingerprint"] == fingerprint:
            try:
                data = _open(entry, manifest)
            except _DamagedEntry as e:
                log.warning("%s: damaged (%s); decoding the dataset again", entry, e)
        if data is None:
            index = load_index(source)
            workers = workers or min(os.cpu_count() or 1, 8)
            _build(index, entry, img_size, fingerprint, workers, crop)
            manifest = _read_manifest(entry)
            _remove_older_formats(entry, manifest)
            data = _open(entry, manifest)
            data.built_now = True
        return data
