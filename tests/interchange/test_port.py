"""`sagan import-port` against an independent functional re-implementation of the port's forward pass.

The reference below is written from the port's published facts (key names, shapes, maths), not from
its code: SpectralNorm does one power iteration from the stored u on weight_bar.view(rows, -1) and
divides by sigma = u.(W v); BatchNorm in eval mode; Self_Attn y = x + gamma * v softmax(q^T k)^T.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import sagan_main
from port_weights import CONV_DIM, Z_DIM, port_discriminator_state, port_generator_state, unit

from sagan_cli.interchange.checkpoint import load_model, read_info
from sagan_cli.model.generation import make_noise

# ---- the reference forward pass (port semantics, eval mode, first forward after loading) ----

def ref_sn_weight(state: dict, prefix: str) -> torch.Tensor:
    w = state[f"{prefix}.module.weight_bar"]
    mat = w.view(w.shape[0], -1)  # dim 0 even for transposed convs
    v = unit(mat.t().mv(state[f"{prefix}.module.weight_u"]))
    u = unit(mat.mv(v))
    return w / u.dot(mat.mv(v))


def ref_bn(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    mean, var = state[f"{prefix}.running_mean"].view(shape), state[f"{prefix}.running_var"].view(shape)
    return (x - mean) / torch.sqrt(var + 1e-5) * state[f"{prefix}.weight"].view(shape) + state[f"{prefix}.bias"].view(shape)


def ref_attention(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape

    def conv(name):
        return F.conv2d(x, state[f"{prefix}.{name}.weight"], state[f"{prefix}.{name}.bias"]).view(b, -1, h * w)

    energy = torch.bmm(conv("query_conv").permute(0, 2, 1), conv("key_conv"))  # [B, N, N]
    attention = torch.softmax(energy, dim=-1)
    out = torch.bmm(conv("value_conv"), attention.permute(0, 2, 1)).view(b, c, h, w)
    return state[f"{prefix}.gamma"] * out + x


def ref_generator(state: dict, z: torch.Tensor) -> torch.Tensor:
    x = z.view(z.shape[0], z.shape[1], 1, 1)
    for i in range(4):
        p = f"l{i + 1}"
        stride, pad = (1, 0) if i == 0 else (2, 1)
        x = F.conv_transpose2d(x, ref_sn_weight(state, f"{p}.0"), state[f"{p}.0.module.bias"], stride, pad)
        x = torch.relu(ref_bn(state, f"{p}.1", x))
        if i == 2:
            x = ref_attention(state, "attn1", x)
        if i == 3:
            x = ref_attention(state, "attn2", x)
    return torch.tanh(F.conv_transpose2d(x, state["last.0.weight"], state["last.0.bias"], 2, 1))


def ref_discriminator(state: dict, x: torch.Tensor) -> torch.Tensor:
    for i in range(4):
        p = f"l{i + 1}.0"
        x = F.leaky_relu(F.conv2d(x, ref_sn_weight(state, p), state[f"{p}.module.bias"], 2, 1), 0.1)
        if i == 2:
            x = ref_attention(state, "attn1", x)
        if i == 3:
            x = ref_attention(state, "attn2", x)
    return F.conv2d(x, state["last.0.weight"], state["last.0.bias"]).squeeze()


def test_the_reference_states_have_the_ports_real_widths():
    """The layouts below are the port's: its attention widths are fixed, so G's l3/l4 and D's l3/l4 match them."""
    g, d = port_generator_state(), port_discriminator_state()
    assert g["l1.0.module.weight_bar"].shape == (Z_DIM, 512, 4, 4) and g["last.0.weight"].shape == (64, 3, 4, 4)
    assert g["l3.1.running_mean"].shape == (128,) and g["attn1.value_conv.weight"].shape == (128, 128, 1, 1)
    assert g["l4.1.running_mean"].shape == (64,) and g["attn2.query_conv.weight"].shape == (8, 64, 1, 1)
    assert d["l3.0.module.weight_bar"].shape == (256, 128, 4, 4) and d["attn1.key_conv.weight"].shape == (32, 256, 1, 1)
    assert d["l4.0.module.weight_bar"].shape == (512, 256, 4, 4)
    assert d["attn2.value_conv.weight"].shape == (512, 512, 1, 1)
    assert "l1.1.num_batches_tracked" not in port_generator_state(counter=False)


# as saved by PyTorch >= 0.4.1; by the port's stated PyTorch 0.3/0.4 (no BatchNorm counter); and by its
# trainer with --parallel (nn.DataParallel: every key starts with `module.`), also from before the counter
SAVED_BY = ["torch-0.4.1+", "torch-0.3", "dataparallel-torch-0.3"]


