"""BigGAN's generator options (shared class embedding, hierarchical z) in sagan's own models, and training them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sagan_cli.config import ModelConfig
from sagan_cli.errors import UserError
from sagan_cli.inspection.interpolate import mixed_classes
from sagan_cli.model.models import Generator

BIGGAN_TINY = dict(arch="resnet", resolution=32, num_classes=5, z_dim=24, g_ch=16, d_ch=16, attention="paper",
                   g_attention=[16], d_attention=[16], shared_embedding=8, hierarchical_z=True)


def test_shared_embedding_and_hierarchical_z_build_biggans_conditioning():
    torch.manual_seed(0)
    g = Generator(ModelConfig(**BIGGAN_TINY)).eval()
    assert g.shared.weight.shape == (5, 8) and g.z_chunk == 6  # 24 = 6 * (stem + 3 blocks)
    assert g.stem.parametrizations.weight.original.shape[1] == 6
    assert g.blocks[0].bn1.gain.parametrizations.weight.original.shape == (16 * 8, 8 + 6)
    z, y = torch.randn(3, 24), torch.tensor([0, 1, 4])
    out = g(z, y)
    assert out.shape == (3, 3, 32, 32)
    # the BN gains depend on z: change one block's chunk only, the image changes
    z2 = z.clone()
    z2[:, 12:18] += 1
    assert (g(z2, y) - out).abs().max() > 1e-4
    # class interpolation mixes the shared embedding: t = 0 and t = 1 are the endpoint classes
    a, b = torch.zeros(3, dtype=torch.long), torch.full((3,), 4)
    with mixed_classes(g, a, b, torch.tensor([0.0, 1.0, 0.5])):
        mixed = g(z, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(mixed[0], g(z[:1], a[:1])[0], atol=1e-5)
    assert torch.allclose(mixed[1], g(z[1:2], b[:1])[0], atol=1e-5)


def test_shared_embedding_without_hierarchical_z():
    g = Generator(ModelConfig(**{**BIGGAN_TINY, "hierarchical_z": False, "z_dim": 16})).eval()
    assert g.z_chunk == 0 and g.blocks[0].bn1.gain.parametrizations.weight.original.shape[1] == 8
    assert g(torch.randn(2, 16), torch.tensor([1, 2])).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("values, key", [
    ({"arch": "dcgan", "num_classes": 3, "shared_embedding": 8}, "model.shared_embedding"),
    ({"arch": "resnet", "shared_embedding": 8}, "model.shared_embedding"),
    ({"arch": "resnet", "num_classes": 3, "shared_embedding": -1}, "model.shared_embedding"),
    ({"arch": "resnet", "num_classes": 3, "shared_embedding": 10**6}, "model.shared_embedding"),
    ({"arch": "resnet", "num_classes": 3, "hierarchical_z": True}, "model.hierarchical_z"),
    ({"arch": "resnet", "resolution": 32, "num_classes": 3, "shared_embedding": 8, "hierarchical_z": True,
      "z_dim": 30}, "model.hierarchical_z"),
])
def test_the_biggan_keys_are_validated(values: dict, key: str):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        ModelConfig.from_dict(values)


def test_a_few_training_steps_with_the_biggan_options(tmp_path):
    from sagan_cli.config import recipe_from_dict
    from sagan_cli.interchange.checkpoint import load_model
    from sagan_cli.training.loop import run_training

    model = {**BIGGAN_TINY, "g_ch": 8, "d_ch": 8, "g_attention": [16], "d_attention": [8]}
    recipe = recipe_from_dict({
        "data": {"kind": "synthetic", "synthetic_size": 16},
        "model": model,
        "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "sample_every": 1000, "log_every": 1,
                  "ema_start": 1, "sample_grid": 4},
    }, name="biggan-tiny")
    result = run_training(recipe, tmp_path / "run")
    assert result.generator.shared is not None
    g, _ = load_model(tmp_path / "run" / "g.safetensors")
    assert g.config.hierarchical_z and g(torch.randn(2, 24), torch.tensor([0, 4])).isfinite().all()


# --- the importer, against an independent functional forward written from BigGAN-PyTorch's key names ---------

def biggan_g_state(ch: int = 8, n_classes: int = 10, shared: int = 16, dim_z: int = 120, resolution: int = 128,
                   attention: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in BigGAN-PyTorch's G layout (its 128 arch: widths 16,16,8,4,2,1 x ch; hierarchical z)."""
    rng = torch.Generator().manual_seed(seed)
    count = {32: 3, 64: 4, 128: 5, 256: 6}[resolution]
    mult = {128: [16, 16, 8, 4, 2, 1], 64: [16, 16, 8, 4, 2], 32: [4, 4, 4, 4]}[resolution]
    widths = [m * ch for m in mult]
    chunk = dim_z // (count + 1)
    state: dict[str, torch.Tensor] = {"shared.weight": torch.randn(n_classes, shared, generator=rng)}

    def sn(prefix, shape, bias=True):
        state[f"{prefix}.weight"] = torch.randn(*shape, generator=rng) * 0.3
        if bias:
            state[f"{prefix}.bias"] = torch.randn(shape[0], generator=rng) * 0.1
        state[f"{prefix}.u0"] = torch.randn(1, shape[0], generator=rng)
        state[f"{prefix}.sv0"] = torch.rand(1, generator=rng) + 0.5

    sn("linear", (16 * widths[0], chunk))
    size = 4
    for i in range(count):
        cin, cout, p = widths[i], widths[i + 1], f"blocks.{i}.0"
        for bn, channels in (("bn1", cin), ("bn2", cout)):
            sn(f"{p}.{bn}.gain", (channels, shared + chunk), bias=False)
            sn(f"{p}.{bn}.bias", (channels, shared + chunk), bias=False)
            state[f"{p}.{bn}.stored_mean"] = torch.randn(channels, generator=rng) * 0.1
            state[f"{p}.{bn}.stored_var"] = torch.rand(channels, generator=rng) + 0.5
        sn(f"{p}.conv1", (cout, cin, 3, 3))
        sn(f"{p}.conv2", (cout, cout, 3, 3))
        sn(f"{p}.conv_sc", (cout, cin, 1, 1))
        size *= 2
        if size == attention:
            _attention_state(sn, state, f"blocks.{i}.1", cout, rng)
    c = widths[-1]
    state.update({"output_layer.0.gain": torch.rand(c, generator=rng) + 0.5,
                  "output_layer.0.bias": torch.randn(c, generator=rng) * 0.1,
                  "output_layer.0.stored_mean": torch.randn(c, generator=rng) * 0.1,
                  "output_layer.0.stored_var": torch.rand(c, generator=rng) + 0.5})
    sn("output_layer.2", (3, c, 3, 3))
    return state


