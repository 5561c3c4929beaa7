"""The documentation and shipped files stay in step with the code."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from sagan_cli import __version__
from sagan_cli.config import TABLES, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


def test_readme_documents_every_recipe_key():
    readme = (ROOT / "README.md").read_text()
    missing = [f"{table}.{f.name}" for table, cls in TABLES.items() for f in dataclasses.fields(cls)
               if f"`{table}.{f.name}`" not in readme]
    assert not missing


def test_readme_quickstart_has_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quickstart, re.S)
    assert commands == ['pip install -e . && sagan train recipes/quickstart.toml', 'pip install -e ".[test]" && pytest']
    assert 'pip install -e ".[test]" && pytest' in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_every_key_is_commented(recipe):
    loaded = load_recipe(recipe)
    assert loaded.name == recipe.stem
    uncommented = [line for line in recipe.read_text().splitlines()
                   if re.match(r"^\s*[a-z0-9_]+\s*=", line) and "#" not in line]
    assert not uncommented


# The official implementation (brain-research/self-attention-gan: generator_test, discriminator_test,
# ops.py, non_local.py, model.py flags), in our recipe keys. Facts read from that code, not from the paper.
OFFICIAL_IMAGENET128 = {
    "model.arch": "resnet", "model.resolution": 128, "model.num_classes": 1000, "model.z_dim": 128,
    "model.g_ch": 64, "model.d_ch": 64,  # gf_dim, df_dim
    "model.attention": "paper",  # sn_non_local_block_sim: C/8 query/key, C/2 value, 2x2 max-pool, 1x1 out conv
    "model.g_attention": [32], "model.d_attention": [32],  # g_non_local after the 32x32 block; d_non_local at 32x32
    "model.g_spectral_norm": True, "model.d_spectral_norm": True,
    "model.sn_last_layer": True,  # g_snconv_last, d_sn_linear (and sn_embedding)
    "model.init": "xavier",  # tf.contrib.layers.xavier_initializer everywhere
    "train.loss": "hinge", "train.lr_g": 1e-4, "train.lr_d": 4e-4, "train.beta1": 0.0,
    "train.beta2": 0.999,  # tf.train.AdamOptimizer's default: the code never sets it
    "train.d_steps": 1,  # is_gd_equal: one D step per G step
    "train.ema": False,  # no moving average of G in the official code
}


def test_recipes_cover_the_issue_list():
    assert {p.stem for p in RECIPES} >= {"quickstart", "lsun", "celeba", "cifar10", "imagenet128"}


def test_imagenet128_recipe_is_the_official_code_key_by_key():
    paper = load_recipe(ROOT / "recipes" / "imagenet128.toml").to_dict()
    actual = {key: paper[key.split(".")[0]][key.split(".")[1]] for key in OFFICIAL_IMAGENET128}
    assert actual == OFFICIAL_IMAGENET128
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## How the model maps to the paper", 1)[1].split("\n## ", 1)[0]
    assert "Xavier" in table and "orthogonal (the official code)" not in table.lower()


def test_dockerfile_copies_only_what_exists_and_runs_as_a_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    sources = [src for line in dockerfile.splitlines() if line.startswith("COPY")
               for src in line.split()[1:-1] if not src.startswith("--")]
    assert sources and all((ROOT / s).exists() for s in sources), sources
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert 'ENTRYPOINT ["sagan"]' in dockerfile


def test_changelog_has_the_current_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{__version__}]" in changelog and "## [Unreleased]" in changelog


def test_every_file_the_docs_link_to_is_in_the_repository():
    """A README figure hidden by .gitignore (0.1.0's docs/attn-map.png) is missing from every clone."""
    import subprocess

    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())
    if not tracked:
        pytest.skip("not a git checkout")
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        # markdown links and images, and <img src=...>: relative paths only
        for target in re.findall(r"\]\(([^)\s#]+)|src=\"([^\"]+)\"", doc.read_text()):
            path = next(t for t in target if t)
            if "://" in path or path.startswith(("#", "mailto:")):
                continue
            relative = (doc.parent / path).resolve().relative_to(ROOT).as_posix()
            if relative not in tracked and not any(t.startswith(relative.rstrip("/") + "/") for t in tracked):
                missing.append(f"{doc.name}: {path}")
    assert not missing


def _commands(group, path=()):
    for name, command in getattr(group, "commands", {}).items():
        yield path + (name,), command
        yield from _commands(command, path + (name,))  # a group's subcommands


def test_help_texts_keep_their_bracketed_words():
    """Typer renders help as rich markup, where an unescaped [data] is a style tag and vanishes from --help."""
    import typer
    from typer.testing import CliRunner

    from sagan_cli.cli import app

    checked = 0
    for path, command in _commands(typer.main.get_command(app)):
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        wanted = {w for t in texts for w in re.findall(r"\[[a-z_.]+\]", t)}  # escaped (\\[) or not
        if not wanted:
            continue
        out = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"}).output
        flat = re.sub(r"[\s│]+", " ", out)
        for word in wanted:
            assert word in flat, f"sagan {' '.join(path)} --help lost {word}"
        checked += 1
    assert checked  # at least one help text has a bracketed word (the classifier's recipe argument)
