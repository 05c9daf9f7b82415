"""A linear layer over token maps whose fp32 products run through oneDNN on CPUs where MKL's
are slow.

PyTorch hands fp32 ``F.linear`` on CPU to MKL. On AMD CPUs MKL takes its AVX2 code even where
the CPU has AVX-512, while oneDNN, which PyTorch uses for convolutions, runs AVX-512 kernels. On
an AMD Zen 5, whose AVX-512 units are full width, a 1x1 convolution over a channels-last token
map does the same product at 2.1-2.3x MKL's rate (forward, backward 1.2-2x; benchmarks/RESULTS.md,
attempt 37). Elsewhere (Intel, where MKL has AVX-512 code; AMD Zen 4, whose AVX-512 is two AVX2
halves; CPUs without AVX-512) the layer is plain ``nn.Linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..machine import cpu_info


def onednn_runs_fp32_products_faster(info: dict | None = None) -> bool:
    """Whether this CPU (or the one ``info``, as :func:`cvtlab.machine.cpu_info` describes it,
    names) gets faster fp32 products from oneDNN than from MKL: AMD from Zen 5 on."""
    info = cpu_info() if info is None else info
    return (
        torch.backends.mkldnn.is_available()
        and info.get("cpu_vendor") == "AuthenticAMD"
        and info.get("cpu_family", 0) >= 26  # Zen 5 and later: full-width AVX-512
        and "avx512f" in info.get("cpu_extensions", ())
    )


# Decided once per process from the CPU, not timed, so that every run on one machine computes
# the same way. Tests set it to exercise either path on any machine.
ONEDNN_FP32_PRODUCTS: bool = onednn_runs_fp32_products_faster()


def linear_on_tokens(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``. For fp32 tokens (B, N, C) on a CPU where
    :data:`ONEDNN_FP32_PRODUCTS` holds, the tokens are viewed without a copy as a channels-last
    (B, C, N, 1) map and multiplied as a 1x1 convolution, so that oneDNN does the product and its
    backward. Under autocast, on GPUs, while compiling or exporting, and for inputs of other
    shapes it is ``F.linear`` itself."""
    if not (
        ONEDNN_FP32_PRODUCTS
        and not torch.compiler.is_compiling()  # compilers and exporters see a plain product
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and x.dim() == 3
        and x.shape[1] > 1  # one token per image: a (B, C, 1, 1) map runs slower than MKL
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
    ):
        return F.linear(x, weight, bias)
    b, n, c = x.shape
    grid = x.reshape(b, n, 1, c).permute(0, 3, 1, 2)
    out = F.conv2d(grid, weight[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1).reshape(b, n, weight.shape[0])


class TokenLinear(nn.Linear):
    """``nn.Linear`` (the same parameters and state-dict names) whose product is
    :func:`linear_on_tokens`: through oneDNN for fp32 token maps where that is faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_on_tokens(x, self.weight, self.bias)
