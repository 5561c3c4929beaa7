"""`sagan interpolate` and `sagan export` on tiny real generators (one unconditional, one conditional)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import exported_output, sagan_main
from PIL import Image

from sagan_cli.config import ModelConfig
from sagan_cli.inspection.interpolate import interpolate, noise_path, slerp
from sagan_cli.interchange.checkpoint import load_model, save_model
from sagan_cli.model.generation import generate, make_noise
from sagan_cli.model.models import Generator

TINY = dict(resolution=32, g_ch=16, d_ch=16, z_dim=16, g_attention=[16], d_attention=[8])


def _trained_looking(g: Generator) -> Generator:
    """Random BatchNorm statistics and class embeddings, so classes and seeds give different images."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in g.named_buffers():
            if name.endswith("running_mean"):
                t.copy_(0.2 * torch.randn(t.shape, generator=gen))
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
        for name, p in g.named_parameters():
            if "gain" in name or "bias.weight" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
            if name.endswith("gamma"):
                p.fill_(0.5)
    return g


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interp")
    torch.manual_seed(0)
    return {
        "g": save_model(root / "g.safetensors", _trained_looking(Generator(ModelConfig(**TINY))), step=1),
        "cond": save_model(root / "cond.safetensors",
                           _trained_looking(Generator(ModelConfig(**TINY, num_classes=3))), step=1),
        "root": root,
    }


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _sheet_cells(sheet: np.ndarray, rows: int, cols: int, size: int = 32) -> list[list[np.ndarray]]:
    # make_grid: 2-pixel gutters around and between cells
    return [[sheet[2 + r * (size + 2): 2 + r * (size + 2) + size, 2 + c * (size + 2): 2 + c * (size + 2) + size]
             for c in range(cols)] for r in range(rows)]


def test_slerp_keeps_the_norm_between_the_ends_and_lerp_does_not():
    a, b = make_noise(1, 64, seed=0)[0], make_noise(1, 64, seed=1)[0]
    na, nb = a.norm(), b.norm()
    norms = torch.stack([slerp(a, b, t).norm() for t in torch.linspace(0, 1, 11).tolist()])
    assert torch.all(norms >= min(na, nb) - 1e-4) and torch.all(norms <= max(na, nb) + 1e-4)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    middle = noise_path([0, 1], 64, 3, "lerp")[0][1]
    assert middle.norm() < 0.85 * min(na, nb)  # a straight line cuts through the low-norm middle


def test_seed_sheet_and_gif(ckpts: dict[str, Path], tmp_path: Path):
    files = interpolate(ckpts["g"], tmp_path / "out", seeds="3,7,9", steps=5, mode="slerp", device="cpu")
    assert [f.name for f in files] == ["seeds-slerp.png", "seeds-slerp.gif"]
    cells = _sheet_cells(_png(files[0]), rows=2, cols=5)
    # the endpoints are the seeds' own samples, as `sagan sample --seed S -n 1` draws them
    g, _ = load_model(ckpts["g"])
    for seed, cell in ((3, cells[0][0]), (7, cells[0][4]), (7, cells[1][0]), (9, cells[1][4])):
        own = generate(g, 1, seed=seed)[0][0].permute(1, 2, 0).numpy()
        assert np.array_equal(cell, own), seed
    assert not np.array_equal(cells[0][1], cells[0][0])  # the frames between move
    with Image.open(files[1]) as gif:
        assert gif.n_frames == 2 * (5 - 1) + 1  # the shared endpoint appears once
        gif.seek(0)
        first = np.asarray(gif.convert("RGB")).astype(int)
        assert np.abs(first - cells[0][0]).mean() < 4  # GIF: a 256-colour palette per frame, so nearly equal


