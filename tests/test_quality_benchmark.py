"""benchmarks/quality.py: finished runs are not redone, unfinished ones are, and the table's spread is right.

The runs are built in-process (a real checkpoint at the recipe's last step, a saved eval and result) rather
than trained: two trainings and evaluations in subprocesses take minutes on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from sagan_cli.config import load_recipe
from sagan_cli.interchange.checkpoint import save_model
from sagan_cli.model.models import build_models

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quality  # noqa: E402

RECIPE = str(ROOT / "recipes" / "quickstart.toml")
OVERRIDES = ["train.steps=20", "model.g_ch=8", "model.d_ch=8"]
SCORES = {0: {"structure_valid_fraction": 0.25, "structure_symmetry_ratio": 0.9},
          1: {"structure_valid_fraction": 0.5, "structure_symmetry_ratio": 0.7},
          2: {"structure_valid_fraction": 0.125, "structure_symmetry_ratio": 0.8}}


def _finished_run(measurement: quality.Measurement, out: Path, seed: int, step: int = 20) -> None:
    """What a finished `sagan train` + `sagan eval` leaves: config.json, g.safetensors at `step`, eval and result JSON."""
    variant = quality.Variant("recipe")
    run_dir = out / "recipe" / f"seed-{seed}"
    run_dir.mkdir(parents=True)
    recipe = load_recipe(RECIPE, [*OVERRIDES, f"train.seed={seed}"])
    (run_dir / "config.json").write_text(json.dumps(recipe.to_dict()))
    generator, _ = build_models(recipe.model)
    save_model(run_dir / "g.safetensors", generator, step=step)
    (run_dir / quality.EVAL_FILE).write_text(json.dumps({"metrics": SCORES[seed], "protocol": {}}))
    result = quality.RunResult(variant="recipe", seed=seed, train_args=quality.train_args(measurement, variant, seed, run_dir),
                               eval_settings=quality.eval_settings(measurement), metrics=SCORES[seed],
                               train_seconds=60.0 + seed, eval_seconds=5.0, load_start=1.0, load_mean=1.5 + seed,
                               load_end=2.0, final_step=step)
    (out / "recipe" / f"seed-{seed}.json").write_text(json.dumps(asdict(result)))


def test_finished_runs_are_kept_and_tabulated_unfinished_ones_retrained(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "SAGAN", ["false"])  # any sagan command run from here fails loudly
    measurement = quality.Measurement(RECIPE, OVERRIDES, samples=64, metrics=["structure"], classifier=None,
                                      jobs=1, threads=None)
    for seed in (0, 1, 2):
        _finished_run(measurement, tmp_path, seed)

    results = quality.measure(measurement, [quality.Variant("recipe")], [0, 1, 2], tmp_path)
    assert [(r.seed, r.metrics) for r in results] == [(seed, SCORES[seed]) for seed in (0, 1, 2)]
    text = quality.table(measurement, results, None)
    rows = [line for line in text.splitlines() if line.startswith("| recipe |")]
    assert [row.split("|")[2].strip() for row in rows[:3]] == ["0", "1", "2"]
    saved = [json.loads((tmp_path / "recipe" / f"seed-{s}.json").read_text()) for s in (0, 1, 2)]
    valid = [run["metrics"]["structure_valid_fraction"] for run in saved]
    mean, spread = statistics.mean(valid), statistics.stdev(valid)
    summary = rows[3].split("|")
    assert summary[2].strip() == "3"
    assert summary[3].strip() == f"{mean:.4g} ± {spread:.2g} ({min(valid):.4g}-{max(valid):.4g})"
    assert summary[-3].strip() == "61"  # mean train seconds of 60, 61, 62

    # a run whose generator is short of the last step (interrupted) is trained again: here, `false` fails
    (tmp_path / "recipe" / "seed-1" / "g.safetensors").unlink()
    generator, _ = build_models(load_recipe(RECIPE, OVERRIDES).model)
    save_model(tmp_path / "recipe" / "seed-1" / "g.safetensors", generator, step=10)
    with pytest.raises(RuntimeError, match="false train .* failed"):
        quality.measure_run(measurement, quality.Variant("recipe"), 1, tmp_path)
