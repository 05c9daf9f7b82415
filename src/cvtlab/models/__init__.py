"""CvT models: building blocks, the CvT family, the seed notebook's model and their registry."""

from .cvt import CvT, CvTConfig
from .pretrained import from_pretrained, load_state_dict_file
from .registry import create_model, get_config, list_models
from .seed import SeedConfig, SeedCvT

__all__ = [
    "CvT",
    "CvTConfig",
    "SeedConfig",
    "SeedCvT",
    "create_model",
    "from_pretrained",
    "get_config",
    "list_models",
    "load_state_dict_file",
]
