"""``cvtlab train | eval | predict | export | demo``."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import CvtLabError
from .config import phase_start, whole_number


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="recipe YAML; flags override its values")
    p.add_argument("--data", help="Tiny ImageNet zip or folder, an image folder, or tiny-imagenet")
    p.add_argument("--model", help="a registered model (`cvtlab models` lists them)")
    p.add_argument("--img-size", type=int, help="the model's input size in pixels")
    p.add_argument("--epochs", type=int, help="epochs to train (with --resume: in all)")
    p.add_argument("--batch-size", type=int, help="training images per step and process")
    p.add_argument(
        "--lr", type=float, help="peak learning rate at batch size 512 (scaled linearly)"
    )
    p.add_argument(
        "--lr-decay", help="cosine or linear: the rate's fall after warmup to min_lr_ratio"
    )
    p.add_argument("--warmup-epochs", type=float, help="epochs of linear warmup to the peak rate")
    p.add_argument("--weight-decay", type=float, help="AdamW's decoupled weight decay")
    p.add_argument(
        "--optimizer",
        help="adamw, or muon (Muon for the weights that mix channels, AdamW for the rest)",
    )
    p.add_argument("--label-smoothing", type=float, help="0 turns it off")
    p.add_argument(
        "--ema-decay",
        type=float,
        help="the weight EMA's decay, e.g. 0.999 (0: off), reached through the warm-up "
        "1 - (1 + step/gamma)^-power",
    )
    p.add_argument(
        "--ema-warmup-power",
        type=float,
        help="the EMA warm-up's power: 1 reaches --ema-decay D after 1/(1-D) steps (default 2/3)",
    )
    p.add_argument(
        "--ema-warmup-gamma",
        type=float,
        help="the EMA warm-up's gamma: with power 1 it averages about 1/gamma of the steps so far",
    )
    p.add_argument(
        "--whiten-stem",
        action="store_true",
        default=None,
        help="start the stem's filters as whitened principal components of image patches",
    )
    p.add_argument("--out", help="output folder of the run")
    p.add_argument("--seed", type=int, help="seeds the weights, the data split and order")
    p.add_argument(
        "--pretrained",
        help="weights to start from: a run folder, .ckpt, .safetensors, official .pth or "
        "Hugging Face folder",
    )
    p.add_argument("--devices", help="number of devices, or a list like 0,1")
    p.add_argument("--accelerator", help="cpu, gpu, auto, …")
    p.add_argument("--num-nodes", type=int, help="machines in a DDP run (NODE_RANK tells each)")
    p.add_argument("--strategy", help="auto, ddp, …")
    p.add_argument(
        "--precision", help="32, bf16-mixed, 16-mixed, or auto (the fastest on this machine)"
    )
    p.add_argument(
        "--matmul-precision",
        help="fp32 matrix products: highest, or high to allow TF32 tensor cores on a GPU",
    )
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    p.add_argument("--logger", help="csv, tensorboard, wandb or none")
    p.add_argument("--max-minutes", type=float, help="stop training after this many minutes")
    p.add_argument(
        "--budget-schedule",
        action="store_true",
        default=None,
        help="with --max-minutes: fit the lr schedule and train sizes to the time budget",
    )
    p.add_argument(
        "--test-checkpoint",
        help="the checkpoint the test split scores: best (by val_top1, the default) or last",
    )
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument(
        "--limit-train-batches", type=int, help="train on this many batches per epoch (smoke runs)"
    )
    p.add_argument(
        "--train-sizes",
        type=_train_sizes,
        help="progressive resizing, FROM_EPOCH:SIZE[:crop],… e.g. 0:32,3:48:crop (:crop takes a "
        "random window at full resolution instead of resizing; validation stays full size)",
    )
    p.add_argument(
        "--train-batch-sizes",
        type=_train_batch_sizes,
        help="training batch by phase, FROM_EPOCH:BATCH,… e.g. 0:256,4:128 with --train-sizes "
        "0:32,4:64 (the schedule counts images; each step takes the schedule's rate)",
    )


def _train_batch_sizes(text: str) -> list[list]:
    try:
        entries = [part.split(":", 1) for part in text.split(",")]
        return [[phase_start(e[0]), whole_number(e[1])] for e in entries]
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of FROM_EPOCH:BATCH entries like 0:256,4:128"
        ) from None


def _train_sizes(text: str) -> list[list]:
    try:
        entries = [part.split(":") for part in text.split(",")]
        return [[phase_start(e[0]), whole_number(e[1]), *e[2:]] for e in entries]
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of FROM_EPOCH:SIZE[:crop] entries like 0:32,3:48:crop"
        ) from None


_FLAG_KEYS = [
    "data",
    "model",
    "img_size",
    "epochs",
    "batch_size",
    "lr",
    "lr_decay",
    "warmup_epochs",
    "weight_decay",
    "optimizer",
    "label_smoothing",
    "ema_decay",
    "ema_warmup_power",
    "ema_warmup_gamma",
    "whiten_stem",
    "out",
    "seed",
    "pretrained",
    "devices",
    "accelerator",
    "num_nodes",
    "strategy",
    "precision",
    "matmul_precision",
    "resume",
    "logger",
    "max_minutes",
    "budget_schedule",
    "test_checkpoint",
    "compile",
    "limit_train_batches",
    "train_sizes",
    "train_batch_sizes",
]


def _cmd_train(args: argparse.Namespace) -> None:
    from .run import configure_from_cli, train

    flags = {k: getattr(args, k) for k in _FLAG_KEYS}
    cfg = configure_from_cli(args.config, flags)
    metrics = train(cfg)
    _print_run(cfg.out, metrics)


def _top5_text(top5: float, num_classes: int | None, sep: str) -> str:
    """The top-5 figure for a line of text; nothing with five classes or fewer, where every
    image has its label among its five best guesses."""
    return "" if num_classes is not None and num_classes <= 5 else f"{sep}top-5 {top5:.4f}"


def _print_run(out: str, metrics: dict) -> None:
    import lightning as L  # noqa: F401  (rank is known once Lightning has set up)
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    print(
        f"test top-1 {metrics['test_top1']:.4f}"
        f"{_top5_text(metrics['test_top5'], metrics.get('num_classes'), ', ')} "
        f"(best val top-1 {metrics['val_top1'] or 0:.4f} at epoch {metrics['best_epoch']}); "
        f"{metrics['train_images_per_second'] or 0:.0f} train images/s"
    )
    print(f"run folder: {out}  (metrics.json, metrics.csv, checkpoints/, report/)")


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
    30-60 s of compiling first."""
    if precision not in ("32", "bf16", "auto"):
        raise CvtLabError(f"--precision must be 32, bf16 or auto, not {precision!r}")
    if batch_size < 1:
        raise CvtLabError(f"--batch-size must be at least 1, not {batch_size}")
    import torch

    from ..inference import (
        CompiledForInference,
        check_shift,
        load_predictor,
        resolve_device,
        view_averaged,
    )

    device = resolve_device(device)
    if precision == "auto":
        from .precision import resolve_precision

        precision = "bf16" if resolve_precision("auto", device)[0] == "bf16-mixed" else "32"
    import torch.nn.functional as F
    from torchmetrics.classification import MulticlassAccuracy

    from ..data.cache import open_decoded
    from ..data.download import check_recorded_data, resolve_data
    from ..data.splits import plan_splits
    from ..machine import describe_machine

    predictor = load_predictor(checkpoint)
    check_shift(shift, predictor.img_size)
    run = predictor.run_config or {}
    if not data:
        data = run.get("data")
        if not data:
            raise CvtLabError(f"{checkpoint}: no config.yaml beside the checkpoint, so pass --data")
        check_recorded_data(data)
    decoded = open_decoded(resolve_data(data), predictor.img_size)
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
    from ..data.augment import normalize

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = predictor.model.to(device, dtype)
    if compile:
        model = CompiledForInference(model, min(batch_size, len(idx)))
    with torch.inference_mode():
        for a in range(0, len(idx), batch_size):
            rows_b = idx[a : a + batch_size]
            # uint8 to the device, then normalised there: a quarter of the bytes to move.
            x = normalize(torch.from_numpy(np.asarray(decoded.images[rows_b])).to(device))
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


