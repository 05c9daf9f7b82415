"""What bounds a training run: the model's own step against the whole `cvtlab train` pipeline.

For a recipe's model, precision and batch size, at each training size: images/s of a bare
training step (forward, backward, AdamW on a batch already on the device), then of `train()`
itself on a generated dataset (loading, transfer, augmentation, logging, checkpoints), with the
given loader worker counts. A large gap means the pipeline, not the model, sets the pace.
Writes benchmarks/results/pipeline-<recipe>-<machine>.json.

    python benchmarks/pipeline.py --config tiny_imagenet_scratch --sizes 32,64 --workers 0,4
    python benchmarks/pipeline.py --config cpu_30min --workers '' --batch-sizes 256  # step only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_train_step, median, write_result  # noqa: E402

from cvtlab.compare import read_history  # noqa: E402
from cvtlab.data.synthetic import make_synthetic_tiny_imagenet  # noqa: E402
from cvtlab.models.registry import create_model  # noqa: E402
from cvtlab.train.config import make_config  # noqa: E402
from cvtlab.train.precision import resolve_precision  # noqa: E402
from cvtlab.train.run import train  # noqa: E402


def model_step_rate(
    cfg, size: int, device: str, steps: int, compile: bool = False, batch_size: int | None = None
) -> dict:
    batch_size = batch_size or cfg.batch_size
    model = create_model(cfg.model, num_classes=200, **cfg.model_overrides).to(device)
    net = torch.compile(model) if compile else model
    x = torch.randn(batch_size, 3, size, size, device=device)
    y = torch.randint(0, 200, (batch_size,), device=device)
    precision, _ = resolve_precision(cfg.precision, "cuda" if device == "cuda" else "cpu")
    amp = {
        "bf16-mixed": torch.bfloat16,
        "bf16-true": torch.bfloat16,
        "16-mixed": torch.float16,
    }.get(precision)
    step = make_train_step(net, model, x, y, amp)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    warmup_s = time.perf_counter() - start
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return {"images_per_second": median(rates), "warmup_seconds": warmup_s}


def pipeline_rate(recipe: str, data: str, size: int, workers: int, steps: int, out: str) -> float:
    # One image size at the recipe's batch_size, as the bare step is timed, even where the recipe
    # trains its small images in larger batches (train_batch_sizes).
    batch = make_config(recipe).batch_size
    cfg = make_config(
        recipe,
        data=data,
        out=out,
        epochs=2,
        limit_train_batches=steps,
        train_sizes=[[0, size]],
        train_batch_sizes=[[0, batch]],
        num_workers=workers,
        logger="none",
        max_minutes=None,
        ckpt_every_n_steps=0,
    )
    train(cfg)
    # The second epoch's speed: the first carries the warm-up.
    return read_history(Path(out) / "metrics.csv")[-1]["train_images_per_second"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny_imagenet_scratch")
    p.add_argument("--sizes", default="32,64")
    p.add_argument("--workers", default="0,4", help="loader workers; '' skips the pipeline runs")
    p.add_argument("--batch-sizes", default="", help="also time the bare step at these batch sizes")
    p.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd step")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = make_config(args.config)
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",") if w]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        per_class = max(60, cfg.batch_size * (args.steps + 1) // 10)
        root = make_synthetic_tiny_imagenet(f"{tmp}/data", train_per_class=per_class)
        for size in sizes:
            row = {"size": size, "model_step": model_step_rate(cfg, size, device, args.steps)}
            if args.compile:
                row["model_step_compiled"] = model_step_rate(
                    cfg, size, device, args.steps, compile=True
                )
            for b in batch_sizes:
                row[f"model_step_batch_{b}"] = model_step_rate(
                    cfg, size, device, args.steps, batch_size=b
                )
            for w in workers:
                row[f"pipeline_workers_{w}"] = pipeline_rate(
                    args.config, str(root), size, w, args.steps, f"{tmp}/run-{size}-{w}"
                )
            rows.append(row)
            print(row, flush=True)
    result = {"recipe": args.config, "batch_size": cfg.batch_size, "device": device, "rows": rows}
    print(
        f"{'size':>5} {'step @' + str(cfg.batch_size):>11} "
        + " ".join(f"{'step @' + str(b):>11}" for b in batch_sizes)
        + " ".join(f"{'pipeline w=' + str(w):>13}" for w in workers)
    )
    for r in rows:
        steps_at = " ".join(
            f"{r[f'model_step_batch_{b}']['images_per_second']:>11.0f}" for b in batch_sizes
        )
        cells = " ".join(f"{r[f'pipeline_workers_{w}']:>13.0f}" for w in workers)
        print(f"{r['size']:>5} {r['model_step']['images_per_second']:>11.0f} {steps_at}{cells}")
    if not args.no_write:
        print(write_result(f"pipeline-{Path(args.config).stem}", result))
    return result


if __name__ == "__main__":
    main()
