"""``cvtlab eval`` as a function: a checkpoint's accuracy on a split of a dataset."""

from __future__ import annotations

import math

import numpy as np

from .errors import CvtLabError


def evaluate(
    checkpoint: str,
    data: str | None = None,
    split: str = "test",
    batch_size: int = 256,
    precision: str = "32",
    flip: bool = False,
    device: str = "auto",
    shift: int = 0,
    compile: bool = False,
    img_size: int | None = None,
    crop: float | str | None = None,
) -> dict:
    """Top-1, top-5, loss and per-class accuracy of ``checkpoint`` on ``split`` of ``data``
    (default: the run's own data, split the same way as in training; ``"all"``: every labelled
    image of ``data``), on ``device`` (``auto``: the GPU where there is one, else the CPU).

    ``flip=True`` averages the class probabilities of each image and its mirror image (test-time
    augmentation: twice the compute, usually about a point of top-1 for a model trained with
    flips); ``shift`` adds the views moved that many pixels up, down, left and right (five times
    the compute, ten with ``flip``).

    ``precision="bf16"`` runs a bf16 copy of the weights on bf16 inputs: on CPUs with bf16
    matrix units the fastest inference (no casts per call, unlike autocast). ``"auto"`` takes
    bf16 where this CPU's bf16 products are clearly faster than its fp32 ones (measured, as for
    training), else 32; the result names the choice. ``compile=True`` runs the model compiled
    for inference (:class:`~cvtlab.inference.CompiledForInference`): faster once compiled, for
    30-60 s of compiling first.

    Images are seen as the checkpoint's makers tested them: cvtlab's runs the whole shorter side
    at the size they trained at; official and Hugging Face ImageNet weights the centre 0.875 of it
    below 384 px (shorter side to 256, centre 224) and the whole image resized to a square from
    384 px up, at the size the file names (``CvT-13-384x384-IN-1k.pth``: 384). ``img_size`` and
    ``crop`` (a fraction in (0, 1] or ``"squash"``) override both."""
    if precision not in ("32", "bf16", "auto"):
        raise CvtLabError(f"--precision must be 32, bf16 or auto, not {precision!r}")
    if batch_size < 1:
        raise CvtLabError(f"--batch-size must be at least 1, not {batch_size}")
    import torch

    from .inference import (
        CompiledForInference,
        check_shift,
        load_predictor,
        resolve_device,
        view_averaged,
    )

    device = resolve_device(device)
    if precision == "auto":
        from .train.precision import resolve_precision

        precision = "bf16" if resolve_precision("auto", device)[0] == "bf16-mixed" else "32"
    import torch.nn.functional as F
    from torchmetrics.classification import MulticlassAccuracy

    from .data.cache import open_decoded
    from .data.decode import crop_label
    from .data.download import check_recorded_data, resolve_data
    from .data.splits import plan_splits
    from .machine import describe_machine

    predictor = load_predictor(checkpoint, img_size, crop)
    check_shift(shift, predictor.img_size)
    run = predictor.run_config or {}
    if not data:
        data = run.get("data")
        if not data:
            raise CvtLabError(f"{checkpoint}: no config.yaml beside the checkpoint, so pass --data")
        check_recorded_data(data)
    decoded = open_decoded(
        resolve_data(data), predictor.img_size, crop=predictor.crop, upscale=False
    )
    # Tiny ImageNet stays at its own 64 px for a larger view; each batch is brought to it.
    view = (predictor.img_size, predictor.crop)
    kept_small = (decoded.img_size, decoded.manifest.get("crop", 1.0)) != view
    model_label = _model_labels(decoded.class_names, predictor, data)
    if split == "all":
        # Every labelled image: for a dataset the model never trained on (a test set of your
        # own), where a carved-out share would score a fifth of it.
        idx = np.flatnonzero(decoded.labels >= 0)
    else:
        rows = plan_splits(decoded, run.get("val_per_class", 10), run.get("seed", 0))
        if split not in rows:
            raise CvtLabError(f"--split must be val, test or all, not {split!r}")
        idx = rows[split]
    if not len(idx):
        raise CvtLabError(f"{data}: the {split} split is empty")
    k = len(predictor.class_names)
    top1 = MulticlassAccuracy(k, top_k=1, average="micro").to(device)
    top5 = MulticlassAccuracy(k, top_k=min(5, k), average="micro").to(device)
    per_class = MulticlassAccuracy(k, top_k=1, average=None).to(device)
    loss_sum = 0.0
    from .data.augment import normalize, resize_images

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = predictor.model.to(device, dtype)
    if compile:
        model = CompiledForInference(model, min(batch_size, len(idx)))
    with torch.inference_mode():
        for a in range(0, len(idx), batch_size):
            rows_b = idx[a : a + batch_size]
            # uint8 to the device, then normalised there: a quarter of the bytes to move.
            x = torch.from_numpy(np.asarray(decoded.images[rows_b])).to(device)
            if kept_small:
                x = resize_images(x, predictor.img_size, predictor.crop)
            x = normalize(x)
            y = torch.from_numpy(model_label[decoded.labels[rows_b]]).to(device)
            logits = view_averaged(model, x.to(dtype), flip, shift)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            for m in (top1, top5, per_class):
                m.update(logits, y)
    accs = per_class.compute().tolist()
    accuracy = float(top1.compute())
    present = np.unique(decoded.labels[idx])  # a held-out set may hold some classes only
    return {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "split": split,
        "precision": precision,
        "device": device,
        "flip": flip,
        "shift": shift,
        "compiled": compile,
        "img_size": predictor.img_size,
        "crop": predictor.crop,
        "view": crop_label(predictor.crop, predictor.img_size),
        "n": int(len(idx)),
        "num_classes": k,  # the model's; the data may hold fewer
        "top1": accuracy,
        "top1_ci95": wilson_interval(accuracy, len(idx)),
        "top5": float(top5.compute()),
        "loss": loss_sum / len(idx),
        "per_class": {decoded.class_names[i]: float(accs[model_label[i]]) for i in present},
        "machine": describe_machine(),
    }


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> list[float]:
    """The 95% (Wilson score) interval of an accuracy measured on ``n`` images: how far the
    figure could move with another sample of that size from the same distribution. On 10,000
    images about ±1 point at 50%: two models closer than that are not told apart by the test."""
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _model_labels(class_names: list[str], predictor, data: str) -> np.ndarray:
    """The model's output index for each of the data's labels. Classes are matched by name, so
    a held-out set may hold some of the model's classes, in any order (an ImageNet-1k model's
    also by WordNet id); a class the model does not know is refused, as is another number of
    classes for weights without class names."""
    k = len(predictor.class_names)
    if not predictor.names_known:
        if len(class_names) != k:
            raise CvtLabError(
                f"{data}: has {len(class_names)} classes but the checkpoint predicts {k} "
                "(and has no class names to match them by)"
            )
        return np.arange(k, dtype=np.int64)
    index = {**(predictor.aliases or {})}
    index.update({name: i for i, name in enumerate(predictor.class_names)})
    unknown = [name for name in class_names if name not in index]
    if unknown:
        # Scoring them would report a wrong accuracy, like a badly trained model's.
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise CvtLabError(
            f"{data}: classes the checkpoint does not predict: "
            f"{', '.join(repr(n) for n in unknown[:3])}{more} (it knows {k} classes)"
        )
    return np.array([index[name] for name in class_names], dtype=np.int64)
