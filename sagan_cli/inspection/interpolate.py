"""`sagan interpolate`: walks through a generator's latent space (between seeds) or its classes.

Seeds: the noise of seed a (exactly what `sagan sample --seed a -n 1` draws) to that of seed b, in
`steps` frames per segment. slerp moves along the great circle between the two directions while the
length changes linearly, so every frame's norm lies between the endpoints' (a straight line, lerp,
cuts through the low-norm middle of the Gaussian, where samples are atypical).
Classes (conditional models): fixed noise; the class-conditional BatchNorm gains and biases are mixed,
(1 - t) * embedding[a] + t * embedding[b], so the endpoints are exactly the class samples.
Output: one PNG sheet (a row per segment) and an animated GIF or WebP of the whole path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.utils import make_grid

from sagan_cli.errors import UserError
from sagan_cli.interchange.checkpoint import atomic_write, load_model
from sagan_cli.model.generation import iter_generate, make_noise, resolve_device, to_pil
from sagan_cli.model.layers import ClassBatchNorm2d

MODES = ("slerp", "lerp")
ANIMATIONS = ("gif", "webp")


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return a if t == 0 else b if t == 1 else (1 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Great-circle interpolation of the direction, linear interpolation of the length."""
    if t == 0:
        return a
    if t == 1:
        return b
    norm_a, norm_b = a.norm(), b.norm()
    unit_a, unit_b = a / norm_a, b / norm_b
    omega = torch.arccos((unit_a * unit_b).sum().clamp(-1.0, 1.0))
    if omega.abs() < 1e-6:  # (nearly) the same direction: the great circle degenerates to a line
        direction = unit_a
    else:
        direction = (torch.sin((1 - t) * omega) * unit_a + torch.sin(t * omega) * unit_b) / torch.sin(omega)
    return ((1 - t) * norm_a + t * norm_b) * direction / direction.norm()


def path_fractions(steps: int) -> list[float]:
    return [i / (steps - 1) for i in range(steps)]


def noise_path(seeds: Sequence[int], z_dim: int, steps: int, mode: str,
               truncation: float | None = None) -> list[torch.Tensor]:
    """One [steps, z_dim] tensor per segment seed[i] -> seed[i+1]."""
    mix = slerp if mode == "slerp" else lerp
    ends = [make_noise(1, z_dim, seed=seed, truncation=truncation)[0] for seed in seeds]
    return [torch.stack([mix(start, end, t) for t in path_fractions(steps)])
            for start, end in zip(ends, ends[1:], strict=False)]


