"""Helpers shared by the benchmarks: machine description, timing, result files."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from cvtlab.machine import describe_machine

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
TINY_ZIP = REPO.parent / "shared" / "data" / "tiny-imagenet-200.zip"


def machine() -> dict:
    return {**describe_machine(), "torch_threads": torch.get_num_threads()}


def machine_tag(info: dict | None = None) -> str:
    """The result file's machine: the GPU's name, or the core count with the CPU's vendor, family
    and model number (``cpu-2core-amd-f25m1``), so that CPUs of one name but different speeds
    (AMD Zen 3 and Zen 4 are both "AMD EPYC") do not overwrite each other's figures. ``info`` is
    the machine's description, made here when not given."""
    info = info or describe_machine()
    if info.get("gpu"):
        return "gpu-" + _slug(info["gpu"])
    tag = f"cpu-{info['cores']}core"
    if "cpu_family" in info and "cpu_model" in info:
        vendor = info.get("cpu_vendor", "cpu")
        vendor = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(vendor) or _slug(vendor)
        tag += f"-{vendor}-f{info['cpu_family']}m{info['cpu_model']}"
    return tag


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def timed(fn, sync=None) -> float:
    if sync:
        sync()
    t = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def make_train_step(
    fn: Callable[[torch.Tensor], torch.Tensor],
    module: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: torch.dtype | None = None,
) -> Callable[[], None]:
    """One training step on a fixed batch: forward (under autocast to ``amp`` if given),
    cross-entropy, backward, fused AdamW. The same step for every implementation timed."""
    opt = torch.optim.AdamW(module.parameters(), 1e-4, fused=True)
    device = x.device.type

    def step() -> None:
        module.train()
        with torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(fn(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()  # described once, for the file's name and its contents
    path = RESULTS / f"{name}-{machine_tag(info)}.json"
    path.write_text(json.dumps({"machine": info, **payload}, indent=2))
    return path
