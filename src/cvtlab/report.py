"""Plots people look at: training curves, sample and prediction grids, confused class pairs."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

log = logging.getLogger("cvtlab.report")

# Characters of class or run names that no installed font draws (a CJK class name on a machine
# with matplotlib's own fonts only). Matplotlib warns once per character and figure, twice each:
# collected here and named once by :func:`warn_missing_glyphs`.
_missing_glyphs: set[str] = set()


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    for w in caught:
        glyph = re.match(r"Glyph (\d+) ", str(w.message))
        if glyph:
            _missing_glyphs.add(chr(int(glyph.group(1))))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return path


def warn_missing_glyphs(where: str) -> None:
    """One warning naming the characters the plots written since the last call drew as boxes."""
    if _missing_glyphs:
        chars = "".join(sorted(_missing_glyphs))
        _missing_glyphs.clear()
        log.warning(
            "%s: no installed font draws %s; those characters show as boxes in the plots",
            where,
            chars,
        )


def _short(name: str, limit: int = 18) -> str:
    name = name.split(",")[0].strip()
    return name if len(name) <= limit else name[: limit - 1] + "…"


def sample_grid(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    *,
    n: int = 32,
    seed: int = 0,
    path: str | Path,
    title: str = "",
    predicted: np.ndarray | None = None,
    indices: np.ndarray | None = None,
) -> Path:
    """A PNG grid of uint8 (N, H, W, 3) images with their class name under each (and, with
    ``predicted``, the prediction, green when right and red when wrong)."""
    if indices is None:
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))
    cols = min(8, len(indices)) or 1
    rows = max(1, int(np.ceil(len(indices) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, indices):
        ax.imshow(np.asarray(images[i]), interpolation="nearest")
        true = class_names[labels[i]] if labels[i] >= 0 else "?"
        if predicted is None:
            ax.set_title(_short(true), fontsize=7)
        else:
            ok = predicted[i] == labels[i]
            ax.set_title(
                f"{_short(true)}\n→ {_short(class_names[predicted[i]])}",
                fontsize=6.5,
                color="green" if ok else "red",
            )
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def curves(history: list[dict], path: str | Path, num_classes: int | None = None) -> Path:
    """Loss and top-1 per epoch (train and val) from ``metrics.csv`` rows; with an EMA of the
    weights, validation of the EMA (the run's ``val_top1``) and of the trained weights. Top-5
    is left out with five classes or fewer, where it is 100% by definition."""
    epochs = [r["epoch"] for r in history]
    ema = any(r.get("val_top1_raw") is not None for r in history)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, style, label in (
        ("train_loss_epoch", "-", "training (augmented)"),
        ("val_loss", "--", "validation" + (" (EMA)" if ema else "")),
    ):
        vals = [r.get(key) for r in history]
        if any(v is not None for v in vals):
            ax_loss.plot(epochs, vals, style, marker="o", ms=3, label=label)
    for key, style, label in (
        ("train_top1", "-", "training top-1 (augmented)"),
        ("val_top1", "--", "validation top-1" + (" (EMA)" if ema else "")),
        ("val_top1_raw", ":", "validation top-1 (trained weights)"),
        ("val_top5", "-.", "validation top-5" + (" (EMA)" if ema else "")),
    ):
        if key == "val_top5" and num_classes is not None and num_classes <= 5:
            continue
        vals = [r.get(key) for r in history]
        if any(v is not None for v in vals):
            ax_acc.plot(
                epochs,
                [v * 100 if v is not None else None for v in vals],
                style,
                marker="o",
                ms=3,
                label=label,
            )
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def confused_pairs(confusion: np.ndarray, class_names: list[str], k: int = 15) -> list[dict]:
    """The ``k`` (true, predicted) pairs most often confused, from a confusion matrix."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None)[::-1][:k]
    pairs = []
    for idx in flat:
        t, p = np.unravel_index(idx, off.shape)
        if off[t, p] == 0:
            break
        pairs.append(
            {
                "true": class_names[t],
                "predicted": class_names[p],
                "count": int(off[t, p]),
                "of": int(confusion[t].sum()),
            }
        )
    return pairs


def confused_pairs_plot(pairs: list[dict], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(pairs), 1) + 1))
    labels = [f"{_short(p['true'], 24)} → {_short(p['predicted'], 24)}" for p in pairs][::-1]
    ax.barh(range(len(pairs)), [p["count"] for p in pairs][::-1], color="#c0504d")
    ax.set_yticks(range(len(pairs)), labels, fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # counts of images
    ax.set_xlabel("test images")
    ax.set_title("most confused class pairs (true → predicted)")
    return _save(fig, path)


def compare_curves(runs: list[dict], path: str | Path) -> Path:
    """Validation top-1 of several runs against training time and against steps, one line
    per run (``runs`` as ``cvtlab.compare.compare_runs`` returns them), the test top-1 in the
    legend."""
    fig, (ax_time, ax_steps) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for run in runs:
        rows = [r for r in run["history"] if r.get("val_top1") is not None]
        top1 = [100 * r["val_top1"] for r in rows]
        label = run["run"]
        if run["test_top1"] is not None:
            label += f" (test {100 * run['test_top1']:.1f}%)"
        (line,) = ax_time.plot(
            [r["elapsed_s"] / 60 for r in rows], top1, marker="o", ms=3, label=label
        )
        ax_steps.plot([r["step"] for r in rows], top1, marker="o", ms=3, color=line.get_color())
    ax_time.set(xlabel="training time (min)", ylabel="validation top-1 (%)")
    ax_steps.set(xlabel="step")
    for ax in (ax_time, ax_steps):
        ax.grid(alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.suptitle("validation top-1 by time and by step", fontsize=10)
    return _save(fig, path)
