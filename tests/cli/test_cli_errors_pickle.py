"""No file sagan reads is ever unpickled (issue 18): hostile pickles planted in the very files it opens
(a resume state's files, checkpoints given to sample/attn-map/eval/import-port, the eval feature cache)
run nothing, and each command answers with one `error:` line and exit code 2 (or, for a cache entry,
rebuilds it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import sagan_in_one_process
from PIL import Image

from sagan_cli.config import ModelConfig
from sagan_cli.errors import UserError
from sagan_cli.interchange.checkpoint import save_model
from sagan_cli.model.models import Generator

TINY = dict(resolution=32, g_ch=8, d_ch=8, z_dim=8, g_attention=[16], d_attention=[8])
RECIPE = ('[data]\nkind = "synthetic"\nsynthetic_size = 16\n'
          '[model]\nresolution = 32\ng_ch = 8\nd_ch = 8\nz_dim = 8\ng_attention = [16]\nd_attention = [8]\n'
          '[train]\nsteps = 1\nbatch_size = 4\ncheckpoint_every = 1\nsample_every = 1\nlog_every = 1\n')


class Payload:
    """Unpickling this creates the marker file: the proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    """Replace `path` with a hostile pickle in torch.save's own format (what torch.load would read)."""
    path.unlink(missing_ok=True)
    torch.save(Payload(marker), path)


def sagan(*commands: list[object]) -> list[tuple[int, str]]:
    """The real command line in a fresh process (nothing this test process loaded or registered helps it),
    several commands in the one process: one `import torch` instead of one per command. (exit code, stderr) each."""
    return sagan_in_one_process(*commands, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})


def assert_refused(done: tuple[int, str], marker: Path) -> None:
    code, stderr = done
    assert not marker.exists(), "a planted pickle was executed"
    assert code == 2, stderr[-800:]
    assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr[-800:]


def test_the_payload_does_run_when_unpickled(tmp_path: Path) -> None:
    """The positive control: without it, the tests below would pass with a harmless payload."""
    marker = tmp_path / "ran"
    plant(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real one-step run (config, checkpoints and state/step-1/) to plant into."""
    from sagan_cli.config import load_recipe
    from sagan_cli.training.loop import run_training

    root = tmp_path_factory.mktemp("hostile")
    (root / "tiny.toml").write_text(RECIPE)
    run_training(load_recipe(root / "tiny.toml"), root / "run")
    return root


@pytest.mark.parametrize("name", ["models.safetensors", "optimizers.safetensors", "progress.json", "rng-rank0.json"])
def test_resume_never_unpickles_its_state_files(run: Path, tmp_path: Path, name: str) -> None:
    import shutil

    from sagan_cli.config import load_recipe
    from sagan_cli.training.loop import run_training
    from sagan_cli.training.state import latest_state

    copy = tmp_path / "run"
    shutil.copytree(run / "run", copy)
    marker = tmp_path / "ran"
    plant(latest_state(copy / "state") / name, marker)
    recipe = load_recipe(run / "tiny.toml", ["train.steps=2"])
    with pytest.raises(UserError, match="training state|damaged"):
        run_training(recipe, copy, resume=True)
    assert not marker.exists()
    if name == "models.safetensors":  # and once through the command line
        [done] = sagan(["train", run / "tiny.toml", "--out", copy, "--resume", "--set", "train.steps=2"])
        assert_refused(done, marker)


def test_checkpoints_given_to_commands_are_never_unpickled(run: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hostile, hostile_pth = tmp_path / "hostile.safetensors", tmp_path / "hostile.pth"
    plant(hostile, marker)
    plant(hostile_pth, marker)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (200, 20, 20)).save(photo)
    commands = (["sample", "--ckpt", hostile, "-n", 1, "--out", tmp_path / "s"],
                ["attn-map", photo, "--ckpt", hostile, "--out", tmp_path / "a.png"],
                ["eval", "--ckpt", hostile, "--data", run / "tiny.toml", "--metrics", "structure", "-n", 8],
                ["import-port", "--g", hostile, "--out", tmp_path / "port"],
                ["import-port", "--d", hostile_pth, "--out", tmp_path / "port"],
                ["import-port", "--g", hostile_pth, "--d", hostile, "--out", tmp_path / "port"])
    results = sagan(*commands)
    assert len(results) == len(commands)
    for done in results:
        assert_refused(done, marker)  # the marker: made by any of the commands


def test_eval_feature_cache_entries_are_never_unpickled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    """The cache files sagan reads (its safetensors entries) hold a pickle: they are rebuilt, nothing runs."""
    from helpers import run_main

    from sagan_cli.evaluation.classifier import Classifier, ClassifierConfig, save_classifier

    monkeypatch.setenv("SAGAN_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    classifier = tmp_path / "c.safetensors"
    save_classifier(classifier, Classifier(ClassifierConfig(3, 32, 3, 8)), dataset="x", class_names=["a", "b", "c"],
                    test_accuracy=0.5, test_images=1, test_set="none", train_images=1, epochs=1)
    ckpt = save_model(tmp_path / "g.safetensors", Generator(ModelConfig(**TINY)), step=1)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE)
    args = ["eval", "--ckpt", str(ckpt), "--data", str(recipe), "--metrics", "classifier_fid", "--classifier",
            str(classifier), "-n", "8", "--device", "cpu", "-q", "--json"]
    assert run_main([*args, str(tmp_path / "a.json")], capsys, monkeypatch)[0] == 0
    entries = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert entries, "no cache entry was written"
    marker = tmp_path / "ran"
    for entry in entries:
        plant(entry, marker)
    assert run_main([*args, str(tmp_path / "b.json")], capsys, monkeypatch)[0] == 0
    assert not marker.exists()
    first, again = (json.loads((tmp_path / f"{n}.json").read_text())["metrics"] for n in "ab")
    assert first == again  # rebuilt from the images, not read from the planted file
