"""The seed notebook's 64-px CvT, made to run.

``EmbeddingBlock`` and ``TransformerBlock`` behave as the notebook's do (same layers, same
shapes: (2, 3, 64, 64) → embedding → block → (2, 256, 64)). The notebook's full model crashed
because it fed token sequences back into a 3-channel ``Conv2d``; here the re-embedding between
blocks is done as CvT does it, as stages: tokens go back to a map, and a convolution embeds them
again. ``reembed_stride=1`` keeps the notebook's 16×16 grid throughout, so every block sees the
(256, 64) tokens the notebook's hand calculations describe.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from einops import rearrange
from torch import nn

from ..errors import CvtLabError
from .token_linear import TokenLinear


class EmbeddingBlock(nn.Module):
    """Conv2d → tokens → LayerNorm: (B, 3, 64, 64) → (B, 256, 64) with the defaults."""

    def __init__(
        self,
        in_channels: int = 3,
        embed_dim: int = 64,
        patch_size: int = 7,
        stride: int = 4,
        padding: int = 3,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=stride, padding=padding)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(rearrange(self.proj(x), "b c h w -> b (h w) c"))


class ConvProjection(nn.Module):
    """Depthwise 3×3 + pointwise 1×1 conv + BatchNorm over the token map."""

    def __init__(self, embed_dim: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.proj = nn.Conv2d(
            embed_dim, embed_dim, kernel_size, stride=stride, padding=padding, groups=embed_dim
        )
        self.pointwise = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise CvtLabError(f"ConvProjection needs a square token grid, got {x.shape[1]} tokens")
        x = rearrange(x, "b (h w) c -> b c h w", h=side)
        return rearrange(self.norm(self.pointwise(self.proj(x))), "b c h w -> b (h w) c")


class TransformerBlock(nn.Module):
    """The notebook's block: one conv projection shared by q, k and v, then LayerNorm and
    ``nn.MultiheadAttention``, a residual on the unprojected input, and a pre-norm MLP."""

    def __init__(
        self,
        embed_dim: int = 64,
        num_heads: int = 1,
        mlp_ratio: float = 4.0,
        drop: float = 0.1,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.conv_proj = ConvProjection(embed_dim)
        self.norm1 = norm_layer(embed_dim)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=drop, batch_first=True)
        self.norm2 = norm_layer(embed_dim)
        hidden = int(embed_dim * mlp_ratio)
        self.mlp = nn.Sequential(
            TokenLinear(embed_dim, hidden),
            nn.GELU(),
            nn.Dropout(drop),
            TokenLinear(hidden, embed_dim),
            nn.Dropout(drop),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.norm1(self.conv_proj(x))
        x = x + self.attn(qkv, qkv, qkv, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


@dataclass(frozen=True)
class SeedConfig:
    """The notebook's model as plain data."""

    embed_dim: int = 64
    depth: int = 2
    num_heads: int = 1
    mlp_ratio: float = 4.0
    drop: float = 0.1
    reembed_stride: int = 1
    num_classes: int = 200
    img_size: int = 64
    in_chans: int = 3

    @property
    def total_stride(self) -> int:
        return 4 * self.reembed_stride ** (self.depth - 1)

    def to_dict(self) -> dict:
        return asdict(self)


class SeedStage(nn.Module):
    """Re-embed the token map with a convolution, then one notebook ``TransformerBlock``."""

    def __init__(self, cfg: SeedConfig, first: bool):
        super().__init__()
        d = cfg.embed_dim
        if first:
            self.embedding = EmbeddingBlock(cfg.in_chans, d)
        else:
            s = cfg.reembed_stride
            self.embedding = EmbeddingBlock(d, d, patch_size=3, stride=s, padding=1)
        self.block = TransformerBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.embedding(x))


class SeedCvT(nn.Module):
    """Embedding → ``depth`` stages of (re-embedding, TransformerBlock) → mean over tokens →
    Linear. With the defaults: (B, 3, 64, 64) → (B, 200)."""

    def __init__(self, cfg: SeedConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.embed_dim
        self.img_size = cfg.img_size
        self.stages = nn.ModuleList(SeedStage(cfg, first=i == 0) for i in range(cfg.depth))
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return set()

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.cfg = SeedConfig(**{**asdict(self.cfg), "num_classes": num_classes})

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i, stage in enumerate(self.stages):
            if i:
                x = rearrange(x, "b (h w) c -> b c h w", h=math.isqrt(x.shape[1]))
            x = stage(x)
        return x.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
