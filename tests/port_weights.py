"""Random weights in the layout of the popular PyTorch port (heykeetae/Self-Attention-GAN), imsize 64: what
`sagan import-port` reads (tests/interchange/test_port.py) and the path matrix imports (tests/test_path_matrix.py).
Written from the port's published facts (key names, shapes), not from its code."""

from __future__ import annotations

import torch

# The port's real layout (imsize 64): conv_dim 64 (its default) and z_dim 128 (its trainer's default).
# Its attention widths are fixed in its code, Self_Attn(128) and Self_Attn(64) in G, Self_Attn(256) and
# Self_Attn(512) in D, so no other conv_dim runs there.
Z_DIM, CONV_DIM = 128, 64
G_ATTENTION_WIDTHS = {"attn1": 128, "attn2": 64}  # after l3 (16x16), after l4 (32x32)
D_ATTENTION_WIDTHS = {"attn1": 256, "attn2": 512}  # after l3 (8x8), after l4 (4x4)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm() + 1e-12)


def _sn(state: dict, prefix: str, fan_in_shape: tuple[int, ...], gen: torch.Generator) -> None:
    w = torch.randn(fan_in_shape, generator=gen) * 0.1
    state[f"{prefix}.module.weight_bar"] = w
    state[f"{prefix}.module.weight_u"] = unit(torch.randn(w.shape[0], generator=gen))
    state[f"{prefix}.module.weight_v"] = unit(torch.randn(w[0].numel(), generator=gen))
    bias_len = w.shape[1] if prefix.startswith("l") and "G" in state["__kind"] else w.shape[0]
    state[f"{prefix}.module.bias"] = torch.randn(bias_len, generator=gen) * 0.1


def _attn(state: dict, prefix: str, c: int, gen: torch.Generator) -> None:
    for name, cout in (("query_conv", c // 8), ("key_conv", c // 8), ("value_conv", c)):
        state[f"{prefix}.{name}.weight"] = torch.randn(cout, c, 1, 1, generator=gen) * 0.3
        state[f"{prefix}.{name}.bias"] = torch.randn(cout, generator=gen) * 0.1
    state[f"{prefix}.gamma"] = torch.tensor([0.7])  # non-zero, so attention shapes the output


def port_generator_state(seed: int = 0, counter: bool = True) -> dict[str, torch.Tensor]:
    """Random weights in the port's Generator layout, imsize 64: widths 8c, 4c, 2c, c. `counter`: BatchNorm's
    num_batches_tracked, which PyTorch < 0.4.1 (the port's stated 0.3/0.4) did not save."""
    gen = torch.Generator().manual_seed(seed)
    state: dict = {"__kind": "G"}
    widths = [Z_DIM, 8 * CONV_DIM, 4 * CONV_DIM, 2 * CONV_DIM, CONV_DIM]
    for i in range(4):
        _sn(state, f"l{i + 1}.0", (widths[i], widths[i + 1], 4, 4), gen)  # ConvTranspose2d: [in, out, k, k]
        c = widths[i + 1]
        state[f"l{i + 1}.1.weight"] = 1 + 0.2 * torch.randn(c, generator=gen)
        state[f"l{i + 1}.1.bias"] = 0.1 * torch.randn(c, generator=gen)
        state[f"l{i + 1}.1.running_mean"] = 0.2 * torch.randn(c, generator=gen)
        state[f"l{i + 1}.1.running_var"] = 0.5 + torch.rand(c, generator=gen)
        if counter:
            state[f"l{i + 1}.1.num_batches_tracked"] = torch.tensor(100)
    state["last.0.weight"] = torch.randn(CONV_DIM, 3, 4, 4, generator=gen) * 0.1
    state["last.0.bias"] = torch.randn(3, generator=gen) * 0.1
    for name, width in G_ATTENTION_WIDTHS.items():
        _attn(state, name, width, gen)
    del state["__kind"]
    return state


def port_discriminator_state(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state: dict = {"__kind": "D"}
    widths = [3, CONV_DIM, 2 * CONV_DIM, 4 * CONV_DIM, 8 * CONV_DIM]
    for i in range(4):
        _sn(state, f"l{i + 1}.0", (widths[i + 1], widths[i], 4, 4), gen)  # Conv2d: [out, in, k, k]
    state["last.0.weight"] = torch.randn(1, 8 * CONV_DIM, 4, 4, generator=gen) * 0.1
    state["last.0.bias"] = torch.randn(1, generator=gen) * 0.1
    for name, width in D_ATTENTION_WIDTHS.items():
        _attn(state, name, width, gen)
    del state["__kind"]
    return state
