"""Drive a generator: seeded noise, class labels, batched generation in eval mode, uint8 and Pillow images.

All noise is drawn up front on the CPU from one seeded generator, so a seed names the same images
whatever the batch size or device; batching only decides how the work is split. Below the commands
that write files (sampling, interpolation, export), the report and the training monitor, which all use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from PIL import Image
from torch import nn
from torch.nn.utils import parametrize
from torchvision.utils import make_grid

from sagan_cli.errors import UserError

GRID_MAX = 64  # images shown in grid.png; more would make an unreadable poster


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


def check_counts(n: int, batch_size: int) -> None:
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
    check_counts(n, batch_size)
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