def _attention_state(sn, state, prefix, c, rng):
    sn(f"{prefix}.theta", (c // 8, c, 1, 1), bias=False)
    sn(f"{prefix}.phi", (c // 8, c, 1, 1), bias=False)
    sn(f"{prefix}.g", (c // 2, c, 1, 1), bias=False)
    sn(f"{prefix}.o", (c, c // 2, 1, 1), bias=False)
    state[f"{prefix}.gamma"] = torch.tensor(0.7)


def biggan_d_state(ch: int = 8, n_classes: int = 10, attention: int = 64, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tensors in BigGAN-PyTorch's D layout at 128 (widths 1,2,4,8,16,16 x ch; the last block keeps 4x4)."""
    rng = torch.Generator().manual_seed(seed)
    ins, outs = [3] + [m * ch for m in (1, 2, 4, 8, 16)], [m * ch for m in (1, 2, 4, 8, 16, 16)]
    sizes = [64, 32, 16, 8, 4, 4]
    state: dict[str, torch.Tensor] = {}

    def sn(prefix, shape, bias=True):
        state[f"{prefix}.weight"] = torch.randn(*shape, generator=rng) * 0.3
        if bias:
            state[f"{prefix}.bias"] = torch.randn(shape[0], generator=rng) * 0.1
        state[f"{prefix}.u0"] = torch.randn(1, shape[0], generator=rng)
        state[f"{prefix}.sv0"] = torch.rand(1, generator=rng) + 0.5

    for i, (cin, cout) in enumerate(zip(ins, outs, strict=True)):
        sn(f"blocks.{i}.0.conv1", (cout, cin, 3, 3))
        sn(f"blocks.{i}.0.conv2", (cout, cout, 3, 3))
        if cin != cout or i < 5:
            sn(f"blocks.{i}.0.conv_sc", (cout, cin, 1, 1))
        if sizes[i] == attention:
            _attention_state(sn, state, f"blocks.{i}.1", cout, rng)
    sn("linear", (1, outs[-1]))
    sn("embed", (n_classes, outs[-1]), bias=False)
    return state


def _w(state, prefix):
    """BigGAN's eval-mode SN weight: one power iteration from u0 (not written back), W / (v W^T u^T)."""
    weight = state[f"{prefix}.weight"].double()
    matrix = weight.reshape(weight.shape[0], -1)
    v = F.normalize(state[f"{prefix}.u0"].double() @ matrix, eps=1e-12)
    u = F.normalize(v @ matrix.t(), eps=1e-12)
    return weight / (v @ matrix.t() @ u.t()).squeeze()


def _conv(state, prefix, x, padding=0, bias=True):
    return F.conv2d(x, _w(state, prefix), state[f"{prefix}.bias"].double() if bias else None, padding=padding)


def _ref_attention(state, prefix, x):
    b, c, h, w = x.shape
    theta = _conv(state, f"{prefix}.theta", x, bias=False).view(b, c // 8, h * w)
    phi = F.max_pool2d(_conv(state, f"{prefix}.phi", x, bias=False), 2).view(b, c // 8, h * w // 4)
    g = F.max_pool2d(_conv(state, f"{prefix}.g", x, bias=False), 2).view(b, c // 2, h * w // 4)
    beta = torch.softmax(theta.transpose(1, 2) @ phi, -1)
    o = _conv(state, f"{prefix}.o", (g @ beta.transpose(1, 2)).view(b, c // 2, h, w), bias=False)
    return x + state[f"{prefix}.gamma"].double() * o


def _bn(state, prefix, x):
    return F.batch_norm(x, state[f"{prefix}.stored_mean"].double(), state[f"{prefix}.stored_var"].double(),
                        None, None, False, 0.1, 1e-5)


def reference_g(state, z, y):
    """BigGAN's G forward (eval), written from its key names, in float64."""
    count = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    chunk = state["linear.weight"].shape[1]
    zs = torch.split(z.double(), chunk, 1)
    shared = state["shared.weight"].double()[y]
    ys = [torch.cat([shared, item], 1) for item in zs[1:]]
    h = F.linear(zs[0], _w(state, "linear"), state["linear.bias"].double())
    h = h.view(z.shape[0], -1, 4, 4)
    for i in range(count):
        p = f"blocks.{i}.0"

        def ccbn(name, x, c=ys[i], p=p):
            gain = 1 + c @ _w(state, f"{p}.{name}.gain").t()
            bias = c @ _w(state, f"{p}.{name}.bias").t()
            return _bn(state, f"{p}.{name}", x) * gain[:, :, None, None] + bias[:, :, None, None]

        out = F.interpolate(F.relu(ccbn("bn1", h)), scale_factor=2)
        out = _conv(state, f"{p}.conv1", out, 1)
        out = _conv(state, f"{p}.conv2", F.relu(ccbn("bn2", out)), 1)
        h = out + _conv(state, f"{p}.conv_sc", F.interpolate(h, scale_factor=2))
        if f"blocks.{i}.1.theta.weight" in state:
            h = _ref_attention(state, f"blocks.{i}.1", h)
    h = F.batch_norm(h, state["output_layer.0.stored_mean"].double(), state["output_layer.0.stored_var"].double(),
                     state["output_layer.0.gain"].double(), state["output_layer.0.bias"].double(), False, 0.1, 1e-5)
    return torch.tanh(_conv(state, "output_layer.2", F.relu(h), 1))


def reference_d(state, x, y, inplace=False):
    """BigGAN's D forward, written from its key names, in float64 ([B, 1] scores). Out-of-place ReLU, or (early
    code with an in-place ReLU) the shortcut of every block after the first sees relu(x)."""
    count = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    h = x.double()
    for i in range(count):
        p = f"blocks.{i}.0"
        down = i < count - 1
        out = h if i == 0 else F.relu(h)
        out = _conv(state, f"{p}.conv2", F.relu(_conv(state, f"{p}.conv1", out, 1)), 1)
        if down:
            out = F.avg_pool2d(out, 2)
        short = F.relu(h) if inplace and i > 0 else h
        if i == 0:  # no preactivation: pool, then the 1x1 conv
            short = _conv(state, f"{p}.conv_sc", F.avg_pool2d(short, 2))
        elif f"{p}.conv_sc.weight" in state:  # preactivation: the 1x1 conv, then pool
            short = _conv(state, f"{p}.conv_sc", short)
            short = F.avg_pool2d(short, 2) if down else short
        h = out + short
        if f"blocks.{i}.1.theta.weight" in state:
            h = _ref_attention(state, f"blocks.{i}.1", h)
    h = torch.sum(F.relu(h), [2, 3])
    out = F.linear(h, _w(state, "linear"), state["linear.bias"].double())
    return out + torch.sum(_w(state, "embed")[y] * h, 1, keepdim=True)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from sagan_cli.interchange.biggan import import_biggan

    root = tmp_path_factory.mktemp("biggan")
    g_state, d_state = biggan_g_state(), biggan_d_state()
    torch.save(g_state, root / "G_ema.pth")
    torch.save(d_state, root / "D.pth")
    import_biggan(root / "G_ema.pth", root / "D.pth", root / "out")
    return {"root": root, "g": g_state, "d": d_state, "out": root / "out"}


def test_imported_generator_gives_biggans_images(imported):
    from sagan_cli.interchange.checkpoint import load_model

    g, _ = load_model(imported["out"] / "g.safetensors")
    assert g.config.shared_embedding == 16 and g.config.hierarchical_z and g.config.z_dim == 120
    assert g.config.g_attention == [64] and g.config.resolution == 128
    z, y = torch.randn(2, 120, generator=torch.Generator().manual_seed(3)), torch.tensor([2, 7])
    with torch.no_grad():
        difference = (g(z, y).double() - reference_g(imported["g"], z, y)).abs().max().item()
    print(f"BigGAN 128 G (ch=8): max pixel difference {difference:.2e}")
    assert difference <= 1e-4


def test_imported_discriminator_gives_biggans_scores(imported):
    from sagan_cli.interchange.checkpoint import load_model

    d, _ = load_model(imported["out"] / "d.safetensors")
    assert d.config.d_attention == [64] and not d.config.d_shortcut_relu
    x, y = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(4)) * 2 - 1, torch.tensor([1, 9])
    with torch.no_grad():
        ours, theirs = d(x, y).double(), reference_d(imported["d"], x, y)[:, 0]
    difference = ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1)).item()
    print(f"BigGAN 128 D (ch=8): max score difference {(ours - theirs).abs().max().item():.2e} "
          f"(scores up to {theirs.abs().max().item():.1f}); relative {difference:.2e}")
    assert difference <= 1e-4


def test_commands_run_on_an_import(imported):
    """import-biggan on the command line (and a swapped file refused in one line), then sample with truncation,
    attn-map, report and interpolate --classes on the imported model."""
    from helpers import sagan_main
    from typer.testing import CliRunner

    from sagan_cli.cli import app

    root, out = imported["root"], imported["root"] / "cli"
    code, _, err = sagan_main("import-biggan", "--g", root / "G_ema.pth", "--d", root / "D.pth", "--out", out)
    assert code == 0, err
    code, _, err = sagan_main("import-biggan", "--g", root / "D.pth", "--out", root / "bad")
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "swap" in err, err
    for args in (["sample", "--ckpt", str(out / "g.safetensors"), "-n", "2", "--out", str(out / "s"), "--class", "3",
                  "--truncation", "0.5"],
                 ["attn-map", str(out / "s" / "000000.png"), "--ckpt", str(out / "d.safetensors"),
                  "--out", str(out / "a.png")],
                 ["report", str(out), "--out", str(out / "r.html"), "--samples", "1", "--dataset-images", "0"],
                 ["interpolate", "--ckpt", str(out / "g.safetensors"), "--classes", "0,3", "--seeds", "0,1",
                  "--steps", "2", "--out", str(out / "i")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (args[0], result.output[-2000:])


def test_a_32x32_layout_imports_with_its_own_widths(tmp_path):
    """BigGAN's 32x32 arch (4 * ch everywhere) differs from sagan's width rule: it goes to model.g_widths."""
    from sagan_cli.interchange.biggan import biggan_config, generator_from_biggan

    state = biggan_g_state(ch=8, resolution=32, attention=16, dim_z=120)
    config = biggan_config(state, None)
    assert config.g_widths == [32] * 4 and config.z_dim == 120 and config.g_attention == [16]
    g = generator_from_biggan(state, config)
    z, y = torch.randn(2, 120), torch.tensor([0, 5])
    with torch.no_grad():
        assert (g(z, y).double() - reference_g(state, z, y)).abs().max() <= 1e-4


@pytest.mark.parametrize("change, words", [
    (lambda s: s.update({"blocks.0.0.conv1.weight": s["blocks.0.0.conv1.weight"][:, :, :1]}), "conv1.weight"),
    (lambda s: s.update({"extra.weight": torch.ones(2)}), "no place"),
    (lambda s: s.pop("blocks.1.0.bn2.stored_var"), "stored_var"),
    (lambda s: s.update({"blocks.0.0.bn1.gain.weight": torch.ones(32, 3)}), "bn1.gain"),
])
def test_refusals_are_one_line(tmp_path, change, words):
    from sagan_cli.interchange.biggan import import_biggan

    state = biggan_g_state(ch=8, resolution=32, attention=16)
    change(state)
    torch.save(state, tmp_path / "G.pth")
    with pytest.raises(UserError, match=words) as caught:
        import_biggan(tmp_path / "G.pth", None, tmp_path / "out")
    assert "\n" not in str(caught.value)


def test_pickled_objects_and_missing_files_are_refused(tmp_path):
    from sagan_cli.interchange.biggan import import_biggan

    torch.save({"model": torch.ones(1), "step": object.__new__(Evil)}, tmp_path / "G.pth")
    with pytest.raises(UserError, match="pickled objects"):
        import_biggan(tmp_path / "G.pth", None, tmp_path / "out")
    with pytest.raises(UserError, match="does not exist"):
        import_biggan(None, tmp_path / "nope.pth", tmp_path / "out")


class Evil:
    pass


def test_the_recipe_is_the_imported_architecture(imported):
    """recipes/biggan128.toml and an import of BigGAN 128's layout agree on every key but widths and class count."""
    from pathlib import Path

    from sagan_cli.config import load_recipe
    from sagan_cli.interchange.checkpoint import read_info

    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "biggan128.toml").model.to_dict()
    config = read_info(imported["out"] / "g.safetensors").config.to_dict()
    differ = {key for key in recipe if recipe[key] != config[key]}
    assert differ <= {"num_classes", "g_ch", "d_ch", "shared_embedding", "init"}, differ


def test_a_d_from_the_in_place_relu_code_imports_with_its_shortcuts(imported):
    from sagan_cli.interchange.biggan import biggan_config, discriminator_from_biggan

    config = biggan_config(None, imported["d"], d_shortcut_relu=True)
    assert config.d_shortcut_relu
    d = discriminator_from_biggan(imported["d"], config)
    x, y = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5)) * 2 - 1, torch.tensor([0, 3])
    with torch.no_grad():
        ours, inplace = d(x, y).double(), reference_d(imported["d"], x, y, inplace=True)[:, 0]
    assert (ours - inplace).abs().max() / inplace.abs().max().clamp_min(1) <= 1e-4
    assert (ours - reference_d(imported["d"], x, y)[:, 0]).abs().max() > 1e-3  # the two codes differ
