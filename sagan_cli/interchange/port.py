"""`sagan import-port`: the popular PyTorch port's checkpoints (heykeetae/Self-Attention-GAN) as sagan files.

What the port saves (facts read from its source, no code taken from it): `torch.save(state_dict())` of
  Generator:     l1..l4 = [SpectralNorm(ConvTranspose2d), BatchNorm2d, ReLU]; last = ConvTranspose2d (no SN);
                 attn1 (after l3, 16x16) and attn2 (after l4, 32x32) at imsize 64
  Discriminator: l1..l4 = [SpectralNorm(Conv2d), LeakyReLU(0.1)]; last = Conv2d(k=4) (no SN);
                 attn1 (after l3, 8x8) and attn2 (after l4, 4x4)
PyTorch before 0.4.1 (the port names 0.3.0) wrote BatchNorm without `num_batches_tracked`: it then
stays 0 (eval mode does not read it). With `--parallel` its trainer saves `state_dict()` of
`nn.DataParallel` models, whose keys start with `module.`: the prefix is dropped.
The port's attention widths are fixed in its code (G: 128 after l3, 64 after l4; D: 256 after l3, 512
after l4), so its checkpoints have conv_dim 64 (its default).
Its SpectralNorm keeps `<layer>.module.weight_bar` (the raw weight), `weight_u`, `weight_v`, and on EVERY
forward does one power iteration from the stored u on w.view(w.shape[0], -1) (dim 0, also for transposed
convs), then uses w / sigma with sigma = u . (W v). Its Self_Attn has query_conv, key_conv, value_conv
(1x1, with bias, no SN) and gamma of shape [1]: sagan's `seed` attention variant.

This is sagan's `dcgan` model at 64x64 with g_attention [16, 32], d_attention [8, 4], sn_last_layer off.
To give the port's first forward after loading (in eval mode: BatchNorm running statistics), each
spectrally normalised layer gets the port's weight and singular vectors chosen so that torch's eval-mode
sigma (u . W_mat v, no power iteration; W_mat uses dim 1 for transposed convs) equals the port's sigma:
v = top right singular vector of W_mat, u = top left one times sigma_port / sigma_max. The port's
attention convs have no spectral norm, ours do: they get the target sigma 1, so they act as the port's
plain weights. Training on from an import renormalises them (torch's power iteration rescales u and v).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from sagan_cli.config import ModelConfig
from sagan_cli.errors import UserError
from sagan_cli.interchange.checkpoint import check_model_sizes, write_imported
from sagan_cli.model.models import Discriminator, Generator

RESOLUTION = 64
G_ATTENTION = {"attn1": 16, "attn2": 32}
D_ATTENTION = {"attn1": 8, "attn2": 4}
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def load_port_state(path: str | Path, option: str) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True (never arbitrary pickle); anything but a dict of tensors is a UserError."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.exists() else "does not exist"
        raise UserError(f"{option} {path} {what}; give the .pth file the port saved")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "Unsupported class" in text:
            raise UserError(
                f"{option} {path} holds pickled objects beyond tensors (it would need weights_only=False, which "
                "can run code); sagan loads state dicts only: re-save it with torch.save(model.state_dict(), path)"
            ) from None
        detail = next((line.strip() for line in reversed(text.splitlines()) if line.strip().startswith("Unsupported")),
                      text.splitlines()[0] if text else "unreadable")
        raise UserError(f"{option} {path} is not a PyTorch checkpoint that can be loaded safely ({detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError, SafetensorError) as exc:  # this torch's load may hand a
        # file to safetensors (seen with a torch.save file named .safetensors): its errors are the file's too
        detail = (str(exc) or type(exc).__name__).splitlines()[0]
        raise UserError(f"{option} {path} is not a PyTorch checkpoint ({detail})") from None
    if (not isinstance(state, dict) or not state or not all(isinstance(key, str) for key in state)
            or not all(isinstance(value, torch.Tensor) for value in state.values())):
        raise UserError(
            f"{option} {path} is not a state dict (a dict of tensors); the port saves one with "
            "torch.save(model.state_dict(), path)"
        )
    if all(key.startswith("module.") for key in state):  # saved from nn.DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _need(state: dict[str, torch.Tensor], key: str, option: str, network: str) -> torch.Tensor:
    if key not in state:
        other = "discriminator" if network == "generator" else "generator"
        hint = (f" (it looks like the port's {other}: swap --g and --d)"
                if _looks_like(state) == other else "")
        raise UserError(f"{option} is not the port's {network} state dict: it has no {key!r}{hint}")
    return state[key].detach().float() if state[key].is_floating_point() else state[key]


def _looks_like(state: dict[str, torch.Tensor]) -> str | None:
    if "l1.1.running_mean" in state:
        return "generator"
    if "l1.0.module.weight_bar" in state:
        return "discriminator"
    return None


def port_config(g_state: dict | None, d_state: dict | None) -> ModelConfig:
    """Infer z_dim, conv_dim (g_ch / d_ch) and the image size from the tensors' shapes."""
    z_dim, g_ch, d_ch = 128, 64, 64
    if g_state is not None:
        _need(g_state, "l1.1.running_mean", "--g", "generator")  # G's BatchNorm: D has none
        first = _need(g_state, "l1.0.module.weight_bar", "--g", "generator")  # [z_dim, 8 * conv_dim, 4, 4]
        if "l4.0.module.weight_bar" not in g_state:
            raise UserError("--g has no l4 layers: the port only runs at imsize 64 (its forward always calls l4)")
        z_dim, g_ch = first.shape[0], first.shape[1] // 8
    if d_state is not None:
        if _looks_like(d_state) == "generator":
            raise UserError("--d is not the port's discriminator state dict: it has BatchNorm layers "
                            "(it looks like the port's generator: swap --g and --d)")
        d_ch = _need(d_state, "l1.0.module.weight_bar", "--d", "discriminator").shape[0]  # [conv_dim, 3, 4, 4]
        if "l4.0.module.weight_bar" not in d_state:
            raise UserError("--d has no l4 layers: the port only runs at imsize 64 (its forward always calls l4)")
    if g_ch % 8 or d_ch % 8:
        raise UserError(f"conv_dim must be a multiple of 8 (its attention uses conv_dim / 8 channels), got {g_ch}/{d_ch}")
    config = ModelConfig(arch="dcgan", resolution=RESOLUTION, z_dim=z_dim, g_ch=g_ch, d_ch=d_ch, attention="seed",
                         g_attention=sorted(G_ATTENTION.values()),
                         d_attention=sorted(D_ATTENTION.values(), reverse=True),
                         sn_last_layer=False, init="default")
    if z_dim < 1 or g_ch < 8 or d_ch < 8:  # a tensor with a 0 dimension holds nothing
        raise UserError(f"the port's first layers give z_dim {z_dim} and conv_dim {g_ch}/{d_ch}: "
                        "not a checkpoint of its model")
    check_model_sizes(config, "--g/--d")  # sizes come from tensor shapes: an empty tensor can claim any
    return config


