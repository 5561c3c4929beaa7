"""Datasets read in the raw byte formats they are distributed in: MNIST-family IDX files and
CIFAR-10's binary batches. Nothing is converted, unpickled or written next to the data.

A whole split is decoded once into one uint8 tensor [N, C, H, W] in memory (Fashion-MNIST's
60,000 training images are 47 MB, CIFAR-10's 50,000 are 154 MB); each item then goes through the
same resize-and-crop as a folder image (`data.to_model_input`), so `kind = "idx"` and a PNG export
of the same files give identical tensors. 28x28 digits and garments are resized to 32x32 with
antialiasing rather than padded: every resolution works the same way, and the numbers compare with
runs on PNG folders.

torchvision's MNIST readers are not used: they open un-gzipped files only, check the header with
`assert`, and accept a file shorter than its header says. The IDX header is 2 zero bytes, a type
byte (0x08: unsigned byte), the number of dimensions, then each dimension as a big-endian int32.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sagan_cli.errors import UserError

IDX_HELP = ("expected train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] (t10k-* for data.split = "
            "'test'), as MNIST, Fashion-MNIST and KMNIST ship them; on Debian/Ubuntu "
            "`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist")
CIFAR_HELP = ("set data.path to the cifar-10-batches-bin folder of CIFAR-10's binary version "
              "(cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)")
# an images file: optional prefix (EMNIST's "emnist-letters-"), split tag, "-images", "-idx3-ubyte" or ".idx3-ubyte"
IDX_IMAGES = re.compile(r"^(?P<prefix>.*?[-_.])?(?P<tag>train|t10k|test)-images[-.]idx3-ubyte(?P<gz>\.gz)?$")
SPLIT_TAGS = {"train": ("train",), "test": ("t10k", "test")}
CIFAR_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
CIFAR_SIDE = 32
CIFAR_RECORD = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE  # one label byte, then 1024 red, 1024 green, 1024 blue bytes
CIFAR_CLASSES = 10


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise UserError(f"cannot read {path}: {exc} (a damaged or truncated download?)") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX file as a numpy array of `ndim` dimensions; a bad file is a UserError."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise UserError(f"{path} is not an IDX file (its first bytes are {raw[:4].hex() or 'missing'}, "
                        "an IDX file starts with 0000 08 0N)")
    if raw[2] != 0x08:
        raise UserError(f"{path} holds IDX type 0x{raw[2]:02x}; sagan reads unsigned-byte (0x08) images and labels")
    if raw[3] != ndim:
        raise UserError(f"{path} has {raw[3]} dimensions, expected {ndim} "
                        f"({'N x H x W images' if ndim == 3 else 'N labels'}): images and labels swapped?")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated: its header is incomplete")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise UserError(f"{path} is truncated or damaged: its header says {' x '.join(map(str, dims))} "
                        f"({expected} bytes of data) but it holds {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, count=expected, offset=header).reshape(dims)


def _labels_file(images: Path) -> Path | None:
    """train-images-idx3-ubyte[.gz] -> the train-labels-idx1-ubyte[.gz] beside it (either compression)."""
    stem = images.name.removesuffix(".gz").replace("images", "labels").replace("idx3", "idx1")
    found = [images.parent / name for name in (stem, stem + ".gz") if (images.parent / name).is_file()]
    return found[0] if found else None


def find_idx(path: str, split: str) -> tuple[Path, Path | None]:
    """(images file, labels file or None): data.path is a folder holding the split's files, or one images file."""
    root = Path(path).expanduser()
    if root.is_file():
        return root, _labels_file(root)
    if not root.is_dir():
        raise UserError(f"data.path {root} does not exist: {IDX_HELP}")
    found: dict[str, Path] = {}
    for candidate in sorted(root.iterdir()):
        match = IDX_IMAGES.match(candidate.name)
        if match and match["tag"] in SPLIT_TAGS[split] and candidate.is_file():
            found.setdefault(candidate.name.removesuffix(".gz"), candidate)  # sorted: the un-gzipped copy wins (faster)
    if not found:
        raise UserError(f"no IDX {split} images in {root}: {IDX_HELP}")
    if len(found) > 1:
        names = ", ".join(image_file.name for image_file in found.values())
        raise UserError(f"{root} holds several IDX {split} image files ({names}): set data.path to one of them")
    images = next(iter(found.values()))
    return images, _labels_file(images)


