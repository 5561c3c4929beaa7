"""Every command that reads a checkpoint works on every kind of model sagan builds (issue 18):
grayscale or colour x conditional or not x dcgan or resnet x seed, paper or no attention."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from sagan_cli.config import recipe_from_dict
from sagan_cli.inspection.interpolate import interpolate
from sagan_cli.interchange.checkpoint import save_model
from sagan_cli.model.models import Discriminator, Generator

ATTENTIONS = ("seed", "paper", "none")
ALL_KINDS = list(itertools.product((1, 3), (0, 3), ("dcgan", "resnet"), ATTENTIONS))
# The path matrix (tests/test_path_matrix.py) runs sample, attn-map on G and D, report, interpolate and
# export through the CLI on 10 kinds, among them 6 of the 8 this file used to run by default:
#   grey-uncond-dcgan-seed  -> c1-uncond-dcgan-seed-32-fp32-aug  rgb-uncond-dcgan-paper -> c3-uncond-dcgan-paper-32-fp32
#   grey-cond-dcgan-none    -> c1-cond-dcgan-none-32-bf16-aug    rgb-uncond-resnet-none -> c3-uncond-resnet-none-32-fp16-2p-aug
#   grey-cond-resnet-seed   -> c1-cond-resnet-seed-64-fp32-aug   rgb-cond-dcgan-seed    -> c3-cond-dcgan-seed-64-fp16
# (test_matrix_covers_the_other_kinds checks that list). The suite runs the two it lacks: a colour
# conditional resnet (no matrix cell has one) and grayscale unconditional resnet with paper attention;
# SAGAN_ALL_KINDS=1 runs all 24 (about a minute on 2 cores).
MATRIX_KINDS = [(1, 0, "dcgan", "seed"), (1, 3, "dcgan", "none"), (1, 3, "resnet", "seed"),
                (3, 0, "dcgan", "paper"), (3, 0, "resnet", "none"), (3, 3, "dcgan", "seed")]
KINDS = ALL_KINDS if os.environ.get("SAGAN_ALL_KINDS") else [(1, 0, "resnet", "paper"), (3, 3, "resnet", "paper")]


def test_matrix_covers_the_other_kinds() -> None:
    """Every channels x classes x arch is run (here or in the matrix), each attention variant too, and the kinds
    left to the matrix really are matrix cells."""
    from test_path_matrix import CELLS

    matrix = {(c.channels, c.classes, c.arch, c.attention) for c in CELLS}
    assert set(MATRIX_KINDS) <= matrix
    covered = set(MATRIX_KINDS) | set(KINDS)
    assert {kind[:3] for kind in covered} == set(itertools.product((1, 3), (0, 3), ("dcgan", "resnet")))
    assert {kind[3] for kind in covered} == set(ATTENTIONS)


def kind_id(kind: tuple) -> str:
    channels, classes, arch, attention = kind
    return f"{'grey' if channels == 1 else 'rgb'}-{'cond' if classes else 'uncond'}-{arch}-{attention}"


def model_dict(kind: tuple) -> dict:
    channels, classes, arch, attention = kind
    sizes = {} if attention != "none" else {"g_attention": [], "d_attention": []}
    return {"arch": arch, "resolution": 32, "channels": channels, "num_classes": classes, "z_dim": 8,
            "g_ch": 8, "d_ch": 8, "attention": "seed" if attention == "none" else attention,
            "g_attention": [16], "d_attention": [8], **sizes}


def make_run(root: Path, kind: tuple) -> Path:
    """A run folder as training leaves it (config.json, g/d.safetensors) on a folder of colour images."""
    channels, classes, _, _ = kind
    images = root / "images"
    for label in range(max(classes, 1)):
        for i in range(2):
            path = images / f"class{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (36, 36), (60 * label + 30, 200 - 40 * i, 90)).save(path)
    recipe = recipe_from_dict({"data": {"kind": "folder", "path": str(images)}, "model": model_dict(kind)}, name="k")
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(recipe.to_dict()))
    torch.manual_seed(0)
    save_model(run / "g.safetensors", Generator(recipe.model), step=1)
    save_model(run / "d.safetensors", Discriminator(recipe.model), step=1)
    return run


def decode_png(uri: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    image.load()
    return image


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_report_and_interpolate_on_every_kind_of_model(kind: tuple, tmp_path: Path) -> None:
    from sagan_cli.inspection.report import build_report

    channels, classes, _, attention = kind
    run = make_run(tmp_path, kind)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (50, 40), (200, 40, 40)).save(photo)
    html = build_report(run, tmp_path / "report.html", images=[photo], samples=1, dataset_images=2,
                        device="cpu").read_text()
    if attention == "none":
        assert 'id="explorer-data"' not in html and "no self-attention layers" in html
    else:
        subjects = json.loads(re.search(r'id="explorer-data">(.*?)</script>', html, re.S).group(1))["subjects"]
        assert [s["network"] for s in subjects] == ["G", "D", "D", "D"]
        assert "dataset images" not in html  # the run's folder opened: no note about a missing dataset
        for subject in subjects:  # the model-size image in the model's own mode
            shown = decode_png(subject["png"])
            assert shown.size == (32, 32) and shown.mode == ("L" if channels == 1 else "RGB"), subject["label"]
            assert subject["layers"]
    files = interpolate(run / "g.safetensors", tmp_path / "interp", seeds="0,1", steps=2,
                        classes="0,2" if classes else None, device="cpu")
    assert [f.name for f in files] == ["seeds-slerp.png", "seeds-slerp.gif"] + (
        ["classes.png", "classes.gif"] if classes else [])
    with Image.open(files[0]) as sheet:
        assert sheet.mode == ("L" if channels == 1 else "RGB") and sheet.size == (2 * 34 + 2, 34 + 2)


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_sample_attn_map_and_export_on_every_kind_of_model(kind: tuple, tmp_path: Path) -> None:
    from sagan_cli.cli.attn_map_command import attn_map_command
    from sagan_cli.errors import UserError
    from sagan_cli.inspection.sample import sample_images
    from sagan_cli.interchange.export import export_generator

    channels, classes, _, attention = kind
    run = make_run(tmp_path, kind)
    mode = "L" if channels == 1 else "RGB"
    out = sample_images(run / "g.safetensors", 3, tmp_path / "s", batch_size=2, device="cpu")
    assert Image.open(out / "000002.png").mode == mode
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (20, 90, 200)).save(photo)
    for ckpt, image in ((run / "g.safetensors", None), (run / "d.safetensors", photo)):
        if attention == "none":
            with pytest.raises(UserError):
                attn_map_command(ckpt, image, out=tmp_path / "a.png", device="cpu")
        else:
            summary = attn_map_command(ckpt, image, out=tmp_path / "a.png", class_=1 if classes else None, device="cpu")
            assert summary["layers"]
    exported, difference = export_generator(run / "g.safetensors", "torchscript", tmp_path / "g.pt", check_samples=3)
    assert difference < 1e-4
    module = torch.jit.load(str(exported))
    with torch.no_grad():
        inputs = (torch.randn(3, 8),) + ((torch.tensor([0, 1, 2]),) if classes else ())
        assert module(*inputs).shape == (3, channels, 32, 32)
