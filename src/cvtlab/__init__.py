"""cvtlab: Convolutional vision Transformers (CvT) — models, layer tables, data and training."""

from .errors import CvtLabError
from .evaluation import evaluate
from .models import CvT, CvTConfig, create_model, from_pretrained, list_models
from .models.pretrained import save_weights
from .prediction import predict

__version__ = "0.1.0"

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
