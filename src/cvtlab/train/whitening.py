"""A data-dependent start for the stem: its filters set to whitened principal components of
the training images' patches.

The stem convolution is the only layer that sees pixels. Randomly initialised, its filters
mostly pick up the few high-variance directions of a patch (brightness, colour, smooth
gradients) and take many steps to find the rest. Set to the top principal components of the
patches it will see, each scaled by one over its standard deviation, its outputs are
decorrelated and of unit variance from the first step. The fast-training recipes for CIFAR-10
start their first layer this way to save steps in short runs; in the 30-minute CPU recipe it led
early in the 64-px phase and ended a few tenths of a point ahead at two seeds
(benchmarks/RESULTS.md, attempts Z40-Z44), so that recipe turns it on; it is off by default.
Each component is used twice, with both signs, so a ReLU- or GELU-like layer downstream keeps
both halves of it. The filters stay trainable.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import normalize
from ..errors import CvtLabError


def stem_conv(model: nn.Module) -> nn.Conv2d:
    """The convolution that reads the image: the model's first registered ``Conv2d``."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.groups != 1:
        raise CvtLabError("whiten_stem: the model has no dense convolution reading the image")
    return conv


@torch.no_grad()
def patch_whitening(
    images: torch.Tensor, conv: nn.Conv2d, eps: float = 5e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias for ``conv`` that whiten the patches it sees in ``images``.

    ``images`` is a normalised float batch (B, C, H, W). Output channel ``2i`` projects a patch
    (centred on the patches' mean) onto the ``i``-th principal component divided by its standard
    deviation, channel ``2i + 1`` onto its negative, so on these images every channel has mean
    zero and unit variance and the components are uncorrelated.
    """
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    dim = conv.in_channels * k[0] * k[1]
    pairs = (conv.out_channels + 1) // 2
    if pairs > dim:
        raise CvtLabError(
            f"whiten_stem: {conv.out_channels} filters need {pairs} components, but a "
            f"{k[0]}x{k[1]} patch of {conv.in_channels} channels has only {dim}"
        )
    patches = F.unfold(images.float(), k, dilation=conv.dilation, padding=p, stride=s)
    patches = patches.transpose(1, 2).reshape(-1, dim)
    if len(patches) <= dim:
        raise CvtLabError(
            f"whiten_stem: {len(patches)} patches cannot estimate a {dim}-dimensional covariance"
        )
    mean = patches.double().mean(0)
    centred = patches - mean.float()
    # The product in fp32 (fast, and accurate enough for a mean of centred values); the
    # eigendecomposition in fp64, where the small components' scales are read.
    cov = (centred.T @ centred).double() / (len(patches) - 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    top = torch.arange(dim - 1, dim - 1 - pairs, -1)
    components = eigvecs[:, top].T / (eigvals[top].clamp_min(0) + eps).sqrt().unsqueeze(1)
    weight = torch.stack((components, -components), dim=1).reshape(2 * pairs, dim)
    weight = weight[: conv.out_channels]
    bias = -(weight @ mean)
    return weight.reshape(conv.weight.shape).float(), bias.float()


def whiten_stem(
    model: nn.Module,
    images: np.ndarray,
    rows: np.ndarray | None = None,
    size: int | None = None,
    samples: int = 2048,
    seed: int = 0,
) -> None:
    """Set ``model``'s stem to the patch whitening of ``samples`` images drawn from ``rows`` of
    ``images`` (uint8, N×H×W×3, as the decoded cache holds them; all rows when None), resized to
    ``size`` first when the run starts at another resolution (progressive resizing)."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    if not len(rows):
        raise CvtLabError("whiten_stem: no training images to measure")
    conv = stem_conv(model)
    rng = np.random.default_rng(seed)
    drawn = np.sort(rng.choice(rows, size=min(samples, len(rows)), replace=False))
    x = normalize(torch.from_numpy(np.asarray(images[drawn])))
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    weight, bias = patch_whitening(x, conv)
    with torch.no_grad():
        conv.weight.copy_(weight.to(conv.weight))
        if conv.bias is not None:
            conv.bias.copy_(bias.to(conv.bias))


__all__ = ["patch_whitening", "stem_conv", "whiten_stem"]
