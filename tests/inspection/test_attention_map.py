"""`sagan attn-map`: attention rows for query pixels, mapped to the right pixels, and the figure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer.main
from PIL import Image
from typer.testing import CliRunner

from sagan_cli.cli import app, main
from sagan_cli.cli.attn_map_command import attn_map_command
from sagan_cli.config import ModelConfig
from sagan_cli.data.datasets import image_to_tensor, open_image
from sagan_cli.errors import UserError
from sagan_cli.inspection.attention import (
    attention_view,
    captured_inputs,
    layer_attention,
    select_layers,
    to_grid,
    to_pixel,
)
from sagan_cli.interchange.checkpoint import save_model
from sagan_cli.model.layers import SelfAttention
from sagan_cli.model.models import Discriminator, Generator

WHITE = (20, 8)  # top-left pixel of a 2x2 white block in an otherwise black 32x32 image


def tiny(**changes) -> ModelConfig:
    """A 32x32 model of width 16 (attention at 16 in G, 8 in D unless changed)."""
    return ModelConfig(**{"resolution": 32, "g_ch": 16, "d_ch": 16, "g_attention": [16], "d_attention": [8], **changes})


def predictable_discriminator(variant: str) -> Discriminator:
    """A D whose attention at 16x16 must peak on the brightest spot of the image, from every query.

    First conv: channel 0 = mean of the red channel over its 4x4 window, channel 1 = 1 everywhere.
    Attention: query = channel 1 (constant), key = 1000 * channel 0, so logits rank key positions
    by local brightness, and the one covering the whole white block wins by a wide margin.
    """
    cfg = tiny(d_attention=[16], d_spectral_norm=False, attention=variant)
    d = Discriminator(cfg)
    attn = d.attention["16"]
    with torch.no_grad():
        for p in d.parameters():
            p.zero_()
        first = d.blocks[0].conv
        first.weight[0, 0] = 1 / 16
        first.bias[1] = 1.0
        attn.query.weight[0, 1] = 1.0
        attn.key.weight[0, 0] = 1000.0
        attn.gamma.fill_(0.5)
    return d


@pytest.fixture
def block_image(tmp_path: Path) -> Path:
    pixels = np.zeros((32, 32, 3), np.uint8)
    x, y = WHITE
    pixels[y : y + 2, x : x + 2] = 255
    path = tmp_path / "block.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize(("variant", "cell", "pixel"), [("seed", [10, 4], [21, 9]), ("paper", [5, 2], [22, 10])])
def test_argmax_lands_on_the_white_block(tmp_path, block_image, variant, cell, pixel) -> None:
    ckpt = save_model(tmp_path / "d.safetensors", predictable_discriminator(variant), step=3)
    report = attn_map_command(
        ckpt, block_image, points=["0,0 31,31"], out=tmp_path / "a.png", json_path=tmp_path / "a.json", device="cpu"
    )
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads(json.dumps(report))
    layer = report["layers"]["attention.16"]
    assert layer["gamma"] == 0.5
    assert layer["key_grid"] == ([16, 16] if variant == "seed" else [8, 8])
    assert [p["query_cell"] for p in layer["points"]] == [[0, 0], [15, 15]]
    for entry in layer["points"]:
        assert entry["argmax_cell"] == cell and entry["argmax"] == pixel
        assert entry["max_weight"] > 0.99 and entry["entropy"] < 0.1
    # the key cell reported covers the white block
    step = 32 // layer["key_grid"][1]
    assert cell[0] * step <= WHITE[0] and WHITE[0] + 1 < (cell[0] + 1) * step
    assert cell[1] * step <= WHITE[1] and WHITE[1] + 1 < (cell[1] + 1) * step


def test_the_library_call_gives_what_the_command_writes(tmp_path, block_image) -> None:
    """`attention_view` takes a model and tensors by keyword; the command only adds files and flags."""
    model = predictable_discriminator("seed")
    report = attn_map_command(save_model(tmp_path / "d.safetensors", model, step=3), block_image,
                              points=["2,3"], out=tmp_path / "a.png", device="cpu")
    pixels = image_to_tensor(open_image(block_image), 32, 3)
    view = attention_view(model.eval(), image=pixels, points=[(2, 3)])
    assert view.kind == "discriminator" and view.image.dtype == torch.uint8 and view.image.shape == (3, 32, 32)
    assert json.loads(json.dumps(view.summary())) == report["layers"]
    with pytest.raises(UserError, match="outside the 32x32"):
        attention_view(model, image=pixels, points=[(32, 0)])
    with pytest.raises(UserError, match="needs an image"):
        attention_view(model, points=[(2, 3)])


def test_rows_sum_to_one_match_the_full_matrix_and_upsample_to_pixels() -> None:
    torch.manual_seed(0)
    d = Discriminator(tiny(d_attention=[16, 8], attention="paper")).eval()
    layers = select_layers(d, None)
    points = [(0, 0), (5, 30), (31, 7)]
    with captured_inputs(layers) as inputs, torch.no_grad():
        d(torch.rand(1, 3, 32, 32) * 2 - 1)
    maps = layer_attention(layers, inputs, points, 32)
    assert [m.name for m in maps] == ["attention.16", "attention.8"]
    for m in maps:
        h, w = m.feature_grid
        full = layers[m.name].attention_weights(inputs[m.name])[0]  # small map: the N x M matrix is fine here
        for p, point in enumerate(points):
            gx, gy = to_grid(point, 32, h, w)
            assert torch.allclose(m.rows[p].flatten(), full[gy * w + gx], atol=1e-6)
        assert torch.allclose(m.rows.sum(dim=(1, 2)), torch.ones(3), atol=1e-5)
        heat = m.heat(32)
        block = 32 // m.rows.shape[2]
        assert torch.allclose(heat.sum(dim=(1, 2)), torch.full((3,), float(block * block)), atol=1e-3)
        assert heat[1, 31, 0] == m.rows[1, -1, 0]  # bottom-left pixel shows the bottom-left key cell


def test_coordinate_mapping() -> None:
    assert to_grid((31, 0), 32, 8, 8) == (7, 0)
    assert to_grid((16, 15), 256, 32, 32) == (2, 1)
    assert to_pixel((0, 0), 32, 8, 8) == (2, 2)
    assert to_pixel((3, 1), 32, 4, 4) == (28, 12)
    assert to_pixel((5, 5), 32, 32, 32) == (5, 5)


def test_large_maps_never_form_the_full_matrix() -> None:
    """At 256x256 the N x N matrix would take 16 GiB; a few rows take a few MB."""
    layer = SelfAttention(8, spectral_norm=False).eval()
    x = torch.randn(1, 8, 256, 256)
    maps = layer_attention({"attention.256": layer}, {"attention.256": x}, [(0, 0), (255, 128)], 256)
    assert maps[0].rows.shape == (2, 256, 256)
    assert torch.allclose(maps[0].rows.sum(dim=(1, 2)), torch.ones(2), atol=1e-4)


def test_generator_mode_png_size_and_determinism(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = Generator(tiny(g_attention=[8, 16], num_classes=2))
    ckpt = save_model(tmp_path / "g.safetensors", g, step=1)

    def run(name: str, seed: int) -> tuple[bytes, str]:
        result = CliRunner().invoke(
            app,
            [
                "visualize-attention",
                "--ckpt",
                str(ckpt),
                "--seed",
                str(seed),
                "--class",
                "1",
                "--out",
                str(tmp_path / f"{name}.png"),
                "--json",
                str(tmp_path / f"{name}.json"),
            ],
        )
        assert result.exit_code == 0, result.output
        return (tmp_path / f"{name}.png").read_bytes(), (tmp_path / f"{name}.json").read_text()

    first, second, other = run("a", 4), run("b", 4), run("c", 5)
    assert first == second and first[0] != other[0]
    assert Image.open(tmp_path / "a.png").size == (6 * 200, 2 * 200)  # image + 5 default points, 2 layers
    report = json.loads(first[1])
    assert report["kind"] == "generator" and report["seed"] == 4 and report["class"] == 1
    assert list(report["layers"]) == ["attention.8", "attention.16"]
    assert typer.main.get_command(app).commands["visualize-attention"].hidden  # the alias stays out of --help


def test_discriminator_mode_png_size(tmp_path: Path, block_image: Path) -> None:
    torch.manual_seed(0)
    d = Discriminator(tiny())
    ckpt = save_model(tmp_path / "d.safetensors", d, step=1)
    result = CliRunner().invoke(
        app,
        [
            "attn-map",
            str(block_image),
            "--ckpt",
            str(ckpt),
            "-p",
            "3,4",
            "-p",
            "30,1",
            "--layer",
            "attention.8",
            "--out",
            str(tmp_path / "f.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "f.png").size == (3 * 200, 200)


@pytest.fixture(scope="module")
def small_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("attn")
    cfg = tiny()
    return {
        "d": save_model(root / "d.safetensors", Discriminator(cfg), step=1),
        "g": save_model(root / "g.safetensors", Generator(cfg), step=1),
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{bad}", "--ckpt", "{d}"], "cannot read image"),
        (["{missing}", "--ckpt", "{d}"], "does not exist"),
        (["--ckpt", "{d}"], "needs an IMAGE"),
        (["{bad}", "--ckpt", "{g}"], "only used with a discriminator"),
        (["--ckpt", "{g}", "--class", "1"], "unconditional"),
        (["--ckpt", "{g}", "-p", "32,0"], "outside the 32x32"),
        (["--ckpt", "{g}", "-p", "3;4"], "x,y"),
        (["--ckpt", "{g}", "--layer", "attention.4"], "attention.16"),
        (["{missing}", "--ckpt", "{d}", "--layer", "attention.4"], "attention.8"),  # options before the image
        (["{missing}", "--ckpt", "{d}", "-p", "40,0"], "outside the 32x32"),
        (["--ckpt", "{g}", "--out", "{tmp}"], "is a folder"),
    ],
)
def test_user_errors_exit_2(small_ckpts, tmp_path, monkeypatch, capsys, args: list[str], message: str) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    names = {"bad": bad, "missing": tmp_path / "nope.png", "tmp": tmp_path, **small_ckpts}
    monkeypatch.setattr(sys, "argv", ["sagan", "attn-map", *(a.format(**names) for a in args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
