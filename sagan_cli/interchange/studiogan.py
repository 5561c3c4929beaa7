"""`sagan import-studiogan`: PyTorch-StudioGAN's SAGAN checkpoints (its resnet backbone) as sagan files.

What StudioGAN saves (facts read from its source and configs, no code taken from it):
  `model=G-best-weights-step=N.pth` (also G_ema, and `current` instead of `best`): a dict with `state_dict` and
  `optimizer`; the D file adds run metadata (seed, step, best_fid as a numpy float, ...).
  Every conv/linear/embedding is torch's old-style `spectral_norm`: `<layer>.weight_orig`, `weight_u`,
  `weight_v`; in eval mode the weight is weight_orig / (u . W v) with the stored vectors, exactly sagan's
  eval formula, so the three tensors are copied as they are.
  Generator: linear0 (z -> 4x4 stem), blocks.I.0 = a residual up block (bn1, conv2d1, bn2, conv2d2, conv2d0 the
    1x1 shortcut) or a self-attention layer (conv1x1_theta/phi/g/attn without bias, sigma: sagan's query, key,
    value, out and gamma, the paper variant); bn4 (affine BatchNorm), conv2d5 (to RGB). All BatchNorm eps 1e-4.
    Conditional BN: gain = 1 + E0[y], bias = E1[y] with spectrally normalised embeddings `bn1.embed0/embed1`
    (releases before Jan 2022), or linear layers on a one-hot label `bn1.gain/bias` (weight [C, classes],
    no bias) in later ones. Either folds exactly (in eval mode) into sagan's per-class gain and bias tables.
  Discriminator: blocks.I.0 = residual down blocks (conv2d1, conv2d2, conv2d0 when the block pools or changes
    width) or attention; linear1 (head), embedding (projection). Its activation is an in-place ReLU, so the
    shortcut of every block after the first sees relu(x) (`model.d_shortcut_relu`). Which blocks pool is a
    fixed table per image size (32: the last two keep 8x8; otherwise only the last block keeps 4x4), so the
    number of D blocks gives the resolution and `model.d_block_sizes`.
  Widths differ from sagan's rule at 32x32 (G 4*g_conv_dim throughout, D 2*d_conv_dim) and in the 64x64 D's last
  block (16*d_conv_dim): they go to `model.g_widths` / `model.d_widths` when they differ from the rule.
Nothing but `torch.load(weights_only=True)` reads the files; numpy scalars (D's best_fid) are allow-listed.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from sagan_cli.config import ModelConfig
from sagan_cli.errors import UserError
from sagan_cli.interchange.checkpoint import check_model_sizes, plain_tensor_problem, write_imported
from sagan_cli.interchange.state_reader import StateReader, tensor_shape
from sagan_cli.model.models import Discriminator, Generator

BN_EPS = 1e-4
EXPECTED = {"--g": "StudioGAN's SAGAN generator (a dict with 'state_dict' holding linear0.weight_orig, blocks.*, "
                   "bn4.*, conv2d5.*)",
            "--d": "StudioGAN's SAGAN discriminator (a dict with 'state_dict' holding blocks.*, linear1.weight_orig, "
                   "embedding.weight_orig)"}


def _numpy_globals() -> list:
    """What pickling a numpy float needs: the scalar constructor (under numpy 1's and 2's module names), dtype."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed: list = [scalar, np.dtype]
    if tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6):  # (object, name) pairs
        allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    allowed += [getattr(np.dtypes, name) for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType",
                                                      "BoolDType") if hasattr(np, "dtypes")]
    return allowed


