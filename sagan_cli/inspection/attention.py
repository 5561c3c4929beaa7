"""Where each self-attention layer looks, for chosen query pixels (the paper's Fig. 1 and 5).

Only the attention rows of the chosen points are formed (SelfAttention.attention_weights with
`points`), never the N x N matrix, so this works at 128x128 and 256x256 as well as at 32x32.
Points are pixel coordinates (x to the right, y down) of the image the model sees: the input
resized and center-cropped to the model's resolution, or the generated image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import nn

from sagan_cli.errors import UserError
from sagan_cli.inspection.attention_stats import captured_inputs, entropy
from sagan_cli.model.generation import generate, make_labels, to_uint8
from sagan_cli.model.layers import SelfAttention
from sagan_cli.model.models import Discriminator, Generator, attention_layers

Point = tuple[int, int]
PANEL_INCHES, DPI = 2.0, 100  # each figure panel is 200 x 200 pixels


@dataclass
class LayerAttention:
    """One layer's attention rows for the query points, on its key grid."""

    name: str
    gamma: float
    feature_grid: tuple[int, int]  # the layer's H x W
    rows: torch.Tensor  # [P, kh, kw]: each sums to 1 (kh x kw = key_shape, halved by the paper variant)

    def heat(self, resolution: int) -> torch.Tensor:
        """The rows upsampled (nearest) to image pixels: [P, R, R]; each key cell covers a pixel block."""
        return F.interpolate(self.rows[:, None], size=(resolution, resolution), mode="nearest")[:, 0]


def default_points(resolution: int) -> list[Point]:
    """Five spread query points: the centre and the four quarter points."""
    quarter, half, three_quarters = resolution // 4, resolution // 2, 3 * resolution // 4
    return [(half, half), (quarter, quarter), (three_quarters, quarter), (quarter, three_quarters),
            (three_quarters, three_quarters)]


def check_points(points: Sequence[Point], resolution: int) -> None:
    """Every point must be a pixel of the R x R image the model sees."""
    for x, y in points:
        if not (0 <= x < resolution and 0 <= y < resolution):
            raise UserError(f"point {x},{y} is outside the {resolution}x{resolution} image the model sees;"
                            f" use 0-{resolution - 1}")


def to_grid(point: Point, resolution: int, height: int, width: int) -> Point:
    """Image pixel -> the feature-map cell that covers it."""
    return point[0] * width // resolution, point[1] * height // resolution


def to_pixel(cell: Point, resolution: int, height: int, width: int) -> Point:
    """Key-grid cell -> the image pixel at the centre of the block it covers."""
    return int((cell[0] + 0.5) * resolution / width), int((cell[1] + 0.5) * resolution / height)


def select_layers(model: nn.Module, names: Sequence[str] | None) -> dict[str, SelfAttention]:
    layers = attention_layers(model)
    if not layers:
        raise UserError("this model has no self-attention layers (its recipe set an empty g_attention/d_attention)")
    if not names:
        return layers
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise UserError(f"no attention layer named {unknown[0]!r}; this model has {', '.join(layers)}")
    return {n: layers[n] for n in names}


def layer_attention(
    layers: dict[str, SelfAttention], inputs: dict[str, torch.Tensor], points: Sequence[Point], resolution: int
) -> list[LayerAttention]:
    """The attention rows of `points` in each layer, from the inputs captured for one image.

    Layers come in the order the forward pass reached them (D: large maps first; G: small first).
    """
    result = []
    with torch.inference_mode():
        for name in sorted(layers, key=list(inputs).index):
            layer, x = layers[name], inputs[name][:1]
            h, w = x.shape[2], x.shape[3]
            cells = [to_grid(point, resolution, h, w) for point in points]
            rows = layer.attention_weights(x, cells)[0].float().cpu()  # [P, M]
            key_height, key_width = layer.key_shape(h, w)
            result.append(LayerAttention(name, float(layer.gamma), (h, w),
                                         rows.reshape(len(points), key_height, key_width)))
    return result


