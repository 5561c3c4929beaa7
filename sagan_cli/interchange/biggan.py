"""`sagan import-biggan`: ajbrock/BigGAN-PyTorch's G.pth / G_ema.pth / D.pth (plain state dicts) as sagan files.

What BigGAN-PyTorch saves (facts read from its BigGAN.py and layers.py; no code taken from it):
  Its own spectral norm: `<layer>.weight` (the raw weight), `u0` [1, out] and `sv0` [1]. Every forward, eval
  included, runs one power iteration from u0 (v = norm(u0 W), u = norm(v W^T), sigma = v W^T u^T = |v W^T|) and
  divides by sigma; only training writes u and sigma back. sagan's eval formula is sigma = u . (W v) with its
  stored vectors, so the import stores that iteration's v and u: sagan's eval forward then divides by exactly the
  sigma BigGAN's eval forward uses with the saved u0 (sv0, the last training sigma, is not needed).
  Generator: `shared` (class embedding, no spectral norm), `linear` (first z chunk -> 4x4 stem),
  `blocks.I.0` = residual up block (bn1, conv1, bn2, conv2, conv_sc), `blocks.I.1` = attention after it
  (theta, phi, g, o without bias, `gamma`: the paper variant); conditional BN `bnK.gain` / `bnK.bias`: linears
  without bias on [shared(y), z chunk] (gain 1 + ...), statistics in `stored_mean` / `stored_var`;
  `output_layer.0` (BN with `gain`, `bias`, stored stats), `output_layer.2` (conv to RGB). BN eps 1e-5.
  Discriminator: `blocks.I.0` = residual down blocks (conv1, conv2, conv_sc where the block pools or widens),
  an out-of-place ReLU (the shortcut sees x; its early code, with `--D_nl inplace_relu`, ReLU'd x in place, so
  the shortcut saw relu(x): `d_shortcut_relu=True` imports such a D), the last block keeps 4x4; `linear` (head),
  `embed` (projection).
Nothing but `torch.load(weights_only=True)` reads the files.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from sagan_cli.config import ModelConfig
from sagan_cli.errors import UserError
from sagan_cli.interchange.checkpoint import check_model_sizes, plain_tensor_problem, write_imported
from sagan_cli.interchange.state_reader import StateReader, tensor_shape
from sagan_cli.model.models import Discriminator, Generator

EXPECTED = {"--g": "BigGAN-PyTorch's generator state dict (G.pth or G_ema.pth: shared.weight, linear.*, blocks.*, "
                   "output_layer.*)",
            "--d": "BigGAN-PyTorch's discriminator state dict (D.pth: blocks.*, linear.*, embed.*)"}


def load_biggan_state(path: str | Path, option: str) -> dict[str, torch.Tensor]:
    """The state dict in one of BigGAN-PyTorch's .pth files; weights_only=True, so no pickle beyond plain data."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.exists() else "does not exist"
        raise UserError(f"{option} {path} {what}; give the .pth file BigGAN-PyTorch saved (G.pth, G_ema.pth, D.pth)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{option} {path} holds pickled objects beyond tensors and plain data; sagan never loads "
                        "those (they can run code): re-save it with torch.save(model.state_dict(), path)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        detail = (str(exc) or type(exc).__name__).splitlines()[0]
        raise UserError(f"{option} {path} is not a PyTorch checkpoint ({detail})") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise UserError(f"{option} {path} is not {EXPECTED[option]}")
    empty = next((key for key, value in state.items() if value.numel() == 0), None)
    if empty is not None:
        raise UserError(f"{option} {path}: {empty} holds no numbers; not {EXPECTED[option]}")
    problem = plain_tensor_problem(state)
    if problem is not None:
        raise UserError(f"{option} {path}: {problem}; not {EXPECTED[option]}")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return {key: value.detach() for key, value in state.items()}


class _Reader(StateReader):
    def __init__(self, state: dict[str, torch.Tensor], option: str):
        super().__init__(state, option, EXPECTED[option], as_float=True, ignored=(".sv0",))


def _shape(state: dict, key: str, ndim: int, option: str) -> tuple[int, ...]:
    return tensor_shape(state, key, ndim, option, EXPECTED[option])


def _blocks(state: dict) -> list[bool]:
    """For each blocks.I.0 (a residual block): whether blocks.I.1 (attention) follows it."""
    indices = sorted({int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.0\.", key))})
    if indices != list(range(len(indices))):
        return []
    return [f"blocks.{i}.1.theta.weight" in state for i in indices]


def _sn(reader: _Reader, module, prefix: str, shape: tuple[int, ...], bias: bool) -> None:
    """BigGAN's (weight, u0) -> sagan's spectral norm: the vectors of its one eval-mode power iteration."""
    weight = reader.get(f"{prefix}.weight", shape)
    matrix = weight.double().reshape(shape[0], -1)
    u0 = reader.get(f"{prefix}.u0", (1, shape[0])).double()
    reader.used.add(f"{prefix}.sv0")
    v = F.normalize(u0 @ matrix, eps=1e-12)
    u = F.normalize(v @ matrix.t(), eps=1e-12)
    param = module.parametrizations.weight
    with torch.no_grad():
        param.original.copy_(weight)
        param[0]._u.copy_(u[0])
        param[0]._v.copy_(v[0])
        if bias:
            module.bias.copy_(reader.get(f"{prefix}.bias", (shape[0],)))


def _attention(reader: _Reader, layer, prefix: str, channels: int) -> None:
    for ours, theirs, shape in (("query", "theta", (channels // 8, channels, 1, 1)),
                                ("key", "phi", (channels // 8, channels, 1, 1)),
                                ("value", "g", (channels // 2, channels, 1, 1)),
                                ("out", "o", (channels, channels // 2, 1, 1))):
        _sn(reader, getattr(layer, ours), f"{prefix}.{theirs}", shape, bias=False)
    with torch.no_grad():
        layer.gamma.copy_(reader.scalar(f"{prefix}.gamma"))


def _stats(reader: _Reader, bn, prefix: str, channels: int) -> None:
    with torch.no_grad():
        bn.running_mean.copy_(reader.get(f"{prefix}.stored_mean", (channels,)))
        bn.running_var.copy_(reader.get(f"{prefix}.stored_var", (channels,)))


def _g_layout(state: dict) -> dict:
    attention_after = _blocks(state)
    if "shared.weight" not in state or "output_layer.2.weight" not in state or not attention_after:
        hint = " (it looks like a discriminator: swap --g and --d)" if "embed.weight" in state else ""
        raise UserError(f"--g is not {EXPECTED['--g']}{hint}")
    count = len(attention_after)
    if not 3 <= count <= 6:
        raise UserError(f"--g has {count} residual blocks; sagan builds 32x32 (3) to 256x256 (6)")
    resolution = 4 * 2 ** count
    num_classes, shared = _shape(state, "shared.weight", 2, "--g")
    stem_out, stem_z = _shape(state, "linear.weight", 2, "--g")
    widths = [stem_out // 16] + [_shape(state, f"blocks.{i}.0.conv1.weight", 4, "--g")[0] for i in range(count)]
    cond = _shape(state, "blocks.0.0.bn1.gain.weight", 2, "--g")[1]
    if cond not in (shared, shared + stem_z):
        raise UserError(f"--g: blocks.0.0.bn1.gain takes {cond} inputs, neither the shared embedding ({shared}) nor "
                        f"it plus a z chunk ({shared + stem_z}); not {EXPECTED['--g']}")
    hierarchical = cond == shared + stem_z
    attention = [8 * 2 ** i for i, after in enumerate(attention_after) if after]
    return {"resolution": resolution, "num_classes": num_classes, "shared": shared, "hierarchical": hierarchical,
            "z_dim": stem_z * (count + 1) if hierarchical else stem_z, "widths": widths, "attention": attention}


def _d_layout(state: dict) -> dict:
    attention_after = _blocks(state)
    if "linear.weight" not in state or "blocks.0.0.conv1.weight" not in state or "shared.weight" in state:
        hint = " (it looks like a generator: swap --g and --d)" if "shared.weight" in state else ""
        raise UserError(f"--d is not {EXPECTED['--d']}{hint}")
    count = len(attention_after)
    if not 4 <= count <= 7:
        raise UserError(f"--d has {count} residual blocks; sagan builds 32x32 (4) to 256x256 (7)")
    resolution = 2 ** (count + 1)
    sizes = [*[resolution // 2 ** (i + 1) for i in range(count - 1)], 4]
    if attention_after[-1]:
        raise UserError("--d has attention after its last (4x4) block, where sagan's D places none")
    widths = [_shape(state, f"blocks.{i}.0.conv1.weight", 4, "--d")[0] for i in range(count)]
    num_classes = _shape(state, "embed.weight", 2, "--d")[0] if "embed.weight" in state else 0
    return {"resolution": resolution, "num_classes": num_classes, "widths": widths, "sizes": sizes,
            "attention": [sizes[i] for i, after in enumerate(attention_after) if after]}


def biggan_config(g_state: dict | None, d_state: dict | None, d_shortcut_relu: bool = False) -> ModelConfig:
    """sagan's ModelConfig for BigGAN-PyTorch's tensors (`d_shortcut_relu`: a D from its early in-place ReLU code)."""
    g = _g_layout(g_state) if g_state is not None else None
    d = _d_layout(d_state) if d_state is not None else None
    if g and d and (g["resolution"], g["num_classes"]) != (d["resolution"], d["num_classes"]):
        raise UserError(f"--g ({g['resolution']}x{g['resolution']}, {g['num_classes']} classes) and --d "
                        f"({d['resolution']}x{d['resolution']}, {d['num_classes']} classes) are not from one model")
    resolution, num_classes = (g or d)["resolution"], (g or d)["num_classes"]
    values: dict = {"arch": "resnet", "resolution": resolution, "num_classes": num_classes, "channels": 3,
                    "attention": "paper", "sn_last_layer": True, "init": "default", "bn_eps": 1e-5,
                    "g_attention": [], "d_attention": []}
    if g:
        values.update(z_dim=g["z_dim"], g_ch=g["widths"][-1], g_attention=g["attention"],
                      shared_embedding=g["shared"], hierarchical_z=g["hierarchical"])
        sizes = [2 ** i for i in range(2, resolution.bit_length())]
        if g["widths"] != [g["widths"][-1] * min(16, resolution // size) for size in sizes]:
            values["g_widths"] = g["widths"]
    if d:
        values.update(d_ch=d["widths"][0], d_attention=d["attention"], d_shortcut_relu=d_shortcut_relu)
        if d["widths"] != [d["widths"][0] * min(16, resolution // (2 * size)) for size in d["sizes"]]:
            values["d_widths"] = d["widths"]
    try:
        config = ModelConfig(**values)
        check_model_sizes(config, "--g/--d")
        ModelConfig.from_dict(config.to_dict())
    except UserError as exc:
        raise UserError(f"the weights give a model sagan cannot build: {exc}") from None
    return config


def generator_from_biggan(state: dict, config: ModelConfig) -> Generator:
    reader, generator = _Reader(state, "--g"), Generator(config).eval()
    widths = [generator.stem_channels] + [block.conv1.parametrizations.weight.original.shape[0]
                                          for block in generator.blocks]
    cond = config.shared_embedding + generator.z_chunk
    with torch.no_grad():
        generator.shared.weight.copy_(reader.get("shared.weight", (config.num_classes, config.shared_embedding)))
    stem_z = generator.z_chunk or config.z_dim
    _sn(reader, generator.stem, "linear", (16 * widths[0], stem_z), bias=True)
    size = 4
    for index, block in enumerate(generator.blocks):
        prefix, cin, cout = f"blocks.{index}.0", widths[index], widths[index + 1]
        for name, channels in (("bn1", cin), ("bn2", cout)):
            layer = getattr(block, name)
            _stats(reader, layer.bn, f"{prefix}.{name}", channels)
            _sn(reader, layer.gain, f"{prefix}.{name}.gain", (channels, cond), bias=False)
            _sn(reader, layer.bias, f"{prefix}.{name}.bias", (channels, cond), bias=False)
        _sn(reader, block.conv1, f"{prefix}.conv1", (cout, cin, 3, 3), bias=True)
        _sn(reader, block.conv2, f"{prefix}.conv2", (cout, cout, 3, 3), bias=True)
        _sn(reader, block.shortcut, f"{prefix}.conv_sc", (cout, cin, 1, 1), bias=True)
        size *= 2
        if str(size) in generator.attention:
            _attention(reader, generator.attention[str(size)], f"blocks.{index}.1", cout)
    _stats(reader, generator.final_bn.bn, "output_layer.0", widths[-1])
    with torch.no_grad():
        generator.final_bn.bn.weight.copy_(reader.get("output_layer.0.gain", (widths[-1],)))
        generator.final_bn.bn.bias.copy_(reader.get("output_layer.0.bias", (widths[-1],)))
    _sn(reader, generator.to_rgb, "output_layer.2", (3, widths[-1], 3, 3), bias=True)
    reader.finish()
    return generator


def discriminator_from_biggan(state: dict, config: ModelConfig) -> Discriminator:
    reader, discriminator = _Reader(state, "--d"), Discriminator(config).eval()
    sizes = config.default_d_block_sizes()
    widths = config.d_widths or [config.d_ch * min(16, config.resolution // (2 * size)) for size in sizes]
    inputs = [3, *widths]
    for index, module in enumerate(discriminator.blocks):
        prefix, cin, cout = f"blocks.{index}.0", inputs[index], widths[index]
        _sn(reader, module.conv1, f"{prefix}.conv1", (cout, cin, 3, 3), bias=True)
        _sn(reader, module.conv2, f"{prefix}.conv2", (cout, cout, 3, 3), bias=True)
        if module.shortcut is not None:
            _sn(reader, module.shortcut, f"{prefix}.conv_sc", (cout, cin, 1, 1), bias=True)
        if str(sizes[index]) in discriminator.attention and index < len(sizes) - 1:
            _attention(reader, discriminator.attention[str(sizes[index])], f"blocks.{index}.1", cout)
    _sn(reader, discriminator.head, "linear", (1, widths[-1]), bias=True)
    if config.num_classes:
        _sn(reader, discriminator.embed, "embed", (config.num_classes, widths[-1]), bias=False)
    reader.finish()
    return discriminator


def import_biggan(g_path: str | Path | None, d_path: str | Path | None, out_dir: str | Path, *,
                  d_shortcut_relu: bool = False) -> list[Path]:
    """Convert BigGAN-PyTorch's G (and/or D) state dicts into OUT/g.safetensors, d.safetensors and config.json."""
    if g_path is None and d_path is None:
        raise UserError("give --g G_ema.pth (or G.pth) and/or --d D.pth")
    g_state = load_biggan_state(g_path, "--g") if g_path is not None else None
    d_state = load_biggan_state(d_path, "--d") if d_path is not None else None
    config = biggan_config(g_state, d_state, d_shortcut_relu)
    models = []
    if g_state is not None:
        models.append(("g.safetensors", generator_from_biggan(g_state, config)))
    if d_state is not None:
        models.append(("d.safetensors", discriminator_from_biggan(d_state, config)))
    return write_imported(out_dir, models, config, source="import-biggan")
