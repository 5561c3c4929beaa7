"""Precomputed attention rows for the report's attention explorer (hover a pixel, see where it looks).

A browser cannot run the model, so the page carries the rows it may be asked for:
  queries: every position when the map has at most MAX_QUERIES (16x16) positions; otherwise a regular
           grid with the smallest power-of-two stride s that gives at most MAX_QUERIES points (query
           cell (s*i + s//2, s*j + s//2)); the page shows the row of the nearest sampled point.
  keys:    the full key grid up to MAX_KEY_SIDE (32) per side; larger grids are sum-pooled (mass kept).
  values:  each row divided by its own maximum and stored as uint8 (0-255), base64 in the page; the
           row's maximum weight is kept as a float so the page can print it.
Rows come from SelfAttention.attention_weights (the only place A is formed), on the inputs each layer
received in a real forward pass (captured with attention.captured_inputs).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sagan_cli.data.datasets import image_to_tensor, open_image
from sagan_cli.inspection.attention import captured_inputs
from sagan_cli.model.generation import generate, to_pil, to_uint8
from sagan_cli.model.layers import SelfAttention
from sagan_cli.model.models import attention_layers

MAX_QUERIES = 256  # rows kept per layer and image (all of a 16x16 map)
MAX_KEY_SIDE = 32  # key grids above 32x32 are sum-pooled down to it


@dataclass
class Subject:
    """One image of the explorer and the attention rows of every layer while the model saw or drew it."""

    label: str
    network: str  # "G" or "D"
    png: str  # data URI of the model-size image
    layers: list[dict] = field(default_factory=list)


def png_data_uri(image: torch.Tensor | Image.Image) -> str:
    """uint8 [C, H, W] tensor (C = 1: an 'L' image, C = 3: RGB) or a PIL image -> data:image/png;base64,..."""
    if isinstance(image, torch.Tensor):
        image = to_pil(image)
    buf = io.BytesIO()
    image.save(buf, format="png", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def query_stride(height: int, width: int) -> int:
    """The smallest power-of-two stride that keeps at most MAX_QUERIES query points."""
    stride = 1
    while (height // stride) * (width // stride) > MAX_QUERIES:
        stride *= 2
    return stride


def layer_rows(layer: SelfAttention, x: torch.Tensor, name: str) -> dict:
    """The explorer's record of one layer for one image x [1, C, H, W]."""
    h, w = x.shape[2], x.shape[3]
    stride = query_stride(h, w)
    ys = torch.arange(stride // 2, h, stride)[: h // stride]
    xs = torch.arange(stride // 2, w, stride)[: w // stride]
    flat = (ys[:, None] * w + xs[None, :]).reshape(-1)
    with torch.inference_mode():
        rows = layer.attention_weights(x, flat)[0].float().cpu()  # [Q, M]
    key_height, key_width = layer.key_shape(h, w)
    pool = max(1, max(key_height, key_width) // MAX_KEY_SIDE)
    grid = rows.reshape(-1, 1, key_height, key_width)
    if pool > 1:
        grid = F.avg_pool2d(grid, pool) * pool * pool  # sums: each pooled cell keeps its share of the row
    grid = grid.flatten(1)
    peak = grid.amax(dim=1, keepdim=True).clamp_min(1e-30)
    quantised = (grid / peak * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return {
        "name": name,
        "gamma": round(float(layer.gamma.detach()), 5),
        "feature": [h, w],
        "stride": stride,
        "queries": [len(ys), len(xs)],
        "keys": [key_height // pool, key_width // pool],
        "peak": [float(f"{float(row_peak):.4g}") for row_peak in peak[:, 0]],
        "rows": base64.b64encode(quantised.tobytes()).decode("ascii"),
    }


def _subjects_from_inputs(
    layers: dict[str, SelfAttention], inputs: dict[str, torch.Tensor], images: torch.Tensor,
    labels: Sequence[str], network: str,
) -> list[Subject]:
    order = sorted(layers, key=list(inputs).index)  # forward order
    subjects = []
    for i, label in enumerate(labels):
        subject = Subject(label, network, png_data_uri(images[i]))
        subject.layers = [layer_rows(layers[name], inputs[name][i : i + 1], name) for name in order]
        subjects.append(subject)
    return subjects


def generator_subjects(generator: nn.Module, count: int, seed: int) -> list[Subject]:
    """`count` images of the generator (noise `seed`, classes spread evenly) with G's attention rows."""
    layers = attention_layers(generator)
    if not layers or count <= 0:
        return []
    with captured_inputs(layers) as inputs:
        images, classes = generate(generator, count, seed=seed, batch_size=count)
    labels = [
        f"G sample {i} (seed {seed}" + ("" if classes is None else f", class {int(classes[i])}") + ")"
        for i in range(count)
    ]
    return _subjects_from_inputs(layers, inputs, images, labels, "G")


def discriminator_subjects(
    discriminator: nn.Module, images: Sequence[tuple[str, torch.Tensor]]
) -> list[Subject]:
    """D's attention rows while it looks at each (label, [C, R, R] image in [-1, 1], C = D's channels).

    Attention sits before the projection term, so the class label does not change the rows: class 0
    is passed to a conditional D.
    """
    layers = attention_layers(discriminator)
    if not layers or not images:
        return []
    x = torch.stack([image for _, image in images])
    device = next(discriminator.parameters()).device
    y = torch.zeros(len(images), dtype=torch.long, device=device) if discriminator.config.num_classes else None
    discriminator.eval()
    with captured_inputs(layers) as inputs, torch.inference_mode():
        discriminator(x.to(device), y)
    return _subjects_from_inputs(layers, inputs, to_uint8(x), [label for label, _ in images], "D")


def real_images(paths: Sequence[str | Path], dataset, count: int, resolution: int,
                channels: int = 3) -> list[tuple[str, torch.Tensor]]:
    """The user's images (resized, center-cropped and converted to D's `channels` like attn-map does) and
    `count` spread dataset images (the dataset must already give `channels`)."""
    chosen = [(f"D: {Path(path).name}", image_to_tensor(open_image(path), resolution, channels)) for path in paths]
    if dataset is not None and count > 0 and len(dataset) > 0:
        picks = torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().long().unique()
        chosen += [(f"D: dataset image {int(i)}", dataset[int(i)][0]) for i in picks]
    return chosen
