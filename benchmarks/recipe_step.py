"""Where a recipe's training step goes: forward and backward, then the optimiser, at each image
size and batch of its schedule, in the precision the recipe trains in on this machine. Where that
is bf16, the step is also timed with the depthwise projections in bf16 (training keeps them in
fp32 under CPU autocast: models/layers.py), which is the measurement behind that choice.

    python benchmarks/recipe_step.py                          # cpu_30min on this machine
    python benchmarks/recipe_step.py --config my.yaml --repeats 9 --precision 32

Random batches of the recipe's sizes, no data loading or augmentation (benchmarks/data.py times
those); the optimiser's part includes the gradient clipping. Each timing is the mean over
``--steps`` steps; the variants run interleaved, after warm-up, and the median of ``--repeats``
is reported. Writes benchmarks/results/recipe-step-<machine>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write_result  # noqa: E402

from cvtlab.models import layers  # noqa: E402
from cvtlab.models.registry import create_model, get_config  # noqa: E402
from cvtlab.train.config import batch_size_at, make_config, train_size_at  # noqa: E402
from cvtlab.train.module import make_optimizer  # noqa: E402
from cvtlab.train.precision import resolve_precision  # noqa: E402


def phases(cfg) -> list[tuple[float, int, int]]:
    """(first epoch, image size, batch) for each stretch of the schedule with its own shape."""
    schedules = (cfg.train_sizes or []) + (cfg.train_batch_sizes or [])
    starts = sorted({0, *(entry[0] for entry in schedules)})
    default_size = get_config(cfg.model, **cfg.model_overrides).img_size
    out = []
    for start in starts:
        size = (train_size_at(cfg.train_sizes, start) or (default_size,))[0]
        batch = batch_size_at(cfg.train_batch_sizes, start, cfg.batch_size)
        if not out or out[-1][1:] != (size, batch):
            out.append((start, size, batch))
    return out


def time_steps(model, optimizer, x, y, steps: int, bf16: bool, cfg) -> tuple:
    """Mean milliseconds of forward + backward and of the optimiser step (with the recipe's
    gradient clipping, as training does it) over ``steps`` steps."""
    fwd_bwd = opt = 0.0
    model.train()
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)
        loss.backward()
        t1 = time.perf_counter()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        fwd_bwd += t1 - t0
        opt += t2 - t1
    return fwd_bwd / steps * 1e3, opt / steps * 1e3


def time_phase(cfg, size, batch, precision, steps, repeats, warmup) -> dict:
    torch.manual_seed(0)
    model = create_model(cfg.model, num_classes=200, **cfg.model_overrides)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # A small rate keeps repeated steps on one batch from driving the weights anywhere odd; the
    # step's cost does not depend on it.
    optimizer = make_optimizer(
        model,
        cfg.optimizer,
        1e-4,
        cfg.weight_decay,
        precision=precision,
        muon_exact=cfg.muon_exact,
        muon_polynomials=cfg.muon_polynomials,
    )
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 200, (batch,))
    bf16 = precision == "bf16-mixed"
    variants = {"recipe": True}
    if bf16:
        variants["depthwise_bf16"] = False
    times = {name: ([], []) for name in variants}

    def run(name: str, n: int) -> tuple:
        setting = layers.FP32_DEPTHWISE_ON_CPU
        layers.FP32_DEPTHWISE_ON_CPU = variants[name]
        try:
            return time_steps(model, optimizer, x, y, n, bf16, cfg)
        finally:
            layers.FP32_DEPTHWISE_ON_CPU = setting

    for name in variants:
        run(name, warmup)
    for _ in range(repeats):
        for name in variants:
            a, b = run(name, steps)
            times[name][0].append(a)
            times[name][1].append(b)
    row = {"size": size, "batch": batch}
    for name, (fb, op) in times.items():
        step = median([a + b for a, b in zip(fb, op)])
        row[name] = {
            "forward_backward_ms": median(fb),
            "optimizer_ms": median(op),
            "step_ms": step,
            "images_per_second": batch / step * 1e3,
        }
    if bf16:  # above 1: bf16 depthwise projections make the step slower
        row["depthwise_bf16_slowdown"] = row["depthwise_bf16"]["step_ms"] / row["recipe"]["step_ms"]
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cpu_30min", help="recipe name or YAML path")
    p.add_argument(
        "--precision", default=None, help="32 or bf16-mixed (default: the recipe's, as resolved)"
    )
    p.add_argument("--steps", type=int, default=5, help="steps per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--max-batch", type=int, default=None, help="cap every batch (smoke runs)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    cfg = make_config(args.config)
    precision, why = resolve_precision(args.precision or cfg.precision, "cpu")
    if precision not in ("32", "bf16-mixed"):
        p.error(f"--precision must be 32 or bf16-mixed on a CPU, got {precision!r}")
    threads = torch.get_num_threads()
    print(f"{args.config}: {cfg.model}, {cfg.optimizer}, {precision} ({why}), {threads} threads")
    rows = []
    for start, size, batch in phases(cfg):
        batch = min(batch, args.max_batch or batch)
        row = time_phase(cfg, size, batch, precision, args.steps, args.repeats, args.warmup)
        row["from_epoch"] = start
        rows.append(row)
        r = row["recipe"]
        line = (
            f"epoch {start:>4} on: {size:3d} px, batch {batch:4d}  forward+backward "
            f"{r['forward_backward_ms']:7.1f} ms  optimiser {r['optimizer_ms']:6.1f} ms  "
            f"step {r['step_ms']:7.1f} ms  {r['images_per_second']:6.0f} img/s"
        )
        if "depthwise_bf16" in row:
            line += (
                f"  | depthwise in bf16: step {row['depthwise_bf16']['step_ms']:7.1f} ms, "
                f"{row['depthwise_bf16_slowdown']:.2f}x"
            )
        print(line)
    payload = {
        "config": str(args.config),
        "precision": precision,
        "precision_reason": why,
        "threads": threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "phases": rows,
    }
    if not args.no_write:
        print(write_result("recipe-step", payload))
    return payload


if __name__ == "__main__":
    main()
