"""``cvtlab train | eval | predict | export | demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import RECIPES, phase_start, whole_number


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="a recipe YAML, or a shipped one ("
        + ", ".join(sorted(path.stem for path in RECIPES.glob("*.yaml")))
        + "); flags override its values",
    )
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
    p.add_argument(
        "--out", help="the run folder (default: runs/RECIPE or runs/MODEL, then -2, -3 …)"
    )
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
    from .run import DEFAULT_OUT_VARIABLE, configure_from_cli, train

    flags = {k: getattr(args, k) for k in _FLAG_KEYS}
    inherited = DEFAULT_OUT_VARIABLE in os.environ
    try:
        cfg = configure_from_cli(args.config, flags)
        metrics = train(cfg)
    finally:
        if not inherited:  # this command's choice, not one for the next in this process
            os.environ.pop(DEFAULT_OUT_VARIABLE, None)
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
    best = (
        f"best val top-1 {metrics['val_top1']:.4f} at epoch {metrics['best_epoch']}"
        if metrics["val_top1"] is not None
        else "no validation images"
    )
    print(
        f"test top-1 {metrics['test_top1']:.4f}"
        f"{_top5_text(metrics['test_top5'], metrics.get('num_classes'), ', ')} ({best}); "
        f"{metrics['train_images_per_second'] or 0:.0f} train images/s"
    )
    print(f"run folder: {out}  (metrics.json, metrics.csv, checkpoints/, report/)")


def _cmd_eval(args: argparse.Namespace) -> None:
    from ..evaluation import evaluate

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
        args.img_size,
        args.crop,
    )
    if args.format == "json":
        print(json.dumps(result, indent=2))
        return
    if result["crop"] != 1.0 or args.img_size is not None:
        print(f"images: {result['view']}")
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


def _cmd_predict(args: argparse.Namespace) -> int:
    from ..prediction import predict

    results = predict(
        args.checkpoint,
        args.images,
        args.topk,
        args.flip,
        args.batch_size,
        args.device,
        args.shift,
        args.compile,
        args.img_size,
        args.crop,
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

IMG_SIZE_HELP = (
    "run the model at this input size (any multiple of its total stride; default: the size it "
    "was trained at, or the one an official file's name gives)"
)

CROP_HELP = (
    "how an image becomes a square: the centre fraction of its shorter side (1: all of it, as "
    "cvtlab trains; 0.875: shorter side to 256, centre 224) or squash (the whole image resized); "
    "default: the checkpoint's own (official ImageNet weights: 0.875 below 384 px, squash above)"
)


def _add_view_flags(p: argparse.ArgumentParser) -> None:
    from ..cli import positive_int

    p.add_argument("--img-size", type=positive_int, default=None, help=IMG_SIZE_HELP)
    p.add_argument("--crop", default=None, help=CROP_HELP)


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
    _add_view_flags(p)
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
    _add_view_flags(p)
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


__all__ = ["register"]
