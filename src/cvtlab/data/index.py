"""What a dataset holds: its classes and, per split on disk, which files carry which label."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sources import Source


@dataclass
class DatasetIndex:
    """The files of a dataset, before any image is decoded.

    ``splits`` maps each split as it is on disk (``train``/``val``/``test``, or ``all`` for a
    folder without split subfolders) to ``(path, label)`` pairs; unlabelled images have -1.
    ``skipped`` lists files left out while indexing, as ``{"file", "reason"}``.
    """

    kind: str
    source: Source
    classes: list[str]
    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]]
    boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"file": self.source.describe(path), "reason": reason})
