"""Recipes: TOML loading, --set overrides, and errors that name the offending key."""

import json
from pathlib import Path

import pytest

from sagan_cli.config import ModelConfig, load_recipe, parse_override, recipe_from_json
from sagan_cli.errors import UserError

GOOD = """
[data]
kind = "synthetic"
[model]
arch = "resnet"
resolution = 32
g_attention = [16]
d_attention = [8, 16]
[train]
steps = 20
lr_g = 1
"""


def write(tmp_path, text, name="recipe.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_model_config_json_round_trip():
    cfg = ModelConfig(arch="resnet", resolution=128, num_classes=10, attention="paper",
                      g_attention=[32, 64], d_attention=[16], sn_last_layer=True, init="xavier")
    text = cfg.to_json()
    assert json.loads(text)["g_attention"] == [32, 64]
    assert ModelConfig.from_json(text) == cfg
    assert ModelConfig.from_json(text) != ModelConfig()
    with pytest.raises(UserError, match="model.resolution"):
        ModelConfig.from_json(json.dumps({**cfg.to_dict(), "resolution": 100}))


def test_recipe_loads_with_defaults_for_unstated_keys(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD, "mine.toml"))
    assert recipe.name == "mine"
    assert recipe.model.arch == "resnet" and recipe.model.d_attention == [8, 16]
    assert recipe.train.steps == 20 and recipe.train.batch_size == 64
    assert recipe.train.lr_g == 1.0 and isinstance(recipe.train.lr_g, float)  # an int is a fine float
    assert recipe.model.z_dim == 128


@pytest.mark.parametrize(
    "extra, key",
    [
        ("[optim]\nlr = 1", "optim"),  # unknown table
        ("[train]\nstepz = 3", "train.stepz"),  # unknown key
        ('[train]\nsteps = "ten"', "train.steps"),  # wrong type
        ("[train]\nsteps = true", "train.steps"),  # a bool is not an int
        ("[train]\nsteps = 2.5", "train.steps"),
        ("[train]\nema = 1", "train.ema"),
        ('[model]\ng_attention = 32', "model.g_attention"),
        ('[model]\ng_attention = ["32"]', "model.g_attention"),
        ('[model]\narch = "vgg"', "model.arch"),  # bad choice
        ('[train]\nloss = "lsgan"', "train.loss"),
        ("[model]\nresolution = 48", "model.resolution"),
        ("[model]\nd_attention = [64]", "model.d_attention"),
        ("[train]\nsteps = 0", "train.steps"),
        ('[data]\nkind = "folder"', "data.path"),  # a folder needs a path
        ('model = "resnet"', "model"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, extra, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_recipe(write(tmp_path, extra))


def test_set_overrides(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, [
        "train.steps=7", "model.g_attention=[8, 32]", "data.kind=folder", "data.path=/x/y",
        "train.lr_d=0.001", "train.ema=false", 'train.loss="wgan-gp"', "eval.metrics=[\"fid\", \"kid\"]",
    ])
    assert recipe.train.steps == 7 and recipe.model.g_attention == [8, 32]
    assert recipe.data.kind == "folder" and recipe.data.path == "/x/y"  # bare strings need no quotes
    assert recipe.train.lr_d == 0.001 and recipe.train.ema is False and recipe.train.loss == "wgan-gp"
    assert recipe.eval.metrics == ["fid", "kid"]
    assert load_recipe(path, ["model.resolution=64", "model.d_attention=[32]"]).model.resolution == 64
    assert load_recipe(path, ["train.seed=2147483647"]).train.seed == 2**31 - 1  # the largest (+ rank stays < 2**32)
    # an override for a table the file does not have
    assert load_recipe(write(tmp_path, "", "empty.toml"), ["model.num_classes=3"]).model.num_classes == 3


@pytest.mark.parametrize(
    "override, key",
    [("train.steps=ten", "train.steps"), ("train.steps=true", "train.steps"), ("model.arch=vgg", "model.arch"),
     ("train.nope=1", "train.nope"), ("steps=10", "table.key=value"), ("train.steps", "table.key=value"),
     ("model.g_attention=[3]", "model.g_attention"), ("train.seed=-1", "train.seed"),
     ("train.seed=2147483648", "train.seed")],
)
def test_bad_overrides_name_the_key(tmp_path, override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_recipe(write(tmp_path, GOOD), [override])


def test_parse_override_reads_toml_values_else_strings():
    assert parse_override("train.steps=10") == ("train", "steps", 10)
    assert parse_override("model.g_attention=[16,32]") == ("model", "g_attention", [16, 32])
    assert parse_override("data.path=/x/y=z") == ("data", "path", "/x/y=z")
    assert parse_override("train.lr_g=2e-4") == ("train", "lr_g", 2e-4)


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[train\nsteps = 1"))


def test_config_json_round_trip_of_a_whole_recipe(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD, "r.toml"), ["train.seed=3"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(recipe.to_dict()))
    again = recipe_from_json(path)
    assert again == recipe and again.name == "r"


@pytest.mark.parametrize("path", ["/data/x[/]y", "/data/celeba [cropped]", "/data/[bold]x\\"])
def test_recipe_printing_shows_square_brackets_verbatim(tmp_path, path):
    import io

    from rich.console import Console

    from sagan_cli.config import print_recipe, recipe_from_dict

    recipe = recipe_from_dict({"data": {"kind": "folder", "path": path}}, name="x[/]")
    out = io.StringIO()
    print_recipe(recipe, Path("runs/run [1]"), Console(file=out, width=300))  # short: a long tmp path wraps
    assert path in out.getvalue() and "run [1]" in out.getvalue() and "'x[/]'" in out.getvalue()


def test_a_recipe_asking_for_sizes_beyond_the_file_limits_is_refused_at_once(tmp_path):
    """The limits that a checkpoint's metadata must meet apply to recipes too: a run whose g.safetensors every
    command would refuse is never started."""
    from sagan_cli.config import MODEL_SIZE_LIMITS

    for key, limit in MODEL_SIZE_LIMITS.items():
        value = limit + 8
        with pytest.raises(UserError, match=rf"model.{key} = {value}, beyond what sagan builds \(at most {limit}\)"):
            load_recipe(write(tmp_path, GOOD, "big.toml"), [f"model.{key}={value}"])
