"""Grayscale data trains grayscale models: recipe resolution of model.channels, training, samples,
attention figures, the RGB view evaluation needs, and old 3-channel checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_garments, write_idx
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sagan_cli.cli.attn_map_command import attn_map_command
from sagan_cli.config import ModelConfig, recipe_from_dict, recipe_from_json
from sagan_cli.data.datasets import build_dataset
from sagan_cli.errors import UserError
from sagan_cli.inspection.attention import draw_figure
from sagan_cli.inspection.sample import sample_images
from sagan_cli.interchange.checkpoint import load_model, read_info, save_model
from sagan_cli.model.generation import to_rgb_uint8
from sagan_cli.model.models import Discriminator, Generator
from sagan_cli.training.loop import run_training

TINY_MODEL = {"resolution": 32, "g_ch": 16, "d_ch": 16, "z_dim": 16, "g_attention": [16], "d_attention": [8]}


def test_recipe_takes_channels_from_the_data() -> None:
    idx = recipe_from_dict({"data": {"kind": "idx", "path": "/somewhere"}})
    assert idx.model.channels == 1
    assert recipe_from_dict({}).model.channels == 3  # synthetic
    assert recipe_from_dict({"data": {"kind": "cifar10-bin", "path": "x"}}).model.channels == 3
    grey_folder = recipe_from_dict({"data": {"kind": "folder", "path": "x"}, "model": {"channels": 1}})
    assert grey_folder.model.channels == 1  # folder images are converted to what the recipe asks
    with pytest.raises(UserError, match="model.channels is 3 but data.kind = 'idx' has 1-channel"):
        recipe_from_dict({"data": {"kind": "idx", "path": "x"}, "model": {"channels": 3}})
    with pytest.raises(UserError, match="model.channels must be 1 .* or 3"):
        recipe_from_dict({"data": {"kind": "folder", "path": "x"}, "model": {"channels": 4}})
    assert ModelConfig.from_dict({}).channels == 3  # a checkpoint from before channels existed


def test_old_run_config_without_channels_resolves_to_rgb(tmp_path: Path) -> None:
    saved = recipe_from_dict({"data": {"kind": "folder", "path": "x"}}).to_dict()
    del saved["model"]["channels"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert recipe_from_json(tmp_path / "config.json").model.channels == 3  # --resume compares equal


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conditional grayscale model trained 3 steps on tiny gzipped IDX files."""
    root = tmp_path_factory.mktemp("grey")
    images, labels = tiny_garments(16)
    write_idx(root / "data" / "train-images-idx3-ubyte.gz", images)
    write_idx(root / "data" / "train-labels-idx1-ubyte.gz", labels)
    recipe = recipe_from_dict({
        "data": {"kind": "idx", "path": str(root / "data")},
        "model": {**TINY_MODEL, "num_classes": 3},
        "train": {"steps": 3, "batch_size": 4, "sample_every": 3, "log_every": 1, "sample_grid": 6, "ema_start": 1},
    }, name="grey")
    torch.manual_seed(0)
    run_training(recipe, root / "run")
    return root


def test_grayscale_training_writes_grayscale_checkpoints_and_grids(grey_run: Path) -> None:
    run = grey_run / "run"
    assert json.loads((run / "config.json").read_text())["model"]["channels"] == 1
    g, info = load_model(run / "g.safetensors", expect="generator")
    d, _ = load_model(run / "d.safetensors", expect="discriminator")
    assert info.config.channels == 1 and info.step == 3
    with torch.no_grad():
        images = g(torch.randn(2, 16), torch.tensor([0, 2]))
        assert images.shape == (2, 1, 32, 32)
        assert d(images, torch.tensor([0, 2])).shape == (2,)
    for step in (0, 3):
        grid = Image.open(run / "samples" / f"step-{step:07d}.png")
        assert grid.mode == "L" and grid.size == (3 * 34 + 2, 2 * 34 + 2)  # 6 images: 3 x 2 with 2-px gutters


def test_sampling_a_grayscale_model_writes_l_mode_pngs_and_npz(grey_run: Path, tmp_path: Path) -> None:
    out = sample_images(grey_run / "run" / "g.safetensors", 5, tmp_path / "png", batch_size=2, device="cpu")
    first = Image.open(out / "000000.png")
    assert first.mode == "L" and first.size == (32, 32)
    assert Image.open(out / "grid.png").mode == "L"
    npz = sample_images(grey_run / "run" / "g.safetensors", 5, tmp_path / "npz", fmt="npz", device="cpu")
    with np.load(npz) as saved:
        assert saved["images"].shape == (5, 32, 32, 1)
        assert np.array_equal(saved["images"][0, :, :, 0], np.asarray(first))  # the same image both ways


def test_attention_map_of_grayscale_checkpoints(grey_run: Path, tmp_path: Path) -> None:
    run = grey_run / "run"
    g_report = attn_map_command(run / "g.safetensors", seed=1, class_=2, out=tmp_path / "g.png", device="cpu")
    assert list(g_report["layers"]) == ["attention.16"]
    assert Image.open(tmp_path / "g.png").size == (6 * 200, 200)
    photo = tmp_path / "photo.png"  # D looks at an RGB file: read as the grayscale image it was trained on
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photo)
    d_report = attn_map_command(run / "d.safetensors", photo, out=tmp_path / "d.png", class_=0, device="cpu")
    assert d_report["kind"] == "discriminator" and list(d_report["layers"]) == ["attention.8"]


