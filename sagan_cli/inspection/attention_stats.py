"""Attention you can see learning: how far each attention layer looks, and how sharply, at every log step.

At each log line `AttentionProbe` runs G on a fixed noise batch and D on the first dataset images (eval mode,
fp32, no autograd), captures each attention layer's input with forward pre-hooks, and forms only the attention
rows of a fixed grid of query points (`SelfAttention.attention_weights`). From those rows it logs, per layer:

- distance: sum_k w_k |pos_k - pos_q|, in pixels of that layer's feature map, averaged over points and images;
- entropy: -sum_k w_k log w_k (nats), averaged the same way;

and the same two numbers for uniform attention (w_k = 1/K) from the same points, which a report draws as the
reference: a layer below it looks near (or sharply), one at it looks everywhere alike.

The probe draws nothing from the global RNGs (its noise comes from a private generator), writes no buffer,
and restores the networks' train/eval modes, so training is bit-identical with or without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import Dataset

from sagan_cli.config import Recipe
from sagan_cli.model.layers import SelfAttention
from sagan_cli.model.models import attention_layers

PROBE_IMAGES = 8  # images in the fixed batch G draws and D sees
QUERIES_PER_SIDE = 4  # a 4 x 4 grid of query points per feature map (all cells of a smaller map)
PROBE_SEED_OFFSET = 104_729  # the probe's noise must not coincide with the training or grid noise
METRIC_KEYS = ("attn_distance", "attn_entropy", "attn_distance_uniform", "attn_entropy_uniform")


@contextmanager
def captured_inputs(layers: dict[str, SelfAttention]) -> Iterator[dict[str, torch.Tensor]]:
    """Record each layer's input during a forward pass (forward pre-hooks; forward is unchanged)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(lambda _layer, args, name=name: seen.__setitem__(name, args[0]))
        for name, layer in layers.items()
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def query_grid(height: int, width: int, per_side: int = QUERIES_PER_SIDE) -> torch.Tensor:
    """[P, 2] (x, y) map cells: the centres of a per_side x per_side tiling of the map (every cell if smaller)."""
    ys = sorted({int((i + 0.5) * height / min(per_side, height)) for i in range(min(per_side, height))})
    xs = sorted({int((i + 0.5) * width / min(per_side, width)) for i in range(min(per_side, width))})
    return torch.tensor([(x, y) for y in ys for x in xs], dtype=torch.long)


def key_positions(layer: SelfAttention, height: int, width: int) -> torch.Tensor:
    """[M, 2] (x, y) of each key in map pixels: a pooled key (paper variant, 2 x 2 max-pool) sits at its cell's centre."""
    key_height, key_width = layer.key_shape(height, width)
    ys, xs = torch.meshgrid(torch.arange(key_height, dtype=torch.float64), torch.arange(key_width, dtype=torch.float64),
                            indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], dim=1)
    return positions * 2 + 0.5 if layer.pooled else positions


def entropy(weights: torch.Tensor) -> torch.Tensor:
    """-sum w log w (nats) over the last dimension of attention rows (a zero weight adds nothing)."""
    return -(weights * weights.clamp_min(1e-30).log()).sum(-1)


def row_stats(weights: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> tuple[float, float]:
    """Mean distance (map pixels) and entropy (nats) of attention rows `weights` [B, P, M] from `queries` [P, 2]."""
    weights = weights.double()
    distances = torch.cdist(queries.double(), keys.double())  # [P, M]
    distance = (weights * distances).sum(-1).mean()
    return float(distance), float(entropy(weights).mean())


def uniform_stats(queries: torch.Tensor, keys: torch.Tensor) -> tuple[float, float]:
    """What uniform attention (w = 1/M over every key) gives from the same query points."""
    return float(torch.cdist(queries.double(), keys.double()).mean()), math.log(keys.shape[0])


@dataclass
class LayerStats:
    distance: float
    entropy: float
    uniform_distance: float
    uniform_entropy: float


def layer_stats(layer: SelfAttention, x: torch.Tensor) -> LayerStats:
    """The statistics of one layer from its input x [B, C, H, W] (the caller disables autograd)."""
    height, width = x.shape[2], x.shape[3]
    queries, keys = query_grid(height, width), key_positions(layer, height, width)
    weights = layer.attention_weights(x, queries[:, 1] * width + queries[:, 0]).float().cpu()  # flat y * W + x
    return LayerStats(*row_stats(weights, queries, keys), *uniform_stats(queries, keys))


def network_stats(model: nn.Module, run: Callable[[], object]) -> dict[str, LayerStats]:
    """Each attention layer's statistics while `run()` does one forward of `model` (in eval mode, restored)."""
    layers = attention_layers(model)
    if not layers:
        return {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), parametrize.cached(), torch.autocast(_device_type(model), enabled=False):
            with captured_inputs(layers) as inputs:
                run()
            return {name: layer_stats(layers[name], inputs[name]) for name in inputs}
    finally:
        model.train(was_training)


def _device_type(model: nn.Module) -> str:
    return next(model.parameters()).device.type


class AttentionProbe:
    """The fixed inputs (made on first use, so only the rank that logs pays) and the per-layer statistics.

    G draws PROBE_IMAGES images from noise of a private generator seeded by train.seed; D sees the first
    PROBE_IMAGES images of the dataset (with their labels when conditional), as training reads them.
    """

    def __init__(self, recipe: Recipe, generator: nn.Module, discriminator: nn.Module, dataset: Dataset):
        self.recipe, self.generator, self.discriminator, self.dataset = recipe, generator, discriminator, dataset
        self.has_attention = bool(attention_layers(generator) or attention_layers(discriminator))
        self.inputs: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None = None

    def _fixed_inputs(self, device: torch.device):
        if self.inputs is None:
            model, seed = self.recipe.model, self.recipe.train.seed
            rng = torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET)
            z = torch.randn(PROBE_IMAGES, model.z_dim, generator=rng)
            fake_labels = torch.randint(0, model.num_classes, (PROBE_IMAGES,), generator=rng) if model.num_classes else None
            items = [self.dataset[i] for i in range(min(PROBE_IMAGES, len(self.dataset)))]
            real = torch.stack([torch.as_tensor(image, dtype=torch.float32) for image, _ in items])
            real_labels = torch.tensor([int(label) for _, label in items]) if model.num_classes else None
            self.inputs = tuple(None if t is None else t.to(device) for t in (z, fake_labels, real, real_labels))
        return self.inputs

    def measure(self) -> dict[str, dict[str, float]]:
        """{"attn_distance": {"g.<layer>": ..., "d.<layer>": ...}, "attn_entropy": ..., and the uniform references};
        {} for a model without attention."""
        if not self.has_attention:
            return {}
        z, fake_labels, real, real_labels = self._fixed_inputs(next(self.generator.parameters()).device)
        stats = {f"g.{name}": value
                 for name, value in network_stats(self.generator, lambda: self.generator(z, fake_labels)).items()}
        stats.update({f"d.{name}": value for name, value in
                      network_stats(self.discriminator, lambda: self.discriminator(real, real_labels)).items()})
        fields = ("distance", "entropy", "uniform_distance", "uniform_entropy")
        return {key: {name: getattr(value, field) for name, value in stats.items()}
                for key, field in zip(METRIC_KEYS, fields, strict=True)}