class ArrayImages(Dataset):
    """Images decoded up front into uint8 [N, C, H, W]; `transform(image, resolution)` runs on access."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, resolution: int, transform, source: str,
                 class_names: list[str] | None = None):
        if len(images) == 0:
            raise UserError(f"{source} holds no images: check data.path")
        self.images, self.labels, self.resolution, self.source = images, labels, resolution, source
        self.transform = transform
        self.class_names = class_names or []
        self.channels = int(images.shape[1])
        self.skipped = 0  # decoded up front: nothing can turn out unreadable later

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index], self.resolution), int(self.labels[index])


def check_classes(labels: np.ndarray, num_classes: int, source: str) -> None:
    """model.num_classes must match the labels (0: unconditional, labels unused)."""
    if num_classes == 0:
        return
    top = int(labels.max())
    if num_classes != top + 1:
        raise UserError(f"model.num_classes is {num_classes} but {source} has labels 0-{top} ({top + 1} classes): "
                        f"set model.num_classes = {top + 1}, or 0 for unconditional")


def _stamp(*paths: Path | None) -> tuple:
    return tuple((path.stat().st_size, path.stat().st_mtime_ns) if path is not None else None for path in paths)


@functools.lru_cache(maxsize=4)
def _decoded_idx(images: Path, labels: Path | None, stamp: tuple) -> tuple[torch.Tensor, np.ndarray | None]:
    """Decoded once per process and file version (stamp: sizes and mtimes); training and evaluation share it."""
    pixels = read_idx(images, 3)
    if "emnist" in images.name.lower():  # EMNIST stores each image transposed (column-major)
        pixels = pixels.transpose(0, 2, 1)
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)[:, None].copy())  # copy: frombuffer is read-only
    if labels is None:
        return tensor, None
    values = read_idx(labels, 1)
    if len(values) != len(tensor):
        raise UserError(f"{images} holds {len(tensor)} images but {labels} holds {len(values)} labels: "
                        "the two files come from different sets")
    return tensor, values.astype(np.int64)


def load_idx(path: str, split: str, need_labels: bool) -> tuple[torch.Tensor, np.ndarray, str, list[Path]]:
    """An MNIST-family IDX set: (uint8 [N, 1, H, W], labels (zeros without a labels file), source, files)."""
    images, labels_path = find_idx(path, split)
    if labels_path is None and need_labels:
        expected = images.name.removesuffix(".gz").replace("images", "labels").replace("idx3", "idx1")
        raise UserError(f"no labels file {expected}[.gz] beside {images}: model.num_classes > 0 needs it "
                        "(or set model.num_classes = 0 for unconditional)")
    pixels, labels = _decoded_idx(images, labels_path, _stamp(images, labels_path))
    if labels is None:
        labels = np.zeros(len(pixels), dtype=np.int64)
    return pixels, labels, str(images), [file for file in (images, labels_path) if file is not None]


def _cifar_root(path: str) -> Path:
    root = Path(path).expanduser()
    if (root / "cifar-10-batches-bin").is_dir():  # the folder the archive unpacks into, one level up
        root = root / "cifar-10-batches-bin"
    if not root.is_dir():
        raise UserError(f"data.path {root} does not exist: {CIFAR_HELP}")
    return root


def cifar_files(path: str, split: str) -> list[Path]:
    root = _cifar_root(path)
    files = [root / name for name in CIFAR_FILES[split]]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise UserError(f"{root} lacks {', '.join(missing)}: {CIFAR_HELP}")
    return files


@functools.lru_cache(maxsize=2)
def _decoded_cifar(files: tuple[Path, ...], stamp: tuple) -> tuple[torch.Tensor, np.ndarray]:
    chunks = []
    for file in files:
        raw = _read_bytes(file)
        if len(raw) == 0 or len(raw) % CIFAR_RECORD:
            raise UserError(f"{file} is truncated or not a CIFAR-10 binary batch: {len(raw)} bytes is not a "
                            f"whole number of {CIFAR_RECORD}-byte records")
        chunks.append(np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD))
    records = np.concatenate(chunks)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= CIFAR_CLASSES:
        raise UserError(f"{files[0].parent} has label {labels.max()}, but CIFAR-10 has labels 0-9 "
                        "(CIFAR-100's binary records, with two label bytes, are not supported)")
    images = torch.from_numpy(records[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).copy())
    return images, labels


def load_cifar10(path: str, split: str) -> tuple[torch.Tensor, np.ndarray, str, list[Path], list[str]]:
    """CIFAR-10's binary version: (uint8 [N, 3, 32, 32], labels, source, files, class names)."""
    files = cifar_files(path, split)
    images, labels = _decoded_cifar(tuple(files), _stamp(*files))
    meta = files[0].parent / "batches.meta.txt"
    names = meta.read_text(errors="replace").split() if meta.is_file() else []
    return images, labels, str(files[0].parent), files, names if len(names) == CIFAR_CLASSES else []


def files_identity(files: list[Path]) -> str:
    """A content hash of the distributed files (sha256 of 30 MB of gzip takes ~15 ms here)."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        try:
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
        except OSError as exc:
            raise UserError(f"cannot read {file}: {exc.strerror or exc}") from None
    return digest.hexdigest()
