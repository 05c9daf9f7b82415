"""The recipes' ``augment:`` section as plain data, with its checks. Apart from the kernels in
``augment.py`` so that importing the recipe module (``train/config.py``), as the CLI does to build
its parser, needs neither torch nor torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CvtLabError


@dataclass
class AugmentConfig:
    """Training augmentation as plain data (the recipes' ``augment:`` section)."""

    crop: str = "pad"  # "pad": pad + random crop; "rrc": random resized crop; "none"
    crop_padding: int = 4  # for "pad": up to this many pixels of shift (reflection padding)
    rrc_scale: tuple[float, float] = (0.35, 1.0)
    flip: bool = True
    auto_augment: str | None = "trivial"  # "trivial", "rand", or None
    rand_magnitude: int = 9
    group_size: int = 8  # samples sharing one sampled auto-augment operation
    random_erase: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mix_prob: float = 1.0
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if self.crop not in ("pad", "rrc", "none"):
            raise CvtLabError(f"augment.crop must be pad, rrc or none, not {self.crop!r}")
        if self.auto_augment not in (None, "trivial", "rand"):
            raise CvtLabError(
                f"augment.auto_augment must be trivial, rand or null, not {self.auto_augment!r}"
            )
        scale = self.rrc_scale
        if not is_pair_of_numbers(scale) or not 0 < scale[0] <= scale[1] <= 1:
            raise CvtLabError(
                f"augment.rrc_scale must be [smallest, largest] shares of the image in (0, 1], "
                f"like [0.35, 1.0], not {scale!r}"
            )
        self.rrc_scale = tuple(scale)
        ranges = {
            "crop_padding": (0, None),
            "rand_magnitude": (0, 30),  # RandAugment's 31 magnitude bins
            "group_size": (1, None),
            "random_erase": (0, 1),
            "mixup": (0, None),  # a Beta distribution's alpha; 0: off
            "cutmix": (0, None),
            "mix_prob": (0, 1),
            "label_smoothing": (0, 1),
        }
        for key, (low, high) in ranges.items():
            value = getattr(self, key)
            if value < low or (high is not None and value > high):
                bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
                raise CvtLabError(f"augment.{key} must be {bound}, not {value!r}")


def is_pair_of_numbers(value) -> bool:
    """Two real numbers, as a recipe's YAML list or a tuple (booleans and strings are not)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
