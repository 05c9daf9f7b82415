"""The Convolutional vision Transformer (Wu et al., ICCV 2021).

Three stages, each a convolutional token embedding followed by pre-norm blocks whose attention
sees conv-projected queries, keys and values. No position embedding; a class token only in the
last stage. The head is LayerNorm(class token) → Linear, or LayerNorm → mean over tokens when the
last stage has no class token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from einops import rearrange
from timm.layers import trunc_normal_
from torch import nn

from ..errors import CvtLabError
from .layers import Block, ConvEmbed, act_layer_from_name


@dataclass(frozen=True)
class CvTConfig:
    """Everything that fixes a CvT's architecture, as plain data (one entry per stage in tuples)."""

    dims: tuple[int, ...] = (64, 192, 384)
    depths: tuple[int, ...] = (1, 2, 10)
    heads: tuple[int, ...] = (1, 3, 6)
    patch_sizes: tuple[int, ...] = (7, 3, 3)
    patch_strides: tuple[int, ...] = (4, 2, 2)
    patch_paddings: tuple[int, ...] = (2, 1, 1)
    stride_kv: tuple[int, ...] = (2, 2, 2)
    stride_q: tuple[int, ...] = (1, 1, 1)
    kernel_qkv: tuple[int, ...] = (3, 3, 3)
    mlp_ratios: tuple[float, ...] = (4.0, 4.0, 4.0)
    drop_path_rates: tuple[float, ...] = (0.0, 0.0, 0.1)
    qkv_bias: bool = True
    # One conv projection and one linear layer for keys and values (and queries where their
    # stride matches): not the official architecture, faster on small grids (ConvAttention).
    shared_projection: bool = False
    cls_token: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    act_layer: str = "quick_gelu"
    num_classes: int = 1000
    img_size: int = 224
    in_chans: int = 3

    def __post_init__(self) -> None:
        per_stage = [f.name for f in fields(self) if f.type.startswith("tuple")]
        n = len(self.dims)
        for name in per_stage:
            value = getattr(self, name)
            if len(value) != n:
                raise CvtLabError(f"config field {name} has {len(value)} entries for {n} stages")
            object.__setattr__(self, name, tuple(value))
        for dim, heads in zip(self.dims, self.heads):
            if dim % heads:
                raise CvtLabError(f"stage width {dim} is not divisible by its {heads} heads")
        act_layer_from_name(self.act_layer)

    @property
    def total_stride(self) -> int:
        return math.prod(self.patch_strides)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> CvTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CvtLabError(f"unknown CvT config keys: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def check_img_size(img_size: int, total_stride: int, name: str = "model") -> None:
    if img_size <= 0 or img_size % total_stride:
        raise CvtLabError(
            f"image size {img_size} is not a positive multiple of {name}'s total stride {total_stride}"
        )


class CvTStage(nn.Module):
    def __init__(self, cfg: CvTConfig, i: int, in_chans: int):
        super().__init__()
        dim, depth = cfg.dims[i], cfg.depths[i]
        with_cls = cfg.cls_token and i == len(cfg.dims) - 1
        self.patch_embed = ConvEmbed(
            in_chans, dim, cfg.patch_sizes[i], cfg.patch_strides[i], cfg.patch_paddings[i]
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if with_cls else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        # Stochastic depth grows linearly within the stage, as in the official code.
        top = cfg.drop_path_rates[i]
        rates = [top * j / (depth - 1) if depth > 1 else 0.0 for j in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                dim,
                cfg.heads[i],
                mlp_ratio=cfg.mlp_ratios[i],
                act_layer=act_layer_from_name(cfg.act_layer),
                drop=cfg.drop_rate,
                drop_path=rate,
                qkv_bias=cfg.qkv_bias,
                kernel_size=cfg.kernel_qkv[i],
                stride_q=cfg.stride_q[i],
                stride_kv=cfg.stride_kv[i],
                attn_drop=cfg.attn_drop_rate,
                with_cls_token=with_cls,
                shared_projection=cfg.shared_projection,
            )
            for rate in rates
        )

    def forward(
        self, x: torch.Tensor, cls_only: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Image or token map (B, C, H, W) → token map (B, dim, h, w) and the class token; with
        ``cls_only`` the last block computes the class token alone and no map is returned."""
        x, h, w = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        elif cls_only:
            raise ValueError("cls_only needs a stage with a class token")
        x = self.pos_drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, h, w, cls_only=cls_only and i == len(self.blocks) - 1)
        if cls_only:
            return None, x
        cls_token = None
        if self.cls_token is not None:
            cls_token, x = x[:, :1], x[:, 1:]
        return rearrange(x, "b (h w) c -> b c h w", h=h, w=w), cls_token


class CvT(nn.Module):
    """A Convolutional vision Transformer built from a :class:`CvTConfig`."""

    def __init__(self, cfg: CvTConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.dims[-1]
        self.img_size = cfg.img_size
        in_chans = cfg.in_chans
        for i, dim in enumerate(cfg.dims):
            setattr(self, f"stage{i}", CvTStage(cfg, i, in_chans))
            in_chans = dim
        self.norm = nn.LayerNorm(cfg.dims[-1], eps=1e-5)
        self.head = nn.Linear(cfg.dims[-1], cfg.num_classes) if cfg.num_classes else nn.Identity()
        # The head reads only the class token, so the last block's other outputs are never
        # used: it computes the class token's row alone (keys and values still see every
        # token). The outputs are the same; CvT-13 at 64 px spends 6-7% fewer FLOPs. False
        # computes every token, as the layer tables do to show the architecture's full cost.
        # (The last block's query projection then never runs, so its BatchNorm statistics do
        # not move in training: nothing that the model returns reads them.)
        self.skip_unread_tokens = True
        if next(self.parameters()).is_meta:
            # Built on the meta device for its shapes alone (`cvtlab models`, `summary`, matching
            # a checkpoint to an architecture): there are no values to draw, and drawing them
            # through meta kernels took 1.4 of the 8.4 s `cvtlab models` ran for.
            return
        self.apply(_init_weights)
        for stage in self.stages:
            if stage.cls_token is not None:
                trunc_normal_(stage.cls_token, std=0.02)

    @property
    def stages(self) -> list[CvTStage]:
        return [getattr(self, f"stage{i}") for i in range(len(self.cfg.dims))]

    def no_weight_decay(self) -> set[str]:
        """Parameter names that AdamW should not decay besides norms and biases."""
        return {f"stage{i}.cls_token" for i, s in enumerate(self.stages) if s.cls_token is not None}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        if num_classes:
            _init_weights(self.head)
        self.cfg = _replace(self.cfg, num_classes=num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) → pooled, normalised features (B, dims[-1])."""
        h, w = x.shape[-2:]
        stride = self.cfg.total_stride
        if h % stride or w % stride:
            raise CvtLabError(
                f"input size {h}x{w} is not a multiple of the model's total stride {stride}"
            )
        cls_token = None
        stages = self.stages
        for i, stage in enumerate(stages):
            last = i == len(stages) - 1
            x, cls_token = stage(
                x, cls_only=last and self.skip_unread_tokens and stage.cls_token is not None
            )
        if cls_token is not None:
            return self.norm(cls_token[:, 0])
        return self.norm(x.flatten(2).transpose(1, 2)).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _replace(cfg: CvTConfig, **changes) -> CvTConfig:
    return CvTConfig(**{**asdict(cfg), **changes})


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


__all__ = ["CvT", "CvTConfig", "CvTStage", "check_img_size"]
