"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) of the images D sees, real and generated alike.

D trained on few images memorises them; showing it randomly transformed images slows that down. The fakes get
the same kind of transform (else G would learn to draw the transforms) and G is trained through it, so G's
own samples stay untransformed. Each op
is a plain function of an NCHW batch in [-1, 1]: differentiable, so G's gradient flows back through it; one
independent draw per sample; on the batch's device and dtype, vectorised (no loop over samples, no host
wait). Randomness comes from torch's global generator on the device, so a resumed run restores it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sagan_cli.config import augment_policy

TRANSLATION_FRACTION = 1 / 8  # the largest shift, as a fraction of the image size (the paper's ratio; whole pixels,
# rounded down)
CUTOUT_FRACTION = 1 / 2  # the side of the zeroed square, as a fraction of the image size (the paper's ratio; the
# square stays wholly inside the image, where the paper's may cross the border)


def _uniform(images: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """One draw per sample, shaped to broadcast over C, H, W."""
    draw = torch.rand(images.shape[0], 1, 1, 1, device=images.device, dtype=images.dtype)
    return draw * (high - low) + low


def color(images: torch.Tensor) -> torch.Tensor:
    """Brightness (+U(-0.5, 0.5)), saturation (deviation from the pixel's channel mean x U(0, 2), RGB only:
    a grayscale pixel has no deviation) and contrast (deviation from the image's mean x U(0.5, 1.5))."""
    images = images + _uniform(images, -0.5, 0.5)
    if images.shape[1] > 1:
        pixel_mean = images.mean(dim=1, keepdim=True)
        images = (images - pixel_mean) * _uniform(images, 0.0, 2.0) + pixel_mean
    image_mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - image_mean) * _uniform(images, 0.5, 1.5) + image_mean


def translation(images: torch.Tensor) -> torch.Tensor:
    """Shift each sample by whole pixels, up to 1/8 of the size each way, filling with zeros.

    The batch is zero-padded by the largest shift, then each output pixel reads (y - dy, x - dx) of its own
    sample through one advanced index (a gather: its backward scatters the gradient back)."""
    n, _, height, width = images.shape
    pad_y, pad_x = int(height * TRANSLATION_FRACTION), int(width * TRANSLATION_FRACTION)
    shift_y = torch.randint(-pad_y, pad_y + 1, (n, 1, 1), device=images.device)
    shift_x = torch.randint(-pad_x, pad_x + 1, (n, 1, 1), device=images.device)
    rows = torch.arange(height, device=images.device).view(1, height, 1) + pad_y - shift_y  # (n, H, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width) + pad_x - shift_x  # (n, 1, W)
    padded = F.pad(images, (pad_x, pad_x, pad_y, pad_y)).permute(0, 2, 3, 1)  # NHWC view: index H and W together
    sample = torch.arange(n, device=images.device).view(n, 1, 1)
    return padded[sample, rows, cols].permute(0, 3, 1, 2)  # (n, H, W, C) -> NCHW (channels-last in memory)


def cutout(images: torch.Tensor) -> torch.Tensor:
    """Zero a square of half the image size at a random place in each sample (always wholly inside the image,
    so every sample loses exactly that many pixels)."""
    n, _, height, width = images.shape
    side_y, side_x = int(height * CUTOUT_FRACTION), int(width * CUTOUT_FRACTION)
    top = torch.randint(0, height - side_y + 1, (n, 1, 1, 1), device=images.device)
    left = torch.randint(0, width - side_x + 1, (n, 1, 1, 1), device=images.device)
    rows = torch.arange(height, device=images.device).view(1, 1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, 1, width)
    inside = (rows >= top) & (rows < top + side_y) & (cols >= left) & (cols < left + side_x)
    return images * (~inside).to(images.dtype)


OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"color": color, "translation": translation,
                                                           "cutout": cutout}


def identity(images: torch.Tensor) -> torch.Tensor:
    return images


def make_augment(policy: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The policy's ops applied in the order written; "" gives `identity` (no op, no random draw)."""
    ops = [OPS[name] for name in augment_policy(policy)]
    if not ops:
        return identity

    def augment(images: torch.Tensor) -> torch.Tensor:
        for op in ops:
            images = op(images)
        return images

    return augment