@contextmanager
def mixed_classes(generator: nn.Module, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> Iterator[None]:
    """While active, every class-conditional BatchNorm uses (1 - t) * E[a] + t * E[b] (per image) for its
    gain and bias, whatever labels the forward pass is given; with a shared class embedding (BigGAN) that
    embedding is the one mixed."""

    def hook(module: nn.Embedding, _inputs, _output):
        table = module.weight
        fraction = t.to(table.device, table.dtype)[:, None]
        return table[a.to(table.device)] * (1 - fraction) + table[b.to(table.device)] * fraction

    handles = []
    shared = getattr(generator, "shared", None)
    if shared is not None:  # BigGAN-style: mix the shared class embedding every block's BN reads
        handles.append(shared.register_forward_hook(hook))
    for module in generator.modules():
        if isinstance(module, ClassBatchNorm2d) and isinstance(module.gain, nn.Embedding):
            handles += [module.gain.register_forward_hook(hook), module.bias.register_forward_hook(hook)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(item) for item in text.replace(" ", "").split(",") if item != ""]
    except ValueError:
        raise UserError(f"{option} expects comma-separated integers such as 0,1,2, got {text!r}") from None
    if len(values) < 2:
        raise UserError(f"{option} needs at least two values to interpolate between, got {text!r}")
    return values


def _sheet(rows: list[torch.Tensor]) -> Image.Image:
    """One row per path; 'L' mode for a grayscale model (make_grid repeats one channel to three)."""
    images = torch.cat(rows)
    grid = make_grid(images, nrow=rows[0].shape[0], padding=2, pad_value=0)
    return to_pil(grid[: images.shape[1]])


def _save(out_dir: Path, stem: str, rows: list[torch.Tensor], animation: str, frame_ms: int) -> list[Path]:
    sheet_path, anim_path = out_dir / f"{stem}.png", out_dir / f"{stem}.{animation}"
    frames = [rows[0][0]] + [frame for row in rows for frame in row[1:]]  # joins appear once
    pictures = [to_pil(frame) for frame in frames]
    sheet = _sheet(rows)
    atomic_write(sheet_path, lambda tmp: sheet.save(tmp, format="png"))
    extra = {"lossless": True} if animation == "webp" else {"optimize": False}
    atomic_write(anim_path, lambda tmp: pictures[0].save(tmp, format=animation.upper(), save_all=True,
                                                        append_images=pictures[1:], duration=frame_ms, loop=0,
                                                        **extra))
    return [sheet_path, anim_path]


def _check_options(*, mode: str, animation: str, steps: int, frame_ms: int, batch_size: int) -> None:
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if animation not in ANIMATIONS:
        raise UserError(f"--animation must be one of {', '.join(ANIMATIONS)}, got {animation!r}")
    if steps < 2:
        raise UserError(f"--steps must be >= 2 (the two endpoints and the frames between), got {steps}")
    if frame_ms <= 0 or batch_size <= 0:
        raise UserError("--frame-ms and --batch-size must be > 0")


def _class_list(classes: str | None, class_: int | None, num_classes: int) -> list[int] | None:
    """--classes as a list (None when not given), after checking it and --class against the model."""
    if num_classes == 0 and (classes is not None or class_ is not None):
        raise UserError("--classes/--class need a class-conditional generator; this one has num_classes = 0")
    class_list = _parse_ints(classes, "--classes") if classes is not None else None
    for class_index in [*(class_list or []), *([class_] if class_ is not None else [])]:
        if not 0 <= class_index < num_classes:
            raise UserError(f"class {class_index} is out of range: this model has classes 0-{num_classes - 1}")
    return class_list


def interpolate(
    ckpt: str | Path,
    out_dir: str | Path = "interpolation",
    *,
    seeds: str = "0,1,2,3",
    steps: int = 8,
    mode: str = "slerp",
    classes: str | None = None,
    class_: int | None = None,
    truncation: float | None = None,
    animation: str = "gif",
    frame_ms: int = 120,
    batch_size: int = 64,
    device: str | None = None,
) -> list[Path]:
    """Write the seed interpolation (and, with `classes`, the class interpolation); return the files."""
    _check_options(mode=mode, animation=animation, steps=steps, frame_ms=frame_ms, batch_size=batch_size)
    seed_list = _parse_ints(seeds, "--seeds")
    torch_device = resolve_device(device)
    generator, info = load_model(ckpt, expect="generator", device=torch_device)
    config = info.config
    num_classes = config.num_classes
    class_list = _class_list(classes, class_, num_classes)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder")

    def render(z: torch.Tensor, label: int | None, chunk: int = batch_size) -> torch.Tensor:
        y = None if num_classes == 0 else torch.full((z.shape[0],), label, dtype=torch.long)
        return torch.cat(list(iter_generate(generator, z, y, batch_size=chunk, device=torch_device)))

    written = []
    label = class_ if class_ is not None else (0 if num_classes else None)
    rows = [render(z, label) for z in noise_path(seed_list, config.z_dim, steps, mode, truncation)]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written += _save(out_dir, f"seeds-{mode}", rows, animation, frame_ms)
        if class_list is not None:
            z = make_noise(1, config.z_dim, seed=seed_list[0], truncation=truncation).expand(steps, -1)
            fractions = torch.tensor(path_fractions(steps))
            rows = []
            for start_class, end_class in zip(class_list, class_list[1:], strict=False):
                with mixed_classes(generator, torch.full((steps,), start_class), torch.full((steps,), end_class),
                                   fractions):
                    rows.append(render(z, start_class, chunk=steps))  # one batch: the mix is per image
            written += _save(out_dir, "classes", rows, animation, frame_ms)
    except OSError as exc:
        raise UserError(f"cannot write to --out {out_dir} ({exc.strerror or exc}); choose a writable folder") from None
    return written
