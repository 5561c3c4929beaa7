"""Where each self-attention layer looks, for chosen query pixels (the paper's Fig. 1 and 5).

Only the attention rows of the chosen points are formed (SelfAttention.attention_weights with
`points`), never the N x N matrix, so this works at 128x128 and 256x256 as well as at 32x32.
Points are pixel coordinates (x to the right, y down) of the image the model sees: the input
resized and center-cropped to the model's resolution, or the generated image.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import nn

from sagan_cli.checkpoint import load_model, write_output
from sagan_cli.data import image_to_tensor, open_image
from sagan_cli.errors import UserError, check_writable
from sagan_cli.layers import SelfAttention
from sagan_cli.models import attention_layers
from sagan_cli.sample import generate, make_labels, resolve_device, to_uint8

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
    a, b, c = resolution // 4, resolution // 2, 3 * resolution // 4
    return [(b, b), (a, a), (c, a), (a, c), (c, c)]


def parse_points(texts: Sequence[str], resolution: int) -> list[Point]:
    """'x,y' strings (several per string allowed, space separated) -> pixel points inside the image."""
    points = []
    for text in texts:
        for item in text.split():
            try:
                x, y = (int(v) for v in item.split(","))
            except ValueError:
                raise UserError(f"--points expects x,y pixel coordinates such as 12,30, got {item!r}") from None
            if not (0 <= x < resolution and 0 <= y < resolution):
                raise UserError(
                    f"point {x},{y} is outside the {resolution}x{resolution} image the model sees;"
                    f" use 0-{resolution - 1}"
                )
            points.append((x, y))
    return points


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


@contextmanager
def captured_inputs(layers: dict[str, SelfAttention]) -> Iterator[dict[str, torch.Tensor]]:
    """Record each layer's input during a forward pass (forward pre-hooks; forward is unchanged)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0]))
        for name, layer in layers.items()
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


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
            cells = [to_grid(p, resolution, h, w) for p in points]
            rows = layer.attention_weights(x, cells)[0].float().cpu()  # [P, M]
            kh, kw = layer.key_shape(h, w)
            result.append(LayerAttention(name, float(layer.gamma), (h, w), rows.reshape(len(points), kh, kw)))
    return result


def summary(maps: list[LayerAttention], points: Sequence[Point], resolution: int) -> dict[str, dict]:
    """Per layer and point: argmax (image pixel and key cell), its weight, and the row's entropy (nats)."""
    out = {}
    for m in maps:
        kh, kw = m.rows.shape[1:]
        entries = []
        for point, row in zip(points, m.rows, strict=True):
            flat = row.flatten()
            best = int(flat.argmax())
            cell = (best % kw, best // kw)
            entries.append(
                {
                    "point": list(point),
                    "query_cell": list(to_grid(point, resolution, *m.feature_grid)),
                    "argmax": list(to_pixel(cell, resolution, kh, kw)),
                    "argmax_cell": list(cell),
                    "max_weight": float(flat[best]),
                    "entropy": float(-(flat * flat.clamp_min(1e-30).log()).sum()),
                }
            )
        out[m.name] = {
            "gamma": m.gamma,
            "feature_grid": list(m.feature_grid),
            "key_grid": [kh, kw],
            "max_entropy": math.log(kh * kw),  # a uniform row: the layer attends everywhere equally
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
    for r, m in enumerate(maps):
        heat = m.heat(resolution).numpy()
        axes[r, 0].imshow(rgb, extent=extent, **shown)
        axes[r, 0].set_ylabel(f"{m.name}\ngamma={m.gamma:.3f}", fontsize=8)
        for p, point in enumerate(points):
            axes[r, 0].plot(*point, "o", color=colours(p % 10), markersize=5, markeredgecolor="white")
            ax = axes[r, p + 1]
            ax.imshow(rgb, extent=extent, **shown)
            ax.imshow(heat[p], cmap="inferno", alpha=0.6, extent=extent, interpolation="nearest")
            ax.plot(*point, "o", color=colours(p % 10), markersize=5, markeredgecolor="white")
            if r == 0:
                ax.set_title(f"({point[0]}, {point[1]})", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


def _load(ckpt: str | Path, image: str | Path | None, dev: torch.device) -> tuple[nn.Module, str]:
    model, info = load_model(ckpt, device=dev)
    if info.kind == "discriminator" and image is None:
        raise UserError(
            "a discriminator checkpoint needs an IMAGE to look at; give one, or use a g.safetensors with --seed"
        )
    if info.kind == "generator" and image is not None:
        raise UserError(
            "IMAGE is only used with a discriminator checkpoint; drop it"
            " (G shows its attention on an image it generates, chosen by --seed)"
        )
    return model, info.kind


def attention_map(
    ckpt: str | Path,
    image: str | Path | None = None,
    *,
    points: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    class_: int | None = None,
    out: str | Path = "attn-map.png",
    json_path: str | Path | None = None,
    device: str | torch.device | None = None,
) -> dict:
    """Draw the attention figure to `out` (and the summary to `json_path`); return the summary.

    Discriminator checkpoint: attention while D looks at IMAGE. Generator checkpoint: attention
    while G draws the image of noise `seed` (and class `class_` if conditional).
    """
    check_writable(Path(out), "--out")  # before any work, and before --out is replaced by a failing run
    if json_path is not None:
        check_writable(Path(json_path), "--json")
    dev = resolve_device(device)
    model, kind = _load(ckpt, image, dev)
    cfg, resolution = model.config, model.config.resolution
    chosen = select_layers(model, layers)
    query = parse_points(points, resolution) if points else default_points(resolution)
    labels = make_labels(1, cfg.num_classes, class_)
    with captured_inputs(chosen) as inputs:
        if kind == "generator":
            picture = generate(model, 1, seed=seed, classes=class_, batch_size=1)[0][0]
        else:
            x = image_to_tensor(open_image(image), resolution, cfg.channels)[None].to(dev)
            with torch.inference_mode():
                model(x, None if labels is None else labels.to(dev))
            picture = to_uint8(x[0].cpu())
    maps = layer_attention(chosen, inputs, query, resolution)
    result = {
        "checkpoint": str(ckpt),
        "kind": kind,
        "image": None if image is None else str(image),
        "seed": seed if kind == "generator" else None,
        "class": class_,
        "resolution": resolution,
        "layers": summary(maps, query, resolution),
    }
    fig = draw_figure(picture, query, maps)
    write_output(Path(out), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI), "--out")
    if json_path is not None:
        text = json.dumps(result, indent=2) + "\n"
        write_output(Path(json_path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), "--json")
    return result
