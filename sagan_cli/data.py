"""Datasets (folder, LSUN LMDB, synthetic) and the image transform every command shares."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from sagan_cli.errors import UserError


def open_image(path: str | Path) -> Image.Image:
    """Open any image Pillow reads, as RGB; a missing or unreadable file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None


def image_to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, center-crop to a square, scale to [-1, 1]: [3, R, R]."""
    t = TF.pil_to_tensor(img.convert("RGB"))
    t = TF.resize(t, resolution, antialias=True)
    t = TF.center_crop(t, [resolution, resolution])
    return t.float().div(127.5).sub(1.0)
