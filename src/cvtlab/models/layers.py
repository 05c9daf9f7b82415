"""Building blocks of a CvT: convolutional token embedding, attention with convolutional
projection, MLP and the pre-norm block.

Module and parameter names follow the official microsoft/CvT state dict, so official
checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath
from torch import nn

from .token_linear import TokenLinear

# On CPUs, attention with at most this many scores per head (queries × keys; every 64-px model
# here, and the last stage at 224 px) runs faster as two batched products and a softmax, in the
# products' dtype, than through SDPA's flash kernel: 1.12-1.16x for the 30-minute recipe's
# training step, 1.07x for CvT-13's bf16 step at 64 px (benchmarks/RESULTS.md, attempt 18).
# Above it the flash kernel wins, and it never holds the whole score matrix in memory.
EXPLICIT_ATTENTION_MAX_SCORES = 16384


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that the official CvT weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACT_LAYERS: dict[str, type[nn.Module]] = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


def act_layer_from_name(name: str) -> type[nn.Module]:
    try:
        return ACT_LAYERS[name]
    except KeyError:
        from ..errors import CvtLabError

        raise CvtLabError(
            f"unknown act_layer {name!r}; choose one of {sorted(ACT_LAYERS)}"
        ) from None


class ConvEmbed(nn.Module):
    """Strided convolution → LayerNorm over channels: an image or token map to a smaller,
    wider token map. Returns tokens (B, H*W, C) and the new map size."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class ConvProjection(nn.Module):
    """Depthwise conv (no bias) → BatchNorm on a token map; the official 'dw_bn' projection."""

    def __init__(self, dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(
            dim, dim, kernel_size, stride=stride, padding=kernel_size // 2, groups=dim, bias=False
        )
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv._forward_hooks or self.bn._forward_hooks:
            # Hooks (e.g. `cvtlab summary`'s) must see each of the two layers run.
            return self.bn(self.conv(x))
        if self.training:
            return self.bn(self._depthwise(x, self.conv.weight, self.conv.bias))
        # In eval mode BatchNorm is a fixed per-channel affine map, so it folds into the conv's
        # weights and bias: one pass over the token map instead of two.
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = self.conv.weight * scale.view(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        return self._depthwise(x, weight, bias)

    def _depthwise(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        conv = self.conv
        (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
        if (
            x.device.type == "cpu"
            and torch.is_grad_enabled()
            and (x.size(-2) < kh or x.size(-1) < kw)
        ):
            # On a map smaller than the kernel (the last stage's 2x2 grid at 32 px) PyTorch's CPU
            # convolution takes a slow path: padding the map first and convolving without padding
            # computes the same sums with forward and backward about 5x faster for a 3x3 kernel
            # on a 2x2 map (1.6-1.9x for a 1x1 map or a 5x5 or 7x7 kernel on a 4x4 one;
            # benchmarks/RESULTS.md, throughput attempt 45). Without a gradient the unpadded
            # forward is the faster one.
            x = F.pad(x, (pw, pw, ph, ph))
            return F.conv2d(x, weight, bias, conv.stride, 0, groups=conv.groups)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, groups=conv.groups)


# Under CPU autocast in training, the depthwise projections of queries, keys and values (and
# SDPA's flash attention, where it runs) are computed in fp32: their bf16 backward kernels are
# slower. benchmarks/recipe_step.py times the step with this off (everything in bf16).
FP32_DEPTHWISE_ON_CPU = True


class _fp32_on_cpu:
    """Inside CPU autocast, run the enclosed ops in fp32 (yields whether it did)."""

    def __init__(self, x: torch.Tensor):
        # Inference keeps bf16 throughout: there the forward kernels are fast.
        self.active = (
            FP32_DEPTHWISE_ON_CPU
            and x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and torch.is_grad_enabled()
        )
        self._ctx = torch.autocast("cpu", enabled=False) if self.active else None

    def __enter__(self) -> bool:
        if self._ctx is not None:
            self._ctx.__enter__()
        return self.active

    def __exit__(self, *exc) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


class ConvAttention(nn.Module):
    """Multi-head self-attention whose queries, keys and values first pass a depthwise conv
    projection; keys and values with stride ``stride_kv`` (fewer tokens, cheaper attention).

    A class token, when present, skips the conv projection and is prepended again before the
    linear projections. The scale is ``dim ** -0.5`` with the full width, as in the official
    code; pretrained weights depend on it.

    ``shared_projection`` (not in the official CvT, so no pretrained weights use it) gives keys
    and values one conv projection and one linear layer of twice the width (``conv_proj_kv``,
    ``proj_kv``), and queries share them too where their stride matches (``conv_proj_qkv``,
    ``proj_qkv``): fewer passes over the token map and larger, faster products.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        kernel_size: int = 3,
        stride_q: int = 1,
        stride_kv: int = 2,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        with_cls_token: bool = False,
        shared_projection: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            from ..errors import CvtLabError

            raise CvtLabError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = dim**-0.5
        self.with_cls_token = with_cls_token
        self.attn_drop = attn_drop
        if not shared_projection:
            groups = {"q": stride_q, "k": stride_kv, "v": stride_kv}
        elif stride_q == stride_kv:
            groups = {"qkv": stride_q}
        else:
            groups = {"q": stride_q, "kv": stride_kv}
        # Which of q, k, v each projection makes, in order; the names are the official ones
        # when nothing is shared. All convs first, then all linear layers: the official
        # state-dict order.
        self.projections = tuple(groups)
        for name, stride in groups.items():
            setattr(self, f"conv_proj_{name}", ConvProjection(dim, kernel_size, stride))
        for name in groups:
            setattr(self, f"proj_{name}", TokenLinear(dim, len(name) * dim, bias=qkv_bias))
        self.proj = TokenLinear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, h: int, w: int, cls_only: bool = False) -> torch.Tensor:
        """Tokens (B, N, C) → attention output (B, N, C); with ``cls_only``, the class token's
        row alone (B, 1, C): keys and values still come from every token, queries from it."""
        if self.with_cls_token:
            cls_token, x = x[:, :1], x[:, 1:]
        elif cls_only:
            raise ValueError("cls_only needs a class token")
        # A (B, N, C) token map viewed as (B, C, H, W) is already channels-last; after the class
        # token is cut off it is not quite (the batch stride is one token longer), and each conv
        # below would copy it. One copy here serves all three.
        grid = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous(
            memory_format=torch.channels_last
        )
        # On CPUs, bf16 depthwise-conv backward kernels (and SDPA's flash backward, below) are
        # many times slower than fp32 ones, so under CPU autocast those run in fp32.
        with _fp32_on_cpu(x) as fp32:
            if fp32:
                grid = grid.float()
            # A query projection of its own is not needed when only the class token asks.
            maps = [
                None
                if cls_only and name == "q"
                else getattr(self, f"conv_proj_{name}")(grid).flatten(2).transpose(1, 2)
                for name in self.projections
            ]
        qkv = []
        for name, t in zip(self.projections, maps):
            lin = getattr(self, f"proj_{name}")
            if t is None:
                out = lin(cls_token)
            elif not self.with_cls_token:
                out = lin(t)
            elif torch.is_grad_enabled():
                # In training the class token joins after the linear projections: each token
                # map then gets a whole, channels-last gradient back. A gradient sliced out of a
                # concatenation has other strides than the BatchNorm's input, which sends its
                # backward down a path several times slower on CPUs.
                out = torch.cat((lin(cls_token), lin(t)), dim=1)
            else:
                # Without a gradient it joins before: one product over every token instead of
                # a one-row product per image and a concatenation of outputs (1-2% faster bf16
                # inference of CvT-13 at 64 px on a CPU; benchmarks/RESULTS.md, attempt 38).
                out = lin(torch.cat((cls_token, t), dim=1))
            qkv.extend(out.chunk(len(name), dim=-1))
        if cls_only:
            qkv[0] = qkv[0][:, :1]
            if "q" in self.projections and torch.is_grad_enabled():
                # The queries' own projection is read by nothing here, but it still joins the
                # graph with the zero gradient the full computation gives it: DDP expects every
                # parameter to get a gradient in every step.
                unread = sum(p.sum() for p in self.conv_proj_q.parameters())
                qkv[0] = qkv[0] + 0 * unread
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.num_heads) for t in qkv)
        drop = self.attn_drop if self.training else 0.0
        if x.device.type == "cpu" and q.shape[-2] * k.shape[-2] <= EXPLICIT_ATTENTION_MAX_SCORES:
            out = F.dropout((q @ k.transpose(-2, -1) * self.scale).softmax(-1), drop) @ v
        else:
            with _fp32_on_cpu(x) as fp32:
                if fp32:
                    q, k, v = q.float(), k.float(), v.float()
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))

    def projection_conv(self, which: str) -> nn.Conv2d:
        """The depthwise conv that projects the queries (``"q"``), keys or values."""
        return getattr(self, f"conv_proj_{next(n for n in self.projections if which in n)}").conv


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module], drop: float = 0.0):
        super().__init__()
        self.fc1 = TokenLinear(dim, hidden)
        self.act = act_layer()
        self.fc2 = TokenLinear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)), each branch
    dropped per sample with probability ``drop_path`` while training."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        act_layer: type[nn.Module] = QuickGELU,
        drop: float = 0.0,
        drop_path: float = 0.0,
        **attn_kwargs,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = ConvAttention(dim, num_heads, proj_drop=drop, **attn_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, drop)

    def forward(self, x: torch.Tensor, h: int, w: int, cls_only: bool = False) -> torch.Tensor:
        """Tokens (B, N, C) → (B, N, C); with ``cls_only``, only the class token's output
        (B, 1, C), the only row a class-token head reads after the last block."""
        shortcut = x[:, :1] if cls_only else x
        x = shortcut + self.drop_path(self.attn(self.norm1(x), h, w, cls_only=cls_only))
        return x + self.drop_path(self.mlp(self.norm2(x)))
