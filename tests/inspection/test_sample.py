"""`sagan sample` and the generate() API, on tiny real generators (32x32, width 16)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sagan_cli.cli import app, main
from sagan_cli.config import ModelConfig
from sagan_cli.errors import UserError
from sagan_cli.inspection.sample import sample_images
from sagan_cli.interchange.checkpoint import save_model
from sagan_cli.model.generation import generate, make_noise
from sagan_cli.model.layers import ClassBatchNorm2d
from sagan_cli.model.models import Discriminator, Generator

TINY = dict(resolution=32, g_ch=16, d_ch=16, g_attention=[16], d_attention=[8])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An unconditional G, a 3-class G and a D, saved as checkpoints."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    conditional = Generator(ModelConfig(**TINY, num_classes=3))
    for m in conditional.modules():  # fresh class embeddings are all equal: make the classes differ
        if isinstance(m, ClassBatchNorm2d) and m.gain is not None:
            torch.nn.init.normal_(m.gain.weight, 1.0, 0.5)
            torch.nn.init.normal_(m.bias.weight, 0.0, 0.5)
    paths = {
        "g": save_model(root / "g.safetensors", Generator(ModelConfig(**TINY)), step=1),
        "g3": save_model(root / "g3.safetensors", conditional, step=1),
        "d": save_model(root / "d.safetensors", Discriminator(ModelConfig(**TINY)), step=1),
    }
    return paths


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """The real `sagan` entry point in-process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["sagan", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_gives_byte_identical_files(ckpts: dict[str, Path], tmp_path: Path) -> None:
    a = sample_images(ckpts["g"], 5, tmp_path / "a", seed=7, batch_size=2, device="cpu")
    b = sample_images(ckpts["g"], 5, tmp_path / "b", seed=7, batch_size=2, device="cpu")
    c = sample_images(ckpts["g"], 5, tmp_path / "c", seed=8, batch_size=2, device="cpu")
    assert sorted(files(a)) == [f"{i:06d}.png" for i in range(5)] + ["grid.png"]
    assert files(a) == files(b)
    assert files(a)["000000.png"] != files(c)["000000.png"]
    assert Image.open(a / "000003.png").size == (32, 32)


def test_batch_size_does_not_change_the_images(ckpts: dict[str, Path]) -> None:
    from sagan_cli.interchange.checkpoint import load_model

    g, _ = load_model(ckpts["g"])
    whole, _ = generate(g, 7, seed=3, batch_size=7)
    split, _ = generate(g, 7, seed=3, batch_size=2)
    assert whole.dtype == torch.uint8 and whole.shape == (7, 3, 32, 32)
    # same noise; convolution kernels may round differently per batch shape, by at most one level
    assert (whole.int() - split.int()).abs().max() <= 1
    assert torch.equal(make_noise(7, 128, seed=3)[5], make_noise(9, 128, seed=3)[5])


def test_generate_uses_eval_mode_and_restores_training(ckpts: dict[str, Path]) -> None:
    torch.manual_seed(1)
    g = Generator(ModelConfig(**TINY)).train()
    one, _ = generate(g, 1, seed=5, device="cpu")
    four, _ = generate(g, 4, seed=5, device="cpu")  # train-mode BatchNorm would mix the batch
    assert g.training
    assert (one[0].int() - four[0].int()).abs().max() <= 1


def test_classes_spread_given_and_stored_in_npz(ckpts: dict[str, Path], tmp_path: Path) -> None:
    spread = np.load(sample_images(ckpts["g3"], 6, tmp_path / "s", seed=1, fmt="npz", device="cpu"))
    assert spread["images"].shape == (6, 32, 32, 3) and spread["images"].dtype == np.uint8
    assert spread["labels"].tolist() == [0, 0, 1, 1, 2, 2]
    two = np.load(sample_images(ckpts["g3"], 6, tmp_path / "t", seed=1, classes=2, fmt="npz", device="cpu"))
    assert two["labels"].tolist() == [2] * 6
    # same noise, so image 5 (class 2 in both) matches and image 0 (class 0 vs 2) does not
    assert np.abs(two["images"][5].astype(int) - spread["images"][5]).max() <= 1
    assert np.abs(two["images"][0].astype(int) - spread["images"][0]).mean() > 1
    pngs = sample_images(ckpts["g3"], 6, tmp_path / "p", seed=1, classes=2, device="cpu")
    assert np.array_equal(np.asarray(Image.open(pngs / "000004.png")), two["images"][4])
    plain = np.load(sample_images(ckpts["g"], 2, tmp_path / "u", fmt="npz", device="cpu"))
    assert plain["labels"].tolist() == [-1, -1]


def test_truncation_bounds_the_noise() -> None:
    z = make_noise(500, 64, seed=0, truncation=0.5)
    assert z.abs().max() <= 0.5 and z.std() > 0.2
    assert torch.equal(z, make_noise(500, 64, seed=0, truncation=0.5))
    assert make_noise(500, 64, seed=0).abs().max() > 3
    with pytest.raises(UserError, match="truncation"):
        make_noise(1, 8, seed=0, truncation=0.0)


def test_on_batch_reports_the_images_done_after_each_batch(ckpts: dict[str, Path], tmp_path: Path) -> None:
    done: list[int] = []
    sample_images(ckpts["g"], 5, tmp_path, batch_size=2, device="cpu", fmt="npz", on_batch=done.append)
    assert done == [2, 4, 5]


@pytest.mark.parametrize(("n", "side"), [(5, 3 * 34 + 2), (65, 8 * 34 + 2)])
def test_grid_size(ckpts: dict[str, Path], tmp_path: Path, n: int, side: int) -> None:
    out = sample_images(ckpts["g"], n, tmp_path, batch_size=50, device="cpu")
    width, height = Image.open(out / "grid.png").size
    rows = 2 if n == 5 else 8  # 5 images: 3 per row; 65: capped at 64 shown, 8 x 8
    assert (width, height) == (side, rows * 34 + 2)


def test_cli_writes_samples(ckpts: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "sample",
            "--ckpt",
            str(ckpts["g3"]),
            "-n",
            "3",
            "--out",
            str(tmp_path / "o"),
            "--class",
            "1",
            "--truncation",
            "0.7",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote 3 images" in result.output
    assert sorted(files(tmp_path / "o")) == ["000000.png", "000001.png", "000002.png", "grid.png"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-n", "0"], "-n must be a positive"),
        (["--class", "0"], "unconditional"),
        (["--format", "gif"], "--format"),
        (["--device", "nonsense"], "--device"),
    ],
)
def test_bad_options_exit_2(ckpts, tmp_path, monkeypatch, capsys, extra: list[str], message: str) -> None:
    code, err = run_main(monkeypatch, capsys, "sample", "--ckpt", ckpts["g"], "--out", tmp_path / "o", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written before the check


def test_out_is_a_file_exit_2_and_file_kept(ckpts, tmp_path, monkeypatch, capsys) -> None:
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    code, err = run_main(monkeypatch, capsys, "sample", "--ckpt", ckpts["g"], "--out", taken)
    assert code == 2 and "--out" in err
    assert taken.read_text() == "keep me"


def test_discriminator_checkpoint_is_refused_by_the_entry_point(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """Through the `sagan` script's main() in this process (a new interpreter would add only `import torch`;
    tests/cli/test_cli_errors_pickle.py runs the command line in a fresh process)."""
    from helpers import sagan_main

    code, _, err = sagan_main("sample", "--ckpt", ckpts["d"], "--out", tmp_path)
    assert code == 2
    assert err.startswith("error:") and "g.safetensors" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_readme_states_what_the_code_does() -> None:
    """Three README claims that were wrong (issue 18): checked against the code's behaviour where cheap."""
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    # fp16: step.py keeps one GradScaler per network
    assert "one scaler for both optimizers" not in readme and "one scaler per network" in readme
    # sampling: only the same batch size is byte-identical (test_batch_size_does_not_change_the_images allows 1 level)
    assert "whatever `--batch-size`" not in readme and "same `--seed` and `--batch-size`" in readme
    # export: a grayscale model's images have one channel
    assert "[B, 3, R, R]" not in readme and "[B, C, R, R] in [-1, 1] (C = 1 for a grayscale model" in readme
