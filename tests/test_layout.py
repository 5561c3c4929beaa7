"""The package layout (README, "Reading the code"): imports run one way between sagan_cli's sub-packages,
and the old flat import paths still give the same objects."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import import_graph  # noqa: E402


def test_the_layout_has_no_cycle_no_upward_import_and_no_private_import_across_packages():
    imports = import_graph.all_imports()
    assert len(imports) > 100  # the parser found the package's imports
    assert import_graph.problems(imports) == []


def test_each_kind_of_violation_is_reported():
    def imp(module, target, *names):
        return import_graph.Import(module, target, names)

    bad = [imp("sagan_cli.model.models", "sagan_cli.training.step", "update_plan"),
           imp("sagan_cli.training.step", "sagan_cli.model.layers", "_private"),
           imp("sagan_cli.data.datasets", "sagan_cli.cli.app", "main"),
           imp("sagan_cli.evaluation.metrics", "sagan_cli.sample", "to_uint8")]
    assert import_graph.problems(bad) == [
        "cycle: model -> training -> model", "data imports the command line", "evaluation imports the old-path shims",
        "sagan_cli.training.step imports private _private from sagan_cli.model.layers"]
    assert import_graph.find_cycle(Counter({("a", "b"): 1, ("b", "c"): 1})) is None


def test_old_flat_import_paths_give_the_moved_objects():
    from sagan_cli.attention import attention_view
    from sagan_cli.cli import app, main
    from sagan_cli.cli.app import app as typer_app
    from sagan_cli.cli.app import main as entry_point
    from sagan_cli.evaluation.metrics import evaluate as moved_evaluate
    from sagan_cli.inspection.attention import attention_view as moved_view
    from sagan_cli.inspection.sample import sample_images as moved_sample_images
    from sagan_cli.layers import SelfAttention
    from sagan_cli.metrics import evaluate
    from sagan_cli.model.generation import generate as moved_generate
    from sagan_cli.model.layers import SelfAttention as MovedSelfAttention
    from sagan_cli.model.models import Generator as MovedGenerator
    from sagan_cli.models import Generator
    from sagan_cli.sample import generate, sample_images

    assert SelfAttention is MovedSelfAttention and Generator is MovedGenerator  # DESIGN.md names the old path
    assert generate is moved_generate and sample_images is moved_sample_images
    assert evaluate is moved_evaluate and attention_view is moved_view
    assert app is typer_app and main is entry_point  # pyproject's `sagan = "sagan_cli.cli:main"`