def _cmd_eval(args: argparse.Namespace) -> None:
    result = evaluate(
        args.checkpoint,
        args.data,
        args.split,
        args.batch_size,
        args.precision,
        args.flip,
        args.device,
        args.shift,
        args.compile,
    )
    if args.format == "json":
        print(json.dumps(result, indent=2))
        return
    views = ["flipped"] * result["flip"]
    views += [f"shifted {result['shift']} px"] * bool(result["shift"])
    averaged = f" (averaged with the {' and '.join(views)} views)" if views else ""
    print(
        f"{result['split']} of {result['data']}{averaged}: "
        f"n={result['n']}  top-1 {result['top1']:.4f} "
        f"(95% CI {result['top1_ci95'][0]:.4f}-{result['top1_ci95'][1]:.4f})"
        f"{_top5_text(result['top5'], result['num_classes'], '  ')}  loss {result['loss']:.4f}"
    )
    worst = sorted(result["per_class"].items(), key=lambda kv: kv[1])[:10]
    print("lowest per-class accuracy: " + ", ".join(f"{n.split(',')[0]} {a:.2f}" for n, a in worst))


def _expand_inputs(paths: list[str]) -> list[tuple[str, Callable[[], bytes] | None, str | None]]:
    """(name, reader, error) per image. A file stands for itself (no reader: it is read from its
    path); a folder, a zip (``photos.zip``) or a folder in a zip (``photos.zip:photos/cats``) for
    the images under it, sorted, those in a zip named ``photos.zip:photos/cats/a.jpg`` and read
    from it. One without images is reported (its error set), not silently dropped."""
    from ..data.decode import is_image_name
    from ..data.sources import ZipSource, walk_tree

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
) -> list[dict]:
    """Top-``topk`` class names and probabilities per image (``flip``: averaged with the mirror
    image's; ``shift``: with the views moved that many pixels, as ``evaluate``'s); a folder, a
    zip or a folder in one (``photos.zip:photos/cats``) stands for the images under it, in sorted
    order. An unreadable image (or a folder without images) gets an ``error`` entry instead, and
    the others are still predicted, ``batch_size`` at a time, on ``device`` (``auto``: the GPU
    where there is one); ``compile`` as in :func:`evaluate`."""
    from ..inference import (
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
    predictor = load_predictor(checkpoint)
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
            pixels = read_image(path, predictor.img_size, data)
        except CvtLabError as e:
            results.append({"image": path, "error": str(e)})
            continue
        results.append({"image": path})  # its predictions are filled in with its batch
        pending.append((results[-1], pixels))
        if len(pending) == batch_size:
            run_pending()
    run_pending()
    return results


def _cmd_predict(args: argparse.Namespace) -> int:
    results = predict(
        args.checkpoint,
        args.images,
        args.topk,
        args.flip,
        args.batch_size,
        args.device,
        args.shift,
        args.compile,
    )
    if args.format == "json":
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                why = r["error"].removeprefix(f"{r['image']}: ")  # the line names it already
                print(f"{r['image']}: skipped ({why})")
                continue
            print(r["image"])
            for p in r["predictions"]:
                print(f"  {p['probability']:.4f}  {p['class']}")
    failed = sum("error" in r for r in results)
    if failed:
        print(
            f"cvtlab: warning: {failed} of {len(results)} images could not be read", file=sys.stderr
        )
    return 1 if failed == len(results) else 0


def _cmd_export(args: argparse.Namespace) -> None:
    from ..export import export

    print(export(args.checkpoint, args.out, args.format))


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, minutes=args.minutes)


