"""Training-step and inference throughput of cvtlab's CvT against its peers at the same
architecture: Hugging Face ``transformers`` (CvtForImageClassification) and lucidrains'
``vit-pytorch`` (vit_pytorch.cvt.CvT).

    python benchmarks/throughput.py                # CPU, every model, writes results/throughput-<machine>.json
    python benchmarks/throughput.py --device cuda  # on a GPU
    python benchmarks/throughput.py --quick        # smoke test: tiny batch, one repeat

One process; every implementation is warmed up first, then timed interleaved (round-robin over
implementations, repeated), and the median is reported. A training step is forward, backward
and an AdamW step; inference is a forward pass under ``inference_mode`` (cvtlab-bf16: bf16
weights on bf16 inputs, training under bf16 autocast; cvtlab-bf16-compiled: that bf16 model
compiled for inference, ``cvtlab.inference.CompiledForInference``, timed in inference only,
on a CPU by default; cvtlab-compiled: the fp32 model compiled the same way, run by default in
its place on a CPU without bf16 instructions, where fp32 is the fastest dtype). GFLOP/s count 2
FLOPs per multiply-accumulate (cvtlab's layer table, attention included; a training step ≈ 3×
forward) and are shown as a share of the matrix-multiply rate measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_train_step, median, timed, write_result  # noqa: E402

import cvtlab  # noqa: E402
from cvtlab.inference import CompiledForInference  # noqa: E402
from cvtlab.models import token_linear  # noqa: E402
from cvtlab.models.token_linear import linear_on_tokens  # noqa: E402
from cvtlab.summary import summarize  # noqa: E402
from cvtlab.train.precision import (  # noqa: E402
    bf16_is_emulated,
    choose_cpu_precision,
    choose_gpu_precision,
)


@dataclass
class Case:
    key: str
    model: str
    img_size: int
    batch: int
    overrides: dict


CASES = [
    Case("cvt_seed@64", "cvt_seed", 64, 128, {}),
    Case("cvt_13@64", "cvt_13", 64, 128, {}),
    Case("cvt_xs_64@64", "cvt_xs_64", 64, 128, {}),
    Case("cvt_13@224", "cvt_13", 224, 16, {}),
]


# Settings timed in inference only (their training step is another implementation's).
INFERENCE_ONLY = {"cvtlab-compiled", "cvtlab-bf16-compiled"}
KNOWN_IMPLS = (
    "cvtlab",
    "cvtlab-compiled",
    "cvtlab-bf16",
    "cvtlab-bf16-compiled",
    "transformers",
    "vit-pytorch",
)
DEFAULT_IMPLS = {
    "cpu": "cvtlab,cvtlab-bf16,cvtlab-bf16-compiled,transformers,vit-pytorch",
    # Not on a GPU by default: its compile time there is unmeasured, and the GPU script gives
    # the whole throughput step 240 s.
    "cuda": "cvtlab,cvtlab-bf16,transformers,vit-pytorch",
}


def default_impls(device: str, bf16_emulated: bool) -> list[str]:
    """The implementations timed without ``--impls``. On a CPU without bf16 instructions fp32 is
    the fastest dtype, so the best inference setting there is the fp32 model compiled."""
    impls = DEFAULT_IMPLS[device].split(",")
    if device == "cpu" and bf16_emulated:
        impls.insert(impls.index("cvtlab") + 1, "cvtlab-compiled")
    return impls


def matmul_rate(device: str, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n product, on a CPU as cvtlab's linear layers compute it: n tokens of
    width n in 16 images, through oneDNN in fp32 where MKL's fp32 products are the slower."""
    a = torch.randn(16, n // 16, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else None
    linear_on_tokens(a, b)
    times = [timed(lambda: linear_on_tokens(a, b), sync) for _ in range(reps)]
    return 2 * n**3 / median(times) / 1e9


def hf_model(cfg, num_classes: int):
    from transformers import CvtConfig, CvtForImageClassification

    n = len(cfg.dims)
    hf = CvtForImageClassification(
        CvtConfig(
            num_labels=num_classes,
            embed_dim=list(cfg.dims),
            depth=list(cfg.depths),
            num_heads=list(cfg.heads),
            patch_sizes=list(cfg.patch_sizes),
            patch_stride=list(cfg.patch_strides),
            patch_padding=list(cfg.patch_paddings),
            stride_kv=list(cfg.stride_kv),
            mlp_ratio=list(cfg.mlp_ratios),
            drop_path_rate=[0.0] * n,
            cls_token=[False] * (n - 1) + [cfg.cls_token],
        )
    )
    return lambda x: hf(x).logits, hf


def vit_pytorch_model(cfg, num_classes: int):
    from vit_pytorch.cvt import CvT

    # vit-pytorch's CvT: same stage widths, depths, heads, embedding kernels/strides and kv
    # stride; it differs in details it cannot express (qkv by depthwise+pointwise conv, no
    # class token, 64-wide heads), so it is the closest, not an identical, network.
    kw = {"num_classes": num_classes}
    for i, s in enumerate(("s1", "s2", "s3")):
        kw.update(
            {
                f"{s}_emb_dim": cfg.dims[i],
                f"{s}_emb_kernel": cfg.patch_sizes[i],
                f"{s}_emb_stride": cfg.patch_strides[i],
                f"{s}_heads": cfg.heads[i],
                f"{s}_depth": cfg.depths[i],
                f"{s}_kv_proj_stride": cfg.stride_kv[i],
                f"{s}_mlp_mult": int(cfg.mlp_ratios[i]),
            }
        )
    m = CvT(**kw)
    return m, m


def build(impl: str, case: Case, device: str):
    """(callable, module, autocast dtype or None, note)"""
    if impl.startswith("cvtlab"):
        # Exact GELU and no stochastic depth: the peers are built that way (transformers with
        # drop_path_rate 0, vit-pytorch has none), so every implementation runs the same network.
        over = dict(case.overrides)
        if case.model != "cvt_seed":
            over.update(act_layer="gelu", drop_path_rate=0.0)
        m = cvtlab.create_model(case.model, num_classes=200, img_size=case.img_size, **over)
        m = m.to(device)
        amp = torch.bfloat16 if impl.startswith("cvtlab-bf16") else None
        return m, m, amp, ""
    cfg = cvtlab.models.get_config(case.model, num_classes=200, img_size=case.img_size)
    if case.model == "cvt_seed":
        raise NotImplementedError(
            "cannot express the seed notebook's block (shared conv projection, nn.MultiheadAttention)"
        )
    if impl == "transformers":
        fn, m = hf_model(cfg, 200)
        return fn, m.to(device), None, ""
    if impl == "vit-pytorch":
        fn, m = vit_pytorch_model(cfg, 200)
        return fn, m.to(device), None, "closest, not identical (see source)"
    raise ValueError(impl)


def run_case(case: Case, impls: list[str], device: str, repeats: int, warmup: int) -> dict:
    x = torch.randn(case.batch, 3, case.img_size, case.img_size, device=device)
    y = torch.randint(0, 200, (case.batch,), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    runners, notes = {}, {}
    for impl in impls:
        try:
            fn, module, amp, note = build(impl, case, device)
        except (NotImplementedError, ModuleNotFoundError) as e:
            notes[impl] = f"not measured: {e}"
            continue
        # A compiled model is an inference setting: its training step is the eager model's.
        compiled = impl in INFERENCE_ONLY
        train_step = None if compiled else make_train_step(fn, module, x, y, amp)

        if amp is None and not compiled:

            def infer(fn=fn, module=module):
                module.eval()
                with torch.inference_mode():
                    fn(x)
        else:
            # cvtlab's bf16 inference runs bf16 weights on bf16 inputs (as `cvtlab eval
            # --precision bf16` does): autocast would cast every weight on every call. A compiled
            # model freezes its own copy of the weights.
            model = copy.deepcopy(module).eval()
            model, xm = (model.to(amp), x.to(amp)) if amp else (model, x)
            if compiled:
                model = CompiledForInference(model, case.batch)

            def infer(model=model, xm=xm):
                with torch.inference_mode():
                    model(xm)

        for _ in range(warmup):
            if train_step:
                train_step()
            infer()
        runners[impl] = (train_step, infer)
        notes[impl] = note
    times = {impl: {"train": [], "infer": []} for impl in runners}
    for _ in range(repeats):
        for impl, (train_step, infer) in runners.items():
            if train_step:
                times[impl]["train"].append(timed(train_step, sync))
            times[impl]["infer"].append(timed(infer, sync))
    out = {}
    for impl, t in times.items():
        out[impl] = {"infer_images_per_s": case.batch / median(t["infer"])}
        if t["train"]:
            out[impl]["train_images_per_s"] = case.batch / median(t["train"])
    for impl, note in notes.items():
        out.setdefault(impl, {})["note"] = note
    return out


def peak_memory_per_image(case: Case, impl: str, device: str) -> float | None:
    """Peak memory of one training step (forward + backward) per image, in MiB (GPU: allocator
    peak; CPU: peak RSS above the RSS before the step, in a fresh process)."""
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        try:
            fn, module, amp, _ = build(impl, case, device)
        except (NotImplementedError, ModuleNotFoundError):
            return None
        x = torch.randn(case.batch, 3, case.img_size, case.img_size, device=device)
        y = torch.randint(0, 200, (case.batch,), device=device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(fn(x).float(), y)
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - base
        del fn, module, x, y, loss
        return peak / case.batch / 2**20
    import json
    import subprocess

    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM), so the peak measured after the
    # step belongs to the step, not to imports and model construction.
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "import throughput as t, torch, torch.nn.functional as F;"
        "torch.set_num_threads(2);"
        "case = t.Case(**json.loads(sys.argv[2])); fn, m, amp, _ = t.build(sys.argv[3], case, 'cpu');"
        "x = torch.randn(case.batch, 3, case.img_size, case.img_size); y = torch.randint(0, 200, (case.batch,));"
        "kb = lambda key: int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]);"
        "open('/proc/self/clear_refs', 'w').write('5'); base = kb('VmRSS:');"
        "ctx = torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp is not None);"
        "ctx.__enter__(); loss = F.cross_entropy(fn(x).float(), y); ctx.__exit__(None, None, None); loss.backward();"
        "print((kb('VmHWM:') - base) / 1024 / case.batch)"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(Path(__file__).resolve().parent),
            json.dumps(case.__dict__),
            impl,
        ],
        capture_output=True,
        text=True,
    )
    try:
        return float(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cases", default=",".join(c.key for c in CASES))
    p.add_argument(
        "--impls",
        help="default: cvtlab,cvtlab-bf16,transformers,vit-pytorch, and on a CPU also "
        "cvtlab-bf16-compiled (inference only; compiling takes about a minute per model), "
        "or cvtlab-compiled where the CPU has no bf16 instructions",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-scale", type=float, default=1.0, help="multiply every case's batch")
    p.add_argument(
        "--memory", action="store_true", help="also measure peak training memory per image"
    )
    p.add_argument(
        "--memory-only", action="store_true", help="only peak memory (writes throughput-memory-…)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: batch 4, one repeat, cvt_seed and CvT-13 at 64 px only",
    )
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2 if args.quick else 64)))
    cases = [c for c in CASES if c.key in args.cases.split(",")]
    if args.quick:
        cases = [
            Case(c.key, c.model, c.img_size, 4, c.overrides) for c in cases if c.img_size == 64
        ][:2]
        args.repeats, args.warmup = 1, 1
    if args.batch_scale != 1.0:
        cases = [
            Case(c.key, c.model, c.img_size, max(1, int(c.batch * args.batch_scale)), c.overrides)
            for c in cases
        ]
    asked = args.impls.split(",") if args.impls else None
    for impl in asked or []:
        if impl not in KNOWN_IMPLS:
            p.error(f"--impls: unknown implementation {impl!r} (known: {', '.join(KNOWN_IMPLS)})")
    dev = args.device
    n = 512 if args.quick else 2048
    rates = {"fp32": matmul_rate(dev, torch.float32, n)}
    # Without bf16 instructions (AMD Zen 3: under 1 GFLOP/s) one 2,048² bf16 product takes
    # 20 s and a bf16 training step minutes, so a small probe settles it and bf16 is not run.
    rates["bf16"] = matmul_rate(dev, torch.bfloat16, 256, reps=3)
    emulated = bf16_is_emulated(rates["fp32"], rates["bf16"])
    impls = asked or default_impls(dev, emulated)
    skipped = {}
    for impl in [i for i in impls if i.startswith("cvtlab-bf16") and emulated]:
        impls.remove(impl)
        skipped[impl] = {
            "note": f"not measured: bf16 products at {rates['bf16'] / rates['fp32']:.3f}x "
            "the fp32 rate (no bf16 instructions)"
        }
        print(f"{impl}: {skipped[impl]['note']}")
    if args.memory_only:
        trained = [i for i in impls if i not in INFERENCE_ONLY]
        mem = {c.key: {i: peak_memory_per_image(c, i, dev) for i in trained} for c in cases}
        print(f"peak training memory per image (MiB), forward + backward, {dev}")
        for key, row in mem.items():
            hf = row.get("transformers")
            print(
                f"{key:<14} "
                + "  ".join(
                    f"{i} {v:.2f}" + (f" ({v / hf:.2f}×HF)" if hf and v else "")
                    for i, v in row.items()
                    if v is not None
                )
            )
        if not args.no_write:
            print(
                write_result(
                    "throughput-memory",
                    {
                        "device": dev,
                        "batches": {c.key: c.batch for c in cases},
                        "peak_mib_per_image": mem,
                        "notes": {impl: v["note"] for impl, v in skipped.items()},
                    },
                )
            )
        return {"peak_mib_per_image": mem, "notes": {i: v["note"] for i, v in skipped.items()}}
    if not emulated:
        rates["bf16"] = matmul_rate(dev, torch.bfloat16, n)
    fp32_products = "oneDNN" if token_linear.ONEDNN_FP32_PRODUCTS else "MKL"
    print(
        f"device {dev}: measured matmul rate fp32 {rates['fp32']:.0f} GFLOP/s"
        + (f" (cvtlab's linear layers through {fp32_products})" if dev == "cpu" else "")
        + f", bf16 {rates['bf16']:.0f} GFLOP/s"
    )
    results = {}
    for case in cases:
        with torch.device("meta"):
            macs = summarize(
                cvtlab.create_model(case.model, num_classes=200, img_size=case.img_size)
            )["total_macs"]
        gflop_fwd = 2 * macs / 1e9
        res = run_case(case, impls, dev, args.repeats, args.warmup) | skipped
        if args.memory:
            for impl in res:
                if "train_images_per_s" in res[impl]:
                    res[impl]["train_peak_mib_per_image"] = peak_memory_per_image(case, impl, dev)
        results[case.key] = {
            "batch": case.batch,
            "gflop_forward_per_image": gflop_fwd,
            "impls": res,
        }
        base = res.get("transformers", {})
        print(f"\n{case.key}  batch {case.batch}  {gflop_fwd:.3f} GFLOP/image forward")
        print(
            f"{'impl':<20} {'train img/s':>11} {'×HF':>6} {'infer img/s':>11} {'×HF':>6} "
            f"{'train GFLOP/s':>13} {'% of mm':>8}  {'MiB/img':>8}"
        )
        for impl, r in res.items():
            if "infer_images_per_s" not in r:
                print(f"{impl:<20} {r.get('note', '')}")
                continue
            inf = r["infer_images_per_s"]
            r["infer_vs_transformers"] = (
                inf / base["infer_images_per_s"] if "infer_images_per_s" in base else float("nan")
            )
            train = f"{'—':>11} {'—':>6}"
            rate = f"{'—':>13} {'—':>8}"
            if "train_images_per_s" in r:
                tr = r["train_images_per_s"]
                gflops = 3 * gflop_fwd * tr
                peak = rates["bf16"] if impl.startswith("cvtlab-bf16") else rates["fp32"]
                r.update(
                    train_vs_transformers=(
                        tr / base["train_images_per_s"]
                        if "train_images_per_s" in base
                        else float("nan")
                    ),
                    train_gflops=gflops,
                    train_share_of_matmul=gflops / peak,
                )
                train = f"{tr:>11.1f} {r['train_vs_transformers']:>6.2f}"
                rate = f"{gflops:>13.1f} {100 * gflops / peak:>7.1f}%"
            mem = r.get("train_peak_mib_per_image")
            print(
                f"{impl:<20} {train} {inf:>11.1f} {r['infer_vs_transformers']:>6.2f} {rate}  "
                f"{mem if mem is not None else float('nan'):>8.2f}  {r.get('note', '')}"
            )
        ours = {
            i: r for i, r in res.items() if i.startswith("cvtlab") and "infer_images_per_s" in r
        }
        trained = [i for i in ours if "train_images_per_s" in ours[i]]
        if "train_images_per_s" in base and len(ours) > 1 and trained:
            best_train = max(trained, key=lambda i: ours[i]["train_vs_transformers"])
            best_infer = max(ours, key=lambda i: ours[i]["infer_vs_transformers"])
            results[case.key]["best"] = {"train": best_train, "infer": best_infer}
            print(
                f"best setting here: train {best_train} "
                f"({ours[best_train]['train_vs_transformers']:.2f}×HF), "
                f"infer {best_infer} ({ours[best_infer]['infer_vs_transformers']:.2f}×HF)"
            )
    # What `precision: auto` would train with on this machine, from this run's own rates.
    auto = (
        choose_cpu_precision(rates["fp32"], rates["bf16"])
        if dev == "cpu"
        else choose_gpu_precision()
    )
    print(f"precision auto here: {auto}")
    payload = {
        "device": dev,
        "auto_precision": auto,
        "matmul_gflops": rates,
        "fp32_linear_products": fp32_products if dev == "cpu" else "cuBLAS",
        "repeats": args.repeats,
        "cases": results,
        "threads": torch.get_num_threads(),
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if not args.no_write and not args.quick:
        print(write_result("throughput", payload))
    return payload


if __name__ == "__main__":
    main()
