"""Named model configurations, ``create_model`` and ``list_models``.

Every name is also registered in timm, so ``timm.create_model("cvt_13")`` works after
``import cvtlab.models`` (or the first use of ``cvtlab.create_model``).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, fields
from typing import Any

from timm.models import register_model as _timm_register
from torch import nn

from ..errors import CvtLabError
from .cvt import CvT, CvTConfig, check_img_size
from .seed import SeedConfig, SeedCvT

_CVT_13 = CvTConfig()
_CVT_21 = CvTConfig(depths=(1, 4, 16))
# A stride-2 stem for 64-px inputs leaves 32×32, 16×16 and 8×8 token grids instead of the
# 16/8/4 that the ImageNet stem would; the 7×7 kernel keeps official weights loadable.
_STEM_64 = dict(patch_strides=(2, 2, 2), patch_paddings=(3, 1, 1), num_classes=200, img_size=64)

MODEL_CONFIGS: dict[str, CvTConfig | SeedConfig] = {
    "cvt_13": _CVT_13,
    "cvt_21": _CVT_21,
    "cvt_w24": CvTConfig(
        dims=(192, 768, 1024),
        heads=(3, 12, 16),
        depths=(2, 2, 20),
        drop_path_rates=(0.0, 0.0, 0.3),
        img_size=384,
    ),
    "cvt_13_64": CvTConfig(**{**asdict(_CVT_13), **_STEM_64}),
    "cvt_21_64": CvTConfig(**{**asdict(_CVT_21), **_STEM_64}),
    # A narrow, shallow CvT for CPU budgets: the ImageNet stride-4 stem (16/8/4 grids at
    # 64 px) and a third of CvT-13's depth; about 0.1 GMACs per 64-px image. Trained from
    # scratch only, so it uses exact GELU: one fused kernel each way, where QuickGELU's
    # sigmoid-and-multiplies cost about a fifth of a CPU training step (RESULTS.md, attempt 7).
    "cvt_xs_64": CvTConfig(
        act_layer="gelu",
        dims=(64, 128, 256),
        heads=(1, 2, 4),
        depths=(1, 2, 4),
        drop_path_rates=(0.0, 0.0, 0.05),
        num_classes=200,
        img_size=64,
    ),
    "cvt_seed": SeedConfig(),
}

DESCRIPTIONS = {
    "cvt_13": "official CvT-13, ImageNet stem (stride 4), 224 px",
    "cvt_21": "official CvT-21, ImageNet stem (stride 4), 224 px",
    "cvt_w24": "official CvT-W24, ImageNet stem (stride 4), 384 px",
    "cvt_13_64": "CvT-13 with a stride-2 stem for 64-px images (32/16/8 grids)",
    "cvt_21_64": "CvT-21 with a stride-2 stem for 64-px images (32/16/8 grids)",
    "cvt_xs_64": "small CvT (64/128/256 wide, 1/2/4 deep, stride-4 stem) for 64 px on a CPU budget",
    "cvt_seed": "the seed notebook's model, made to run (64-px, 2 blocks of 64 wide)",
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(MODEL_CONFIGS)


def get_config(name: str, **overrides: Any) -> CvTConfig | SeedConfig:
    """The named configuration with ``overrides`` applied (unknown keys are an error).

    ``drop_path_rate=x`` (a number) sets the last stage's stochastic depth, as the official
    recipes do; ``drop_path_rates`` sets every stage.
    """
    if name not in MODEL_CONFIGS:
        close = difflib.get_close_matches(name, MODEL_CONFIGS, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CvtLabError(f"unknown model {name!r}{hint} (available: {', '.join(MODEL_CONFIGS)})")
    base = MODEL_CONFIGS[name]
    values = asdict(base)
    if "drop_path_rate" in overrides and isinstance(base, CvTConfig):
        rate = float(overrides.pop("drop_path_rate"))
        values["drop_path_rates"] = (0.0,) * (len(base.dims) - 1) + (rate,)
    known = {f.name for f in fields(base)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise CvtLabError(
            f"model {name} has no option {', '.join(unknown)} (options: {', '.join(sorted(known))})"
        )
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    return type(base)(**values)


def build_model(cfg: CvTConfig | SeedConfig, name: str = "model") -> nn.Module:
    check_img_size(cfg.img_size, cfg.total_stride, name)
    return CvT(cfg) if isinstance(cfg, CvTConfig) else SeedCvT(cfg)


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    pretrained: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model.

    ``num_classes`` and ``img_size`` default to the config's own (1000 classes at 224 px for the
    official CvTs, 200 classes at 64 px for the 64-px variants and ``cvt_seed``). ``pretrained``
    is a checkpoint source as accepted by :func:`cvtlab.from_pretrained`; its weights are loaded
    into this architecture (the head is replaced when ``num_classes`` differs).
    """
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if img_size is not None:
        overrides["img_size"] = img_size
    cfg = get_config(name, **overrides)
    model = build_model(cfg, name)
    model.model_name = name
    if pretrained:
        from .pretrained import load_pretrained_into

        load_pretrained_into(model, pretrained)
    return model


def _register_in_timm(name: str) -> None:
    def entrypoint(pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        if pretrained is True:
            raise CvtLabError(f"{name}: pass a checkpoint path or hub id as pretrained, not True")
        return create_model(name, pretrained=pretrained or None, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    _timm_register(entrypoint)


for _name in MODEL_CONFIGS:
    _register_in_timm(_name)
