"""Model checkpoints as safetensors files that carry their own config, so a file alone rebuilds its model.

Metadata keys (all strings, as safetensors requires):
  sagan.kind     "generator" | "discriminator"
  sagan.config   the ModelConfig as JSON
  sagan.step     training step the weights come from
  sagan.recipe   the recipe's name
  sagan.ema      "true" when the generator weights are the EMA average
  sagan.version  the sagan version that wrote the file
Only safetensors is ever read from a user-supplied path: no pickle, no code execution.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from sagan_cli import __version__
from sagan_cli.config import MODEL_SIZE_LIMITS, ModelConfig
from sagan_cli.errors import UserError
from sagan_cli.model.models import Discriminator, Generator

KINDS = ("generator", "discriminator")


def check_model_sizes(config: ModelConfig, source: str) -> None:
    """Refuse a model config whose sizes no sagan model has, before any module is built."""
    for key, limit in MODEL_SIZE_LIMITS.items():
        value = getattr(config, key)
        if not 0 <= value <= limit:
            raise UserError(f"{source} asks for model.{key} = {value}, beyond what sagan builds (at most {limit}); "
                            "the file is damaged or not from sagan")


@dataclass
class CheckpointInfo:
    kind: str
    config: ModelConfig
    step: int
    recipe: str
    ema: bool
    version: str


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename into place: a crash mid-write never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide checkpoints from the rest of a lab
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_output(path: Path, write, option: str) -> None:
    """atomic_write for a file the user named with `option`: a folder or an OSError is a UserError."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    try:
        atomic_write(path, write)
    except OSError as exc:
        raise UserError(f"cannot write {option} {path} ({exc.strerror or exc}); choose a writable path") from None


def save_model(path: str | Path, model: Generator | Discriminator, *, step: int, recipe: str = "recipe", ema: bool = False) -> Path:
    """Write `model` (unwrapped, any device) to a safetensors file with its config in the metadata."""
    kind = "generator" if isinstance(model, Generator) else "discriminator"
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "sagan.kind": kind,
        "sagan.config": model.config.to_json(),
        "sagan.step": str(int(step)),
        "sagan.recipe": recipe,
        "sagan.ema": "true" if ema else "false",
        "sagan.version": __version__,
    }
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return Path(path)


def read_info(path: str | Path) -> CheckpointInfo:
    """Read and check a checkpoint's metadata without loading its tensors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist (training writes g.safetensors and d.safetensors in its run directory)")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file (give the .safetensors file inside the run directory)")
    try:
        with safe_open(str(path), framework="pt") as checkpoint_file:
            meta = checkpoint_file.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a safetensors checkpoint ({exc}); give a g.safetensors or d.safetensors written by `sagan train`") from None
    if meta.get("sagan.kind") not in KINDS or "sagan.config" not in meta:
        raise UserError(f"{path} is a safetensors file but not a sagan checkpoint (no sagan metadata); give a file written by `sagan train`")
    try:
        config = ModelConfig.from_json(meta["sagan.config"])
        step = int(meta.get("sagan.step", "0"))
    except (UserError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} has a damaged model config in its metadata: {exc}") from None
    check_model_sizes(config, str(path))
    return CheckpointInfo(
        kind=meta["sagan.kind"],
        config=config,
        step=step,
        recipe=meta.get("sagan.recipe", "recipe"),
        ema=meta.get("sagan.ema") == "true",
        version=meta.get("sagan.version", "unknown"),
    )


def load_model(path: str | Path, expect: str | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild the model a checkpoint describes and load its weights (eval mode, on `device`).

    `expect` ("generator" / "discriminator") turns a wrong kind into a UserError that says so.
    """
    info = read_info(path)
    if expect is not None and info.kind != expect:
        hint = "g.safetensors" if expect == "generator" else "d.safetensors"
        raise UserError(f"{path} holds a {info.kind}, but a {expect} is needed here (use the run's {hint})")
    build = Generator if info.kind == "generator" else Discriminator
    _check_tensor_shapes(path, build, info.config)  # allocate only what the file really holds
    model = build(info.config)
    try:
        from safetensors.torch import load_file

        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        first = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]  # the detail
        raise UserError(f"{path}: its weights do not match its model config ({first}); the file is damaged or not from sagan") from None
    return model.to(device).eval(), info


def _check_tensor_shapes(path: str | Path, build, config: ModelConfig) -> None:
    """The model the metadata describes, built on the meta device (no memory), against the tensors the file's
    header lists: metadata within the size limits can still ask for tens of GB that a small file does not hold."""
    with torch.device("meta"):
        wanted = {name: tuple(tensor.shape) for name, tensor in build(config).state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as weights:
            held = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors file ({str(exc)[:120]})") from None
    if wanted != held:
        name = next((n for n in wanted if held.get(n) != wanted[n]), None) or next(n for n in held if n not in wanted)
        raise UserError(f"{path}: its weights do not match its model config ({name}: {held.get(name, 'missing')} in "
                        f"the file, {wanted.get(name, 'not in the model')} in the config); the file is damaged or "
                        "not from sagan")


def write_imported(out_dir: str | Path, models: list[tuple[str, nn.Module]], config: ModelConfig, *,
                   source: str) -> list[Path]:
    """An import's folder (`import-port`, `import-studiogan`): each model as a sagan checkpoint at step 0, and a
    config.json with the model, so that `sagan report` reads the folder as a run."""
    from sagan_cli.config import recipe_from_dict

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder")
    written = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, model in models:
            written.append(save_model(out_dir / name, model, step=0, recipe=source))
        recipe = recipe_from_dict({"model": config.to_dict()}, name=source)
        (out_dir / "config.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write to --out {out_dir} ({exc.strerror or exc}); choose a writable folder") from None
    return [*written, out_dir / "config.json"]


def plain_tensor_problem(state: dict[str, torch.Tensor]) -> str | None:
    """What makes an untrusted state dict's tensors other than plain dense numbers, or None. A tensor whose storage
    is smaller than its shape (expanded, stride 0) could make a tiny file describe a model of tens of GB."""
    for key, value in state.items():
        if value.layout != torch.strided or value.is_quantized or value.is_complex():
            return f"{key} is not a plain dense real tensor"
        if value.numel() and value.untyped_storage().nbytes() < value.numel() * value.element_size():
            return f"{key} holds fewer numbers than its shape {list(value.shape)} says (an expanded tensor)"
    return None
