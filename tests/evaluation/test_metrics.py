"""`sagan eval` and `evaluate_generator`, through real torch-fidelity on small inputs, offline.

The Inception weights are torch-fidelity's own architecture with random Kaiming convolutions (its
default init gives features of ~1e-10, which would make every FID ~0). Inception costs ~0.13 s
per image on 2 CPU cores at 299x299, so every set here holds 6-12 images. Only 256 of the 2048
features vary (LIVE_FEATURES): FID's eigensolve of a 2048 x 2048 product took ~30 s of CPU on
full-rank weights, and LAPACK's balancing sets the constant (exactly zero) rows and columns aside.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from helpers import frechet, run_main
from PIL import Image
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from sagan_cli.config import DataConfig, ModelConfig, Recipe
from sagan_cli.data.datasets import SyntheticBlobs, dataset_identity
from sagan_cli.evaluation.metrics import evaluate_generator
from sagan_cli.interchange.checkpoint import save_model
from sagan_cli.model.models import Discriminator, Generator

TINY = dict(resolution=32, g_ch=16, d_ch=16, g_attention=[16], d_attention=[8])
LIVE_FEATURES = 8  # one output channel in 8 of Mixed_7c's last convolutions is non-zero: 256 features vary


class _Unloaded(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception built from an empty state dict: its own layers, our initialisation."""

    def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002 - signature of nn.Module
        return super().load_state_dict(state_dict, strict=False)


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pt")
    torch.manual_seed(0)
    model = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(folder / "empty.pt"))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    block = model.Mixed_7c  # its branches' last convolutions give the 2048 features (ReLU after a zero BN shift)
    for last in (block.branch1x1, block.branch3x3_2a, block.branch3x3_2b, block.branch3x3dbl_3a,
                 block.branch3x3dbl_3b, block.branch_pool):
        with torch.no_grad():
            keep = torch.arange(last.conv.out_channels) % LIVE_FEATURES == 0
            last.conv.weight[~keep] = 0  # these features are 0 for every image: no variance, a cheap FID
            last.conv.weight[keep] *= LIVE_FEATURES**0.5  # the features' total energy (FID's scale) as with 2048
    nn.init.normal_(model.fc.weight, std=0.2)  # large enough logits that class posteriors differ between images
    torch.save(model.state_dict(), folder / "weights.pth")
    return folder / "weights.pth"


@pytest.fixture(scope="session")
def uniform_weights(weights: Path) -> Path:
    """The same network with its logits layer zeroed: every image gets the uniform class posterior."""
    state = torch.load(weights, weights_only=True)
    state["fc.weight"].zero_()
    state["fc.bias"].zero_()
    path = weights.with_name("uniform.pth")
    torch.save(state, path)
    return path


