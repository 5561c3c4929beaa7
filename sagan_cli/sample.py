"""Generate images from a generator checkpoint: seeded noise, class labels, truncation, PNG/NPZ output.

All noise is drawn up front on the CPU from one seeded generator, so a seed names the same images
whatever the batch size or device; batching only decides how the work is split.
"""

from __future__ import annotations

import math
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn.utils import parametrize
from torchvision.utils import make_grid

from sagan_cli.checkpoint import atomic_write, load_model
from sagan_cli.config import ModelConfig
from sagan_cli.errors import UserError

FORMATS = ("png", "npz")
GRID_MAX = 64  # images shown in grid.png; more would make an unreadable poster
PNG_LEVEL = 1  # zlib level: ~3x faster than Pillow's default 6 for ~10% larger files
WRITERS = 4  # PNG writer threads (zlib releases the GIL, so they overlap with the generator)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` -> cuda when available, else cpu; an unknown or missing device is a UserError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for CUDA, but no CUDA GPU is available; use --device cpu")
    return resolved


def make_noise(n: int, z_dim: int, *, seed: int, truncation: float | None = None) -> torch.Tensor:
    """[n, z_dim] standard normal noise; with `truncation` T every entry is redrawn into [-T, T]."""
    rng = torch.Generator().manual_seed(seed)
    if truncation is None:
        return torch.randn(n, z_dim, generator=rng)
    if not truncation > 0:
        raise UserError(f"--truncation must be > 0 (e.g. 0.5 or 1.0), got {truncation}")
    z = torch.empty(n, z_dim)
    return nn.init.trunc_normal_(z, 0.0, 1.0, -truncation, truncation, generator=rng)


