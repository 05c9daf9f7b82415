"""What a result was measured on: the processor, the GPU and the library versions, recorded
beside every training run's metrics and every benchmark's figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def describe_machine() -> dict:
    """The CPU model, its core count, the GPU's name where PyTorch sees one, and the versions
    of Python, PyTorch, Lightning and cvtlab."""
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
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info
