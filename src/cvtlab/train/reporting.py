"""The ``report/`` folder of a run: curves, predictions on test images, confused class pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.augment import normalize, resize_images
from ..report import (
    confused_pairs,
    confused_pairs_plot,
    curves,
    sample_grid,
    warn_missing_glyphs,
)


def write_report(out: Path, module, dm, rows: list[dict], n_predictions: int = 24) -> None:
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    names = dm.class_names
    if rows:
        curves(rows, report / "curves.png", num_classes=len(names))
    test_rows = dm.rows["test"]
    if len(test_rows):
        rng = np.random.default_rng(0)
        pick = np.sort(
            rng.choice(test_rows, size=min(n_predictions, len(test_rows)), replace=False)
        )
        images = np.asarray(dm.data.images[pick])
        labels = dm.data.labels[pick]
        model = module.eval_model().eval().cpu()
        with torch.no_grad():
            x = resize_images(torch.from_numpy(images), model.img_size)
            predicted = model(normalize(x)).argmax(-1).numpy()
        sample_grid(
            images,
            labels,
            names,
            path=report / "test_predictions.png",
            title="test images: true → predicted",
            predicted=predicted,
            indices=np.arange(len(images)),
        )
    confusion = getattr(module, "confusion", None)
    if confusion is not None:
        pairs = confused_pairs(confusion.numpy(), names)
        (report / "confused_pairs.json").write_text(json.dumps(pairs, indent=2))
        confused_pairs_plot(pairs, report / "confused_pairs.png")
    per_class = getattr(module, "per_class_accuracy", None)
    if per_class is not None:
        table = sorted(
            ({"class": n, "accuracy": float(a)} for n, a in zip(names, per_class.tolist())),
            key=lambda r: r["accuracy"],
        )
        (report / "per_class_accuracy.json").write_text(json.dumps(table, indent=2))
    warn_missing_glyphs(str(report))


def send_report_to_logger(logger, report: Path) -> None:
    """The report's figures, for a run followed in Weights & Biases or TensorBoard rather than
    in its folder: W&B gets them as images of the run, TensorBoard in its Images tab."""
    pngs = sorted(report.glob("*.png"))
    if not logger or not pngs:
        return
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_image(
            key="report", images=[str(p) for p in pngs], caption=[p.stem for p in pngs]
        )
    elif isinstance(logger, TensorBoardLogger):
        from PIL import Image

        writer = logger.experiment
        for path in pngs:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))
            writer.add_image(f"report/{path.stem}", pixels, dataformats="HWC")
        writer.flush()