def make_labels(n: int, num_classes: int, classes: int | Sequence[int] | None) -> torch.Tensor | None:
    """Class labels for n images: None for an unconditional model; by default classes in equal runs."""
    if num_classes == 0:
        if classes is not None:
            raise UserError("--class was given, but this model is unconditional (num_classes = 0); drop --class")
        return None
    if classes is None:
        return torch.arange(n) * num_classes // n  # 0,0,..,1,1,..: every class, in equal runs
    labels = torch.full((n,), classes) if isinstance(classes, int) else torch.as_tensor(list(classes))
    if labels.shape != (n,):
        raise UserError(f"give one class or exactly {n} labels, got {labels.numel()}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise UserError(f"--class {int(bad[0])} is out of range: this model has classes 0-{num_classes - 1}")
    return labels.long()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> [0, 255] uint8, rounded to nearest (as torchvision's save_image does)."""
    return images.add(1).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)


def to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats or uint8, [..., C, H, W] -> uint8 with 3 channels: a grayscale image is repeated.

    For consumers that want RGB whatever the model draws (Inception and torch-fidelity).
    """
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    if images.shape[-3] == 1:
        images = images.expand(*images.shape[:-3], 3, *images.shape[-2:]).contiguous()
    return images


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 [C, H, W] -> a Pillow image: mode 'L' for 1 channel, 'RGB' for 3."""
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


def iter_generate(
    generator: nn.Module, z: torch.Tensor, labels: torch.Tensor | None, *, batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """Yield uint8 CPU batches [b, C, H, W] of G(z, labels) in eval mode, without autograd.

    Eval mode makes spectral norm use its stored singular vectors (no power iteration) and BatchNorm
    its running statistics, so an image does not depend on its batch-mates. The caller's train/eval
    mode is restored afterwards.
    """
    was_training = generator.training
    generator.eval()
    try:
        with torch.inference_mode(), parametrize.cached():
            for start in range(0, z.shape[0], batch_size):
                noise_batch = z[start : start + batch_size].to(device, non_blocking=True)
                label_batch = None if labels is None else labels[start : start + batch_size].to(device)
                yield to_uint8(generator(noise_batch, label_batch)).cpu()
    finally:
        generator.train(was_training)


def _check_counts(n: int, batch_size: int) -> None:
    if n <= 0:
        raise UserError(f"-n must be a positive number of images, got {n}")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be > 0, got {batch_size}")


def generate(
    generator: nn.Module,
    n: int,
    *,
    seed: int = 0,
    classes: int | Sequence[int] | None = None,
    truncation: float | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n images from `generator` as uint8 [n, C, H, W] on the CPU, and their labels (None if unconditional).

    `device` defaults to the generator's own device; the generator is moved there if needed.
    """
    _check_counts(n, batch_size)
    config = generator.config
    torch_device = next(generator.parameters()).device if device is None else resolve_device(device)
    generator.to(torch_device)
    z = make_noise(n, config.z_dim, seed=seed, truncation=truncation)
    labels = make_labels(n, config.num_classes, classes)
    images = torch.cat(list(iter_generate(generator, z, labels, batch_size=batch_size, device=torch_device)))
    return images, labels


def grid_indices(n: int) -> torch.Tensor:
    """The (at most GRID_MAX) images grid.png shows: evenly spread over the set, so every class shows."""
    return torch.linspace(0, n - 1, min(n, GRID_MAX)).round().long().unique()


def grid_image(images: torch.Tensor) -> Image.Image:
    """uint8 [k, C, H, W] -> one square grid image with 2-pixel black gutters ('L' mode when C = 1)."""
    grid = make_grid(images, nrow=math.ceil(math.sqrt(images.shape[0])), padding=2, pad_value=0)
    return to_pil(grid[: images.shape[1]])  # make_grid repeats one channel to three


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="png", compress_level=PNG_LEVEL))


def _write_pngs(batch: torch.Tensor, start: int, out_dir: Path) -> None:
    for i, image in enumerate(batch):
        to_pil(image).save(out_dir / f"{start + i:06d}.png", compress_level=PNG_LEVEL)


def _prepare_out(out_dir: Path) -> None:
    """Create the output folder now, so a bad path fails before any work is done."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder for the samples")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()  # can we create files there?
    except OSError as exc:
        raise UserError(f"cannot write to --out {out_dir} ({exc.strerror or exc}); choose a writable folder") from None


def sample_images(
    ckpt_path: str | Path,
    n: int,
    out_dir: str | Path,
    *,
    seed: int = 0,
    classes: int | Sequence[int] | None = None,
    truncation: float | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    fmt: str = "png",
    on_batch: Callable[[int], None] | None = None,
) -> Path:
    """Write n samples of a generator checkpoint into out_dir; return the folder (png) or the .npz file.

    png: 000000.png, 000001.png, ... ('L' mode for a grayscale model) and grid.png.  npz: samples.npz
    holding `images` (uint8 [n, H, W, C], C = 1 or 3) and `labels` (int64 [n], -1 for an unconditional model), plus grid.png.
    `on_batch(done)` is called after each batch with the number of images generated so far (a progress bar).
    """
    _check_counts(n, batch_size)
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    torch_device = resolve_device(device)
    generator, _ = load_model(ckpt_path, expect="generator", device=torch_device)
    generator.to(memory_format=torch.channels_last)  # measured 1.5-2x faster convolutions on CPU
    config = generator.config
    z = make_noise(n, config.z_dim, seed=seed, truncation=truncation)
    labels = make_labels(n, config.num_classes, classes)
    out_dir = Path(out_dir)
    _prepare_out(out_dir)

    files = _NpzFile(out_dir, labels, n, config) if fmt == "npz" else _PngFiles(out_dir)
    picks, shown, done = grid_indices(n), [], 0
    try:
        with files:
            for batch in iter_generate(generator, z, labels, batch_size=batch_size, device=torch_device):
                shown.append(batch[picks[(picks >= done) & (picks < done + len(batch))] - done])
                files.add(batch, done)
                done += len(batch)
                if on_batch is not None:
                    on_batch(done)
            files.wait()  # a failed write stops here, before grid.png
        _save_png(grid_image(torch.cat(shown)), out_dir / "grid.png")
        return files.finish()
    except OSError as exc:
        raise UserError(
            f"writing samples to {out_dir} failed ({exc.strerror or exc}); check free space and permissions"
        ) from None


class _PngFiles:
    """000000.png, 000001.png, ...: written by WRITERS threads while the generator draws the next batch."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.pool, self.pending = out_dir, ThreadPoolExecutor(WRITERS), deque()

    def __enter__(self) -> _PngFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)

    def add(self, batch: torch.Tensor, start: int) -> None:
        self.pending.append(self.pool.submit(_write_pngs, batch, start, self.out_dir))
        while len(self.pending) > 2 * WRITERS:  # bound the batches waiting in memory
            self.pending.popleft().result()

    def wait(self) -> None:
        while self.pending:
            self.pending.popleft().result()  # a failed write raises here

    def finish(self) -> Path:
        return self.out_dir


class _NpzFile:
    """samples.npz: the images gathered in memory, written once (atomically) at the end."""

    def __init__(self, out_dir: Path, labels: torch.Tensor | None, n: int, config: ModelConfig):
        self.path = out_dir / "samples.npz"
        self.images = np.empty((n, config.resolution, config.resolution, config.channels), np.uint8)
        self.labels = (labels if labels is not None else torch.full((n,), -1)).numpy().astype(np.int64)

    def __enter__(self) -> _NpzFile:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add(self, batch: torch.Tensor, start: int) -> None:
        self.images[start : start + len(batch)] = batch.permute(0, 2, 3, 1).numpy()

    def wait(self) -> None:
        pass

    def finish(self) -> Path:
        atomic_write(self.path, lambda tmp: _savez(tmp, {"images": self.images, "labels": self.labels}))
        return self.path


def _savez(tmp: str, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as handle:  # a file object, or numpy would append ".npz" to the temporary name
        np.savez(handle, **arrays)
