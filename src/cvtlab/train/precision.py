"""``precision: auto``: pick the training precision that runs fastest on this machine.

bf16 autocast pays off only where the hardware multiplies bf16 faster than fp32. On CPUs that
differs from machine to machine: with AMX, bf16 products ran 6.4x the fp32 rate; on an AMD Zen 4
(AVX-512 bf16 dot products) 2.2x; on an AMD Zen 3 (no bf16 instructions) 0.01x; on an Intel Xeon
whose AMX the hypervisor hides, 0.55x, where the 30-minute recipe trained 0.6-0.7x as fast in
bf16 as in fp32 and lost four points of top-1 (benchmarks/RESULTS.md, attempts Z28 and Z29). So
on a CPU ``auto`` times one product in each dtype and chooses.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from ..models.token_linear import linear_on_tokens

# bf16 autocast adds casts and keeps some ops in fp32, so its products must be clearly faster
# before the step is: the machines measured sit at 0.01x, 0.55x, 2.2x and 6.4x.
BF16_MIN_SPEEDUP = 1.3
# Lightning starts DDP's other processes on a machine by re-running the command; they inherit
# the first process's environment, and with it its choice, so they all train in one precision.
_ENV = "CVTLAB_AUTO_PRECISION"
# AMD Zen 3 hosts (AVX2, no bf16 instructions) multiplied bf16 at 0.01x and at 0.09-0.12x the fp32
# rate; the slowest CPU with bf16 support measured, a Xeon with AMX hidden, at 0.55x. The bound
# sits between them with room on both sides, so that a probe's noise cannot flip the verdict.
BF16_EMULATED = 0.25
_DTYPES = (torch.float32, torch.bfloat16)


def _timed_rates(n: int, rounds: int) -> dict[torch.dtype, float]:
    # n tokens of width n in 16 images, through the product the models' linear layers use (in
    # fp32 that is oneDNN's on some CPUs, not MKL's: models/token_linear.py).
    pairs = {
        dt: (torch.randn(16, n // 16, n, dtype=dt), torch.randn(n, n, dtype=dt)) for dt in _DTYPES
    }
    for x, w in pairs.values():  # warm-up: the first calls pick and prepare the kernels
        linear_on_tokens(x, w)
        linear_on_tokens(x, w)
    times: dict[torch.dtype, list[float]] = {dt: [] for dt in _DTYPES}
    for _ in range(rounds):
        for dt, (x, w) in pairs.items():
            t = time.perf_counter()
            linear_on_tokens(x, w)
            times[dt].append(time.perf_counter() - t)
    return {dt: 2 * n**3 / statistics.median(ts) / 1e9 for dt, ts in times.items()}


def product_rates(n: int = 1024, rounds: int = 7) -> dict[torch.dtype, float]:
    """Median GFLOP/s of an n × n matrix product in fp32 and in bf16 on the CPU, timed in
    alternation so that a change in the machine's speed touches both alike (0.1-0.3 s).

    A 256² probe runs first. Where it finds bf16 under ``BF16_EMULATED`` of the fp32 rate (a
    CPU without bf16 instructions, where the library emulates them), its rates are returned:
    there the full measurement would take half a minute to confirm what the probe shows."""
    probe = _timed_rates(min(n, 256), rounds=3)
    if bf16_is_emulated(probe[torch.float32], probe[torch.bfloat16]):
        return probe
    return _timed_rates(n, rounds)


def bf16_is_emulated(fp32_rate: float, bf16_rate: float) -> bool:
    """Whether bf16 products run under ``BF16_EMULATED`` of the fp32 rate: a CPU without bf16
    instructions, where measuring or training in bf16 only costs time."""
    return bf16_rate < BF16_EMULATED * fp32_rate


def choose_cpu_precision(fp32_rate: float, bf16_rate: float) -> str:
    """``bf16-mixed`` where bf16 products run at least ``BF16_MIN_SPEEDUP`` × fp32's, else ``32``."""
    return "bf16-mixed" if bf16_rate >= BF16_MIN_SPEEDUP * fp32_rate else "32"


def choose_gpu_precision() -> str:
    """``bf16-mixed`` where the GPU supports bf16, else ``16-mixed``."""
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def _on_cuda(accelerator: str) -> bool:
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def resolve_precision(precision: str, accelerator: str = "auto") -> tuple[str, str]:
    """The Lightning precision to train with, and why: ``precision`` itself unless it is
    ``auto``. On a GPU ``auto`` is ``bf16-mixed`` where the card supports bf16, else
    ``16-mixed``; on a CPU it follows the measured product rates (``choose_cpu_precision``)."""
    if precision != "auto":
        return precision, "as configured"
    inherited = os.environ.get(_ENV)
    if inherited and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return inherited, "auto, chosen by the run's first process"
    if _on_cuda(accelerator):
        chosen = choose_gpu_precision()
        reason = f"auto on {torch.cuda.get_device_name(0)}"
    elif accelerator in ("cpu", "auto"):
        rates = product_rates()
        fp32, bf16 = rates[torch.float32], rates[torch.bfloat16]
        chosen = choose_cpu_precision(fp32, bf16)
        reason = f"auto: bf16 products at {bf16 / fp32:.2f}x the fp32 rate on this CPU"
    else:  # Apple's MPS and other backends: no measurement here, so the safe choice
        chosen, reason = "32", f"auto on accelerator {accelerator!r}"
    os.environ[_ENV] = chosen
    return chosen, reason


__all__ = [
    "BF16_EMULATED",
    "BF16_MIN_SPEEDUP",
    "bf16_is_emulated",
    "choose_cpu_precision",
    "choose_gpu_precision",
    "product_rates",
    "resolve_precision",
]
