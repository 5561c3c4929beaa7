"""Shared fixtures: small image files written into pytest's tmp_path."""

from __future__ import annotations

import os

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

# Exact comparisons on a CUDA machine: no TF32 in matmuls and convolutions.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
# Under pytest-xdist each worker gets its share of the cores, not all of them (oversubscribed
# workers made the suite crawl on a 16-core GPU machine).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

RGB = tuple[int, int, int]


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """write_image(path, colour, size=(40, 30)): a flat-colour image; the suffix picks the format."""

    def write(path: Path, colour: RGB, size: tuple[int, int] = (40, 30)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colour).save(path)
        return path

    return write


@pytest.fixture
def image_folder(tmp_path: Path, write_image: Callable[..., Path]) -> Path:
    """Two class folders: cats (2 red PNGs, one nested) and dogs (2 blue JPEGs), plus a non-image."""
    root = tmp_path / "images"
    write_image(root / "cats" / "a.png", (250, 0, 0))
    write_image(root / "cats" / "more" / "b.png", (250, 0, 0), size=(30, 50))
    write_image(root / "dogs" / "c.jpg", (0, 0, 250))
    write_image(root / "dogs" / "d.JPEG", (0, 0, 250))
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root
