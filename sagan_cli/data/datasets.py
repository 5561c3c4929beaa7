"""Datasets (folder, LSUN LMDB, synthetic; IDX and CIFAR-10 binary through `formats`) and the image
transform every command shares.

Every dataset yields `(image, label)`: float32 [C, R, R] in [-1, 1] and an int (0 when
unconditional); C is 3, or 1 for grayscale data (IDX files, or folder/LSUN images read with
`channels = 1`). Datasets do no random augmentation: the training loop flips images with its own
RNG, so a resumed run sees exactly the same batches.

Unreadable images (a corrupt file, a bad LMDB value) are found lazily, because decoding a million
images up front would delay training by hours. Construction only checks that one image decodes;
`__getitem__` replaces a bad item by the next readable one, logs one line naming it, and marks it
in a shared-memory flag array, so the warn-once rule and the count (`dataset.skipped`) hold across
DataLoader worker processes.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import logging
import os
import struct
from pathlib import Path

import lmdb
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from sagan_cli.config import DATA_CHANNELS, DataConfig
from sagan_cli.data import formats
from sagan_cli.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                  ".ppm", ".pgm", ".pbm", ".pnm", ".tga"}
# What Pillow raises on damaged data varies by format and by where in the file the damage is.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError,
                 lmdb.Error, UserError)
LSUN_HELP = ("download a category with `python download.py -c church_outdoor` from "
             "https://github.com/fyu/lsun (or the LSUN website), unzip it, and set data.path "
             "to the *_lmdb directory")


def open_image(path: str | Path) -> Image.Image:
    """Open any image Pillow reads, as RGB; a missing or unreadable file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} " + ("is not a file; give an image file" if path.exists() else "does not exist"))
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, *DECODE_ERRORS) as exc:  # incl. Pillow's DecompressionBombError
        raise UserError(f"cannot read image {path}: {exc}") from None


