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
                   if re.match(r"^\s*[a-z_]+\s*=", line) and "#" not in line]
    assert not uncommented


def test_recipes_cover_the_issue_list():
    assert {p.stem for p in RECIPES} >= {"quickstart", "lsun", "celeba", "cifar10", "imagenet128"}
    paper = load_recipe(ROOT / "recipes" / "imagenet128.toml")
    assert (paper.model.arch, paper.model.attention, paper.model.g_attention, paper.model.d_attention) == \
        ("resnet", "paper", [32], [32])
    assert (paper.train.batch_size, paper.model.num_classes, paper.train.lr_g, paper.train.lr_d) == (256, 1000, 1e-4, 4e-4)


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
