"""Layer-by-layer tables: every layer's output shape (without the batch), parameters and
multiply-accumulates (MACs) — the notebook's hand calculations, automated.

MACs are counted analytically from each layer's shapes in one forward pass (batch 1), so the
attention products that a FLOP counter misses on some backends (SDPA on CPU) are included.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .models.layers import ConvAttention

_LEAF_TYPES = (nn.Conv2d, nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.MultiheadAttention)


@dataclass
class LayerRow:
    name: str
    type: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


def _conv_out(size: int, conv: nn.Conv2d, axis: int) -> int:
    k, s, p = conv.kernel_size[axis], conv.stride[axis], conv.padding[axis]
    return (size + 2 * p - k) // s + 1


def _macs(module: nn.Module, args: tuple, out: torch.Tensor) -> int:
    per_image = out[0].numel() if isinstance(out, torch.Tensor) else 0
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_image * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return per_image * module.in_features
    if isinstance(module, nn.MultiheadAttention):
        n, c = args[0].shape[1], args[0].shape[2]
        return 4 * n * c * c + 2 * n * n * c
    if isinstance(module, ConvAttention):
        x, h, w = args
        c = x.shape[-1]
        extra = 1 if module.with_cls_token else 0
        q, k = module.projection_conv("q"), module.projection_conv("k")
        t_q = _conv_out(h, q, 0) * _conv_out(w, q, 1) + extra
        t_kv = _conv_out(h, k, 0) * _conv_out(w, k, 1) + extra
        return 2 * t_q * t_kv * c  # q·kᵀ and attn·v
    return 0


def summarize(model: nn.Module, img_size: int | None = None) -> dict:
    """Run one image through ``model`` and return the table as a JSON-ready dict:
    ``{"model", "img_size", "layers": [...], "total_params", "total_macs"}``."""
    img_size = img_size or getattr(model, "img_size", 224)
    in_chans = getattr(getattr(model, "cfg", None), "in_chans", 3)
    rows = [LayerRow("input", "Input", (in_chans, img_size, img_size), 0, 0)]
    hooks = []

    def record(name: str):
        def hook(module, args, out):
            tensor = out[0] if isinstance(out, tuple) else out
            own = module.parameters(recurse=not isinstance(module, ConvAttention))
            rows.append(
                LayerRow(
                    name,
                    type(module).__name__,
                    tuple(tensor.shape[1:]),
                    sum(p.numel() for p in own),
                    int(_macs(module, args, tensor)),
                )
            )

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (*_LEAF_TYPES, ConvAttention)):
            hooks.append(module.register_forward_hook(record(name)))
    was_training = model.training
    # Count every token of the last block, as the architecture (and its paper) does, though a
    # CvT with a class token skips the ones its head never reads.
    skipping = getattr(model, "skip_unread_tokens", None)
    if skipping is not None:
        model.skip_unread_tokens = False
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            out = model(torch.zeros(1, in_chans, img_size, img_size, device=device))
        # Without a head (num_classes=0) the model returns pooled features, which no layer
        # above produced: show them, as the input is shown.
        if tuple(out.shape[1:]) != rows[-1].output_shape:
            rows.append(LayerRow("output", "Output", tuple(out.shape[1:]), 0, 0))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        if skipping is not None:
            model.skip_unread_tokens = skipping
    layers = [asdict(r) for r in rows]
    for layer in layers:
        layer["output_shape"] = list(layer["output_shape"])
    return {
        "model": getattr(model, "model_name", type(model).__name__),
        "img_size": img_size,
        "layers": layers,
        "total_params": sum(p.numel() for p in model.parameters()),
        "total_macs": sum(r.macs for r in rows),
    }


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_summary(summary: dict, fmt: str = "table") -> str:
    """Render :func:`summarize`'s result as ``table`` (plain text), ``markdown`` or ``json``."""
    if fmt == "json":
        return json.dumps(summary, indent=2)
    header = ("layer", "type", "output shape", "params", "MACs")
    body = [
        (r["name"], r["type"], str(tuple(r["output_shape"])), f"{r['params']:,}", _human(r["macs"]))
        for r in summary["layers"]
    ]
    total = (
        "total",
        "",
        "",
        f"{summary['total_params']:,}",
        _human(summary["total_macs"]),
    )
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in [*body, total]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *body, total]) for i in range(len(header))]

    def line(row):
        return "  ".join(
            cell.rjust(w) if i >= 3 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        )

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    title = f"{summary['model']} at {summary['img_size']} px"
    return "\n".join([title, line(header), rule, *map(line, body), rule, line(total)])


def gmacs(model: nn.Module, img_size: int | None = None) -> float:
    return summarize(model, img_size)["total_macs"] / 1e9


__all__ = ["format_summary", "gmacs", "summarize"]
