"""Optimiser step time: AdamW per-op (foreach) against fused on a registered model's
parameters, and Muon's step weight by weight against same-shaped weights batched, and (in
fp32) with its faster forms for long and large weights (the Gram matrix, the singular values)
against the step without them, and against exact orthogonalisation (``muon_exact``).

    python benchmarks/optimizer.py                       # cvt_xs_64 and cvt_13_64; Muon on the
                                                         # cpu_30min recipe's model
    python benchmarks/optimizer.py --models cvt_xs_64 --steps 20 --muon-recipe none

The training module uses the fused AdamW and the batched Muon step; this is the measurement
behind those choices. Steps are timed interleaved (foreach, fused, foreach, …) on fixed random
gradients, after warm-up; the median per step is reported with the ratio. Muon is timed on its
own group (the weights it steps), with the orthogonalising products in fp32 and in bf16.
Writes benchmarks/results/optimizer-<machine>.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, timed, write_result  # noqa: E402

from cvtlab.models.registry import create_model  # noqa: E402
from cvtlab.train import muon  # noqa: E402
from cvtlab.train.config import make_config  # noqa: E402
from cvtlab.train.module import param_groups  # noqa: E402
from cvtlab.train.muon import MuonAdamW, orthogonalize  # noqa: E402
from cvtlab.train.precision import bf16_is_emulated, product_rates  # noqa: E402


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


@torch.no_grad()
def muon_step_per_weight(opt: MuonAdamW) -> None:
    """Muon's step one weight at a time: the loop MuonAdamW ran before it batched weights of one
    shape, kept here as the baseline (same state, same arithmetic)."""
    for group in opt.param_groups:
        lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            buf = opt.state[p]["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            matrix = p.grad.lerp(buf, momentum).flatten(1)
            update = orthogonalize(matrix, group["ns_steps"], opt.ns_dtype).view_as(p)
            p.mul_(1 - lr * decay)
            p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(matrix.shape)))


def muon_step_without(opt: MuonAdamW, *thresholds: str) -> None:
    """The batched step with the forms that ``orthogonalize`` takes past ``thresholds`` (names
    of its module constants) turned off: without ``SPECTRAL_FORM_MIN_ROWS`` large fp32 matrices
    go through their Gram matrix, without ``GRAM_FORM_MIN_ASPECT`` too through the plain
    iterations."""
    saved = {name: getattr(muon, name) for name in thresholds}
    try:
        for name in thresholds:
            setattr(muon, name, math.inf)
        opt.step()
    finally:
        for name, value in saved.items():
            setattr(muon, name, value)


def time_muon(recipe: str, steps: int, repeats: int, device: str) -> dict:
    """Muon's group of the recipe's model: weight by weight against batched by shape, with the
    products in fp32 and in bf16 (bf16 left out, with a note, on a CPU that emulates it)."""
    cfg = make_config(recipe)
    torch.manual_seed(0)
    model = create_model(cfg.model, num_classes=200, **cfg.model_overrides).to(device)
    group = param_groups(model, cfg.weight_decay, muon=True)[0]
    for p in group["params"]:
        p.grad = torch.randn_like(p)
    shapes = {tuple(sorted(p.flatten(1).shape)) for p in group["params"]}
    sync = torch.cuda.synchronize if device == "cuda" else None
    out = {"weights": len(group["params"]), "shapes": len(shapes)}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device == "cpu":
        # Without bf16 instructions (AMD Zen 3) the bf16 timings alone take most of a minute
        # and only confirm that fp32, the CPU default, is the dtype to use.
        rates = product_rates(256, rounds=3)
        fp32, bf16 = rates[torch.float32], rates[torch.bfloat16]
        if bf16_is_emulated(fp32, bf16):
            del dtypes["bf16"]
            out["bf16"] = {
                "note": f"not measured: bf16 products at {bf16 / fp32:.3f}x the fp32 rate "
                "(no bf16 instructions)"
            }
    for label, dtype in dtypes.items():
        opt = MuonAdamW([group], lr=1e-4, ns_dtype=dtype)
        runs = {"per_weight": lambda opt=opt: muon_step_per_weight(opt), "batched": opt.step}
        if dtype == torch.float32:  # the Gram and spectral forms are for fp32 only
            spectral, gram = "SPECTRAL_FORM_MIN_ROWS", "GRAM_FORM_MIN_ASPECT"
            runs["no_spectral_form"] = partial(muon_step_without, opt, spectral)
            runs["no_gram_form"] = partial(muon_step_without, opt, spectral, gram)
            runs["exact"] = MuonAdamW([group], lr=1e-4, exact=True).step
        opt.step()  # creates the momentum buffers the per-weight loop reads
        for _ in range(2):  # warm-up
            for run in runs.values():
                run()
        times = {kind: [] for kind in runs}
        for _ in range(repeats):
            for kind, run in runs.items():

                def many(run=run):
                    for _ in range(steps):
                        run()

                times[kind].append(timed(many, sync) / steps * 1e3)
        ms = {kind: median(t) for kind, t in times.items()}
        out[label] = {
            "per_weight_ms": ms["per_weight"],
            "batched_ms": ms["batched"],
            "speedup": ms["per_weight"] / ms["batched"],
        }
        for form in ("spectral", "gram"):  # the shipped step against the step without it
            if f"no_{form}_form" in ms:
                out[label][f"no_{form}_form_ms"] = ms[f"no_{form}_form"]
                out[label][f"{form}_form_speedup"] = ms[f"no_{form}_form"] / ms["batched"]
        if "exact" in ms:  # above 1: the exact step is the faster one
            out[label]["exact_ms"] = ms["exact"]
            out[label]["exact_speedup"] = ms["batched"] / ms["exact"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="cvt_xs_64,cvt_13_64")
    p.add_argument("--steps", type=int, default=10, help="optimiser steps per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--muon-recipe", default="cpu_30min", help="recipe whose model Muon is timed on; none: skip"
    )
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
    if args.muon_recipe != "none":
        m = payload["muon"] = time_muon(args.muon_recipe, args.steps, args.repeats, args.device)
        m["recipe"] = args.muon_recipe
        for label in ("fp32", "bf16"):
            r = m[label]
            if "note" in r:
                print(f"Muon ({args.muon_recipe}, {label}): {r['note']}")
                continue
            print(
                f"Muon ({args.muon_recipe}, {m['weights']} weights in {m['shapes']} shapes, {label})"
                f"  per weight {r['per_weight_ms']:7.2f} ms  batched {r['batched_ms']:7.2f} ms"
                f"  {r['speedup']:.2f}x"
            )
            for form, without in (("spectral", "the spectral form"), ("gram", "either form")):
                if f"no_{form}_form_ms" in r:
                    print(
                        f"Muon ({args.muon_recipe}, {label}) batched without {without}"
                        f" {r[f'no_{form}_form_ms']:7.2f} ms: {r[f'{form}_form_speedup']:.2f}x"
                    )
            if "exact_ms" in r:
                print(
                    f"Muon ({args.muon_recipe}, {label}) orthogonalised exactly"
                    f" {r['exact_ms']:7.2f} ms: {r['exact_speedup']:.2f}x the batched step's speed"
                )
    if not args.no_write:
        print(write_result("optimizer", payload))
    return payload


if __name__ == "__main__":
    main()
