"""``cvtlab predict`` as a function: class names and probabilities for image files, folders
and zips."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from .errors import CvtLabError


def _expand_inputs(paths: list[str]) -> list[tuple[str, Callable[[], bytes] | None, str | None]]:
    """(name, reader, error) per image. A file stands for itself (no reader: it is read from its
    path); a folder, a zip (``photos.zip``) or a folder in a zip (``photos.zip:photos/cats``) for
    the images under it, sorted, those in a zip named ``photos.zip:photos/cats/a.jpg`` and read
    from it. One without images is reported (its error set), not silently dropped."""
    from .data.decode import is_image_name
    from .data.sources import ZipSource, walk_tree

    expanded: list[tuple[str, Callable[[], bytes] | None, str | None]] = []
    for path in paths:
        in_zip = re.fullmatch(r"(.+\.zip)(?::(.*))?", path, flags=re.IGNORECASE)
        if Path(path).is_dir():
            # As a dataset folder is read: links followed, hidden files and __MACOSX/ left out.
            folder = Path(path)
            found = [str(folder / f) for f in walk_tree(folder)[0] if is_image_name(f)]
            expanded += [(f, None, None) for f in found] or [
                (path, None, f"{path}: a folder without images")
            ]
        elif in_zip and Path(in_zip[1]).is_file():
            try:
                source = ZipSource(Path(in_zip[1]))
            except CvtLabError as e:
                expanded.append((path, None, str(e)))
                continue
            inner = (in_zip[2] or "").strip("/")
            under = f"{inner}/" if inner else ""  # the folder, or the image itself
            members = sorted(
                f
                for f in source.files()
                if is_image_name(f) and f"{source.prefix}{f}/".startswith(under)
            )
            empty = f"no images under {inner} in the zip" if inner else "a zip without images"
            expanded += [
                (f"{in_zip[1]}:{source.prefix}{f}", partial(source.read, f), None) for f in members
            ] or [(path, None, f"{path}: {empty}")]
        else:
            expanded.append((path, None, None))
    return expanded


def predict(
    checkpoint: str,
    images: list[str],
    topk: int = 5,
    flip: bool = False,
    batch_size: int = 64,
    device: str = "auto",
    shift: int = 0,
    compile: bool = False,
    img_size: int | None = None,
    crop: float | str | None = None,
) -> list[dict]:
    """Top-``topk`` class names and probabilities per image (``flip``: averaged with the mirror
    image's; ``shift``: with the views moved that many pixels, as ``evaluate``'s); a folder, a
    zip or a folder in one (``photos.zip:photos/cats``) stands for the images under it, in sorted
    order. An unreadable image (or a folder without images) gets an ``error`` entry instead, and
    the others are still predicted, ``batch_size`` at a time, on ``device`` (``auto``: the GPU
    where there is one); ``compile``, ``img_size`` and ``crop`` as in :func:`evaluate`."""
    from .inference import (
        CompiledForInference,
        check_shift,
        load_predictor,
        read_image,
        resolve_device,
    )

    if batch_size < 1:
        raise CvtLabError(f"--batch-size must be at least 1, not {batch_size}")
    if topk < 1:
        raise CvtLabError(f"--topk must be at least 1, not {topk}")
    device = resolve_device(device)
    predictor = load_predictor(checkpoint, img_size, crop)
    check_shift(shift, predictor.img_size)
    predictor.model.to(device)
    if compile:
        predictor.model = CompiledForInference(predictor.model, batch_size)
    results: list[dict] = []
    pending: list[tuple[dict, np.ndarray]] = []

    def run_pending() -> None:
        if not pending:
            return
        pixels = np.stack([pixels for _, pixels in pending])
        probs = predictor.probabilities(pixels, flip=flip, shift=shift)
        for (entry, _), row in zip(pending, probs):
            values, indices = row.topk(min(topk, len(row)))
            entry["predictions"] = [
                {"class": predictor.class_names[i], "probability": round(float(v), 6)}
                for v, i in zip(values.tolist(), indices.tolist())
            ]
        pending.clear()

    for path, reader, error in _expand_inputs(images):
        if error:
            results.append({"image": path, "error": error})
            continue
        try:
            data = reader() if reader else None
            pixels = read_image(path, predictor.img_size, data, predictor.crop)
        except CvtLabError as e:
            results.append({"image": path, "error": str(e)})
            continue
        results.append({"image": path})  # its predictions are filled in with its batch
        pending.append((results[-1], pixels))
        if len(pending) == batch_size:
            run_pending()
    run_pending()
    return results
