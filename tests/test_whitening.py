"""The whitened stem start: the filters it computes whiten the patches the stem sees."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cvtlab
from cvtlab.data.augment import IMAGENET_MEAN, IMAGENET_STD
from cvtlab.errors import CvtLabError
from cvtlab.train.whitening import patch_whitening, stem_conv, whiten_stem


def smooth_images(n: int = 64, size: int = 32) -> torch.Tensor:
    """Blurred noise: neighbouring pixels and channels strongly correlated, like photos."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    x = x + 0.5 * x.mean(1, keepdim=True)  # correlated colour channels
    return F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)


def test_patch_whitening_decorrelates_the_patches_the_stem_sees():
    images = smooth_images()
    conv = nn.Conv2d(3, 64, 7, stride=4, padding=2)
    weight, bias = patch_whitening(images, conv)
    out = F.conv2d(images, weight, bias, stride=4, padding=2)
    channels = out.permute(1, 0, 2, 3).reshape(64, -1).double()
    assert channels.mean(1).abs().max() < 1e-3
    # Even channels: the top 32 components, each of unit variance and uncorrelated.
    cov = torch.cov(channels[0::2])
    assert torch.allclose(cov, torch.eye(32, dtype=cov.dtype), atol=0.02)
    # Odd channels: the same components with the other sign.
    assert torch.allclose(channels[1::2], -channels[0::2], atol=1e-4)
    # Random filters see mostly the few largest directions: far from white.
    random_out = conv(images).detach().permute(1, 0, 2, 3).reshape(64, -1).double()
    random_cov = torch.cov(random_out)
    assert not torch.allclose(random_cov, torch.eye(64, dtype=random_cov.dtype), atol=0.5)


def test_patch_whitening_needs_enough_components_and_patches():
    with pytest.raises(CvtLabError, match="20 filters need 10 components.*only 9"):
        patch_whitening(torch.randn(8, 1, 16, 16), nn.Conv2d(1, 20, 3))
    with pytest.raises(CvtLabError, match="cannot estimate a 147-dimensional covariance"):
        patch_whitening(torch.randn(1, 3, 16, 16), nn.Conv2d(3, 64, 7, stride=4, padding=2))


def test_whiten_stem_sets_the_first_convolution_of_a_cvt_from_uint8_images():
    model = cvtlab.create_model("cvt_xs_64", num_classes=10)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(300, 64, 64, 3), dtype=np.uint8)
    rows = np.arange(100, 300)
    stem = stem_conv(model)
    assert stem is model.stage0.patch_embed.proj
    before = stem.weight.detach().clone()
    whiten_stem(model, images, rows, size=32, samples=150, seed=3)
    assert not torch.equal(before, stem.weight)
    # The same draw of rows and the same resize, computed directly.
    drawn = np.sort(np.random.default_rng(3).choice(rows, size=150, replace=False))
    x = torch.from_numpy(images[drawn]).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    x = (x - mean) / std
    x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)
    weight, bias = patch_whitening(x, stem)
    assert torch.allclose(stem.weight, weight, atol=1e-4)
    assert torch.allclose(stem.bias, bias, atol=1e-4)
    with torch.no_grad():
        assert model(x[:4]).shape == (4, 10)