def to_model_input(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [C, H, W] -> resize the short side to `resolution` (antialiased), center-crop, scale to [-1, 1]."""
    if min(image.shape[-2:]) != resolution:
        image = TF.resize(image, resolution, antialias=True)
    image = TF.center_crop(image, [resolution, resolution])
    return image.float().div(127.5).sub(1.0)


def image_to_tensor(image: Image.Image, resolution: int, channels: int = 3) -> torch.Tensor:
    """A Pillow image as the model sees it: [channels, R, R] in [-1, 1] (1 channel: Pillow's luma)."""
    return to_model_input(TF.pil_to_tensor(image.convert("L" if channels == 1 else "RGB")), resolution)


def _subset(count: int, max_images: int) -> np.ndarray:
    """Indices of at most `max_images` items, spread evenly so every class keeps its share."""
    if max_images <= 0 or max_images >= count:
        return np.arange(count)
    return np.arange(max_images) * count // max_images


class _LazyImages(Dataset):
    """Decodes on demand; a bad item is replaced by the next readable one (see the module doc)."""

    def __init__(self, resolution: int, labels: np.ndarray, class_names: list[str], source: str, channels: int):
        self.resolution, self.channels = resolution, channels
        self.labels = labels
        self.class_names = class_names
        self.source = source
        self._bad = torch.zeros(len(labels), dtype=torch.bool).share_memory_()
        if len(labels) == 0:
            raise UserError(f"no images found in {source}: check data.path")
        self[0]  # fails (UserError) when not a single image decodes

    def _load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def _name(self, index: int) -> str:
        raise NotImplementedError

    @property
    def skipped(self) -> int:
        """Unreadable items met so far, in any process."""
        return int(self._bad.sum())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if self._bad[candidate]:
                continue
            try:
                image = image_to_tensor(self._load(candidate), self.resolution, self.channels)
            except DECODE_ERRORS as exc:
                self._bad[candidate] = True
                log.warning("skipping unreadable image %s: %s", self._name(candidate), str(exc).splitlines()[0])
                continue
            return image, int(self.labels[candidate])
        raise UserError(f"no readable image in {self.source} ({len(self)} tried): check the files or data.path")


def _find_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, sorted; hidden files and folders are left out."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [subfolder for subfolder in dirs if not subfolder.startswith(".")]
        found += [Path(folder, file_name) for file_name in files
                  if not file_name.startswith(".") and Path(file_name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def _folder_root(data: DataConfig) -> Path:
    root = Path(data.path).expanduser()
    if not data.path or not root.is_dir():
        what = f"{root} does not exist" if data.path else "is not set"
        raise UserError(f"data.path {what}: set data.path to a folder of images "
                        "(one sub-folder per class when model.num_classes > 0)")
    return root


class FolderImages(_LazyImages):
    """Every image under a folder, recursively; with classes, label = sorted sub-folder index."""

    def __init__(self, data: DataConfig, resolution: int, num_classes: int = 0, channels: int = 3):
        self.root = _folder_root(data)
        class_names: list[str] = []
        if num_classes > 0:
            class_names = sorted(entry.name for entry in self.root.iterdir()
                                 if entry.is_dir() and not entry.name.startswith("."))
            if len(class_names) != num_classes:
                raise UserError(
                    f"model.num_classes is {num_classes} but {self.root} has {len(class_names)} class "
                    f"sub-folders ({', '.join(class_names[:5]) or 'none'}{', ...' if len(class_names) > 5 else ''}): "
                    "set model.num_classes to the number of sub-folders, or 0 for unconditional")
            files, labels = [], []
            for label, name in enumerate(class_names):
                found = _find_images(self.root / name)
                if not found:
                    raise UserError(f"class folder {self.root / name} has no images: remove it or add images")
                files += found
                labels += [label] * len(found)
        else:
            files = _find_images(self.root)
            labels = [0] * len(files)
        keep = _subset(len(files), data.max_images)
        self.files = [files[i] for i in keep]
        super().__init__(resolution, np.asarray(labels, dtype=np.int64)[keep], class_names, str(self.root), channels)

    def _load(self, index: int) -> Image.Image:
        return open_image(self.files[index])

    def _name(self, index: int) -> str:
        return str(self.files[index])


def _lsun_root(data: DataConfig) -> Path:
    root = Path(data.path).expanduser()
    if root.name == "data.mdb":
        root = root.parent
    if not data.path or not root.is_dir():
        what = f"{root} does not exist" if data.path else "is not set"
        raise UserError(f"LSUN data.path {what}: {LSUN_HELP}")
    if not (root / "data.mdb").is_file():
        raise UserError(f"{root} is not an LMDB directory (no data.mdb in it): {LSUN_HELP}")
    return root


_ENVS: dict[tuple[int, str], lmdb.Environment] = {}


def _open_lmdb(root: Path) -> lmdb.Environment:
    """One read-only environment per process and LMDB: lmdb refuses a second one in a process, and
    one must not cross a fork, so each DataLoader worker opens its own (keyed by process id)."""
    key = (os.getpid(), str(root.resolve()))
    for inherited in [env_key for env_key in _ENVS if env_key[0] != key[0]]:
        _ENVS.pop(inherited).close()  # a forked copy: closing it here leaves the parent's untouched
    if key not in _ENVS:
        try:
            _ENVS[key] = lmdb.open(key[1], readonly=True, lock=False, readahead=False, meminit=False)
        except lmdb.Error as exc:
            raise UserError(f"cannot open LMDB {root}: {exc} ({LSUN_HELP})") from None
    return _ENVS[key]


_KEYS: dict[tuple[str, int, int], tuple[bytes, np.ndarray]] = {}


def _lmdb_keys(root: Path) -> tuple[bytes, np.ndarray]:
    """All keys, read once per process: one bytes blob plus offsets (compact for millions of keys)."""
    stat = (root / "data.mdb").stat()
    cache_key = (str(root.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _KEYS:
        with _open_lmdb(root).begin() as txn:
            keys = list(txn.cursor().iternext(keys=True, values=False))
        offsets = np.cumsum([0] + [len(key) for key in keys], dtype=np.int64)
        _KEYS[cache_key] = (b"".join(keys), offsets)
    return _KEYS[cache_key]


class LSUNImages(_LazyImages):
    """An LSUN category as distributed: one LMDB, keys = image ids, values = encoded images."""

    def __init__(self, data: DataConfig, resolution: int, channels: int = 3):
        self.root = _lsun_root(data)
        self._blob, offsets = _lmdb_keys(self.root)
        keep = _subset(len(offsets) - 1, data.max_images)
        self._starts, self._ends = offsets[keep], offsets[keep + 1]
        super().__init__(resolution, np.zeros(len(keep), dtype=np.int64), [], str(self.root), channels)

    def _key(self, index: int) -> bytes:
        return self._blob[self._starts[index]:self._ends[index]]

    def _load(self, index: int) -> Image.Image:
        with _open_lmdb(self.root).begin() as txn:
            value = txn.get(self._key(index))
        if value is None:
            raise ValueError("key missing from the LMDB")
        with Image.open(io.BytesIO(value)) as opened:
            return opened.convert("RGB")

    def _name(self, index: int) -> str:
        return f"{self.root}[{self._key(index).decode(errors='replace')}]"


# Synthetic geometry, in fractions of the image size. The margins keep blobs off the border (so the
# border median is the background) and apart from the axis and each other (so counts are defined).
MARGIN = 0.05  # between a blob and the border, and between a blob and the mirror axis
GAP = 0.08  # between two blobs on the same side
BACKGROUND = np.array([0.08, 0.08, 0.10])
BLOB_GREY = np.array([0.95, 0.95, 0.95])
SYNTHETIC_VERSION = 1  # bump when the renderer changes, so cached statistics are not reused


class SyntheticBlobs(Dataset):
    """Bright discs on a dark background, exactly left-right mirror-symmetric.

    Each side of the vertical axis holds `blobs_per_side` discs of radius in `radius` (fractions of
    the image size, so any resolution gets the same picture); discs never touch each other, the
    axis or the border. Unconditional: all discs are light grey. With `num_classes` K > 0 the label
    is the disc colour: class k has hue k/K. Item i is a pure function of (seed, i).
    The pilot in FACTS.md found 2 large high-contrast blobs learnable on a CPU in minutes, 4 not.
    """

    def __init__(self, size: int, resolution: int, seed: int = 0, blobs_per_side: int = 1,
                 radius: tuple[float, float] = (0.10, 0.16), num_classes: int = 0):
        band = (1 - 2 * MARGIN) / blobs_per_side
        if 2 * radius[1] + 2 * MARGIN > 0.5 or 2 * radius[1] + GAP > band:
            raise UserError(f"{blobs_per_side} blobs per side of radius up to {radius[1]} do not fit: "
                            "lower data.synthetic_radius_max or data.synthetic_blobs_per_side")
        self.size, self.resolution, self.seed = size, resolution, seed
        self.blobs_per_side, self.radius, self.num_classes = blobs_per_side, radius, num_classes
        self.class_names = [f"hue{round(360 * label / num_classes):03d}" for label in range(num_classes)]
        self.skipped = 0

    def __len__(self) -> int:
        return self.size

    def colour(self, label: int) -> np.ndarray:
        if self.num_classes == 0:
            return BLOB_GREY
        return np.array(colorsys.hsv_to_rgb(label / self.num_classes, 0.85, 1.0))

    def layout(self, index: int) -> tuple[np.ndarray, int]:
        """(left-side discs as rows (cx, cy, r) in fractions of the size, label)."""
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(self.num_classes)) if self.num_classes else 0
        n = self.blobs_per_side
        for _ in range(100):
            radii = rng.uniform(*self.radius, n)
            centre_x = rng.uniform(MARGIN + radii, 0.5 - MARGIN - radii)
            centre_y = rng.uniform(MARGIN + radii, 1 - MARGIN - radii)
            dist = np.hypot(centre_x[:, None] - centre_x, centre_y[:, None] - centre_y)
            if np.all(dist + np.eye(n) * 9 >= radii[:, None] + radii + GAP):
                return np.stack([centre_x, centre_y, radii], axis=1), label
        band = (1 - 2 * MARGIN) / n  # rare crowded draws: one disc per horizontal band always fits
        return np.stack([centre_x, MARGIN + band * (np.arange(n) + 0.5), radii], axis=1), label

    def render(self, index: int) -> tuple[np.ndarray, int]:
        """([R, R, 3] float in [0, 1] on the 8-bit grid, label); the right half mirrors the left."""
        blobs, label = self.layout(index)
        resolution, half = self.resolution, (self.resolution + 1) // 2
        ys, xs = np.arange(resolution)[:, None] + 0.5, np.arange(half)[None, :] + 0.5
        cover = np.zeros((resolution, half))
        for centre_x, centre_y, radius in blobs * resolution:  # anti-aliased disc: coverage ramps over one pixel
            cover = np.maximum(cover, np.clip(radius - np.hypot(xs - centre_x, ys - centre_y) + 0.5, 0, 1))
        left = BACKGROUND + cover[..., None] * (self.colour(label) - BACKGROUND)
        image = np.concatenate([left, left[:, : resolution - half][:, ::-1]], axis=1)
        return np.round(image * 255) / 255, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        image, label = self.render(index)
        chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
        return torch.from_numpy(chw * 2 - 1), label


def _synthetic(data: DataConfig, resolution: int, num_classes: int) -> SyntheticBlobs:
    size = min(data.synthetic_size, data.max_images) if data.max_images > 0 else data.synthetic_size
    return SyntheticBlobs(size, resolution, data.synthetic_seed, data.synthetic_blobs_per_side,
                          (data.synthetic_radius_min, data.synthetic_radius_max), num_classes)


def _arrays(data: DataConfig, resolution: int, num_classes: int) -> formats.ArrayImages:
    """IDX or CIFAR-10 binary files, decoded into memory (see formats.py)."""
    names: list[str] = []
    if data.kind == "idx":
        images, labels, source, _ = formats.load_idx(data.path, data.split, need_labels=num_classes > 0)
    else:
        images, labels, source, _, names = formats.load_cifar10(data.path, data.split)
    formats.check_classes(labels, num_classes, source)
    keep = _subset(len(labels), data.max_images)
    if len(keep) < len(labels):
        images, labels = images[keep], labels[keep]
    return formats.ArrayImages(images, labels, resolution, to_model_input, source, names if num_classes else [])


def build_dataset(data: DataConfig, resolution: int, num_classes: int = 0, channels: int | None = None) -> Dataset:
    """The dataset a recipe names; raises UserError for a missing path or no readable image.

    `channels` (1 or 3) is what the model takes; None: the data's own (1 for IDX, else 3). Folder and
    LSUN images are converted; IDX, CIFAR-10 and synthetic data have a fixed count.
    """
    fixed = DATA_CHANNELS.get(data.kind)
    if channels is not None and fixed is not None and channels != fixed:
        raise UserError(f"model.channels is {channels} but data.kind = {data.kind!r} has {fixed}-channel images: "
                        f"set model.channels = {fixed} (or leave it out to take it from the data)")
    channels = channels or fixed or 3
    if data.kind == "folder":
        return FolderImages(data, resolution, num_classes, channels)
    if data.kind == "lsun":
        if num_classes > 0:
            raise UserError("an LSUN LMDB holds one category without labels: set model.num_classes = 0 "
                            "(or use data.kind = 'folder' with one sub-folder per class)")
        return LSUNImages(data, resolution, channels)
    if data.kind == "synthetic":
        return _synthetic(data, resolution, num_classes)
    if data.kind in ("idx", "cifar10-bin"):
        return _arrays(data, resolution, num_classes)
    raise UserError(f"data.kind must be one of folder, lsun, synthetic, idx, cifar10-bin, got {data.kind!r}")


def dataset_identity(data: DataConfig, resolution: int, num_classes: int = 0) -> str:
    """A short stable id of the images a recipe yields (for caching reference statistics).

    num_classes matters only to the synthetic data, whose colours depend on it.
    """
    digest = hashlib.sha256(f"{data.kind}|{resolution}|{data.max_images}".encode())
    if data.kind == "folder":
        root = _folder_root(data)
        for path in _find_images(root):
            file_stat = path.stat()
            digest.update(f"|{path.relative_to(root).as_posix()}|{file_stat.st_size}|{file_stat.st_mtime_ns}".encode())
    elif data.kind == "lsun":
        root = _lsun_root(data)
        entries = _open_lmdb(root).stat()["entries"]
        digest.update(f"|{root.resolve()}|{entries}|{(root / 'data.mdb').stat().st_size}".encode())
    elif data.kind in ("idx", "cifar10-bin"):  # the files' content, wherever they are installed
        files = (formats.find_idx(data.path, data.split) if data.kind == "idx"
                 else formats.cifar_files(data.path, data.split))
        digest.update(f"|{data.split}|{formats.files_identity([path for path in files if path is not None])}".encode())
    else:
        synthetic = _synthetic(data, resolution, num_classes)
        digest.update(f"|{SYNTHETIC_VERSION}|{synthetic.seed}|{synthetic.size}|{synthetic.blobs_per_side}"
                      f"|{synthetic.radius}|{num_classes}".encode())
    return f"{data.kind}-{resolution}-{digest.hexdigest()[:16]}"
