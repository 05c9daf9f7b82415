"""Any folder (or zip) of labelled images: ``root/<class>/<image>``, optionally with
``train/``, ``val/`` and ``test/`` subfolders that each hold the class folders."""

from __future__ import annotations

from collections import defaultdict

from ..errors import CvtLabError
from .decode import is_image_name, skip_reason_for_name
from .index import DatasetIndex
from .sources import Source

SPLIT_NAMES = ("train", "val", "test")


def index_image_folder(source: Source) -> DatasetIndex:
    files = source.files()
    tops = {f.split("/", 1)[0] for f in files if "/" in f}
    has_splits = bool(tops) and "train" in tops and tops <= set(SPLIT_NAMES)
    split_files: dict[str, list[str]] = defaultdict(list)
    loose = []
    # A class folder's images may sit in subfolders of it at any depth (cat/2019/x.jpg).
    for f in files:
        parts = f.split("/")
        if has_splits and len(parts) >= 3:
            split_files[parts[0]].append(f)
        elif not has_splits and len(parts) >= 2:
            split_files["all"].append(f)
        else:
            loose.append(f)

    folders = source.folders()
    if has_splits:
        class_dirs = sorted(
            {d.split("/")[1] for d in folders if d.startswith("train/") and d.count("/") == 1}
        )
    else:
        class_dirs = sorted(d for d in folders if "/" not in d)
    if not class_dirs:
        raise CvtLabError(
            f"{source.location}: no class folders found (expected <class>/<image> or "
            "train/<class>/<image>, or the Tiny ImageNet layout)"
        )
    label_of = {c: i for i, c in enumerate(class_dirs)}
    index = DatasetIndex("image-folder", source, class_dirs, list(class_dirs), {})
    for f in loose:
        index.skip(f, "outside any class folder")
    for split in SPLIT_NAMES if has_splits else ("all",):
        items = []
        for f in sorted(split_files.get(split, [])):
            cls = f.split("/")[1 if has_splits else 0]
            if cls not in label_of:
                index.skip(f, f"class folder {cls!r} is not in train/")
            elif not is_image_name(f):
                index.skip(f, skip_reason_for_name(f))
            else:
                items.append((f, label_of[cls]))
        if items or split in ("train", "all"):
            index.splits[split] = items
    counts = defaultdict(int)
    for items in index.splits.values():
        for _, label in items:
            counts[label] += 1
    empty = [c for c in class_dirs if not counts[label_of[c]]]
    if empty:
        raise CvtLabError(f"{source.describe(empty[0])}: class folder holds no images")
    return index
