"""Every command, fed bad input: exit code 2, one `error:` line on stderr naming the culprit, no traceback,
and nothing already on disk is lost.

Most cases call the real entry point `sagan_cli.cli.main()` in this process (fast: torch is imported
once); a handful run `python -m sagan_cli` in subprocesses, in parallel, to check what a shell sees.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error_line, run_main
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sagan_cli import __version__
from sagan_cli.cli import app
from sagan_cli.config import ModelConfig, load_recipe
from sagan_cli.interchange.checkpoint import save_model
from sagan_cli.model.models import Discriminator, Generator

TINY = dict(resolution=32, g_ch=16, d_ch=16, g_attention=[16], d_attention=[8])
RECIPE = """\
[data]
kind = "synthetic"
synthetic_size = 64
[model]
resolution = 32
g_ch = 16
d_ch = 16
z_dim = 16
g_attention = [16]
d_attention = [8]
[train]
steps = 1
batch_size = 4
sample_grid = 4
log_every = 1
ema = false
"""


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every file the cases use: good and broken checkpoints, images, recipes, a finished run."""
    root = tmp_path_factory.mktemp("cli-errors")
    torch.manual_seed(0)
    p = {"root": root}
    p["g"] = save_model(root / "g.safetensors", Generator(ModelConfig(**TINY)), step=1)
    p["d"] = save_model(root / "d.safetensors", Discriminator(ModelConfig(**TINY)), step=1)
    p["garbage_ckpt"] = root / "garbage.safetensors"
    p["garbage_ckpt"].write_bytes(os.urandom(300))
    p["empty_ckpt"] = root / "empty.safetensors"
    p["empty_ckpt"].write_bytes(b"")
    p["plain_ckpt"] = root / "plain.safetensors"  # a valid safetensors file, but not from sagan
    save_file({"w": torch.zeros(2)}, p["plain_ckpt"])
    p["damaged_ckpt"] = root / "damaged.safetensors"  # sagan metadata with a broken config
    save_file({"w": torch.zeros(2)}, p["damaged_ckpt"], metadata={"sagan.kind": "generator", "sagan.config": "{oops"})
    p["mismatch_ckpt"] = root / "mismatch.safetensors"  # G metadata, weights of a wider G
    wide = save_model(root / "wide.safetensors", Generator(ModelConfig(**{**TINY, "g_ch": 24})), step=1)
    save_file(load_file(wide), p["mismatch_ckpt"], metadata={"sagan.kind": "generator", "sagan.step": "1",
                                                             "sagan.config": ModelConfig(**TINY).to_json()})
    p["ckpt_dir"] = root / "ckpt-folder.safetensors"
    p["ckpt_dir"].mkdir()

    p["image"] = root / "photo.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(p["image"])
    p["bad_image"] = root / "notes.png"
    p["bad_image"].write_text("not an image\n")
    p["truncated_image"] = root / "cut.jpg"
    Image.new("RGB", (64, 64), (0, 90, 200)).save(root / "whole.jpg")
    p["truncated_image"].write_bytes((root / "whole.jpg").read_bytes()[:40])
    p["bomb_image"] = root / "huge.png"  # a PNG header claiming 30000 x 30000 pixels: Pillow refuses it
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    p["bomb_image"].write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b""))
    p["not_images"] = root / "no-images"
    p["not_images"].mkdir()
    (p["not_images"] / "readme.txt").write_text("nothing to see")
    p["garbage_npz"] = root / "samples.npz"
    p["garbage_npz"].write_bytes(os.urandom(200))

    p["recipe"] = root / "tiny.toml"
    p["recipe"].write_text(RECIPE)
    recipes = {
        "garbage_recipe": os.urandom(64) + b"\xff\xfe\x00",
        "invalid_recipe": b"[model\nresolution = = 32\n",
        "unknown_key": b"[model]\nresolutoin = 32\n",
        "unknown_table": b"[modle]\nresolution = 32\n",
        "wrong_type": b"[train]\nsteps = \"many\"\n",
        "wrong_list_type": b"[model]\ng_attention = \"16\"\n",
        "bad_value": b"[model]\nresolution = 48\n",
        "bad_choice": b"[train]\nloss = \"wasserstein\"\n",
        "bad_table": b"model = 3\n",
        "folder_no_path": b"[data]\nkind = \"folder\"\n",
    }
    for name, text in recipes.items():
        p[name] = root / f"{name}.toml"
        p[name].write_bytes(text)
    p["garbage_json"] = root / "config.json"
    p["garbage_json"].write_text("{ this is not json")
    p["list_json"] = root / "list-config.json"
    p["list_json"].write_text("[1, 2]")
    p["weights_garbage"] = root / "inception.pth"
    p["weights_garbage"].write_bytes(os.urandom(500))
    p["fake_weights"] = root / "fake-inception.pth"  # passes sagan's shape probes; never run through Inception
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "fc.weight": torch.zeros(1008, 2048),
                "Mixed_7c.branch_pool.conv.weight": torch.zeros(192, 2048, 1, 1)}, p["fake_weights"])
    p["file"] = root / "existing.txt"  # a plain file that must survive every case
    p["file"].write_text("keep me\n")
    p["figure"] = root / "figure.png"
    p["figure"].write_bytes(b"an earlier figure")
    p["empty_torch_home"] = root / "torch-home"
    p["empty_torch_home"].mkdir()

    # A finished run (real training, 1 step on a 4-image folder): refused without --resume, and on
    # --resume with a new architecture. Its copy gets a damaged config.json.
    from sagan_cli.training.loop import run_training

    (root / "train-images").mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 100, 200 - 40 * i)).save(root / "train-images" / f"{i}.png")
    p["run_recipe"] = root / "run.toml"
    p["run_recipe"].write_text(RECIPE.replace('kind = "synthetic"', f'kind = "folder"\npath = "{root / "train-images"}"'))
    p["run"] = root / "run"
    run_training(load_recipe(p["run_recipe"]), p["run"])
    assert (p["run"] / "g.safetensors").is_file() and (p["run"] / "state").is_dir()
    p["exported_run"] = root / "exported-run"  # a finished run whose (large) state/ was deleted
    shutil.copytree(p["run"], p["exported_run"], ignore=shutil.ignore_patterns("state"))
    p["run_garbage_config"] = root / "run-garbage-config"
    shutil.copytree(p["run"], p["run_garbage_config"])
    (p["run_garbage_config"] / "config.json").write_text("{ not json")
    return p


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` (or the file itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(q.relative_to(path)): q.read_bytes() for q in sorted(path.rglob("*")) if q.is_file()}


@dataclass
class Case:
    id: str
    args: list[str]  # {name} is replaced by the fixture path of that name
    names: list[str]  # what the error line must mention ({name} as in args)
    intact: list[str] = field(default_factory=list)  # fixture paths that must be unchanged afterwards
    env: dict[str, str | None] = field(default_factory=dict)
    xfail: str | None = None


CKPT_COMMANDS = {  # how each checkpoint-taking command is called with a checkpoint {ckpt}
    "sample": ["sample", "--ckpt", "{ckpt}", "-n", "2", "--out", "{root}/s-out"],
    "attn-map": ["attn-map", "{image}", "--ckpt", "{ckpt}", "--out", "{root}/attn.png"],
    "eval": ["eval", "--ckpt", "{ckpt}", "--data", "{recipe}", "--metrics", "structure", "-n", "8"],
}
BROKEN_CKPTS = {  # fixture name -> what the message must say
    "missing": ("{root}/nope.safetensors", "does not exist"),
    "folder": ("{ckpt_dir}", "not a file"),
    "garbage": ("{garbage_ckpt}", "not a safetensors checkpoint"),
    "empty": ("{empty_ckpt}", "not a safetensors checkpoint"),
    "not-sagan": ("{plain_ckpt}", "not a sagan checkpoint"),
    "damaged-config": ("{damaged_ckpt}", "damaged model config"),
    "weights-mismatch": ("{mismatch_ckpt}", "do not match"),
}

CASES: list[Case] = [
    Case(f"{cmd}-ckpt-{kind}", [a.replace("{ckpt}", path) for a in args], [path, hint])
    for cmd, args in CKPT_COMMANDS.items()
    for kind, (path, hint) in BROKEN_CKPTS.items()
]
CASES += [  # the alias, with the two cheapest broken checkpoints
    Case(f"visualize-attention-ckpt-{kind}", ["visualize-attention", "{image}", "--ckpt", path], [path, hint])
    for kind, (path, hint) in BROKEN_CKPTS.items() if kind in ("missing", "garbage")
]
CASES += [
    # --- train ---
    Case("train-missing-recipe", ["train", "{root}/nope.toml", "--out", "{root}/t1"], ["{root}/nope.toml"]),
    Case("train-recipe-is-folder", ["train", "{root}", "--out", "{root}/t1"], ["{root}"]),
    Case("train-garbage-recipe", ["train", "{garbage_recipe}", "--out", "{root}/t1"], ["{garbage_recipe}", "TOML"]),
    Case("train-invalid-toml", ["train", "{invalid_recipe}", "--out", "{root}/t1"], ["{invalid_recipe}", "TOML"]),
    Case("train-unknown-key", ["train", "{unknown_key}", "--out", "{root}/t1"], ["model.resolutoin"]),
    Case("train-unknown-table", ["train", "{unknown_table}", "--out", "{root}/t1"], ["[modle]"]),
    Case("train-table-not-table", ["train", "{bad_table}", "--out", "{root}/t1"], ["[model]"]),
    Case("train-wrong-type", ["train", "{wrong_type}", "--out", "{root}/t1"], ["train.steps", "int"]),
    Case("train-wrong-list-type", ["train", "{wrong_list_type}", "--out", "{root}/t1"], ["model.g_attention"]),
    Case("train-bad-value", ["train", "{bad_value}", "--out", "{root}/t1"], ["model.resolution", "48"]),
    Case("train-bad-choice", ["train", "{bad_choice}", "--out", "{root}/t1"], ["train.loss", "wasserstein"]),
    Case("train-folder-without-path", ["train", "{folder_no_path}", "--out", "{root}/t1"], ["data.path"]),
    Case("train-set-malformed", ["train", "{recipe}", "--set", "steps=5", "--out", "{root}/t1"], ["--set", "steps=5"]),
    Case("train-set-unknown-key", ["train", "{recipe}", "--set", "train.stepz=5", "--dry-run"], ["train.stepz"]),
    Case("train-set-wrong-type", ["train", "{recipe}", "--set", "train.steps=1.5", "--dry-run"], ["train.steps"]),
    Case("train-set-bad-value", ["train", "{recipe}", "--set", "train.steps=0", "--dry-run"], ["train.steps"]),
    Case("train-set-negative-seed", ["train", "{recipe}", "--set", "train.seed=-1", "--out", "{root}/t-seed"],
         ["train.seed", "-1"]),  # once a ValueError traceback from np.random.seed
    Case("train-set-seed-too-big", ["train", "{recipe}", "--set", "train.seed=2147483648", "--dry-run"],
         ["train.seed", "2147483648"]),
    Case("train-set-missing-data", ["train", "{recipe}", "--set", "data.kind=folder",
                                    "--set", "data.path={root}/no-such-data", "--out", "{root}/t2"],
         ["data.path", "{root}/no-such-data"]),
    Case("train-folder-of-non-images", ["train", "{recipe}", "--set", "data.kind=folder",
                                        "--set", "data.path={not_images}", "--out", "{root}/t3"], ["{not_images}"]),
    Case("train-existing-run", ["train", "{run_recipe}", "--out", "{run}"], ["{run}", "--resume"], intact=["run"]),
    Case("train-resume-new-arch", ["train", "{run_recipe}", "--set", "model.arch=resnet", "--set", "model.g_attention=[16]",
                                   "--out", "{run}", "--resume"], ["model.arch"], intact=["run"]),
    Case("train-over-exported-run", ["train", "{run_recipe}", "--set", "data.path={root}/moved-data",
                                     "--out", "{exported_run}"], ["{exported_run}"], intact=["exported_run"]),
    Case("train-resume-nothing", ["train", "{recipe}", "--out", "{root}/empty-run", "--resume"],
         ["{root}/empty-run", "--resume"]),
    Case("train-resume-garbage-config", ["train", "{run_recipe}", "--out", "{run_garbage_config}", "--resume"],
         ["{run_garbage_config}/config.json"], intact=["run_garbage_config"]),
    Case("train-out-is-file", ["train", "{recipe}", "--out", "{file}"], ["{file}"], intact=["file"]),
    Case("train-out-under-file", ["train", "{recipe}", "--out", "{file}/run"], ["{file}/run"], intact=["file"]),
    # --- sample ---
    Case("sample-discriminator", ["sample", "--ckpt", "{d}", "--out", "{root}/s1"], ["{d}", "generator"]),
    Case("sample-n-zero", ["sample", "--ckpt", "{g}", "-n", "0", "--out", "{root}/s1"], ["-n", "0"]),
    Case("sample-n-negative", ["sample", "--ckpt", "{g}", "-n", "-3", "--out", "{root}/s1"], ["-n", "-3"]),
    Case("sample-batch-zero", ["sample", "--ckpt", "{g}", "-b", "0", "--out", "{root}/s1"], ["--batch-size"]),
    Case("sample-truncation-zero", ["sample", "--ckpt", "{g}", "--truncation", "0", "--out", "{root}/s1"],
         ["--truncation"]),
    Case("sample-class-unconditional", ["sample", "--ckpt", "{g}", "--class", "1", "--out", "{root}/s1"], ["--class"]),
    Case("sample-bad-format", ["sample", "--ckpt", "{g}", "--format", "gif", "--out", "{root}/s1"], ["--format", "gif"]),
    Case("sample-bad-device", ["sample", "--ckpt", "{g}", "--device", "toaster", "--out", "{root}/s1"],
         ["--device", "toaster"]),
    Case("sample-out-is-file", ["sample", "--ckpt", "{g}", "-n", "2", "--out", "{file}"], ["--out", "{file}"],
         intact=["file"]),
    Case("sample-out-under-file", ["sample", "--ckpt", "{g}", "-n", "2", "--out", "{file}/samples"],
         ["--out", "{file}/samples"], intact=["file"]),
    Case("sample-n-not-a-number", ["sample", "--ckpt", "{g}", "-n", "many"], ["--num"]),
    Case("sample-no-ckpt", ["sample", "-n", "2"], ["--ckpt"]),
]
ALIAS_CASES = ("missing-image", "unreadable-image", "d-without-image", "g-with-image", "out-is-folder", "no-ckpt")
for cmd in ("attn-map", "visualize-attention"):  # the alias is the same function: a few cases suffice
    CASES += [c for c in [
        Case(f"{cmd}-missing-image", [cmd, "{root}/nope.jpg", "--ckpt", "{d}", "--out", "{figure}"],
             ["{root}/nope.jpg"], intact=["figure"]),
        Case(f"{cmd}-unreadable-image", [cmd, "{bad_image}", "--ckpt", "{d}", "--out", "{figure}"],
             ["{bad_image}"], intact=["figure"]),
        Case(f"{cmd}-truncated-image", [cmd, "{truncated_image}", "--ckpt", "{d}", "--out", "{figure}"],
             ["{truncated_image}"], intact=["figure"]),
        Case(f"{cmd}-decompression-bomb", [cmd, "{bomb_image}", "--ckpt", "{d}", "--out", "{figure}"],
             ["{bomb_image}"], intact=["figure"]),
        Case(f"{cmd}-image-is-folder", [cmd, "{root}", "--ckpt", "{d}", "--out", "{figure}"], ["{root}"],
             intact=["figure"]),
        Case(f"{cmd}-d-without-image", [cmd, "--ckpt", "{d}", "--out", "{figure}"], ["IMAGE"], intact=["figure"]),
        Case(f"{cmd}-g-with-image", [cmd, "{image}", "--ckpt", "{g}", "--out", "{figure}"], ["IMAGE"],
             intact=["figure"]),
        Case(f"{cmd}-bad-points", [cmd, "{image}", "--ckpt", "{d}", "-p", "12;30", "--out", "{figure}"],
             ["--points", "12;30"], intact=["figure"]),
        Case(f"{cmd}-point-outside", [cmd, "{image}", "--ckpt", "{d}", "-p", "40,3", "--out", "{figure}"],
             ["40,3", "0-31"], intact=["figure"]),
        Case(f"{cmd}-unknown-layer", [cmd, "{image}", "--ckpt", "{d}", "--layer", "attention.99", "--out", "{figure}"],
             ["attention.99"], intact=["figure"]),
        Case(f"{cmd}-out-is-folder", [cmd, "{image}", "--ckpt", "{d}", "--out", "{root}"], ["--out", "{root}"]),
        Case(f"{cmd}-out-under-file", [cmd, "{image}", "--ckpt", "{d}", "--out", "{file}/a.png"],
             ["--out", "{file}/a.png"], intact=["file"]),
        Case(f"{cmd}-json-under-file", [cmd, "{image}", "--ckpt", "{d}", "--out", "{figure}", "--json",
                                        "{file}/a.json"], ["--json", "{file}/a.json"], intact=["file", "figure"]),
        Case(f"{cmd}-no-ckpt", [cmd, "{image}"], ["--ckpt"]),
    ] if cmd == "attn-map" or c.id.removeprefix(f"{cmd}-") in ALIAS_CASES]
NO_WEIGHTS = {"TORCH_HOME": "{empty_torch_home}", "SAGAN_INCEPTION_WEIGHTS": None}
CASES += [
    # --- eval ---
    Case("eval-neither-source", ["eval", "--data", "{recipe}"], ["--ckpt", "--samples"]),
    Case("eval-both-sources", ["eval", "--ckpt", "{g}", "--samples", "{root}", "--data", "{recipe}"],
         ["--ckpt", "--samples"]),
    Case("eval-discriminator", ["eval", "--ckpt", "{d}", "--data", "{recipe}", "--metrics", "structure"],
         ["{d}", "generator"]),
    Case("eval-missing-data", ["eval", "--ckpt", "{g}", "--data", "{root}/nope.toml"], ["--data", "{root}/nope.toml"]),
    Case("eval-data-wrong-kind", ["eval", "--ckpt", "{g}", "--data", "{image}"], ["--data", "{image}"]),
    Case("eval-garbage-recipe", ["eval", "--ckpt", "{g}", "--data", "{garbage_recipe}"], ["{garbage_recipe}"]),
    Case("eval-recipe-unknown-key", ["eval", "--ckpt", "{g}", "--data", "{unknown_key}"], ["model.resolutoin"]),
    Case("eval-garbage-config-json", ["eval", "--ckpt", "{g}", "--data", "{garbage_json}", "--metrics", "structure"],
         ["{garbage_json}"]),
    Case("eval-config-json-not-object", ["eval", "--ckpt", "{g}", "--data", "{list_json}", "--metrics", "structure"],
         ["{list_json}"]),
    Case("eval-unknown-metric", ["eval", "--ckpt", "{g}", "--data", "{recipe}", "--metrics", "fid,lpips"],
         ["--metrics", "lpips"]),
    Case("eval-structure-on-folder", ["eval", "--ckpt", "{g}", "--data", "{root}", "--metrics", "structure"],
         ["--metrics structure"]),
    Case("eval-n-zero", ["eval", "--ckpt", "{g}", "--data", "{recipe}", "--metrics", "structure", "-n", "0"], ["-n"]),
    Case("eval-n-negative", ["eval", "--ckpt", "{g}", "--data", "{recipe}", "--metrics", "structure", "-n", "-5"],
         ["-n"]),
    Case("eval-missing-inception-weights", ["eval", "--ckpt", "{g}", "--data", "{recipe}", "--metrics", "fid"],
         ["--inception-weights", "SAGAN_INCEPTION_WEIGHTS"], env=NO_WEIGHTS),
    Case("eval-inception-weights-missing-file", ["eval", "--ckpt", "{g}", "--data", "{recipe}", "--metrics", "fid",
                                                 "--inception-weights", "{root}/nope.pth"], ["{root}/nope.pth"],
         env=NO_WEIGHTS),
    Case("eval-inception-weights-env-missing-file", ["eval", "--ckpt", "{g}", "--data", "{recipe}", "--metrics", "fid"],
         ["{root}/env-nope.pth"], env={"SAGAN_INCEPTION_WEIGHTS": "{root}/env-nope.pth"}),
    Case("eval-inception-weights-garbage", ["eval", "--ckpt", "{g}", "--data", "{recipe}", "--metrics", "fid",
                                            "--inception-weights", "{weights_garbage}"], ["{weights_garbage}"]),
    Case("eval-samples-missing", ["eval", "--samples", "{root}/nope", "--data", "{recipe}", "--metrics", "structure"],
         ["--samples", "{root}/nope"]),
    Case("eval-samples-garbage-npz", ["eval", "--samples", "{garbage_npz}", "--data", "{recipe}",
                                      "--metrics", "structure"], ["{garbage_npz}"]),
    Case("eval-samples-no-images", ["eval", "--samples", "{not_images}", "--data", "{recipe}", "--metrics", "structure"],
         ["{not_images}"]),
    Case("eval-bad-device", ["eval", "--ckpt", "{g}", "--data", "{recipe}", "--metrics", "structure",
                             "--device", "toaster"], ["--device", "toaster"]),
    Case("eval-json-under-file", ["eval", "--ckpt", "{g}", "--data", "{recipe}", "--metrics", "structure", "-n", "8",
                                  "--json", "{file}/eval.json"], ["--json", "{file}/eval.json"], intact=["file"]),
    Case("eval-feature-cache-unwritable", ["eval", "--ckpt", "{g}", "--data", "{recipe}", "--metrics", "fid", "-n", "8",
                                           "--inception-weights", "{fake_weights}"], ["{file}/cache"],
         env={"SAGAN_CACHE": "{file}/cache"}, intact=["file"]),
    # --- info, and the root ---
    Case("info-unknown-option", ["info", "--yaml"], ["--yaml"]),
    Case("unknown-command", ["trian"], ["trian"]),
]


def fill(text: str, paths: dict[str, Path]) -> str:
    for name, path in paths.items():
        text = text.replace("{" + name + "}", str(path))
    assert "{" not in text, text
    return text


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
             for c in CASES]
)
def test_user_error(case: Case, paths: dict[str, Path], capsys: pytest.CaptureFixture,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in case.env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, fill(value, paths))
    before = {name: snapshot(paths[name]) for name in case.intact}
    code, out, err = run_main([fill(a, paths) for a in case.args], capsys, monkeypatch)
    assert_one_error_line(code, out, err, [fill(n, paths) for n in case.names])
    for name, files in before.items():
        assert snapshot(paths[name]) == files, f"{name} changed"


def test_every_command_is_covered() -> None:
    commands = {c.args[0] for c in CASES}
    assert {"train", "sample", "attn-map", "visualize-attention", "eval", "info"} <= commands


def test_runs_after_the_errors_still_work(paths: dict[str, Path], capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The refused run is still resumable and its checkpoint still samples (the refusals lost nothing)."""
    code, out, err = run_main(["sample", "--ckpt", str(paths["run"] / "g.safetensors"), "-n", "2",
                               "--out", str(paths["root"] / "ok-samples"), "--device", "cpu"], capsys, monkeypatch)
    assert code == 0, err
    assert sorted(p.name for p in (paths["root"] / "ok-samples").iterdir()) == ["000000.png", "000001.png", "grid.png"]


# --- help and version (Typer's CliRunner: exit code 0 paths) ---

runner = CliRunner()


@pytest.mark.parametrize("command", ["train", "sample", "attn-map", "visualize-attention", "eval", "info"])
def test_help_shows_defaults_and_an_example(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Example: sagan" in text
    if command != "info":  # info has one flag and nothing with a default
        assert "[default:" in text
    assert "Traceback" not in result.output


def test_root_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for command in ("train", "sample", "attn-map", "eval", "info"):
        assert command in result.output


# --- a few through a real interpreter: what a shell script sees ---

SUBPROCESS_CASES = {  # name: (args, environment changes, what the error line names)
    "version": (["--version"], {}, []),
    "train-garbage-recipe": (["train", "{garbage_recipe}", "--out", "{root}/sp-run"], {}, ["{garbage_recipe}"]),
    "info-unknown-option": (["info", "--yaml"], {}, ["--yaml"]),
    "train-existing-run": (["train", "{run_recipe}", "--out", "{run}"], {}, ["{run}", "--resume"]),
    "eval-missing-inception-weights": (["eval", "--ckpt", "{g}", "--data", "{recipe}", "--metrics", "fid,kid"],
                                       NO_WEIGHTS, ["--inception-weights", "SAGAN_INCEPTION_WEIGHTS"]),
}


@pytest.fixture(scope="module", autouse=True)
def shell(paths: dict[str, Path]) -> Iterator[Callable[[str], tuple[int, str, str]]]:
    """Starts the interpreters before the first test, so their start-up overlaps the in-process cases."""
    before = snapshot(paths["run"])
    procs = {}
    for name, (args, changes, _) in SUBPROCESS_CASES.items():
        env = {**os.environ, "COLUMNS": "200"}
        for key, value in changes.items():
            env.pop(key, None) if value is None else env.__setitem__(key, fill(value, paths))
        procs[name] = subprocess.Popen([sys.executable, "-m", "sagan_cli", *[fill(a, paths) for a in args]],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    results: dict[str, tuple[int, str, str]] = {}

    def result(name: str) -> tuple[int, str, str]:
        if name not in results:
            out, err = procs[name].communicate(timeout=300)
            results[name] = (procs[name].returncode, out, err)
        return results[name]

    result.before = before  # type: ignore[attr-defined]
    yield result
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_version_in_a_shell(shell: Callable[[str], tuple[int, str, str]]) -> None:
    code, out, err = shell("version")
    assert code == 0, err
    assert out.strip() == f"sagan {__version__}"
    assert err == ""


@pytest.mark.parametrize("name", [n for n in SUBPROCESS_CASES if n != "version"])
def test_user_error_in_a_shell(name: str, shell: Callable[[str], tuple[int, str, str]], paths: dict[str, Path]) -> None:
    code, out, err = shell(name)
    assert_one_error_line(code, out, err, [fill(n, paths) for n in SUBPROCESS_CASES[name][2]])


def test_the_refused_run_is_intact_after_the_shell_cases(shell: Callable[[str], tuple[int, str, str]],
                                                         paths: dict[str, Path]) -> None:
    shell("train-existing-run")
    assert snapshot(paths["run"]) == shell.before  # type: ignore[attr-defined]


def test_info_without_weights_reports_how_to_get_them(paths: dict[str, Path], capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(paths["empty_torch_home"]))
    monkeypatch.delenv("SAGAN_INCEPTION_WEIGHTS", raising=False)
    code, out, err = run_main(["info", "--json"], capsys, monkeypatch)
    assert code == 0, err
    details = json.loads(out)
    assert details["sagan"] == __version__
    assert details["inception_weights"] is None
    assert "--inception-weights" in details["inception_weights_help"]
