"""What each step consumes: real batches in an order that resumes exactly, and the training noise.

The data order is a pure function of (seed, position), and the DataLoader never touches the global RNG;
the flips and the noise are drawn from the device RNG, which the resumable state restores.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from sagan_cli.config import Recipe


def batch_indices(n: int, batch_size: int, *, seed: int, start_batch: int, rank: int,
                  world: int) -> Iterator[list[int]]:
    """Endless batches of dataset indices: epoch e is a permutation seeded by (seed, e).

    Global batch b covers positions [b*B*W, (b+1)*B*W) of the concatenated epochs; rank r takes its
    slice. Starting at `start_batch` therefore resumes the exact same order.
    """
    per_step = batch_size * world
    cached_epoch, permutation = -1, None
    batch = start_batch
    while True:
        first = batch * per_step + rank * batch_size
        indices = []
        for position in range(first, first + batch_size):
            epoch = position // n
            if epoch != cached_epoch:
                epoch_rng = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                cached_epoch, permutation = epoch, torch.randperm(n, generator=epoch_rng).tolist()
            indices.append(permutation[position % n])
        yield indices
        batch += 1


class Data:
    """Endless (real images, labels) batches from the recipe's data position `start_batch`, on the device."""

    def __init__(self, recipe: Recipe, dataset: Dataset, accelerator: Accelerator, start_batch: int):
        self.device = accelerator.device
        self.hflip, self.classes = recipe.data.hflip, recipe.model.num_classes
        self.memory_format = torch.channels_last if recipe.train.channels_last else torch.contiguous_format
        loader = DataLoader(
            dataset,
            batch_sampler=batch_indices(len(dataset), recipe.train.batch_size, seed=recipe.train.seed,
                                        start_batch=start_batch, rank=accelerator.process_index,
                                        world=accelerator.num_processes),
            num_workers=recipe.data.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(recipe.train.seed),  # keeps the global RNG untouched
            persistent_workers=recipe.data.workers > 0,
        )
        self.batches = iter(loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = next(self.batches)
        images = images.to(self.device, non_blocking=True)
        if self.hflip:
            flip = torch.rand(images.shape[0], device=self.device) < 0.5  # the device RNG: restored on resume
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        images = images.contiguous(memory_format=self.memory_format)
        return images, (labels.to(self.device, non_blocking=True) if self.classes else None)


class Noise:
    """Training noise and fake labels, drawn on the device from its RNG (restored exactly on resume)."""

    def __init__(self, recipe: Recipe, device: torch.device):
        self.batch_size, self.z_dim = recipe.train.batch_size, recipe.model.z_dim
        self.classes, self.device = recipe.model.num_classes, device

    def draw(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(self.batch_size, self.z_dim, device=self.device)
        labels = torch.randint(0, self.classes, (self.batch_size,), device=self.device) if self.classes else None
        return z, labels
