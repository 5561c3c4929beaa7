"""The offline classifier and classifier-space evaluation, with real torch-fidelity on tiny inputs.

One tiny classifier (width 8) is trained once on 90 coloured synthetic discs of 3 classes (a few
seconds); everything else reuses it. Features are 32 numbers, so every FID here is cheap.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from helpers import (
    frechet,  # the independent Frechet distance
    run_main,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from torch_fidelity.noise import random_normal
from torch_fidelity.utils import create_feature_extractor

from sagan_cli.config import DataConfig, EvalConfig, ModelConfig, Recipe
from sagan_cli.data.datasets import SyntheticBlobs, build_dataset, dataset_identity
from sagan_cli.evaluation.classifier import (
    Classifier,
    ClassifierConfig,
    accuracy,
    held_out_split,
    load_classifier,
    save_classifier,
    train_classifier,
    weights_sha256,
)
from sagan_cli.evaluation.features import CLASSIFIER_EXTRACTOR, register
from sagan_cli.evaluation.metrics import evaluate_generator
from sagan_cli.interchange.checkpoint import save_model
from sagan_cli.model.generation import to_uint8
from sagan_cli.model.models import Generator

TINY = dict(resolution=32, g_ch=16, d_ch=16, z_dim=16, g_attention=[16], d_attention=[8])
DATA = DataConfig(kind="synthetic", synthetic_size=90)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("classifier") / "c.safetensors"
    train_classifier(DATA, 32, 3, path, epochs=3, batch_size=16, lr=5e-3, width=8, seed=0)
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def sagan(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The real entry point, on the CPU (the comparisons below are exact or to 1e-6: no TF32 on a GPU)."""
    if args[0] == "eval":
        args = (*args, "--device", "cpu")
    return run_main([str(a) for a in args], capsys, monkeypatch)


