"""Read-only access to a dataset kept as a zip file or as a folder.

Nothing here writes beside the data: the notebook crashed exactly there, on a read-only mount.
Paths are POSIX, relative to the dataset's root (a zip's single top folder is the root).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from pathlib import Path

from ..errors import CvtLabError


def is_system_clutter(path: str) -> bool:
    """Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints/``) and the ``__MACOSX/``
    tree of resource forks that macOS puts in the zips it makes: never part of a dataset."""
    return any(part.startswith(".") or part == "__MACOSX" for part in path.split("/"))


class Source:
    """A read-only tree of files: ``files()`` lists them, ``read()`` returns their bytes."""

    location: str

    def files(self) -> list[str]:
        raise NotImplementedError

    def read(self, path: str) -> bytes:
        raise NotImplementedError

    def read_head(self, path: str, n: int) -> bytes:
        """The first ``n`` bytes of a file (an image's header, to learn its size)."""
        return self.read(path)[:n]

    def folders(self) -> set[str]:
        """Every folder, including empty ones where the format records them."""
        found = set()
        for f in self.files():
            parts = f.split("/")[:-1]
            found.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return found

    def fingerprint(self) -> str:
        """Changes whenever a file is added, removed, resized or rewritten."""
        raise NotImplementedError

    def describe(self, path: str) -> str:
        """How to name ``path`` in a message to the user."""
        return f"{self.location}:{path}"


class ZipSource(Source):
    def __init__(self, path: Path):
        self.path = path.resolve()
        self.location = str(path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CvtLabError(f"{path}: not a readable zip file ({e})") from None
        infos = [i for i in infos if not is_system_clutter(i.filename.rstrip("/"))]
        names = [i.filename for i in infos if not i.is_dir()]
        tops = {n.split("/", 1)[0] for n in names}
        # A zip holding one top folder (tiny-imagenet-200/...) is rooted inside it, unless that
        # folder is itself a split folder of an image-folder dataset.
        single = len(tops) == 1 and all("/" in n for n in names)
        top = tops.pop() if single else ""
        self.prefix = f"{top}/" if single and top not in ("train", "val", "test") else ""
        self._names = [n[len(self.prefix) :] for n in names if not n.endswith("/")]
        self._dirs = {
            i.filename[len(self.prefix) :].rstrip("/")
            for i in infos
            if i.is_dir() and len(i.filename) > len(self.prefix)
        }
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def files(self) -> list[str]:
        return list(self._names)

    def read(self, path: str) -> bytes:
        return self.read_head(path, -1)

    def read_head(self, path: str, n: int) -> bytes:
        # A ZipFile handle must not be shared across forked worker processes.
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        try:
            with self._zip.open(self.prefix + path) as f:
                return f.read(n)  # all of it for n = -1
        except KeyError:
            raise CvtLabError(f"{self.describe(path)}: no such file in the zip") from None
        except (zipfile.BadZipFile, zlib.error, OSError) as e:
            # A damaged member (bad CRC, broken compressed stream) loses that file alone.
            raise CvtLabError(
                f"{self.describe(path)}: damaged in the zip ({type(e).__name__})"
            ) from None

    def folders(self) -> set[str]:
        return super().folders() | self._dirs

    def fingerprint(self) -> str:
        st = self.path.stat()
        return f"zip:{st.st_size}:{st.st_mtime_ns}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"] = None
        return state


class DirSource(Source):
    def __init__(self, path: Path):
        self.path = path.resolve()
        self.location = str(path)
        self._names, self._dirs = walk_tree(self.path)

    def files(self) -> list[str]:
        return list(self._names)

    def read(self, path: str) -> bytes:
        try:
            return (self.path / path).read_bytes()
        except OSError as e:
            raise CvtLabError(f"{self.describe(path)}: cannot be read ({e.strerror})") from None

    def read_head(self, path: str, n: int) -> bytes:
        try:
            with open(self.path / path, "rb") as f:
                return f.read(n)
        except OSError as e:
            raise CvtLabError(f"{self.describe(path)}: cannot be read ({e.strerror})") from None

    def fingerprint(self) -> str:
        digest = hashlib.sha1()
        for name in self._names:
            st = (self.path / name).stat()
            digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return f"dir:{digest.hexdigest()}"

    def describe(self, path: str) -> str:
        return str(self.path / path)

    def folders(self) -> set[str]:
        return set(self._dirs)


def walk_tree(root: Path) -> tuple[list[str], set[str]]:
    """The files (sorted) and folders under ``root`` as POSIX paths relative to it. Links are
    followed, since a subset of a dataset is often a folder of links to class folders, but a
    folder reached twice (a link back up the tree) is read once."""
    files, folders, seen = [], set(), set()
    for here, subdirs, names in os.walk(root, followlinks=True):
        st = os.stat(here)
        if (st.st_dev, st.st_ino) in seen:
            subdirs.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        subdirs[:] = [d for d in subdirs if not is_system_clutter(d)]
        rel = Path(here).relative_to(root).as_posix()
        prefix = "" if rel == "." else f"{rel}/"
        if prefix:
            folders.add(rel)
        files += [
            prefix + n
            for n in names
            if not is_system_clutter(n) and os.path.isfile(os.path.join(here, n))
        ]
    return sorted(files), folders


def _dataset_root(path: Path) -> Path:
    """A folder that holds nothing but a Tiny ImageNet folder (the official zip extracted into
    it) stands for that folder, as the zip itself does; read as an image folder it would be one
    class of 112,000 images."""
    entries = [e for e in path.iterdir() if not is_system_clutter(e.name)]
    if len(entries) == 1 and entries[0].is_dir():
        inner = entries[0]
        if (inner / "wnids.txt").is_file() and (inner / "train").is_dir():
            return inner
    return path


def open_source(path: str | Path) -> Source:
    """A zip file or a folder; anything else is a one-line error."""
    path = Path(path).expanduser()
    if path.is_dir():
        return DirSource(_dataset_root(path))
    if path.is_file():
        return ZipSource(path)
    raise CvtLabError(f"{path}: no such dataset file or folder")
