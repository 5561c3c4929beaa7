"""Structure checker for the synthetic dataset: did the generator learn the mirrored blob layout?

FID says little about a toy dataset with one precise rule, so `sagan eval` and the training log
report how often samples obey the rule. Blob detection follows the pilot in FACTS.md: the
background is the border's median colour, foreground is whatever lies far from it, blobs are its
connected components. All pixel sizes are stated for 32x32 and scale with the resolution.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from sagan_cli.config import DataConfig

THRESHOLD = 0.3  # RGB distance (channels in [0, 1]) from the background that counts as foreground
MIN_PIXELS_32 = 3  # smaller components are noise, not blobs (at 32x32; scaled by area)
MIRROR_TOLERANCE_32 = 1.5  # how far a blob's mirrored centroid may be from its partner (px at 32x32)
MAX_RATIO = 2.0  # cap per-image symmetry ratios, so one image symmetric up-down cannot dominate the mean


def _as_hwc01(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """[N, H, W, 3] floats in [0, 1] from a float [-1, 1] or uint8 tensor [N, 3, H, W], or uint8 numpy [N, H, W, 3]."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"numpy images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        return images.astype(np.float32) / 255
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"image tensors must be [N, 3, H, W], got {tuple(images.shape)}")
    x = images.detach().cpu()
    x = x.float() / 255 if x.dtype == torch.uint8 else (x.float().clamp(-1, 1) + 1) / 2
    return x.permute(0, 2, 3, 1).numpy()


def find_blobs(image: np.ndarray) -> np.ndarray:
    """Centroids (x, y) in pixels of the blobs in one [H, W, 3] image in [0, 1]: shape [K, 2]."""
    h, w, _ = image.shape
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    mask = np.linalg.norm(image - np.median(border, axis=0), axis=-1) > THRESHOLD
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros((0, 2))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = np.flatnonzero(sizes >= max(1, round(MIN_PIXELS_32 * h * w / 32**2))) + 1
    if len(keep) == 0:
        return np.zeros((0, 2))
    centroids_yx = np.array(ndimage.center_of_mass(mask, labels, keep))
    return centroids_yx[:, ::-1]


def is_valid(centroids: np.ndarray, width: int, blobs_per_side: int) -> bool:
    """Right count, half on each side, and every blob's mirror image lands on another blob."""
    if len(centroids) != 2 * blobs_per_side:
        return False
    axis = (width - 1) / 2
    if np.sum(centroids[:, 0] < axis) != blobs_per_side or np.sum(centroids[:, 0] > axis) != blobs_per_side:
        return False
    mirrored = np.stack([width - 1 - centroids[:, 0], centroids[:, 1]], axis=1)
    dist = np.linalg.norm(mirrored[:, None] - centroids[None], axis=-1)
    return bool(np.all(dist.min(axis=1) <= MIRROR_TOLERANCE_32 * width / 32))


def symmetry_ratio(image: np.ndarray, has_blobs: bool) -> float:
    """Left-right mirror error / up-down mirror error: 0 = mirror-symmetric, ~1 = no preference.

    A plain left-right error would call a blank image perfect, so an image without blobs counts as 1.
    """
    if not has_blobs:
        return 1.0
    left_right_error = float(np.abs(image - image[:, ::-1]).mean())
    up_down_error = float(np.abs(image - image[::-1]).mean())
    if up_down_error == 0:
        return 1.0 if left_right_error == 0 else MAX_RATIO
    return min(left_right_error / up_down_error, MAX_RATIO)


def score_images(images: torch.Tensor | np.ndarray,
                 blobs_per_side: int = DataConfig.synthetic_blobs_per_side) -> dict[str, float]:
    """Structure scores of a batch (see `_as_hwc01` for the accepted forms); the dataset scores ~1/~0.

    blob_count_accuracy: fraction with exactly 2 * blobs_per_side blobs
    valid_fraction:      fraction that `is_valid` (the full mirrored layout)
    symmetry_ratio:      mean of `symmetry_ratio` (lower is better; 1 = no learned symmetry)
    mean_blobs:          mean number of blobs found
    """
    batch = _as_hwc01(images)
    if len(batch) == 0:
        raise ValueError("score_images needs at least one image")
    counts, valid, ratios = [], [], []
    for image in batch:
        centroids = find_blobs(image)
        counts.append(len(centroids))
        valid.append(is_valid(centroids, image.shape[1], blobs_per_side))
        ratios.append(symmetry_ratio(image, len(centroids) > 0))
    counts_arr = np.array(counts)
    return {
        "blob_count_accuracy": float(np.mean(counts_arr == 2 * blobs_per_side)),
        "valid_fraction": float(np.mean(valid)),
        "symmetry_ratio": float(np.mean(ratios)),
        "mean_blobs": float(counts_arr.mean()),
    }