CHECKPOINT_HELP = (
    "a .ckpt, a run folder (the checkpoint its test scored), a .safetensors export, "
    "an official .pth or a Hugging Face folder"
)

SHIFT_HELP = (
    "also average over the views moved this many pixels up, down, left and right "
    "(test-time augmentation; 0: none)"
)

COMPILE_HELP = (
    "compile the model for inference first (30-60 s; then faster: worth it for thousands of images)"
)


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import positive_int

    p = sub.add_parser("train", help="train a model (Lightning); writes a run folder")
    _add_train_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5/loss/per-class accuracy of a checkpoint")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", help="default: the run's own data (config.yaml beside the checkpoint)")
    p.add_argument(
        "--split",
        default="test",
        choices=["val", "test", "all"],
        help="test (default) or val as the run split its data, or all: every labelled image "
        "of --data, for a held-out set of your own",
    )
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    p.add_argument(
        "--precision",
        default="32",
        help="32; bf16: bf16 weights, fastest on CPUs with AMX; auto: bf16 where it is faster here",
    )
    p.add_argument(
        "--flip",
        action="store_true",
        help="average each image's and its mirror image's probabilities (test-time augmentation)",
    )
    p.add_argument("--shift", type=int, default=0, help=SHIFT_HELP)
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: the GPU where there is one, else the CPU",
    )
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="class names and probabilities for image files")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument(
        "images",
        nargs="+",
        help="image files, folders or zips of them, or a folder in a zip (photos.zip:photos/cats)",
    )
    p.add_argument(
        "--topk", type=positive_int, default=5, help="classes shown per image (default 5)"
    )
    p.add_argument(
        "--flip", action="store_true", help="average with the mirror image's probabilities"
    )
    p.add_argument("--shift", type=int, default=0, help=SHIFT_HELP)
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: the GPU where there is one, else the CPU",
    )
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export weights as safetensors or ONNX")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument(
        "--format",
        choices=["safetensors", "onnx"],
        default=None,
        help="by default the one --out's suffix names (.safetensors, .onnx)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="the file to write: .safetensors (weights, architecture, class names) or .onnx "
        "(the network, with class names and preprocessing in its metadata)",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "demo", help="generate a small dataset and run train → test → predict → report"
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--minutes", type=float, default=None, help="optional cap on training time")
    p.set_defaults(func=_cmd_demo)


__all__ = ["evaluate", "predict", "register"]
