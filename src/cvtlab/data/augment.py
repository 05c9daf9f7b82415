"""Augmentation on whole batches of uint8 images, on the CPU or on the GPU.

The cache hands out uint8 batches (B, H, W, 3); this module turns them into normalised float
batches (B, 3, H, W). Per-sample crop and flip are one gather; RandAugment/TrivialAugment come
from torchvision (applied to small groups so that samples get different operations); random
erasing and mixup/cutmix with label smoothing come from timm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing

from ..errors import CvtLabError
from .augment_config import AugmentConfig
from .decode import Crop, resized_side

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _reflect(index: torch.Tensor, n: int) -> torch.Tensor:
    index = index.abs()
    return torch.where(index >= n, 2 * (n - 1) - index, index)


def crop_flip(
    images: torch.Tensor, padding: int = 4, flip: bool = True, generator=None
) -> torch.Tensor:
    """Per-sample random shift by up to ``padding`` pixels (reflecting at the border) and
    horizontal flip.

    ``images``: (B, H, W, C) of any dtype; returns the same shape and dtype. Every output pixel
    is fetched with one ``index_select`` over the flattened pixels, which is far faster on a CPU
    than padding the batch or gathering with broadcast indices.
    """
    b, h, w, c = images.shape
    device = images.device
    oy = torch.randint(-padding, padding + 1, (b, 1), device=device, generator=generator)
    ox = torch.randint(-padding, padding + 1, (b, 1), device=device, generator=generator)
    rows = _reflect(oy + torch.arange(h, device=device), h)
    cols = _reflect(ox + torch.arange(w, device=device), w)
    if flip:
        mirrored = torch.rand(b, 1, device=device, generator=generator) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    base = torch.arange(b, device=device)[:, None, None] * (h * w)
    pixels = (base + rows[:, :, None] * w + cols[:, None, :]).reshape(-1)
    return images.reshape(b * h * w, c).index_select(0, pixels).reshape(b, h, w, c)


def random_resized_crop(
    images: torch.Tensor, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True
) -> torch.Tensor:
    """Per-sample random resized crop (and flip) via one batched ``grid_sample``.

    ``images``: (B, C, H, W) float; returns the same shape.
    """
    b = images.shape[0]
    device = images.device
    area = torch.empty(b, device=device).uniform_(*scale)
    log_r = torch.empty(b, device=device).uniform_(
        torch.log(torch.tensor(ratio[0])).item(), torch.log(torch.tensor(ratio[1])).item()
    )
    r = torch.exp(log_r)
    sw = torch.sqrt(area * r).clamp(max=1.0)
    sh = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(b, device=device) * 2 - 1) * (1 - sw)
    cy = (torch.rand(b, device=device) * 2 - 1) * (1 - sh)
    sx = sw * torch.where(torch.rand(b, device=device) < 0.5, -1.0, 1.0) if flip else sw
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = sh, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )


def random_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """A random ``size`` × ``size`` window of each sample, at the images' own resolution.

    ``images``: (B, C, H, W); returns (B, C, size, size). Unlike resizing, the objects keep the
    scale that the model sees at test time, so a run that trains on crops and tests on whole
    images only gains context.
    """
    b, _, h, w = images.shape
    if size > h or size > w:
        raise CvtLabError(f"cannot crop {size}x{size} from {h}x{w} images")
    device = images.device
    top = torch.randint(0, h - size + 1, (b, 1), device=device)
    left = torch.randint(0, w - size + 1, (b, 1), device=device)
    offsets = torch.arange(size, device=device)
    rows, cols = top + offsets, left + offsets
    batch = torch.arange(b, device=device)[:, None, None]
    # Advanced indices around a slice put the indexed dims first: (B, size, size, C).
    return images[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_erase(
    images: torch.Tensor,
    p: float,
    area: tuple[float, float] = (0.02, 1 / 3),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """Random erasing for a whole batch in a fixed number of operations: each sample, with
    probability ``p``, gets one rectangle (``area`` share of the image, log-uniform ``aspect``)
    filled with per-pixel normal noise, as timm's ``RandomErasing(mode="pixel")`` does.

    ``images``: normalised (B, C, H, W) float. timm loops over the samples in Python, a few
    kernel launches each, which a GPU waits on; here the rectangles are drawn together and
    applied with one mask. (A rectangle too large for the image is clipped to it rather than
    drawn again.)
    """
    b, _, h, w = images.shape
    device = images.device
    target = torch.empty(b, device=device).uniform_(*area) * (h * w)
    log_ar = torch.empty(b, device=device).uniform_(math.log(aspect[0]), math.log(aspect[1]))
    eh = torch.sqrt(target * torch.exp(log_ar)).round().clamp(1, h - 1)
    ew = torch.sqrt(target / torch.exp(log_ar)).round().clamp(1, w - 1)
    top = (torch.rand(b, device=device) * (h - eh + 1)).floor()
    left = (torch.rand(b, device=device) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    inside_r = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
    inside_c = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    chosen = torch.rand(b, device=device) < p
    mask = inside_r[:, :, None] & inside_c[:, None, :] & chosen[:, None, None]
    return torch.where(mask[:, None], torch.randn_like(images), images)


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, H, W, 3) or float-in-[0,1] (B, 3, H, W) → normalised float (B, 3, H, W).

    From uint8 this is one conversion and two in-place passes, with the mean and deviation
    scaled by 255 instead of dividing the batch by 255 first; the result keeps the cache's
    channels-last memory order (no copy into (B, 3, H, W) order).
    """
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).float().sub_(m * 255).div_(s * 255)
    return (images - m).div_(s)