def test_figure_shows_a_grayscale_image_in_gray() -> None:
    from sagan_cli.inspection.attention import LayerAttention

    image = torch.arange(32 * 32, dtype=torch.uint8).reshape(1, 32, 32)
    rows = torch.full((1, 4, 4), 1 / 16)
    fig = draw_figure(image, [(3, 4)], [LayerAttention("attention.8", 0.1, (8, 8), rows)])
    shown = fig.axes[0].images[0]
    assert shown.get_array().shape == (32, 32) and shown.get_cmap().name == "gray"
    assert shown.get_clim() == (0, 255)  # not stretched to the image's own range


def test_evaluation_sees_three_channels(grey_run: Path) -> None:
    """torch-fidelity's Inception takes B x 3 x H x W uint8: what sagan's metrics hand it."""
    from sagan_cli.config import DataConfig
    from sagan_cli.evaluation.metrics import UInt8Images, _Sampler

    assert torch.equal(to_rgb_uint8(torch.tensor([[[-1.0, 1.0]]])), torch.tensor([[[0, 255]]] * 3, dtype=torch.uint8))
    rgb = torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8)
    assert to_rgb_uint8(rgb) is rgb
    real = UInt8Images(build_dataset(DataConfig(kind="idx", path=str(grey_run / "data")), 32))
    first = real[0]
    assert first.shape == (3, 32, 32) and first.dtype == torch.uint8
    assert torch.equal(first[0], first[1]) and torch.equal(first[1], first[2]) and first.float().std() > 10
    g, _ = load_model(grey_run / "run" / "g.safetensors")
    fake = _Sampler(g, seed=0, keep=False)(torch.randn(2, 16))
    assert fake.shape == (2, 3, 32, 32) and fake.dtype == torch.uint8


def without_channels(path: Path) -> None:
    """Rewrite a checkpoint as sagan 0.1.0 wrote it: no `channels` in its config metadata."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["sagan.config"])
    del config["channels"]
    meta["sagan.config"] = json.dumps(config, sort_keys=True)
    tensors = load_file(path)
    save_file(tensors, path, metadata=meta)


def test_old_rgb_checkpoint_without_channels_still_loads_and_samples(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g_path = save_model(tmp_path / "g.safetensors", Generator(ModelConfig(**TINY_MODEL)), step=5)
    d_path = save_model(tmp_path / "d.safetensors", Discriminator(ModelConfig(**TINY_MODEL)), step=5)
    for path in (g_path, d_path):
        without_channels(path)
        with safe_open(str(path), framework="pt") as f:
            assert "channels" not in json.loads(f.metadata()["sagan.config"])
    assert read_info(g_path).config.channels == 3
    out = sample_images(g_path, 3, tmp_path / "samples", device="cpu")
    assert Image.open(out / "000000.png").mode == "RGB" and Image.open(out / "grid.png").mode == "RGB"
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (0, 90, 200)).save(photo)
    assert attn_map_command(d_path, photo, out=tmp_path / "d.png", device="cpu")["kind"] == "discriminator"


def test_eval_reads_grayscale_npz_samples(tmp_path):
    """`sagan sample --format npz` of a grayscale model writes N x H x W x 1: `sagan eval --samples` takes it."""
    import numpy as np

    from sagan_cli.cli.eval_command import load_samples

    path = tmp_path / "grey.npz"
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(5))
    loaded, size, labels = load_samples(path)
    assert size == 8 and len(loaded) == 5 and loaded[2].shape == (3, 8, 8)  # feature extractors see RGB
    assert all(np.array_equal(loaded[2][c].numpy(), images[2, :, :, 0]) for c in range(3))
    assert labels.tolist() == [0, 1, 2, 3, 4]


def test_eval_refuses_an_npz_whose_header_asks_for_more_than_the_file_holds(tmp_path):
    """An .npz is untrusted: numpy sizes its buffer from the array header, so a 1 kB file claiming
    10^6 x 1024 x 1024 x 3 images would allocate 3 TB. It is refused first (one error, exit 2)."""
    import io
    import zipfile

    import numpy as np

    from sagan_cli.cli.eval_command import load_samples
    from sagan_cli.errors import UserError

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10**6, 1024, 1024, 3)})
    path = tmp_path / "liar.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("images.npy", np.lib.format.MAGIC_PREFIX + bytes([1, 0]) + header.getvalue()[8:] + b"\0" * 64)
    with pytest.raises(UserError, match="more than the file holds"):
        load_samples(path)
    good = tmp_path / "good.npz"  # a real compressed file of zeros (ratio ~1000:1) is still read
    np.savez_compressed(good, images=np.zeros((40, 64, 64, 3), np.uint8))
    assert len(load_samples(good)[0]) == 40


def test_eval_refuses_an_npz_with_corrupt_compressed_data_in_one_line(tmp_path):
    """Corrupt deflate data inside a valid zip directory raises zlib.error in numpy: one error, not a traceback."""
    import numpy as np

    from sagan_cli.cli.eval_command import load_samples
    from sagan_cli.errors import UserError

    path = tmp_path / "corrupt.npz"
    np.savez_compressed(path, images=np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8))
    raw = bytearray(path.read_bytes())
    start = raw.index(b"images.npy") + len("images.npy") + 200  # inside the member's compressed data
    raw[start:start + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="is not an .npz"):
        load_samples(path)