def load_studiogan_state(path: str | Path, option: str) -> dict[str, torch.Tensor]:
    """The state dict inside one of StudioGAN's .pth files; weights_only=True, so no pickle beyond plain data."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.exists() else "does not exist"
        raise UserError(f"{option} {path} {what}; give the .pth file StudioGAN saved (model=G-best-weights-step=N.pth)")
    try:
        allow = (torch.serialization.safe_globals(_numpy_globals()) if hasattr(torch.serialization, "safe_globals")
                 else contextlib.nullcontext())  # torch < 2.5: a numpy scalar is refused like any other object
        with warnings.catch_warnings(), allow:
            warnings.simplefilter("ignore")
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if line.strip().startswith("Unsupported")),
                      "unreadable")
        raise UserError(f"{option} {path} holds pickled objects beyond tensors and plain data ({detail}); sagan never "
                        "loads those (they can run code): re-save it with torch.save({'state_dict': "
                        "model.state_dict()}, path)") from None
    except (RuntimeError, EOFError, OSError, ValueError, SafetensorError) as exc:
        detail = (str(exc) or type(exc).__name__).splitlines()[0]
        raise UserError(f"{option} {path} is not a PyTorch checkpoint ({detail})") from None
    state = content.get("state_dict") if isinstance(content, dict) and "state_dict" in content else content
    if not isinstance(state, dict) or not state or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise UserError(f"{option} {path} is not {EXPECTED[option]}")
    empty = next((key for key, value in state.items() if value.numel() == 0), None)
    if empty is not None:  # a 0-element tensor could claim any width: no model has one
        raise UserError(f"{option} {path}: {empty} holds no numbers (shape {list(state[empty].shape)}); "
                        f"not {EXPECTED[option]}")
    problem = plain_tensor_problem(state)
    if problem is not None:
        raise UserError(f"{option} {path}: {problem}; not {EXPECTED[option]}")
    if all(key.startswith("module.") for key in state):  # saved from DataParallel / DistributedDataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    return {key: value.detach() for key, value in state.items()}


class _Reader(StateReader):
    def __init__(self, state: dict[str, torch.Tensor], option: str):
        super().__init__(state, option, EXPECTED[option], hint=" (only the resnet SAGAN configs import)")


def _shape(state: dict, key: str, ndim: int, option: str) -> tuple[int, ...]:
    return tensor_shape(state, key, ndim, option, EXPECTED[option])


def _blocks(state: dict, prefix: str = "blocks") -> list[str]:
    """'block' or 'attention' for each blocks.I.0 entry, in order."""
    indices = sorted({int(m.group(1)) for key in state if (m := re.match(rf"{prefix}\.(\d+)\.0\.", key))})
    if indices != list(range(len(indices))):
        return []
    return ["attention" if f"{prefix}.{i}.0.conv1x1_theta.weight_orig" in state else "block" for i in indices]


def _config_file(path: str | Path | None) -> dict:
    """The few facts sagan reads from a StudioGAN config (SAGAN.yaml): to cross-check the shapes."""
    if path is None:
        return {}
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"--config {path} is not a readable YAML file ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"--config {path} is not a StudioGAN config (DATA:, MODEL: tables)")
    data, model = raw.get("DATA") or {}, raw.get("MODEL") or {}
    if not isinstance(data, dict) or not isinstance(model, dict):
        raise UserError(f"--config {path} is not a StudioGAN config (DATA:, MODEL: tables)")
    if model.get("backbone", "resnet") != "resnet":
        raise UserError(f"--config {path} uses backbone {model['backbone']!r}; only StudioGAN's resnet SAGAN imports")
    facts = {"img_size": data.get("img_size"), "num_classes": data.get("num_classes"),
             "attn_g_loc": model.get("attn_g_loc"), "attn_d_loc": model.get("attn_d_loc"),
             "apply_attn": model.get("apply_attn", True)}

    def number(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for key in ("img_size", "num_classes"):
        if facts[key] is not None and not number(facts[key]):
            raise UserError(f"--config {path}: {key} must be a whole number, got {facts[key]!r}")
    for key in ("attn_g_loc", "attn_d_loc"):
        if facts[key] is not None and not (isinstance(facts[key], list) and all(map(number, facts[key]))):
            raise UserError(f"--config {path}: {key} must be a list of block numbers, got {facts[key]!r}")
    return facts


def _sn(reader: _Reader, module, prefix: str, shape: tuple[int, ...], bias: bool) -> None:
    """Copy weight_orig, weight_u, weight_v (and the bias) into a sagan spectral-norm layer as they are."""
    weight = reader.get(f"{prefix}.weight_orig", shape)
    rows, cols = shape[0], int(np.prod(shape[1:]))
    param = module.parametrizations.weight
    with torch.no_grad():
        param.original.copy_(weight)
        param[0]._u.copy_(reader.get(f"{prefix}.weight_u", (rows,)))
        param[0]._v.copy_(reader.get(f"{prefix}.weight_v", (cols,)))
        if bias:
            module.bias.copy_(reader.get(f"{prefix}.bias", (rows,)))


def _sn_matrix(reader: _Reader, prefix: str, shape: tuple[int, int]) -> torch.Tensor:
    """weight_orig / (u . W v) in float64: an eval-mode spectrally normalised embedding or linear weight."""
    weight = reader.get(f"{prefix}.weight_orig", shape).double()
    u = reader.get(f"{prefix}.weight_u", (shape[0],)).double()
    v = reader.get(f"{prefix}.weight_v", (shape[1],)).double()
    return weight / (u @ (weight @ v))


def _attention(reader: _Reader, layer, prefix: str, channels: int) -> None:
    for ours, theirs, shape in (("query", "conv1x1_theta", (channels // 8, channels, 1, 1)),
                                ("key", "conv1x1_phi", (channels // 8, channels, 1, 1)),
                                ("value", "conv1x1_g", (channels // 2, channels, 1, 1)),
                                ("out", "conv1x1_attn", (channels, channels // 2, 1, 1))):
        _sn(reader, getattr(layer, ours), f"{prefix}.{theirs}", shape, bias=False)
    with torch.no_grad():
        layer.gamma.copy_(reader.get(f"{prefix}.sigma", (1,)).reshape(()))


def _batch_norm(reader: _Reader, bn, prefix: str, channels: int, affine: bool) -> None:
    with torch.no_grad():
        for key in ("running_mean", "running_var", *(("weight", "bias") if affine else ())):
            getattr(bn, key).copy_(reader.get(f"{prefix}.{key}", (channels,)))
        if reader.has(f"{prefix}.num_batches_tracked"):
            bn.num_batches_tracked.copy_(reader.scalar(f"{prefix}.num_batches_tracked"))


def _class_batch_norm(reader: _Reader, layer, prefix: str, channels: int, num_classes: int) -> None:
    """StudioGAN's cBN -> sagan's ClassBatchNorm2d: its (1 + W/sigma, W/sigma) folded into per-class tables."""
    if not num_classes:
        _batch_norm(reader, layer.bn, prefix, channels, affine=True)
        return
    _batch_norm(reader, layer.bn, f"{prefix}.bn", channels, affine=False)
    if reader.has(f"{prefix}.embed0.weight_orig"):  # releases before Jan 2022: embeddings [classes, C]
        gain = _sn_matrix(reader, f"{prefix}.embed0", (num_classes, channels))
        bias = _sn_matrix(reader, f"{prefix}.embed1", (num_classes, channels))
    else:  # later releases: linear layers on a one-hot label, weight [C, classes]
        gain = _sn_matrix(reader, f"{prefix}.gain", (channels, num_classes)).t()
        bias = _sn_matrix(reader, f"{prefix}.bias", (channels, num_classes)).t()
    with torch.no_grad():
        layer.gain.weight.copy_(1 + gain)
        layer.bias.weight.copy_(bias)


def _g_layout(state: dict) -> dict:
    kinds = _blocks(state)
    if "linear0.weight_orig" not in state or "conv2d5.weight_orig" not in state or not kinds:
        hint = " (it looks like a discriminator: swap --g and --d)" if "linear1.weight_orig" in state else ""
        raise UserError(f"--g is not {EXPECTED['--g']}{hint}")
    blocks = [i for i, kind in enumerate(kinds) if kind == "block"]
    if not 3 <= len(blocks) <= 6:
        raise UserError(f"--g has {len(blocks)} residual blocks; StudioGAN's resnet G has 3 (32x32) to 6 (256x256)")
    resolution = 4 * 2 ** len(blocks)
    widths = [_shape(state, f"blocks.{blocks[0]}.0.conv2d1.weight_orig", 4, "--g")[1]]
    widths += [_shape(state, f"blocks.{i}.0.conv2d1.weight_orig", 4, "--g")[0] for i in blocks]
    attention = [4 * 2 ** sum(1 for b in blocks if b < i) for i, kind in enumerate(kinds) if kind == "attention"]
    if 4 in attention:
        raise UserError("--g has attention before its first block, where sagan's G places none")
    prefix = f"blocks.{blocks[0]}.0.bn1"
    if f"{prefix}.embed0.weight_orig" in state:
        num_classes = _shape(state, f"{prefix}.embed0.weight_orig", 2, "--g")[0]
    elif f"{prefix}.gain.weight_orig" in state:
        num_classes = _shape(state, f"{prefix}.gain.weight_orig", 2, "--g")[1]
    elif f"{prefix}.bn.running_mean" in state:
        raise UserError("--g has a conditional BatchNorm sagan does not know (neither embed0/embed1 nor gain/bias)")
    else:
        num_classes = 0
    z_dim = _shape(state, "linear0.weight_orig", 2, "--g")[1]
    return {"kinds": kinds, "resolution": resolution, "widths": widths, "attention": attention,
            "num_classes": num_classes, "z_dim": z_dim}


def _d_layout(state: dict) -> dict:
    kinds = _blocks(state)
    if "linear1.weight_orig" not in state or not kinds:
        hint = " (it looks like a generator: swap --g and --d)" if "linear0.weight_orig" in state else ""
        raise UserError(f"--d is not {EXPECTED['--d']}{hint}")
    blocks = [i for i, kind in enumerate(kinds) if kind == "block"]
    if not 4 <= len(blocks) <= 7:
        raise UserError(f"--d has {len(blocks)} residual blocks; StudioGAN's resnet D has 4 (32x32) to 7 (256x256)")
    resolution = 32 if len(blocks) == 4 else 2 ** (len(blocks) + 1)
    sizes = [16, 8, 8, 8] if resolution == 32 else [*[resolution // 2 ** (i + 1) for i in range(len(blocks) - 1)], 4]
    widths = [_shape(state, f"blocks.{i}.0.conv2d1.weight_orig", 4, "--d")[0] for i in blocks]
    attention = []
    for i, kind in enumerate(kinds):
        if kind == "attention":
            before = sum(1 for b in blocks if b < i)
            if before == 0 or (before > 1 and sizes[before - 1] == sizes[before - 2]):
                raise UserError(f"--d has attention after block {before}, where sagan's D places none")
            attention.append(sizes[before - 1])
    num_classes = _shape(state, "embedding.weight_orig", 2, "--d")[0] if "embedding.weight_orig" in state else 0
    return {"kinds": kinds, "resolution": resolution, "sizes": sizes, "widths": widths, "attention": attention,
            "num_classes": num_classes}


def _default_g_widths(resolution: int, g_ch: int) -> list[int]:
    sizes = [2 ** i for i in range(2, int(np.log2(resolution)) + 1)]
    return [g_ch * min(16, resolution // size) for size in sizes]


def studiogan_config(g_state: dict | None, d_state: dict | None, config_path: str | Path | None = None) -> ModelConfig:
    """sagan's ModelConfig for StudioGAN's tensors (and its config file, if given, checked against them)."""
    g = _g_layout(g_state) if g_state is not None else None
    d = _d_layout(d_state) if d_state is not None else None
    if g and d and (g["resolution"], g["num_classes"]) != (d["resolution"], d["num_classes"]):
        raise UserError(f"--g ({g['resolution']}x{g['resolution']}, {g['num_classes']} classes) and --d "
                        f"({d['resolution']}x{d['resolution']}, {d['num_classes']} classes) are not from one model")
    resolution = (g or d)["resolution"]
    num_classes = (g or d)["num_classes"]
    facts = _config_file(config_path)
    if facts.get("img_size") not in (None, resolution):
        raise UserError(f"--config says img_size {facts['img_size']}, the weights are {resolution}x{resolution}")
    if facts.get("num_classes") not in (None, num_classes) and num_classes:
        raise UserError(f"--config says num_classes {facts['num_classes']}, the weights have {num_classes}")
    for key, layout in (("attn_g_loc", g), ("attn_d_loc", d)):
        if layout and facts.get(key) is not None and facts.get("apply_attn"):
            found = [sum(1 for kind in layout["kinds"][:i] if kind == "block")
                     for i, kind in enumerate(layout["kinds"]) if kind == "attention"]
            if sorted(found) != sorted(facts[key]):
                raise UserError(f"--config says {key} {facts[key]}, the weights have attention after blocks {found}")
    values: dict = {"arch": "resnet", "resolution": resolution, "num_classes": num_classes, "channels": 3,
                    "attention": "paper", "sn_last_layer": True, "init": "default", "bn_eps": BN_EPS,
                    "d_shortcut_relu": True, "g_attention": [], "d_attention": []}
    if g:
        values.update(z_dim=g["z_dim"], g_ch=g["widths"][-1], g_attention=g["attention"])
        if g["widths"] != _default_g_widths(resolution, g["widths"][-1]):
            values["g_widths"] = g["widths"]
    if d:
        values.update(d_ch=d["widths"][0], d_attention=d["attention"])
        defaults = [*[resolution // 2 ** (i + 1) for i in range(int(np.log2(resolution)) - 2)], 4]
        if d["sizes"] != defaults:
            values["d_block_sizes"] = d["sizes"]
        d_default = [d["widths"][0] * min(16, resolution // (2 * size)) for size in d["sizes"]]
        if d["widths"] != d_default:
            values["d_widths"] = d["widths"]
    try:
        config = ModelConfig(**values)
        check_model_sizes(config, "--g/--d")  # sizes come from tensor shapes: an empty tensor can claim any
        ModelConfig.from_dict(config.to_dict())
    except UserError as exc:
        raise UserError(f"the weights give a model sagan cannot build: {exc}") from None
    return config


def generator_from_studiogan(state: dict, config: ModelConfig) -> Generator:
    reader, generator = _Reader(state, "--g"), Generator(config).eval()
    widths = config.g_widths or _default_g_widths(config.resolution, config.g_ch)
    _sn(reader, generator.stem, "linear0", (16 * widths[0], config.z_dim), bias=True)
    kinds, block, size = _blocks(state), 0, 4
    for index, kind in enumerate(kinds):
        prefix = f"blocks.{index}.0"
        if kind == "attention":
            _attention(reader, generator.attention[str(size)], prefix, widths[block])
            continue
        cin, cout, module = widths[block], widths[block + 1], generator.blocks[block]
        _class_batch_norm(reader, module.bn1, f"{prefix}.bn1", cin, config.num_classes)
        _sn(reader, module.conv1, f"{prefix}.conv2d1", (cout, cin, 3, 3), bias=True)
        _class_batch_norm(reader, module.bn2, f"{prefix}.bn2", cout, config.num_classes)
        _sn(reader, module.conv2, f"{prefix}.conv2d2", (cout, cout, 3, 3), bias=True)
        _sn(reader, module.shortcut, f"{prefix}.conv2d0", (cout, cin, 1, 1), bias=True)
        block, size = block + 1, size * 2
    _batch_norm(reader, generator.final_bn.bn, "bn4", widths[-1], affine=True)
    _sn(reader, generator.to_rgb, "conv2d5", (3, widths[-1], 3, 3), bias=True)
    reader.finish()
    return generator


def discriminator_from_studiogan(state: dict, config: ModelConfig) -> Discriminator:
    reader, discriminator = _Reader(state, "--d"), Discriminator(config).eval()
    sizes = config.d_block_sizes or config.default_d_block_sizes()
    widths = config.d_widths or [config.d_ch * min(16, config.resolution // (2 * size)) for size in sizes]
    inputs = [3, *widths]
    block = 0
    for index, kind in enumerate(_blocks(state)):
        prefix = f"blocks.{index}.0"
        if kind == "attention":
            _attention(reader, discriminator.attention[str(sizes[block - 1])], prefix, widths[block - 1])
            continue
        cin, cout, module = inputs[block], widths[block], discriminator.blocks[block]
        _sn(reader, module.conv1, f"{prefix}.conv2d1", (cout, cin, 3, 3), bias=True)
        _sn(reader, module.conv2, f"{prefix}.conv2d2", (cout, cout, 3, 3), bias=True)
        if module.shortcut is not None:
            _sn(reader, module.shortcut, f"{prefix}.conv2d0", (cout, cin, 1, 1), bias=True)
        block += 1
    _sn(reader, discriminator.head, "linear1", (1, widths[-1]), bias=True)
    if config.num_classes:
        _sn(reader, discriminator.embed, "embedding", (config.num_classes, widths[-1]), bias=False)
    reader.finish()
    return discriminator


def import_studiogan(g_path: str | Path | None, d_path: str | Path | None, out_dir: str | Path,
                     config_path: str | Path | None = None) -> list[Path]:
    """Convert StudioGAN's SAGAN G (and/or D) checkpoints into OUT/g.safetensors, d.safetensors and config.json."""
    if g_path is None and d_path is None:
        raise UserError("give --g model=G-best-weights-step=N.pth and/or --d model=D-best-weights-step=N.pth")
    g_state = load_studiogan_state(g_path, "--g") if g_path is not None else None
    d_state = load_studiogan_state(d_path, "--d") if d_path is not None else None
    config = studiogan_config(g_state, d_state, config_path)
    models = []
    if g_state is not None:
        models.append(("g.safetensors", generator_from_studiogan(g_state, config)))
    if d_state is not None:
        models.append(("d.safetensors", discriminator_from_studiogan(d_state, config)))
    return write_imported(out_dir, models, config, source="import-studiogan")