def test_class_interpolation_ends_at_the_class_samples(ckpts: dict[str, Path], tmp_path: Path):
    files = interpolate(ckpts["cond"], tmp_path / "out", seeds="4,5", steps=4, classes="0,2", animation="webp",
                        device="cpu")
    assert [f.name for f in files] == ["seeds-slerp.png", "seeds-slerp.webp", "classes.png", "classes.webp"]
    cells = _sheet_cells(_png(files[2]), rows=1, cols=4)[0]
    g, _ = load_model(ckpts["cond"])
    class0 = generate(g, 1, seed=4, classes=0)[0][0].permute(1, 2, 0).numpy()
    class2 = generate(g, 1, seed=4, classes=2)[0][0].permute(1, 2, 0).numpy()
    assert not np.array_equal(class0, class2)
    assert np.array_equal(cells[0], class0) and np.array_equal(cells[3], class2)
    assert not np.array_equal(cells[1], class0) and not np.array_equal(cells[1], class2)
    with Image.open(files[3]) as webp:
        assert webp.n_frames == 4


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("which", ["g", "cond"])
def test_export_matches_the_generator(fmt: str, which: str, ckpts: dict[str, Path], tmp_path: Path):
    if fmt == "onnx":
        pytest.importorskip("onnx")
        ort = pytest.importorskip("onnxruntime")
    from sagan_cli.interchange.export import export_generator

    out, difference = export_generator(ckpts[which], fmt, tmp_path / f"g.{fmt}", check_samples=3)
    print(f"export {fmt} {which}: max |difference| {difference:.3g}")
    assert difference < 1e-4
    # independently of the built-in check: another batch size, through the runtime directly
    g, info = load_model(ckpts[which])
    z = make_noise(7, info.config.z_dim, seed=11)
    y = torch.arange(7) % 3 if info.config.num_classes else None
    with torch.no_grad():
        expected = g(z, y)
    if fmt == "onnx":
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == (["z", "y"] if y is not None else ["z"])
    got = exported_output(out, fmt, z, y)
    assert got.shape == (7, 3, 32, 32)
    assert (got - expected).abs().max() < 1e-4
    # the folded graph holds no spectral-norm state: its size is about the plain weights'
    assert not any("parametrizations" in n for n in (torch.jit.load(str(out)).state_dict() if fmt == "torchscript" else []))


def test_export_cli_prints_the_difference(ckpts: dict[str, Path], tmp_path: Path):
    code, out, err = sagan_main("export", "--ckpt", ckpts["g"], "--format", "torchscript", "--out", tmp_path / "g.pt")
    assert code == 0, err
    assert "max |difference| to the original" in out and (tmp_path / "g.pt").is_file()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_check_covers_the_traced_batch_size_and_another(fmt: str, ckpts: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    """`--check 2` (the traced batch size) still runs the exported graph at another batch size too (issue 18)."""
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    from sagan_cli.interchange import export

    runner = "_run_onnx" if fmt == "onnx" else "_run_torchscript"
    real_runner, batches = getattr(export, runner), []

    def recording(path, inputs):  # the real runtime, recording the batch sizes it is given
        batches.append(int(inputs[0].shape[0]))
        return real_runner(path, inputs)

    monkeypatch.setattr(export, runner, recording)
    for check in (2, 5):
        batches.clear()
        _, difference = export.export_generator(ckpts["cond"], fmt, tmp_path / f"g-{check}.{fmt}", check_samples=check)
        assert sorted(batches) == ([2, 3] if check == 2 else [2, 5])  # traced at 2
        assert difference < 1e-4


def test_export_of_a_grayscale_generator_draws_one_channel(tmp_path: Path):
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "grey.safetensors",
                      _trained_looking(Generator(ModelConfig(**TINY, num_classes=3, channels=1))), step=1)
    code, out, err = sagan_main("export", "--ckpt", ckpt, "--format", "torchscript", "--out", tmp_path / "g.pt",
                                "--check", 2)
    assert code == 0, err
    assert "batch sizes 2 (traced) and 3" in out
    module = torch.jit.load(str(tmp_path / "g.pt"))
    with torch.no_grad():
        assert module(make_noise(4, 16, seed=0), torch.arange(4) % 3).shape == (4, 1, 32, 32)


