"""`sagan classifier train` and `sagan eval --classifier`, fed bad input: exit code 2, one `error:` line.

The classifiers here are saved untrained (no training needed to be refused); the cases run the
real entry point in this process, as tests/cli/test_cli_errors.py does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sagan_cli.cli import main
from sagan_cli.config import ModelConfig
from sagan_cli.evaluation.classifier import Classifier, ClassifierConfig, save_classifier
from sagan_cli.interchange.checkpoint import save_model
from sagan_cli.model.models import Generator

TINY = dict(resolution=32, g_ch=16, d_ch=16, z_dim=16, g_attention=[16], d_attention=[8])
RECIPE = ('[data]\nkind = "synthetic"\nsynthetic_size = 16\n[model]\nresolution = 32\nnum_classes = {classes}\n'
          'g_attention = [16]\nd_attention = [8]\n')


def classifier(path: Path, **config) -> Path:
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(**{"channels": 3, "resolution": 32, "num_classes": 3, "width": 8, **config}))
    save_classifier(path, model, dataset="x", class_names=[], test_accuracy=0.5, test_images=1, test_set="none",
                    train_images=1, epochs=1)
    return path


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classifier-errors")
    torch.manual_seed(0)
    p = {"root": root, "good": classifier(root / "good.safetensors"),
         "res64": classifier(root / "res64.safetensors", resolution=64),
         "grey": classifier(root / "grey.safetensors", channels=1),
         "five": classifier(root / "five.safetensors", num_classes=5)}
    p["g3"] = save_model(root / "g3.safetensors", Generator(ModelConfig(**TINY, num_classes=3)), step=1)
    p["g0"] = save_model(root / "g0.safetensors", Generator(ModelConfig(**TINY)), step=1)
    p["garbage"] = root / "garbage.safetensors"
    p["garbage"].write_bytes(b"\x00not safetensors" * 10)
    p["tampered"] = root / "tampered.safetensors"
    state = load_file(str(p["good"]))
    state["head.bias"] += 1
    from safetensors import safe_open

    with safe_open(str(p["good"]), framework="pt") as f:
        save_file(state, str(p["tampered"]), metadata=f.metadata())
    for classes in (0, 3):
        (root / f"recipe{classes}.toml").write_text(RECIPE.format(classes=classes))
        p[f"recipe{classes}"] = root / f"recipe{classes}.toml"
    p["unlabelled_npz"] = root / "samples.npz"
    np.savez(p["unlabelled_npz"], images=np.zeros((8, 32, 32, 3), np.uint8), labels=np.full(8, -1))
    return p


CASES = {
    "missing-file": (["eval", "--ckpt", "{g3}", "--data", "{recipe3}", "--classifier", "{root}/nope.safetensors"],
                     ["{root}/nope.safetensors", "does not exist", "sagan classifier train"]),
    "corrupt-file": (["eval", "--ckpt", "{g3}", "--data", "{recipe3}", "--classifier", "{garbage}"],
                     ["not a safetensors file"]),
    "generator-as-classifier": (["eval", "--ckpt", "{g3}", "--data", "{recipe3}", "--classifier", "{g3}"],
                                ["holds a sagan generator, not a classifier"]),
    "tampered-weights": (["eval", "--ckpt", "{g3}", "--data", "{recipe3}", "--classifier", "{tampered}"],
                         ["do not match the hash"]),
    "other-resolution": (["eval", "--ckpt", "{g3}", "--data", "{recipe3}", "--classifier", "{res64}"],
                         ["trained on 64x64 images, these are 32x32"]),
    "other-channels": (["eval", "--ckpt", "{g3}", "--data", "{recipe3}", "--classifier", "{grey}"],
                       ["reads 1-channel images", "3-channel"]),
    "other-class-count": (["eval", "--ckpt", "{g3}", "--data", "{recipe3}", "--classifier", "{five}",
                           "--metrics", "gan_test"], ["knows 5 classes", "have 3"]),
    "unconditional-gan-test": (["eval", "--ckpt", "{g0}", "--data", "{recipe0}", "--classifier", "{good}",
                                "--metrics", "gan_test"], ["gan_test needs intended classes"]),
    "unlabelled-samples-gan-test": (["eval", "--samples", "{unlabelled_npz}", "--data", "{recipe3}",
                                     "--classifier", "{good}", "--metrics", "gan_test"], ["gan_test needs intended"]),
    "no-classifier": (["eval", "--ckpt", "{g3}", "--data", "{recipe3}", "--metrics", "classifier_fid"],
                      ["--classifier FILE", "eval.classifier"]),
    "unknown-metric": (["eval", "--ckpt", "{g3}", "--data", "{recipe3}", "--metrics", "classifier_isc"],
                       ["unknown metric 'classifier_isc'"]),
    "train-unlabelled-recipe": (["classifier", "train", "{recipe0}", "--out", "{root}/c.safetensors"],
                                ["model.num_classes"]),
    "train-missing-recipe": (["classifier", "train", "{root}/nope.toml"], ["{root}/nope.toml"]),
    "train-bad-test-set": (["classifier", "train", "{recipe3}", "--test-set", "model.resolution=64"],
                           ["--test-set takes data.key=value"]),
    "train-out-is-a-folder": (["classifier", "train", "{recipe3}", "--out", "{root}"], ["is a folder"]),
    "train-bad-epochs": (["classifier", "train", "{recipe3}", "--out", "{root}/c.safetensors", "--epochs", "0"],
                         ["--epochs"]),
    "train-width-beyond-what-eval-reads": (["classifier", "train", "{recipe3}", "--out", "{root}/c.safetensors",
                                            "--width", "2048"], ["width = 2048 is outside 1-1024"]),
    "recipe-metric-without-classifier": (["train", "{recipe3}", "--set", 'eval.metrics=["gan_test"]', "--dry-run"],
                                         ["eval.classifier must be set"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error(name, paths, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SAGAN_CACHE", str(tmp_path / "cache"))
    args, expected = CASES[name]

    def fill(text: str) -> str:
        for key, path in paths.items():
            text = text.replace("{" + key + "}", str(path))
        return text

    monkeypatch.setattr(sys, "argv", ["sagan", *map(fill, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for part in expected:
        assert fill(part) in lines[0], (part, lines[0])
    assert not (paths["root"] / "c.safetensors").exists()  # nothing written by a refused command


def test_training_checks_the_classifier_before_step_one(paths):
    from sagan_cli.config import load_recipe
    from sagan_cli.errors import UserError
    from sagan_cli.evaluation.metrics import check_evaluation

    def recipe(path: Path, metrics: str = '["classifier_fid", "gan_test"]'):
        return load_recipe(paths["recipe3"], [f"eval.classifier={path}", f"eval.metrics={metrics}"])

    check_evaluation(recipe(paths["good"]))  # fits: no error
    for bad, message in ((paths["res64"], "trained on 64x64"), (paths["five"], "knows 5 classes"),
                         (paths["root"] / "nope.safetensors", "does not exist")):
        with pytest.raises(UserError, match=message):
            check_evaluation(recipe(bad))
    with pytest.raises(UserError, match="needs a class-conditional model"):
        load_recipe(paths["recipe0"], [f"eval.classifier={paths['good']}", 'eval.metrics=["gan_test"]'])