def summarise(maps: list[LayerAttention], points: Sequence[Point], resolution: int) -> dict[str, dict]:
    """Per layer and point: argmax (image pixel and key cell), its weight, and the row's entropy (nats)."""
    out = {}
    for layer_map in maps:
        key_height, key_width = layer_map.rows.shape[1:]
        entries = []
        for point, row in zip(points, layer_map.rows, strict=True):
            flat = row.flatten()
            best = int(flat.argmax())
            cell = (best % key_width, best // key_width)
            entries.append(
                {
                    "point": list(point),
                    "query_cell": list(to_grid(point, resolution, *layer_map.feature_grid)),
                    "argmax": list(to_pixel(cell, resolution, key_height, key_width)),
                    "argmax_cell": list(cell),
                    "max_weight": float(flat[best]),
                    "entropy": float(entropy(flat)),
                }
            )
        out[layer_map.name] = {
            "gamma": layer_map.gamma,
            "feature_grid": list(layer_map.feature_grid),
            "key_grid": [key_height, key_width],
            "max_entropy": math.log(key_height * key_width),  # a uniform row: the layer attends everywhere equally
            "points": entries,
        }
    return out


def draw_figure(image: torch.Tensor, points: Sequence[Point], maps: list[LayerAttention]) -> Figure:
    """One row per layer: the image with all query points, then each point's attention heat map."""
    resolution = image.shape[-1]
    rgb = image.permute(1, 2, 0).numpy()
    shown = dict(cmap="gray", vmin=0, vmax=255) if rgb.shape[2] == 1 else {}  # a grayscale model's image
    rgb = rgb[..., 0] if rgb.shape[2] == 1 else rgb
    colours = colormaps["tab10"]
    nrows, ncols = len(maps), len(points) + 1
    fig = Figure(figsize=(ncols * PANEL_INCHES, nrows * PANEL_INCHES), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    extent = (-0.5, resolution - 0.5, resolution - 0.5, -0.5)
    for row, layer_map in enumerate(maps):
        heat = layer_map.heat(resolution).numpy()
        axes[row, 0].imshow(rgb, extent=extent, **shown)
        axes[row, 0].set_ylabel(f"{layer_map.name}\ngamma={layer_map.gamma:.3f}", fontsize=8)
        for point_index, point in enumerate(points):
            axes[row, 0].plot(*point, "o", color=colours(point_index % 10), markersize=5, markeredgecolor="white")
            ax = axes[row, point_index + 1]
            ax.imshow(rgb, extent=extent, **shown)
            ax.imshow(heat[point_index], cmap="inferno", alpha=0.6, extent=extent, interpolation="nearest")
            ax.plot(*point, "o", color=colours(point_index % 10), markersize=5, markeredgecolor="white")
            if row == 0:
                ax.set_title(f"({point[0]}, {point[1]})", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


@dataclass
class AttentionView:
    """What `attention_view` saw: the image (uint8 [C, R, R]), the query pixels, and each layer's rows."""

    kind: str  # "generator" (G drew the image) or "discriminator" (D looked at it)
    image: torch.Tensor
    points: list[Point]
    maps: list[LayerAttention]

    def summary(self) -> dict[str, dict]:
        return summarise(self.maps, self.points, self.image.shape[-1])

    def figure(self) -> Figure:
        return draw_figure(self.image, self.points, self.maps)


def attention_view(
    model: Generator | Discriminator,
    *,
    image: torch.Tensor | None = None,
    points: Sequence[Point] | None = None,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    class_: int | None = None,
) -> AttentionView:
    """Where each attention layer (`layers`: default all) looks from `points` (default: five spread pixels).

    A discriminator looks at `image` ([C, R, R] in [-1, 1], as `data.image_to_tensor` makes it); a
    generator draws the image of noise `seed` (and class `class_` if conditional) and shows its own.
    """
    config = model.config
    resolution, device = config.resolution, next(model.parameters()).device
    chosen = select_layers(model, layers)
    points = list(points) if points else default_points(resolution)
    check_points(points, resolution)
    labels = make_labels(1, config.num_classes, class_)
    is_generator = isinstance(model, Generator)
    if is_generator == (image is not None):
        raise UserError("a discriminator needs an image to look at; a generator draws its own")
    with captured_inputs(chosen) as inputs:
        if is_generator:
            picture = generate(model, 1, seed=seed, classes=class_, batch_size=1)[0][0]
        else:
            batch = image[None].to(device)
            with torch.inference_mode():
                model(batch, None if labels is None else labels.to(device))
            picture = to_uint8(batch[0].cpu())
    maps = layer_attention(chosen, inputs, points, resolution)
    return AttentionView("generator" if is_generator else "discriminator", picture, points, maps)
