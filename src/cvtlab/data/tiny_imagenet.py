"""Tiny ImageNet-200 in its original layout, from the zip or an extracted folder.

Classes are indexed by sorted wnid (as torchvision's ImageFolder does); ``wnids.txt`` itself is
not sorted. Labels of ``val`` come from ``val/val_annotations.txt``; ``test`` is unlabelled.
"""

from __future__ import annotations

from collections import defaultdict

from ..errors import CvtLabError
from .decode import is_image_name, skip_reason_for_name
from .index import DatasetIndex
from .sources import Source

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def looks_like_tiny_imagenet(files: list[str]) -> bool:
    return "wnids.txt" in files and any(f.startswith("train/") for f in files)


def _text(source: Source, path: str) -> str:
    try:
        return source.read(path).decode("utf-8")
    except UnicodeDecodeError:
        raise CvtLabError(f"{source.describe(path)}: not a UTF-8 text file") from None


def _box(fields: list[str], where: str) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(v) for v in fields)
    except ValueError:
        raise CvtLabError(f"{where}: bounding box {fields} is not four integers") from None
    return x0, y0, x1, y1


def index_tiny_imagenet(source: Source) -> DatasetIndex:
    files = source.files()
    present = set(files)
    if "wnids.txt" not in present:
        raise CvtLabError(f"{source.location}: not Tiny ImageNet (no wnids.txt at its top level)")
    wnids = sorted({w.strip() for w in _text(source, "wnids.txt").split() if w.strip()})
    if not wnids:
        raise CvtLabError(f"{source.describe('wnids.txt')}: lists no classes")
    label_of = {w: i for i, w in enumerate(wnids)}
    names = {w: w for w in wnids}
    if "words.txt" in present:
        for line in _text(source, "words.txt").splitlines():
            wnid, _, words = line.partition("\t")
            if wnid in names:
                names[wnid] = words.strip() or wnid
    index = DatasetIndex(
        "tiny-imagenet",
        source,
        wnids,
        [names[w] for w in wnids],
        {"train": [], "val": [], "test": []},
    )

    by_folder: dict[str, list[str]] = defaultdict(list)
    for f in files:
        parts = f.split("/")
        if parts[0] == "train" and len(parts) >= 3:
            by_folder[parts[1]].append(f)
    for wnid in sorted(by_folder):
        if wnid not in label_of:
            raise CvtLabError(
                f"{source.describe('train/' + wnid)}: class folder not listed in wnids.txt"
            )
        for f in sorted(by_folder[wnid]):
            if f.endswith(f"{wnid}_boxes.txt"):
                for n, line in enumerate(_text(source, f).splitlines(), 1):
                    cols = line.split("\t")
                    if len(cols) == 5:
                        index.boxes[f"train/{wnid}/images/{cols[0]}"] = _box(
                            cols[1:], f"{source.describe(f)}:{n}"
                        )
            elif is_image_name(f):
                index.splits["train"].append((f, label_of[wnid]))
            else:
                index.skip(f, skip_reason_for_name(f))
    for wnid in wnids:
        if wnid not in by_folder:
            raise CvtLabError(f"{source.describe('train/' + wnid)}: class folder is missing")

    val_images = sorted(f for f in files if f.startswith("val/") and f != "val/val_annotations.txt")
    if val_images:
        ann = "val/val_annotations.txt"
        if ann not in present:
            raise CvtLabError(f"{source.describe(ann)}: missing, so the val images have no labels")
        labelled = {}
        for n, line in enumerate(_text(source, ann).splitlines(), 1):
            if not line.strip():
                continue
            cols = line.split("\t")
            where = f"{source.describe(ann)}:{n}"
            if len(cols) < 2:
                raise CvtLabError(f"{where}: expected 'file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1'")
            if cols[1] not in label_of:
                raise CvtLabError(f"{where}: unknown wnid {cols[1]!r} (not in wnids.txt)")
            labelled[f"val/images/{cols[0]}"] = label_of[cols[1]]
            if len(cols) >= 6:
                index.boxes[f"val/images/{cols[0]}"] = _box(cols[2:6], where)
        for f in val_images:
            if not is_image_name(f):
                index.skip(f, skip_reason_for_name(f))
            elif f not in labelled:
                index.skip(f, "not listed in val_annotations.txt")
            else:
                index.splits["val"].append((f, labelled[f]))
        for f in sorted(set(labelled) - present):
            index.skip(f, "listed in val_annotations.txt but missing")

    for f in sorted(f for f in files if f.startswith("test/")):
        if is_image_name(f):
            index.splits["test"].append((f, -1))
        else:
            index.skip(f, skip_reason_for_name(f))
    # Official order within a split: by the number in the file name, not lexically.
    for split in index.splits.values():
        split.sort(key=lambda item: _natural_key(item[0]))
    return index


def _natural_key(path: str) -> tuple:
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path))