def disc_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x 32 x 32 x 3 coloured discs of 3 classes, and their labels."""
    blobs = SyntheticBlobs(count, 32, seed=seed, num_classes=3)
    items = [blobs[i] for i in range(count)]
    images = np.stack([to_uint8(x).permute(1, 2, 0).numpy() for x, _ in items])
    return images, np.array([y for _, y in items], np.int64)


def png_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def recipe_file(tmp_path: Path, size: int = 90) -> Path:
    path = tmp_path / "discs.toml"
    path.write_text(f'[data]\nkind = "synthetic"\nsynthetic_size = {size}\n'
                    '[model]\nresolution = 32\nnum_classes = 3\ng_attention = [16]\nd_attention = [8]\n')
    return path


def test_training_learns_and_the_metadata_round_trips(trained):
    model, info = load_classifier(trained)
    assert info.config == ClassifierConfig(channels=3, resolution=32, num_classes=3, width=8)
    assert info.dataset == dataset_identity(DATA, 32, 3) and info.class_names == ["hue000", "hue120", "hue240"]
    assert (info.train_images, info.test_images, info.epochs) == (81, 9, 3)
    assert info.weights_sha256 == weights_sha256(load_file(str(trained)))
    # the stored test accuracy is the accuracy on the held-out images, recomputed here
    _, test_idx = held_out_split(90, 0.1, 0)
    full = build_dataset(DATA, 32, 3)
    correct = sum(int(model(full[i][0][None]).argmax()) == full[i][1] for i in test_idx)
    assert info.test_accuracy == correct / len(test_idx)
    assert accuracy(model, torch.utils.data.Subset(full, range(90)), 32, torch.device("cpu")) > 0.6  # chance: 1/3


def test_a_given_test_set_is_used(tmp_path):
    test = DataConfig(kind="synthetic", synthetic_size=10, synthetic_seed=7)
    info = train_classifier(DataConfig(kind="synthetic", synthetic_size=20), 32, 3, tmp_path / "c.safetensors",
                            test_data=test, epochs=1, width=8)
    model, loaded = load_classifier(tmp_path / "c.safetensors")
    assert (loaded.train_images, loaded.test_images) == (20, 10) and loaded.test_set == "synthetic"
    assert loaded.test_accuracy == accuracy(model, build_dataset(test, 32, 3), 4, torch.device("cpu")) == info.test_accuracy


@pytest.mark.parametrize("channels", [3, 1])
def test_features_through_torch_fidelity_are_the_classifiers_own(tmp_path, trained, channels):
    if channels == 3:
        path, model = trained, load_classifier(trained)[0]
    else:  # a grayscale classifier: grey images reach it as three equal channels
        torch.manual_seed(0)
        model = Classifier(ClassifierConfig(channels=1, resolution=32, num_classes=3, width=8)).eval()
        path = tmp_path / "grey.safetensors"
        save_classifier(path, model, dataset="x", class_names=["a", "b", "c"], test_accuracy=0.0, test_images=1,
                        test_set="none", train_images=1, epochs=0)
    register()
    extractor = create_feature_extractor(CLASSIFIER_EXTRACTOR, ["features", "logits"], cuda=False, verbose=False,
                                         feature_extractor_weights_path=str(path))
    images = torch.from_numpy(disc_images(5, seed=3)[0]).permute(0, 3, 1, 2).contiguous()
    if channels == 1:
        images = images[:, :1].expand(-1, 3, -1, -1).contiguous()
    features, logits = extractor(images)
    own = images[:, :channels].float() / 127.5 - 1
    with torch.no_grad():
        assert torch.allclose(features, model.features(own), atol=1e-5)
        assert torch.allclose(logits, model(own), atol=1e-5)


@pytest.mark.slow
def test_classifier_metrics_equal_torch_fidelity_and_scipy(tmp_path, trained, monkeypatch, capsys):
    fake = png_folder(tmp_path / "fake", disc_images(20, seed=1)[0])
    real = png_folder(tmp_path / "real", disc_images(24, seed=2)[0])
    out = tmp_path / "eval.json"
    code, stdout, err = sagan(monkeypatch, capsys, "eval", "--samples", fake, "--data", real, "--ref-n", 24,
                              "--classifier", trained, "--metrics", "classifier_fid,classifier_kid,classifier_prc",
                              "--json", out, "-q")
    assert code == 0, err
    report = json.loads(out.read_text())
    got, protocol = report["metrics"], report["protocol"]
    assert "classifier_fid" in stdout and "fid" not in got and "kid_mean" not in got  # names carry the space
    direct = torch_fidelity.calculate_metrics(
        input1=str(fake), input2=str(real), cuda=False, fid=True, kid=True, prc=True, verbose=False, cache=False,
        feature_extractor=CLASSIFIER_EXTRACTOR, feature_extractor_weights_path=str(trained),
        feature_layer_fid="features", feature_layer_kid="features", feature_layer_prc="features",
        kid_subset_size=20, rng_seed=0, save_cpu_ram=True)
    assert got["classifier_fid"] == pytest.approx(direct["frechet_inception_distance"], rel=1e-6)
    assert got["classifier_kid_mean"] == pytest.approx(direct["kernel_inception_distance_mean"], rel=1e-6)
    assert got["classifier_kid_std"] == pytest.approx(direct["kernel_inception_distance_std"], rel=1e-6)
    assert (got["classifier_precision"], got["classifier_recall"]) == (direct["precision"], direct["recall"])

    model, info = load_classifier(trained)
    with torch.no_grad():
        feats = [model.features(torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)
                                             for p in sorted(folder.glob("*.png"))]).float() / 127.5 - 1)
                 for folder in (fake, real)]
    assert got["classifier_fid"] == pytest.approx(frechet(*(f.double().numpy() for f in feats)), rel=1e-3)
    assert got["classifier_fid"] > 0.01

    c = protocol["classifier"]
    assert c["feature_extractor"] == CLASSIFIER_EXTRACTOR and c["weights_sha256"] == info.weights_sha256
    assert c["test_accuracy"] == info.test_accuracy and c["feature_dim"] == 32 and c["input_size"] == 32
    assert Path(c["reference_cache"]).name.startswith(f"sagan-ref-{CLASSIFIER_EXTRACTOR}-{info.weights_sha256[:12]}")
    assert "feature_extractor_weights_sha256" not in protocol  # no Inception field without Inception metrics

    code, _, _ = sagan(monkeypatch, capsys, "eval", "--samples", real, "--data", real, "--classifier", trained,
                       "--metrics", "classifier_fid", "--json", out, "-q")
    assert code == 0 and abs(json.loads(out.read_text())["metrics"]["classifier_fid"]) < 1e-4  # self-FID


def test_gan_test_accuracy_equals_an_independent_computation(tmp_path, trained, monkeypatch, capsys):
    torch.manual_seed(1)
    generator = Generator(ModelConfig(**TINY, num_classes=3))
    recipe = Recipe(data=DATA, model=generator.config, eval=EvalConfig(classifier=str(trained)))
    scores = evaluate_generator(generator, recipe, num_samples=24, metrics=["gan_test", "classifier_fid"],
                                batch_size=10, seed=5, device="cpu")
    model, _ = load_classifier(trained)
    rng, labels = np.random.RandomState(5), torch.Generator().manual_seed(5)
    hits = 0
    generator.eval()
    with torch.no_grad():
        for size in (10, 10, 4):  # torch-fidelity's noise, then our label stream, batch by batch
            z = random_normal(rng, (size, 16))
            y = torch.randint(3, (size,), generator=labels)
            images = to_uint8(generator(z, y)).float() / 127.5 - 1
            hits += int((model(images).argmax(1) == y).sum())
    assert scores["gan_test_accuracy"] == hits / 24
    assert "classifier_fid" in scores and "structure_valid_fraction" in scores

    images, labels_np = disc_images(12, seed=4)  # real images with their true classes: the classifier's accuracy
    np.savez(tmp_path / "real.npz", images=images, labels=labels_np)
    out = tmp_path / "eval.json"
    code, _, err = sagan(monkeypatch, capsys, "eval", "--samples", tmp_path / "real.npz", "--data",
                         recipe_file(tmp_path), "--classifier", trained, "--json", out, "-q")
    assert code == 0, err
    got = json.loads(out.read_text())["metrics"]
    assert set(got) >= {"classifier_fid", "classifier_kid_mean", "gan_test_accuracy"}  # the default with labels
    with torch.no_grad():
        predicted = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).argmax(1).numpy()
    assert got["gan_test_accuracy"] == (predicted == labels_np).mean() > 0.6


class _Payload:
    """Unpickling this creates a file: the proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_no_cache_file_is_ever_unpickled_and_extractors_never_share_entries(tmp_path, trained, monkeypatch, capsys):
    real = png_folder(tmp_path / "real", disc_images(8, seed=2)[0])
    fake = png_folder(tmp_path / "fake", disc_images(8, seed=1)[0])
    common = ("eval", "--samples", fake, "--data", real, "--metrics", "classifier_fid,classifier_kid", "-q")
    first = tmp_path / "first.json"
    assert sagan(monkeypatch, capsys, *common, "--classifier", trained, "--json", first)[0] == 0
    expected = json.loads(first.read_text())["metrics"]
    cache = tmp_path / "cache" / "fidelity"
    entries = sorted(cache.glob("*"))
    assert [p.suffix for p in entries] == [".safetensors"]

    marker = tmp_path / "pickle-ran"
    planted = pickle.dumps(_Payload(marker))
    for path in entries:  # our entry, and every name torch-fidelity's own cache would look up
        path.write_bytes(planted)
    for stem in ("features-features", "stat-fid-features"):
        for name in {p.name.split(".")[0] for p in entries}:
            (cache / f"{name}-{CLASSIFIER_EXTRACTOR}-{stem}.pt").write_bytes(planted)
    again = tmp_path / "again.json"
    code, _, err = sagan(monkeypatch, capsys, *common, "--classifier", trained, "--json", again)
    assert code == 0, err
    assert not marker.exists()
    assert json.loads(again.read_text())["metrics"] == expected  # rebuilt from the images
    assert set(load_file(str(entries[0]))) == {"features"}  # a real safetensors entry again

    # a second classifier (other weights) gets its own entry; one planted under its name is rebuilt
    other = tmp_path / "other.safetensors"
    state = load_file(str(trained))
    state["head.bias"] += 1.0  # other weights, same features: a shared entry would go unnoticed by the FID
    model = Classifier(ClassifierConfig(3, 32, 3, 8))
    model.load_state_dict(state)
    save_classifier(other, model, dataset="x", class_names=["a", "b", "c"], test_accuracy=0.5, test_images=1,
                    test_set="none", train_images=1, epochs=1)
    third = tmp_path / "third.json"
    assert sagan(monkeypatch, capsys, *common, "--classifier", other, "--json", third)[0] == 0
    ours = {p.name for p in cache.glob("*.safetensors")}
    assert len(ours) == 2 and any(load_classifier(other)[1].weights_sha256[:12] in name for name in ours)
    new = next(cache / n for n in ours if cache / n != entries[0])
    tensors = load_file(str(new))
    save_file({"features": tensors["features"] + 5}, str(new), metadata={  # the first classifier's label on it
        "extractor": CLASSIFIER_EXTRACTOR, "weights_sha256": load_classifier(trained)[1].weights_sha256})
    assert sagan(monkeypatch, capsys, *common, "--classifier", other, "--json", third)[0] == 0
    assert json.loads(third.read_text())["metrics"] == expected  # not the planted (shifted) features

    with open(entries[0], "wb") as f:  # the positive control: the planted payload does run when unpickled
        f.write(planted)
    pickle.loads(entries[0].read_bytes())
    assert marker.exists()


