"""Which cached images train, which select the model (validation), which measure it (test).

As papers on Tiny ImageNet do, the official ``val`` split is the held-out test set; the
validation split for model selection is carved from ``train``: seeded, stratified,
``val_per_class`` images of every class (10 by default, 2,000 images).
"""

from __future__ import annotations

import numpy as np

from ..errors import CvtLabError
from .cache import DecodedDataset


def stratified_holdout(
    labels: np.ndarray, per_class: int, seed: int, max_fraction: float = 0.2
) -> np.ndarray:
    """Positions of ``per_class`` images of every class (at most ``max_fraction`` of a class,
    at least one when the class has two or more), chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = min(per_class, max(1 if len(members) > 1 else 0, int(len(members) * max_fraction)))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def plan_splits(
    data: DecodedDataset, val_per_class: int = 10, seed: int = 0
) -> dict[str, np.ndarray]:
    """Global row indices into ``data.images`` for ``train``, ``val`` (model selection) and
    ``test``; a split may be empty (a dataset without labelled held-out images has no test)."""
    ranges = data.manifest["splits"]

    def rows(name: str) -> np.ndarray:
        a, b = ranges.get(name, (0, 0))
        return np.arange(a, b)

    if "all" in ranges:
        everything = rows("all")
        test_pos = stratified_holdout(data.labels[everything], max(val_per_class, 1) * 2, seed + 1)
        rest = np.setdiff1d(everything, everything[test_pos])
        val_pos = stratified_holdout(data.labels[rest], val_per_class, seed)
        return {
            "train": np.setdiff1d(rest, rest[val_pos]),
            "val": rest[val_pos],
            "test": everything[test_pos],
        }

    train = rows("train")
    labelled_test = (
        "test" in ranges and (data.labels[rows("test")] >= 0).all() and len(rows("test"))
    )
    if labelled_test:
        test = rows("test")
        val = rows("val") if len(rows("val")) else None
    else:
        # Tiny ImageNet's convention: the labelled val split is the test set.
        test = rows("val")
        val = None
    if val is None:
        pos = stratified_holdout(data.labels[train], val_per_class, seed)
        val = train[pos]
        train = np.setdiff1d(train, val)
    if not len(train):
        raise CvtLabError(f"{data.manifest['source']}: no training images")
    return {"train": train, "val": val, "test": test}