def port_sigma(weight: torch.Tensor, u: torch.Tensor) -> float:
    """The port's sigma: one power iteration from u on weight.view(rows, -1), then u . (W v)."""
    mat = weight.double().reshape(weight.shape[0], -1)
    v = mat.t() @ u.double()
    v = v / (v.norm() + 1e-12)
    u = mat @ v
    u = u / (u.norm() + 1e-12)
    return float(u @ (mat @ v))


def set_spectral_norm(module: nn.Module, weight: torch.Tensor, sigma: float) -> None:
    """Load `weight` into a spectral-norm-parametrised module so that its eval-mode weight is weight / sigma."""
    param = module.parametrizations.weight
    norm = param[0]
    mat = norm._reshape_weight_to_matrix(weight.double())  # torch's layout (dim 1 for transposed convs)
    left, singular, right = top_singular(mat)
    with torch.no_grad():
        param.original.copy_(weight)
        norm._v.copy_(right)
        norm._u.copy_(left * (sigma / singular))


def top_singular(mat: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(u, sigma, v) of the largest singular value, from the eigenvectors of the smaller Gram matrix:
    a full SVD of the port's 512 x 4096 layers took ~0.6 s each here, this a few milliseconds."""
    if mat.shape[0] <= mat.shape[1]:
        values, vectors = torch.linalg.eigh(mat @ mat.t())
        sigma = float(values[-1].clamp_min(0).sqrt())
        left = vectors[:, -1]
        right = mat.t() @ left / max(sigma, 1e-300)
    else:
        values, vectors = torch.linalg.eigh(mat.t() @ mat)
        sigma = float(values[-1].clamp_min(0).sqrt())
        right = vectors[:, -1]
        left = mat @ right / max(sigma, 1e-300)
    return left, sigma, right


def _copy(target: torch.Tensor, source: torch.Tensor, name: str, option: str) -> None:
    if source.numel() != target.numel():
        raise UserError(f"{option}: {name} has shape {list(source.shape)}, expected {list(target.shape)}: "
                        "not a checkpoint of the port's model")
    with torch.no_grad():
        target.copy_(source.reshape(target.shape))


def _sn_layer(module: nn.Module, state: dict, prefix: str, option: str, network: str) -> None:
    weight = _need(state, f"{prefix}.module.weight_bar", option, network)
    u = _need(state, f"{prefix}.module.weight_u", option, network)
    expected = module.parametrizations.weight.original
    if weight.shape != expected.shape or u.shape != (weight.shape[0],):
        raise UserError(f"{option}: {prefix}.module.weight_bar has shape {list(weight.shape)}, expected "
                        f"{list(expected.shape)}: not a checkpoint of the port's model")
    set_spectral_norm(module, weight, port_sigma(weight, u))
    _copy(module.bias, _need(state, f"{prefix}.module.bias", option, network), f"{prefix}.module.bias", option)


def _attention(layer: nn.Module, state: dict, prefix: str, option: str, network: str) -> None:
    for ours, theirs in (("query", "query_conv"), ("key", "key_conv"), ("value", "value_conv")):
        conv = getattr(layer, ours)
        weight = _need(state, f"{prefix}.{theirs}.weight", option, network)
        if weight.shape != conv.parametrizations.weight.original.shape:
            raise UserError(f"{option}: {prefix}.{theirs}.weight has shape {list(weight.shape)}, expected "
                            f"{list(conv.parametrizations.weight.original.shape)}: not a checkpoint of the port's model")
        set_spectral_norm(conv, weight, 1.0)  # the port has no spectral norm here
        _copy(conv.bias, _need(state, f"{prefix}.{theirs}.bias", option, network), f"{prefix}.{theirs}.bias", option)
    _copy(layer.gamma, _need(state, f"{prefix}.gamma", option, network), f"{prefix}.gamma", option)


def generator_from_port(state: dict, config: ModelConfig) -> Generator:
    generator = Generator(config).eval()
    for i in range(4):
        _sn_layer(generator.blocks[i].conv, state, f"l{i + 1}.0", "--g", "generator")
        batch_norm = generator.blocks[i].bn.bn
        for key in BN_KEYS:
            name = f"l{i + 1}.1.{key}"
            if key == "num_batches_tracked" and name not in state:
                continue  # PyTorch < 0.4.1 (the port's stated 0.3/0.4) saved no counter: keep ours at 0
            _copy(getattr(batch_norm, key), _need(state, name, "--g", "generator"), name, "--g")
    for name, size in G_ATTENTION.items():
        _attention(generator.attention[str(size)], state, name, "--g", "generator")
    _copy(generator.to_rgb.weight, _need(state, "last.0.weight", "--g", "generator"), "last.0.weight", "--g")
    _copy(generator.to_rgb.bias, _need(state, "last.0.bias", "--g", "generator"), "last.0.bias", "--g")
    return generator


def discriminator_from_port(state: dict, config: ModelConfig) -> Discriminator:
    discriminator = Discriminator(config).eval()
    for i in range(4):
        _sn_layer(discriminator.blocks[i].conv, state, f"l{i + 1}.0", "--d", "discriminator")
    for name, size in D_ATTENTION.items():
        _attention(discriminator.attention[str(size)], state, name, "--d", "discriminator")
    _copy(discriminator.head.weight, _need(state, "last.0.weight", "--d", "discriminator"), "last.0.weight", "--d")
    _copy(discriminator.head.bias, _need(state, "last.0.bias", "--d", "discriminator"), "last.0.bias", "--d")
    return discriminator


def import_port(g_path: str | Path | None, d_path: str | Path | None, out_dir: str | Path) -> list[Path]:
    """Convert the port's G (and/or D) state dicts into OUT/g.safetensors, d.safetensors and config.json."""
    if g_path is None and d_path is None:
        raise UserError("give --g G.pth and/or --d D.pth (state dicts saved by the port)")
    g_state = load_port_state(g_path, "--g") if g_path is not None else None
    d_state = load_port_state(d_path, "--d") if d_path is not None else None
    config = port_config(g_state, d_state)
    models = []
    if g_state is not None:
        models.append(("g.safetensors", generator_from_port(g_state, config)))
    if d_state is not None:
        models.append(("d.safetensors", discriminator_from_port(d_state, config)))
    return write_imported(out_dir, models, config, source="import-port")
