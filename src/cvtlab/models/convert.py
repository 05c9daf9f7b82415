"""Key-name conversion between Hugging Face ``CvtForImageClassification`` and cvtlab.

cvtlab uses the official microsoft/CvT names (``stage2.blocks.3.attn.proj_q.weight``), so
official checkpoints need no conversion; Hugging Face checkpoints are renamed here, in one place.
"""

from __future__ import annotations

import re

import torch

from ..errors import CvtLabError
from .cvt import CvTConfig

# (Hugging Face fragment, cvtlab fragment), applied in order to the part after the stage/layer.
_BLOCK_PARTS = [
    (
        "attention.attention.convolution_projection_query.convolution_projection.convolution",
        "attn.conv_proj_q.conv",
    ),
    (
        "attention.attention.convolution_projection_key.convolution_projection.convolution",
        "attn.conv_proj_k.conv",
    ),
    (
        "attention.attention.convolution_projection_value.convolution_projection.convolution",
        "attn.conv_proj_v.conv",
    ),
    (
        "attention.attention.convolution_projection_query.convolution_projection.normalization",
        "attn.conv_proj_q.bn",
    ),
    (
        "attention.attention.convolution_projection_key.convolution_projection.normalization",
        "attn.conv_proj_k.bn",
    ),
    (
        "attention.attention.convolution_projection_value.convolution_projection.normalization",
        "attn.conv_proj_v.bn",
    ),
    ("attention.attention.projection_query", "attn.proj_q"),
    ("attention.attention.projection_key", "attn.proj_k"),
    ("attention.attention.projection_value", "attn.proj_v"),
    ("attention.output.dense", "attn.proj"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
    ("layernorm_before", "norm1"),
    ("layernorm_after", "norm2"),
]
_STAGE_PARTS = [
    ("embedding.convolution_embeddings.projection", "patch_embed.proj"),
    ("embedding.convolution_embeddings.normalization", "patch_embed.norm"),
    ("cls_token", "cls_token"),
]
_TOP_PARTS = [("layernorm", "norm"), ("classifier", "head")]

_HF_LAYER = re.compile(r"^cvt\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)\.(\w+)$")
_HF_STAGE = re.compile(r"^cvt\.encoder\.stages\.(\d+)\.(.+?)(\.\w+)?$")
_OURS_BLOCK = re.compile(r"^stage(\d+)\.blocks\.(\d+)\.(.+)\.(\w+)$")
_OURS_STAGE = re.compile(r"^stage(\d+)\.(.+?)(\.\w+)?$")


def is_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("cvt.encoder.") for k in state_dict)


def _swap(fragment: str, table: list[tuple[str, str]], reverse: bool, key: str) -> str:
    for hf, ours in table:
        src, dst = (ours, hf) if reverse else (hf, ours)
        if fragment == src:
            return dst
    raise CvtLabError(f"unexpected checkpoint key {key!r}")


def hf_to_cvtlab(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``CvtForImageClassification`` state dict to cvtlab's (official) names."""
    out = {}
    for key, value in state_dict.items():
        if m := _HF_LAYER.match(key):
            stage, layer, part, leaf = m.groups()
            new = f"stage{stage}.blocks.{layer}.{_swap(part, _BLOCK_PARTS, False, key)}.{leaf}"
        elif m := re.match(r"^cvt\.encoder\.stages\.(\d+)\.cls_token$", key):
            new = f"stage{m.group(1)}.cls_token"
        elif m := _HF_STAGE.match(key):
            stage, part, leaf = m.groups()
            new = f"stage{stage}.{_swap(part, _STAGE_PARTS, False, key)}{leaf or ''}"
        else:
            top, _, leaf = key.rpartition(".")
            new = f"{_swap(top, _TOP_PARTS, False, key)}.{leaf}"
        out[new] = value
    return out


def cvtlab_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a cvtlab (official-named) state dict to ``CvtForImageClassification``'s names."""
    out = {}
    for key, value in state_dict.items():
        if m := _OURS_BLOCK.match(key):
            stage, block, part, leaf = m.groups()
            new = f"cvt.encoder.stages.{stage}.layers.{block}.{_swap(part, _BLOCK_PARTS, True, key)}.{leaf}"
        elif m := re.match(r"^stage(\d+)\.cls_token$", key):
            new = f"cvt.encoder.stages.{m.group(1)}.cls_token"
        elif m := _OURS_STAGE.match(key):
            stage, part, leaf = m.groups()
            new = f"cvt.encoder.stages.{stage}.{_swap(part, _STAGE_PARTS, True, key)}{leaf or ''}"
        else:
            top, _, leaf = key.rpartition(".")
            new = f"{_swap(top, _TOP_PARTS, True, key)}.{leaf}"
        out[new] = value
    return out


def config_from_hf(hf: dict, source: str) -> tuple[CvTConfig, list[str] | None]:
    """A :class:`CvTConfig` (and class names, when the file names them) from a Hugging Face
    ``config.json``. Features cvtlab does not build are a clear error, not a silent change."""
    n = len(hf.get("depth", []))
    if hf.get("model_type") not in (None, "cvt") or not n:
        raise CvtLabError(
            f"{source}: config.json does not describe a CvT (model_type {hf.get('model_type')!r})"
        )

    def per_stage(key: str, default):
        value = hf.get(key, [default] * n)
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n

    methods = set(per_stage("qkv_projection_method", "dw_bn"))
    if methods != {"dw_bn"}:
        raise CvtLabError(
            f"{source}: qkv_projection_method {sorted(methods)} is not supported (only dw_bn)"
        )
    kernel = per_stage("kernel_qkv", 3)
    for key in ("padding_q", "padding_kv"):
        if per_stage(key, 1) != tuple(k // 2 for k in kernel):
            raise CvtLabError(f"{source}: {key} must be kernel_qkv // 2, got {per_stage(key, 1)}")
    cls = per_stage("cls_token", False)
    if any(cls[:-1]):
        raise CvtLabError(f"{source}: a class token before the last stage is not supported")
    bias = set(per_stage("qkv_bias", True))
    if len(bias) != 1:
        raise CvtLabError(f"{source}: qkv_bias must be the same in every stage, got {sorted(bias)}")
    id2label = hf.get("id2label") or {}
    num_classes = hf.get("num_labels") or len(id2label) or 2
    names = (
        [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))] if id2label else None
    )
    if names and all(n is None or re.fullmatch(r"LABEL_\d+", str(n)) for n in names):
        names = None
    cfg = CvTConfig(
        dims=per_stage("embed_dim", 64),
        depths=per_stage("depth", 1),
        heads=per_stage("num_heads", 1),
        patch_sizes=per_stage("patch_sizes", 3),
        patch_strides=per_stage("patch_stride", 2),
        patch_paddings=per_stage("patch_padding", 1),
        stride_kv=per_stage("stride_kv", 2),
        stride_q=per_stage("stride_q", 1),
        kernel_qkv=kernel,
        mlp_ratios=tuple(float(r) for r in per_stage("mlp_ratio", 4.0)),
        drop_path_rates=tuple(float(r) for r in per_stage("drop_path_rate", 0.0)),
        qkv_bias=bias.pop(),
        cls_token=bool(cls[-1]),
        drop_rate=float(max(per_stage("drop_rate", 0.0))),
        attn_drop_rate=float(max(per_stage("attention_drop_rate", 0.0))),
        num_classes=int(num_classes),
        in_chans=int(hf.get("num_channels", 3)),
    )
    return cfg, names