@pytest.fixture(scope="module", params=SAVED_BY)
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("port")
    counter = request.param == "torch-0.4.1+"
    g_state, d_state = port_generator_state(counter=counter), port_discriminator_state()
    prefix = "module." if request.param.startswith("dataparallel") else ""
    torch.save({prefix + k: v for k, v in g_state.items()}, root / "G.pth")
    torch.save({prefix + k: v for k, v in d_state.items()}, root / "D.pth")
    code, _, err = sagan_main("import-port", "--g", root / "G.pth", "--d", root / "D.pth", "--out", root / "out")
    assert code == 0, err
    return {"root": root, "g_state": g_state, "d_state": d_state, "out": root / "out", "counter": counter}


def test_generator_gives_the_ports_images(imported: dict):
    g, info = load_model(imported["out"] / "g.safetensors", expect="generator")
    cfg = info.config
    assert (cfg.arch, cfg.resolution, cfg.z_dim, cfg.g_ch, cfg.g_attention, cfg.sn_last_layer) == \
        ("dcgan", 64, Z_DIM, CONV_DIM, [16, 32], False)
    z = make_noise(8, Z_DIM, seed=3)
    with torch.no_grad():
        ours, theirs = g(z), ref_generator(imported["g_state"], z)
    assert ours.shape == theirs.shape == (8, 3, 64, 64)
    diff = (ours - theirs).abs().max().item()
    print(f"import-port G max abs pixel difference: {diff:.3g}")
    assert diff < 1e-5
    assert theirs.std() > 0.05  # the images are not flat: the comparison means something
    counters = [int(g.blocks[i].bn.bn.num_batches_tracked) for i in range(4)]
    assert counters == ([100] * 4 if imported["counter"] else [0] * 4)  # a missing counter defaults to 0
    # attention matters: zeroing gamma in the reference moves the pixels far more than our error
    no_attn = {**imported["g_state"], "attn1.gamma": torch.zeros(1), "attn2.gamma": torch.zeros(1)}
    with torch.no_grad():
        assert (ref_generator(no_attn, z) - theirs).abs().max() > 1000 * max(diff, 1e-7)


def test_discriminator_gives_the_ports_scores(imported: dict):
    d, info = load_model(imported["out"] / "d.safetensors", expect="discriminator")
    assert (info.config.d_ch, info.config.d_attention) == (CONV_DIM, [8, 4])
    x = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours, theirs = d(x), ref_discriminator(imported["d_state"], x)
    diff = (ours - theirs).abs().max().item()
    print(f"import-port D max abs difference: {diff:.3g} (scores of size {theirs.abs().max():.3g})")
    assert ours.shape == theirs.shape == (6,)
    assert diff < 1e-5 * max(1.0, theirs.abs().max().item())


def test_the_import_samples_and_keeps_a_recipe(imported: dict):
    """`sagan sample` reads the import (same pixels as the reference, after uint8 rounding) and config.json is a recipe."""
    from sagan_cli.config import recipe_from_json
    from sagan_cli.model.generation import to_uint8

    out = imported["out"]
    assert recipe_from_json(out / "config.json").model.g_attention == [16, 32]
    assert read_info(out / "g.safetensors").recipe == "import-port"
    import numpy as np

    from sagan_cli.inspection.sample import sample_images

    sample_images(out / "g.safetensors", 4, out / "s", seed=2, fmt="npz", device="cpu")  # what `sagan sample` runs

    images = torch.from_numpy(np.load(out / "s" / "samples.npz")["images"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = to_uint8(ref_generator(imported["g_state"], make_noise(4, Z_DIM, seed=2)))
    assert (images.int() - expected.int()).abs().max() <= 1  # a pixel may round the other way


def test_generator_only(tmp_path: Path):
    """--g alone (here DataParallel-saved, from before the counter) writes g.safetensors and the recipe."""
    torch.save({f"module.{k}": v for k, v in port_generator_state(counter=False).items()}, tmp_path / "G.pth")
    from sagan_cli.interchange.port import import_port

    import_port(tmp_path / "G.pth", None, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "g.safetensors"]


def test_a_state_dict_with_keys_that_are_not_names_is_refused_in_one_line(tmp_path):
    """A dict of tensors keyed by numbers is no state dict: the `module.` prefix check must not crash on it."""
    from sagan_cli.errors import UserError
    from sagan_cli.interchange.port import load_port_state

    path = tmp_path / "numbers.pth"
    torch.save({1: torch.zeros(1)}, path)
    with pytest.raises(UserError, match="is not a state dict"):
        load_port_state(path, "--g")
