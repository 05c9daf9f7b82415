"""AdamW step time, per-op (foreach) against fused, on a registered model's parameters.

    python benchmarks/optimizer.py                       # cvt_xs_64 and cvt_13_64
    python benchmarks/optimizer.py --models cvt_xs_64 --steps 20

The training module uses the fused AdamW; this is the measurement behind that choice. Steps are
timed interleaved (foreach, fused, foreach, …) on fixed random gradients, after warm-up; the
median per step is reported with the ratio. Writes benchmarks/results/optimizer-<machine>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, timed, write_result  # noqa: E402

from cvtlab.models.registry import create_model  # noqa: E402


def time_model(name: str, steps: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    params = list(create_model(name, num_classes=200).to(device).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    sync = torch.cuda.synchronize if device == "cuda" else None
    optimizers = {
        "foreach": torch.optim.AdamW(params, lr=1e-4, foreach=True),
        "fused": torch.optim.AdamW(params, lr=1e-4, fused=True),
    }
    times = {kind: [] for kind in optimizers}
    for opt in optimizers.values():  # warm-up: state allocation, first kernels
        for _ in range(3):
            opt.step()
    for _ in range(repeats):
        for kind, opt in optimizers.items():

            def run(opt=opt):
                for _ in range(steps):
                    opt.step()

            times[kind].append(timed(run, sync) / steps * 1e3)
    ms = {kind: median(t) for kind, t in times.items()}
    return {
        "parameters": sum(p.numel() for p in params),
        "foreach_ms": ms["foreach"],
        "fused_ms": ms["fused"],
        "speedup": ms["foreach"] / ms["fused"],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cvt_xs_64,cvt_13_64")
    p.add_argument("--steps", type=int, default=10, help="optimiser steps per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    results = {}
    for name in args.models.split(","):
        r = results[name] = time_model(name, args.steps, args.repeats, args.device)
        print(
            f"{name:12s} {r['parameters'] / 1e6:6.2f}M params  foreach {r['foreach_ms']:7.2f} ms"
            f"  fused {r['fused_ms']:7.2f} ms  {r['speedup']:.2f}x"
        )
    payload = {"device": args.device, "steps": args.steps, "repeats": args.repeats}
    payload["models"] = results
    if not args.no_write:
        print(write_result("optimizer", payload))
    return payload


if __name__ == "__main__":
    main()
