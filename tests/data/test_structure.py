"""The structure checker: the synthetic data scores ~perfectly; noise, blanks and broken layouts do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sagan_cli.config import DataConfig
from sagan_cli.data.datasets import build_dataset
from sagan_cli.data.structure import find_blobs, score_images


def real_images(n: int, resolution: int = 32, per_side: int = 1, num_classes: int = 0) -> torch.Tensor:
    cfg = DataConfig(kind="synthetic", synthetic_size=n, synthetic_blobs_per_side=per_side)
    ds = build_dataset(cfg, resolution, num_classes)
    return torch.stack([ds[i][0] for i in range(n)])


@pytest.mark.parametrize("resolution, per_side, num_classes", [(32, 1, 0), (64, 1, 5), (32, 2, 0), (64, 2, 0)])
def test_dataset_scores_perfectly(resolution, per_side, num_classes):
    s = score_images(real_images(100, resolution, per_side, num_classes), blobs_per_side=per_side)
    assert s["valid_fraction"] >= 0.98 and s["blob_count_accuracy"] >= 0.98
    assert s["symmetry_ratio"] < 0.05 and s["mean_blobs"] == pytest.approx(2 * per_side, abs=0.05)


def test_input_forms_agree():
    x = real_images(20)
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    assert score_images(x) == score_images(u8) == score_images(u8.permute(0, 2, 3, 1).numpy())
    with pytest.raises(ValueError):
        score_images(x[0])
    with pytest.raises(ValueError):
        score_images(u8.numpy())  # numpy must be channels-last


def test_noise_and_blank_images_score_badly():
    g = torch.Generator().manual_seed(0)
    noise = score_images(torch.randn(50, 3, 32, 32, generator=g).clamp(-1, 1))
    assert noise["valid_fraction"] == 0 and noise["symmetry_ratio"] > 0.9
    for value in (-1.0, -0.8, 0.5):  # blank images are trivially mirror-symmetric but have no structure
        blank = score_images(torch.full((10, 3, 32, 32), value))
        assert blank == {"blob_count_accuracy": 0.0, "valid_fraction": 0.0, "symmetry_ratio": 1.0, "mean_blobs": 0.0}


def test_shifted_real_images_score_badly():
    x = real_images(100)
    shifted = x.clone()
    shifted[..., 3:] = x[..., :-3]
    shifted[..., :3] = x[..., :1]  # fill with the (background) border column
    s = score_images(shifted)
    assert s["blob_count_accuracy"] >= 0.98  # blobs are still there ...
    assert s["valid_fraction"] < 0.05 and s["symmetry_ratio"] > 0.8  # ... but no longer mirrored


def test_wrong_count_and_misplaced_partner_are_invalid():
    x = real_images(1)[0]
    one_side = x.clone()
    one_side[:, :, 16:] = x[:, :, :1]  # erase the right half: one blob
    left = x[:, :, :16]
    moved = torch.cat([left, torch.roll(left, 4, dims=1).flip(-1)], dim=-1)  # partner 4 px lower
    s = score_images(torch.stack([x, one_side, moved]))
    assert s["blob_count_accuracy"] == pytest.approx(2 / 3) and s["valid_fraction"] == pytest.approx(1 / 3)
    assert s["mean_blobs"] == pytest.approx(5 / 3)


def test_find_blobs_centroids():
    image = np.zeros((32, 32, 3))
    image[4:9, 6:11] = 1.0  # 5x5 square centred at (8, 6)
    image[20:22, 20:21] = 1.0  # 2 px: too small to be a blob
    assert np.allclose(find_blobs(image), [[8.0, 6.0]])
