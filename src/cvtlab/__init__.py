"""cvtlab: Convolutional vision Transformers (CvT) — models, layer tables, data and training.

The public names load on first use, so that ``cvtlab --help`` and a mistyped flag answer without
waiting seconds for torch, torchvision and timm to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CvtLabError

if TYPE_CHECKING:
    from .evaluation import evaluate
    from .models import CvT, CvTConfig, create_model, from_pretrained, list_models
    from .models.pretrained import save_weights
    from .prediction import predict

__version__ = "0.1.0"

# Each public name and the module that defines it.
_HOMES = {
    "CvT": ".models",
    "CvTConfig": ".models",
    "create_model": ".models",
    "evaluate": ".evaluation",
    "from_pretrained": ".models",
    "list_models": ".models",
    "predict": ".prediction",
    "save_weights": ".models.pretrained",
}

__all__ = [
    "CvT",
    "CvTConfig",
    "CvtLabError",
    "create_model",
    "evaluate",
    "from_pretrained",
    "list_models",
    "predict",
    "save_weights",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    try:  # a subpackage (`cvtlab.models`), as when this file imported them all
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise  # a dependency of that module is missing: say which
    raise AttributeError(f"module 'cvtlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
