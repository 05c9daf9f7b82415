"""What a result was measured on: the processor, the GPU and the library versions, recorded
beside every training run's metrics and every benchmark's figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# Instruction-set extensions that decide which dtype's matrix products are fast on a CPU (bf16
# needs avx512_bf16 or AMX; int8 inference needs VNNI): the CPU's name alone ("AMD EPYC") does
# not tell a Zen 3 without bf16 from a Zen 4 with it.
MATRIX_EXTENSIONS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def describe_machine() -> dict:
    """The CPU model (on Linux with its vendor, family, model number and the matrix-relevant
    instruction-set extensions), its core count, the GPU's name where PyTorch sees one, and the
    versions of Python, PyTorch, Lightning and cvtlab."""
    import lightning

    from . import __version__

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cvtlab": __version__,
    }
    info.update(cpu_info())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> dict:
    """The first processor's entries of ``/proc/cpuinfo`` that tell CPUs apart; empty where the
    file is missing (macOS, Windows)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    info: dict = {}
    if fields.get("model name"):
        info["cpu"] = fields["model name"]
    if fields.get("vendor_id"):
        info["cpu_vendor"] = fields["vendor_id"]
    for key, name in (("cpu family", "cpu_family"), ("model", "cpu_model")):
        if fields.get(key, "").isdigit():
            info[name] = int(fields[key])
    if "flags" in fields:
        flags = set(fields["flags"].split())
        info["cpu_extensions"] = [ext for ext in MATRIX_EXTENSIONS if ext in flags]
    return info