@pytest.fixture(autouse=True)
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A private cache and an empty torch hub per test: nothing found by accident, nothing shared."""
    monkeypatch.setenv("SAGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("SAGAN_INCEPTION_WEIGHTS", raising=False)


def shapes(folder: Path, count: int, seed: int) -> Path:
    """`count` 32x32 PNGs with random coloured rectangles: varied enough for Inception to tell apart."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        image = np.empty((32, 32, 3), np.uint8)
        image[:] = rng.integers(0, 256, 3)
        for _ in range(3):
            x, y = rng.integers(0, 24, 2)
            w, h = rng.integers(4, 16, 2)
            image[y : y + h, x : x + w] = rng.integers(0, 256, 3)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def sagan(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """Run the real entry point in-process: (exit code, stdout, stderr)."""
    return run_main([str(a) for a in args], capsys, monkeypatch)


@pytest.mark.slow
def test_cli_agrees_with_torch_fidelity_and_scipy(tmp_path, weights, monkeypatch, capsys):
    fake, real = shapes(tmp_path / "fake", 10, seed=1), shapes(tmp_path / "real", 12, seed=2)
    out = tmp_path / "eval.json"
    code, stdout, _ = sagan(monkeypatch, capsys, "eval", "--samples", fake, "--data", real, "--ref-n", 12,
                            "--metrics", "fid,isc,kid,prc", "--inception-weights", weights, "--json", out, "-q")
    assert code == 0
    report = json.loads(out.read_text())
    got, protocol = report["metrics"], report["protocol"]
    assert "fid" in stdout and f"{got['fid']:.4f}" in stdout

    direct_cache = tmp_path / "direct"
    direct = torch_fidelity.calculate_metrics(
        input1=str(fake), input2=str(real), input1_cache_name="fake", input2_cache_name="real",
        cache_root=str(direct_cache), cuda=False, isc=True, fid=True, kid=True, prc=True, verbose=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights),
        kid_subset_size=10, isc_splits=1, rng_seed=0, save_cpu_ram=True)
    assert got["fid"] == pytest.approx(direct["frechet_inception_distance"], rel=1e-6)
    assert got["isc_mean"] == pytest.approx(direct["inception_score_mean"], rel=1e-6)
    assert got["kid_mean"] == pytest.approx(direct["kernel_inception_distance_mean"], rel=1e-6)
    assert got["kid_std"] == pytest.approx(direct["kernel_inception_distance_std"], rel=1e-6)
    assert got["kid_std"] > 0  # 10-image subsets of 12 reference images differ
    assert (got["precision"], got["recall"]) == (direct["precision"], direct["recall"])
    assert got["isc_mean"] > 1.05  # the positive control for the uniform-classifier test
    assert got["fid"] > 1.0

    feats = {name: torch.load(direct_cache / f"{name}-inception-v3-compat-features-2048.pt").double().numpy()
             for name in ("fake", "real")}
    # torch-fidelity takes float32 means and eigenvalues of a rank-deficient product: ~1e-5 apart
    assert got["fid"] == pytest.approx(frechet(feats["fake"], feats["real"]), rel=1e-3)

    assert protocol["num_samples"] == 10 and protocol["num_reference"] == 12 and protocol["image_size"] == 32
    assert protocol["feature_extractor"] == "inception-v3-compat"
    assert protocol["torch_fidelity"] == torch_fidelity.__version__
    assert protocol["feature_extractor_weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert protocol["dataset"].startswith("folder-32-") and protocol["feature_extractor_weights_official"] is False
    assert "NOT torch-fidelity's released weights" in stdout


@pytest.mark.slow
def test_inception_score_of_a_uniform_classifier_is_one(tmp_path, uniform_weights, monkeypatch, capsys):
    fake = shapes(tmp_path / "fake", 10, seed=1)  # the images that score > 1.05 with the full weights
    out = tmp_path / "eval.json"
    code, _, _ = sagan(monkeypatch, capsys, "eval", "--samples", fake, "--data", fake, "--metrics", "isc",
                       "--inception-weights", uniform_weights, "--json", out, "-q")
    assert code == 0
    assert json.loads(out.read_text())["metrics"]["isc_mean"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_self_fid_is_zero_and_reference_statistics_are_cached(tmp_path, weights, monkeypatch, capsys):
    real = shapes(tmp_path / "real", 6, seed=3)
    images = np.stack([np.asarray(Image.open(p)) for p in sorted(real.glob("*.png"))])
    np.savez(tmp_path / "samples.npz", images=images, labels=np.full(len(images), -1))
    common = ("--data", real, "--metrics", "fid", "--inception-weights", weights, "-q")
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    assert sagan(monkeypatch, capsys, "eval", "--samples", tmp_path / "samples.npz", *common, "--json", first)[0] == 0
    assert abs(json.loads(first.read_text())["metrics"]["fid"]) < 1e-3  # the npz holds the reference's own pixels
    cache = tmp_path / "cache" / "fidelity"
    assert len(list(cache.glob("sagan-ref-inception-v3-compat-*.safetensors"))) == 1

    for path in real.glob("*.png"):  # garbage of the same size and mtime: same identity, unreadable pixels
        st = path.stat()
        path.write_bytes(b"\0" * st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "g.safetensors", Generator(ModelConfig(**TINY)), step=1)
    again = ("--ckpt", ckpt, "-n", 6, *common[:3], "kid", *common[4:])  # KID: the cached features, no 2nd eigensolve
    assert sagan(monkeypatch, capsys, "eval", *again, "--json", second)[0] == 0
    report = json.loads(second.read_text())
    assert report["metrics"]["kid_mean"] > 0  # an untrained generator is far from the (cached) reference
    assert report["protocol"]["num_reference"] == 6 and report["protocol"]["checkpoint_step"] == 1

    for path in cache.glob("sagan-ref-*"):  # without the cache the garbage is read: the cache was used
        path.unlink()
    code, _, err = sagan(monkeypatch, capsys, "eval", *again)
    assert code == 2 and "no readable image" in err


def test_missing_weights_fail_fast_with_one_line(tmp_path, monkeypatch, capsys):
    real = shapes(tmp_path / "real", 2, seed=5)  # offline_env: an empty cache and torch hub, no SAGAN_INCEPTION_WEIGHTS
    started = time.perf_counter()
    code, _, err = sagan(monkeypatch, capsys, "eval", "--samples", real, "--data", real)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "weights-inception-2015-12-05-6726825d.pth" in lines[0] and "--inception-weights" in lines[0]
    assert "SAGAN_INCEPTION_WEIGHTS" in lines[0]
    assert time.perf_counter() - started < 30  # nothing tries to download


def test_weights_found_through_env_and_torch_hub(tmp_path, weights, monkeypatch):
    from sagan_cli.evaluation.inception import INCEPTION_FILE, find_inception_weights

    monkeypatch.setenv("SAGAN_INCEPTION_WEIGHTS", str(weights))
    assert find_inception_weights().path == weights
    monkeypatch.delenv("SAGAN_INCEPTION_WEIGHTS")
    hub = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE
    hub.parent.mkdir(parents=True)
    hub.symlink_to(weights)
    assert find_inception_weights().path == hub


@pytest.mark.parametrize("content, message", [(b"not a pickle", "not a readable PyTorch weights file"),
                                              (None, "not torch-fidelity's Inception-v3")])
def test_bad_weights_file_is_a_user_error(tmp_path, monkeypatch, capsys, content, message):
    bad = tmp_path / "bad.pth"
    if content is None:
        torch.save({"fc.weight": torch.zeros(3)}, bad)
    else:
        bad.write_bytes(content)
    real = shapes(tmp_path / "real", 2, seed=6)
    code, _, err = sagan(monkeypatch, capsys, "eval", "--samples", real, "--data", real, "--inception-weights", bad)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_user_errors_exit_2(tmp_path, weights, monkeypatch, capsys):
    ckpt_d = save_model(tmp_path / "d.safetensors", Discriminator(ModelConfig(**TINY)), step=1)
    real = shapes(tmp_path / "real", 2, seed=7)
    (tmp_path / "bad.npz").write_bytes(b"junk")
    np.savez(tmp_path / "float.npz", images=np.zeros((4, 8, 8, 3), np.float32))
    cases = [
        (("--ckpt", ckpt_d, "--data", real), "holds a discriminator"),
        (("--samples", real, "--ckpt", ckpt_d, "--data", real), "exactly one of"),
        (("--samples", tmp_path / "bad.npz", "--data", real), "is not an .npz"),
        (("--samples", tmp_path / "float.npz", "--data", real), "must be uint8"),
        (("--samples", real, "--data", real, "--metrics", "fid,lpips"), "unknown metric 'lpips'"),
        (("--samples", real, "--data", real, "--metrics", "structure"), "synthetic"),
        (("--samples", real, "--data", tmp_path / "nothing"), "--data"),
    ]
    for args, message in cases:
        code, _, err = sagan(monkeypatch, capsys, "eval", *args, "--inception-weights", weights)
        assert code == 2, args
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)


def synthetic_recipe(num_classes: int = 0) -> Recipe:
    return Recipe(data=DataConfig(kind="synthetic", synthetic_size=64), model=ModelConfig(**TINY, num_classes=num_classes))


def test_structure_scores_need_no_weights_and_separate_data_from_noise(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "synthetic.toml"
    recipe.write_text('[data]\nkind = "synthetic"\nsynthetic_size = 64\n[model]\nresolution = 32\ng_attention = [16]\nd_attention = [8]\n')
    real = SyntheticBlobs(16, 32)
    images = np.stack([(real[i][0].permute(1, 2, 0).numpy() * 127.5 + 127.5).round() for i in range(16)]).astype(np.uint8)
    np.savez(tmp_path / "real.npz", images=images)
    out = tmp_path / "eval.json"
    code, _, _ = sagan(monkeypatch, capsys, "eval", "--samples", tmp_path / "real.npz", "--data", recipe,
                       "--metrics", "structure", "--json", out)
    assert code == 0
    scores = json.loads(out.read_text())["metrics"]
    assert scores["structure_valid_fraction"] == 1.0 and scores["structure_mean_blobs"] == 2.0

    torch.manual_seed(0)
    generator = Generator(synthetic_recipe(num_classes=3).model).train()
    untrained = evaluate_generator(generator, synthetic_recipe(3), num_samples=16, metrics=["structure"])
    assert generator.training  # the caller's mode is restored
    assert set(untrained) == {"structure_valid_fraction", "structure_blob_count_accuracy",
                              "structure_symmetry_ratio", "structure_mean_blobs"}
    assert untrained["structure_valid_fraction"] < 0.5


def test_a_sample_folder_is_scored_without_its_grid(tmp_path, monkeypatch, capsys):
    """`sagan sample --out DIR` writes DIR/grid.png beside the samples; `eval --samples DIR` scores the samples only
    (found by tests/test_path_matrix.py: a folder of 6 samples was scored as 7 images)."""
    recipe = tmp_path / "synthetic.toml"
    recipe.write_text('[data]\nkind = "synthetic"\nsynthetic_size = 64\n[model]\nresolution = 32\ng_attention = [16]\nd_attention = [8]\n')
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "g.safetensors", Generator(ModelConfig(**TINY)), step=1)
    assert sagan(monkeypatch, capsys, "sample", "--ckpt", ckpt, "-n", 6, "--out", tmp_path / "s")[0] == 0
    assert (tmp_path / "s" / "grid.png").is_file()
    own = tmp_path / "own"  # a folder of the user's images may hold a grid.png of its own: it counts
    own.mkdir()
    for name in ("grid.png", "a.png", "b.png", "c.png", "d.png"):
        Image.open(tmp_path / "s" / "000001.png").save(own / name)
    for folder, count in ((tmp_path / "s", 6), (own, 5)):
        out = tmp_path / "eval.json"
        code, _, err = sagan(monkeypatch, capsys, "eval", "--samples", folder, "--data", recipe,
                             "--metrics", "structure", "--json", out)
        assert code == 0, err
        assert json.loads(out.read_text())["protocol"]["num_samples"] == count, folder


@pytest.mark.slow
def test_conditional_synthetic_reference_has_the_class_colours(tmp_path, weights, monkeypatch, capsys):
    """Issue 11.6: a conditional model's reference is the coloured class discs, not the grey ones."""
    real = SyntheticBlobs(6, 32, num_classes=3)  # the whole reference set: the same 6 coloured images
    images = np.stack([(real[i][0].permute(1, 2, 0).numpy() * 127.5 + 127.5).round() for i in range(6)]).astype(np.uint8)
    np.savez(tmp_path / "samples.npz", images=images)
    recipe = tmp_path / "conditional.toml"
    recipe.write_text('[data]\nkind = "synthetic"\nsynthetic_size = 6\n'
                      '[model]\nresolution = 32\nnum_classes = 3\ng_attention = [16]\nd_attention = [8]\n')
    out = tmp_path / "eval.json"
    code, _, err = sagan(monkeypatch, capsys, "eval", "--samples", tmp_path / "samples.npz", "--data", recipe,
                         "--metrics", "fid", "--inception-weights", weights, "--json", out, "-q")
    assert code == 0, err
    report = json.loads(out.read_text())
    assert abs(report["metrics"]["fid"]) < 1e-3  # against grey discs it is far from 0
    assert report["protocol"]["dataset"] == dataset_identity(DataConfig(kind="synthetic", synthetic_size=6), 32, 3)
    assert report["protocol"]["reference_num_classes"] == 3

    torch.manual_seed(0)  # a generator: its own class count picks the reference (and the cache entry)
    recipe3 = Recipe(data=DataConfig(kind="synthetic", synthetic_size=6), model=ModelConfig(**TINY, num_classes=3))
    conditional = evaluate_generator(Generator(recipe3.model), recipe3, num_samples=6, metrics=["fid", "kid"],
                                     inception_weights=weights, batch_size=4)  # labels drawn in two batches
    assert conditional["kid_mean"] > 0 and conditional["kid_std"] >= 0
    assert "structure_valid_fraction" in conditional  # synthetic data: scored on the same samples
    grey = evaluate_generator(Generator(ModelConfig(**TINY)), replace(recipe3, model=ModelConfig(**TINY)),
                              num_samples=6, metrics=["fid"], inception_weights=weights, batch_size=6)
    assert len(list((tmp_path / "cache" / "fidelity").glob("sagan-ref-*.safetensors"))) == 2  # one entry per class count
    assert conditional["fid"] != grey["fid"]


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a folder of colour images, a feature cache) shared by both grayscale tests: the reference features are
    the same for the two, so the second reads them from the first one's cache (caching is tested above)."""
    root = tmp_path_factory.mktemp("colour")
    return shapes(root / "real", 6, seed=3), root / "cache"