def resize_images(images: torch.Tensor, size: int, crop: Crop = 1.0) -> torch.Tensor:
    """Square uint8 images (B, H, H, 3) → uint8 (B, size, size, 3), seen as ``crop`` says
    (:func:`~cvtlab.data.decode.decode_image`): resized bilinearly (antialiased) to ``size``,
    or for a crop fraction to ``size / crop`` and the centre ``size`` × ``size`` taken.

    Batches of a dataset kept at its own smaller size (``open_decoded(..., upscale=False)``)
    come to the model's view here, on the device, instead of being stored upscaled: the same
    pixels as decoding at ``size``, within 2 grey levels of Pillow's resize on a CPU (uint8
    kernel) and 1 on a GPU (through float, rounded)."""
    side = size if crop in (1.0, "squash") else resized_side(size, crop)
    if images.shape[1:3] != (side, side):
        x = images.permute(0, 3, 1, 2)
        if x.device.type == "cpu":
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
        else:  # CUDA's bilinear kernels take floats only
            x = _resize_through_float(x, side)
        images = x.permute(0, 2, 3, 1)
    if side != size:
        top = (side - size) // 2  # as decode_image crops: the centre, rounded down
        images = images[:, top : top + size, top : top + size]
    return images


def _resize_through_float(x: torch.Tensor, size: int) -> torch.Tensor:
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def denormalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Normalised (B, 3, H, W) → float in [0, 1], for showing images."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


class BatchAugment:
    """uint8 (B, H, W, 3) images and int labels → normalised float images and (soft) targets."""

    def __init__(self, cfg: AugmentConfig, num_classes: int):
        self.cfg = cfg
        self.num_classes = num_classes
        self.auto = {
            "trivial": T.TrivialAugmentWide(),
            "rand": T.RandAugment(num_ops=2, magnitude=cfg.rand_magnitude),
            None: None,
        }[cfg.auto_augment]
        self.mixup = (
            Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                prob=cfg.mix_prob,
                label_smoothing=cfg.label_smoothing,
                num_classes=num_classes,
            )
            if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mix_prob > 0
            else None
        )
        self._erase: RandomErasing | None = None

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if cfg.crop == "pad" or (cfg.crop == "none" and cfg.flip):
            images = crop_flip(images, cfg.crop_padding if cfg.crop == "pad" else 0, cfg.flip)
        x = images.permute(0, 3, 1, 2)  # uint8 (B, 3, H, W)
        if self.auto is not None:
            g = max(1, cfg.group_size)
            x = torch.cat([self.auto(chunk.contiguous()) for chunk in x.split(g)])
        if cfg.crop == "rrc":
            x = normalize(random_resized_crop(x.float().div_(255), cfg.rrc_scale, flip=cfg.flip))
        else:
            x = normalize(x.permute(0, 2, 3, 1))  # back to (B, H, W, 3): a view, no copy
        if cfg.random_erase > 0 and x.device.type != "cpu":
            x = random_erase(x, cfg.random_erase)
        elif cfg.random_erase > 0:
            # On a CPU timm's per-sample loop is cheap, and it draws noise for the erased pixels
            # only, where the batched version would draw it for the whole batch.
            if self._erase is None or self._erase.device != x.device:
                self._erase = RandomErasing(cfg.random_erase, mode="pixel", device=x.device)
            x = self._erase(x)
        if self.mixup is not None and len(x) % 2 == 0:
            return self.mixup(x, labels)
        if cfg.label_smoothing > 0:
            off = cfg.label_smoothing / self.num_classes
            targets = torch.full((len(labels), self.num_classes), off, device=x.device)
            targets.scatter_(1, labels[:, None], 1.0 - cfg.label_smoothing + off)
            return x, targets
        return x, labels
