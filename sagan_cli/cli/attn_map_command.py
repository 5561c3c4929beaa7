"""`sagan attn-map` as a command: read the checkpoint, the image and the `--points` text, draw, write files.

The library behind it is `sagan_cli.inspection.attention.attention_view`; this module only resolves what the user
named and writes the figure and the JSON summary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from sagan_cli.data.datasets import image_to_tensor, open_image
from sagan_cli.errors import UserError, check_writable
from sagan_cli.inspection.attention import DPI, Point, attention_view, check_points, select_layers
from sagan_cli.interchange.checkpoint import load_model, write_output
from sagan_cli.model.generation import make_labels, resolve_device


def parse_points(texts: Sequence[str], resolution: int) -> list[Point]:
    """'x,y' strings (several per string allowed, space separated) -> pixel points inside the image."""
    points = []
    for text in texts:
        for item in text.split():
            try:
                x, y = (int(value) for value in item.split(","))
            except ValueError:
                raise UserError(f"--points expects x,y pixel coordinates such as 12,30, got {item!r}") from None
            check_points([(x, y)], resolution)
            points.append((x, y))
    return points


def attn_map_command(
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
    model, info = load_model(ckpt, device=resolve_device(device))
    if info.kind == "discriminator" and image is None:
        raise UserError(
            "a discriminator checkpoint needs an IMAGE to look at; give one, or use a g.safetensors with --seed"
        )
    if info.kind == "generator" and image is not None:
        raise UserError(
            "IMAGE is only used with a discriminator checkpoint; drop it"
            " (G shows its attention on an image it generates, chosen by --seed)"
        )
    config = model.config
    select_layers(model, layers)  # the option checks come before the image is read
    query = parse_points(points, config.resolution) if points else None
    make_labels(1, config.num_classes, class_)
    pixels = None if image is None else image_to_tensor(open_image(image), config.resolution, config.channels)
    view = attention_view(model, image=pixels, points=query, layers=layers, seed=seed, class_=class_)
    result = {
        "checkpoint": str(ckpt),
        "kind": view.kind,
        "image": None if image is None else str(image),
        "seed": seed if view.kind == "generator" else None,
        "class": class_,
        "resolution": config.resolution,
        "layers": view.summary(),
    }
    figure = view.figure()
    write_output(Path(out), lambda tmp: figure.savefig(tmp, format="png", dpi=DPI), "--out")
    if json_path is not None:
        text = json.dumps(result, indent=2) + "\n"
        write_output(Path(json_path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), "--json")
    return result
