"""Shared fixtures: small image files, IDX files and CIFAR-10 binary batches written into pytest's tmp_path."""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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



def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that launch several processes go first: each takes tens of seconds and two cores, so started
    last (in file order) they ran side by side on the suite's critical path; started first, the many short
    tests fill the other worker around them."""
    items.sort(key=lambda item: item.get_closest_marker("processes") is None)  # stable: file order otherwise


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


def idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    """An array in the IDX format: two zero bytes, the type, the number of dimensions, each
    dimension as a big-endian int32, then the data."""
    return bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool | None = None) -> Path:
    """Write `array` (uint8) as an IDX file; gzipped when the name ends in .gz (or `gz` says so)."""
    data = idx_bytes(np.ascontiguousarray(array, dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if (path.suffix == ".gz" if gz is None else gz) else data)
    return path


def tiny_garments(n: int, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, 28, 28], labels [n]): class k is a block k+1 quarters wide under a bright bar along the
    top rows (so a transposed read shows), plus noise so no two images are equal."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 30, (n, 28, 28), dtype=np.uint8)
    images[:, 1:4, :] = 250
    for i, k in enumerate(labels):
        images[i, 8:24, 2 : 2 + 6 * (k + 1)] = 180
    return images, labels.astype(np.uint8)


@dataclass
class IdxSet:
    root: Path
    train: tuple[np.ndarray, np.ndarray]  # gzipped on disk
    test: tuple[np.ndarray, np.ndarray]  # plain on disk (t10k-*)


@pytest.fixture
def idx_folder(tmp_path: Path) -> IdxSet:
    """A Fashion-MNIST-shaped folder in miniature: 12 gzipped train images (3 classes), 6 plain t10k ones."""
    root = tmp_path / "fashion"
    train, test = tiny_garments(12), tiny_garments(6, seed=1)
    write_idx(root / "train-images-idx3-ubyte.gz", train[0])
    write_idx(root / "train-labels-idx1-ubyte.gz", train[1])
    write_idx(root / "t10k-images-idx3-ubyte", test[0])
    write_idx(root / "t10k-labels-idx1-ubyte", test[1])
    return IdxSet(root, train, test)


def cifar_records(labels: list[int]) -> bytes:
    """CIFAR-10 binary records: label byte, then the red, green and blue planes (32 x 32 each).
    Image i: red 200, green 10 * i, blue = 20 * label."""
    out = b""
    for i, label in enumerate(labels):
        planes = np.stack([np.full((32, 32), 200), np.full((32, 32), 10 * i), np.full((32, 32), 20 * label)])
        out += bytes([label]) + planes.astype(np.uint8).tobytes()
    return out


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def cifar_folder(tmp_path: Path) -> Path:
    """cifar-10-batches-bin in miniature: five train batches of 2 records, a test batch of 3, the class names."""
    root = tmp_path / "cifar" / "cifar-10-batches-bin"
    root.mkdir(parents=True)
    for b in range(1, 6):
        (root / f"data_batch_{b}.bin").write_bytes(cifar_records([2 * b - 2, 2 * b - 1]))
    (root / "test_batch.bin").write_bytes(cifar_records([9, 0, 4]))
    (root / "batches.meta.txt").write_text("\n".join(CIFAR_NAMES) + "\n\n")
    return root