def test_a_grayscale_folder_recipe_gets_a_grayscale_classifier_that_eval_accepts(tmp_path, monkeypatch, capsys):
    """model.channels = 1 on a folder of colour images: the classifier reads what the models read (issue 18)."""
    images, labels = disc_images(12, seed=4)
    root = tmp_path / "discs"
    for k in range(3):
        png_folder(root / f"class{k}", images[labels == k])
    recipe = tmp_path / "grey.toml"
    recipe.write_text(f'[data]\nkind = "folder"\npath = "{root}"\n'
                      '[model]\nresolution = 32\nchannels = 1\nnum_classes = 3\nz_dim = 16\ng_ch = 16\nd_ch = 16\n'
                      'g_attention = [16]\nd_attention = [8]\n')
    classifier = tmp_path / "grey.safetensors"
    code, out, err = sagan(monkeypatch, capsys, "classifier", "train", recipe, "--out", classifier, "--epochs", 1,
                           "--width", 8, "--batch-size", 8)
    assert code == 0, err
    assert load_classifier(classifier)[1].config.channels == 1 and "1-channel" in out
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "g.safetensors", Generator(ModelConfig(**TINY, channels=1, num_classes=3)), step=1)
    code, _, err = sagan(monkeypatch, capsys, "eval", "--ckpt", ckpt, "--data", recipe, "-n", 8,
                         "--metrics", "classifier_fid", "--classifier", classifier, "-q")
    assert code == 0, err