@pytest.mark.slow
@pytest.mark.parametrize("as_png", [False, True])
def test_grayscale_samples_meet_a_grayscale_reference(tmp_path, weights, monkeypatch, capsys, as_png, colour_folder):
    """A grayscale model's samples (its .npz or 'L' PNGs) against a folder of colour images: the reference
    is read in grayscale as the model reads it, so the folder's own pixels in grayscale score FID 0 (issue 18)."""
    from sagan_cli.data.datasets import image_to_tensor, open_image
    from sagan_cli.model.generation import to_uint8

    real, cache = colour_folder
    monkeypatch.setenv("SAGAN_CACHE", str(cache))
    grey = np.stack([to_uint8(image_to_tensor(open_image(p), 32, channels=1)).permute(1, 2, 0).numpy()
                     for p in sorted(real.glob("*.png"))])
    if as_png:
        samples = tmp_path / "samples"
        samples.mkdir()
        for i, image in enumerate(grey):
            Image.fromarray(image[..., 0]).save(samples / f"{i:06d}.png")  # as `sagan sample` writes them
    else:
        samples = tmp_path / "samples.npz"
        np.savez(samples, images=grey, labels=np.full(len(grey), -1))
    out = tmp_path / "grey.json"
    code, _, err = sagan(monkeypatch, capsys, "eval", "--samples", samples, "--data", real, "--metrics", "fid",
                         "--inception-weights", weights, "--json", out, "-q")
    assert code == 0, err
    assert abs(json.loads(out.read_text())["metrics"]["fid"]) < 1e-3
