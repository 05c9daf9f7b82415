"""Fetch the official Tiny ImageNet zip into the cache folder: resumable, checksummed."""

from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..errors import CvtLabError
from .cache import cache_root
from .tiny_imagenet import MD5, URL

DEFAULT_NAME = "tiny-imagenet-200.zip"


def default_zip() -> Path:
    return cache_root() / DEFAULT_NAME


def _offline_hint(dest: Path) -> str:
    return (
        f"download {DEFAULT_NAME} where a network is available and pass it with --data PATH "
        f"(or copy it to {dest})"
    )


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(
    url: str = URL, dest: Path | None = None, md5: str | None = MD5, timeout: float = 30
) -> Path:
    """Download ``url`` to ``dest`` (default: the cache folder), resuming a partial ``.part``
    file, and check ``md5`` before the file takes its final name."""
    dest = Path(dest) if dest else default_zip()
    if dest.is_file() and (md5 is None or md5sum(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is already complete
            response = None
        else:
            raise CvtLabError(
                f"{url}: the server answered {e.code} {e.reason}; {_offline_hint(dest)}"
            ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CvtLabError(f"{url}: cannot be reached ({reason}); {_offline_hint(dest)}") from None
    if response is not None:
        with response:
            resumed = response.status == 206
            mode = "ab" if resumed else "wb"
            start = have if resumed else 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length else None
            with (
                open(part, mode) as f,
                tqdm(
                    total=total,
                    initial=start,
                    unit="B",
                    unit_scale=True,
                    desc=dest.name,
                    disable=None,
                ) as bar,
            ):
                try:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        f.write(block)
                        bar.update(len(block))
                except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
                    raise CvtLabError(
                        f"{url}: the transfer broke off ({e}); run the same command again to resume"
                    ) from None
        got = part.stat().st_size
        if total is not None and got < total:
            raise CvtLabError(
                f"{url}: the transfer broke off at {got} of {total} bytes; run the same command again to resume"
            )
    if md5 is not None:
        got = md5sum(part)
        if got != md5:
            part.unlink()
            raise CvtLabError(
                f"{url}: checksum mismatch (md5 {got}, expected {md5}); the download was removed"
            )
    part.replace(dest)
    return dest


def check_recorded_data(data: str) -> None:
    """``data`` as a run's ``config.yaml`` records it must still be there: a run folder moved to
    another machine, or a relative path used from another folder, names data that is not."""
    if data != "tiny-imagenet" and not resolve_data(data).exists():
        raise CvtLabError(
            f"{data}: no such dataset file or folder (the data the run trained on, as its "
            "config.yaml names it); pass --data with where the data is now"
        )


def resolve_data(data: str) -> Path:
    """``tiny-imagenet`` means the zip in the cache folder; anything else is a path."""
    if data != "tiny-imagenet":
        return Path(data).expanduser()
    path = default_zip()
    if not path.is_file():
        raise CvtLabError(
            f"the default dataset is not at {path}: run `cvtlab data download` to fetch it, "
            "or pass --data PATH to a Tiny ImageNet zip or an image folder"
        )
    return path
