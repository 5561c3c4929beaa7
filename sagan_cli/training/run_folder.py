"""The run folder (README, `sagan train`): what may start or resume in it, and the recipe it records.

`check_run_folder` runs before anything is written, so a refused `sagan train` leaves a folder as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator
from rich.console import Console

from sagan_cli.config import Recipe, print_recipe, recipe_from_json
from sagan_cli.errors import UserError
from sagan_cli.interchange.checkpoint import atomic_write
from sagan_cli.training.state import latest_state, read_progress, read_rng, together

RUN_FILES = ("config.json", "g.safetensors", "d.safetensors", "metrics.jsonl")  # any of these (or the folders): a run
RUN_FOLDERS = ("samples", "state")
# Keys whose change would make a saved state meaningless: refused on --resume. Batch size: the data position;
# the seed and the data keys: the data order (bit-exact resume), all but data.workers, which only loads faster.
FROZEN_ON_RESUME = ("train.mixed_precision", "train.ema", "train.batch_size", "train.seed")
THAWED_DATA_KEYS = ("workers",)
TRAINED_FILES = ("g.safetensors", "d.safetensors", "g_best.safetensors")  # written after a committed state


def check_run_folder(recipe: Recipe, run_dir: Path, *, resume: bool, world_size: int, rank: int = 0) -> Path | None:
    """The state to resume from (None for a new run); refuses what would overwrite or corrupt a run."""
    state = latest_state(run_dir / "state")
    if not resume:
        if state is not None or _holds_run(run_dir):
            raise UserError(f"{run_dir} already holds a run; add --resume to continue it or choose another --out")
        return None
    if state is None:  # killed before its first checkpoint: start it again from step 0, once the recipe agrees
        if not _holds_run(run_dir):
            raise UserError(f"nothing to resume in {run_dir} (no run there); drop --resume to start a new run")
        trained = [name for name in TRAINED_FILES if (run_dir / name).exists()]
        if trained:  # exported only after a state was committed: that state is gone, the weights are not
            raise UserError(f"nothing to resume in {run_dir}: it has {trained[0]} but no state/ checkpoint "
                            "(deleted?); restarting would overwrite the trained weights, so start a new run "
                            "with another --out")
        if _readable_recipe(run_dir / "config.json"):
            _check_unchanged(recipe, run_dir)
        return None
    if not (run_dir / "config.json").is_file():
        raise UserError(f"cannot resume {run_dir}: its config.json is missing, so the recipe cannot be checked "
                        "against the saved state; restore it or start a new run with another --out")
    _check_unchanged(recipe, run_dir)
    progress, _ = read_progress(state)  # checked in full (and its sagan version) before anything is written
    if progress.world_size != world_size:
        raise UserError(f"--resume cannot change the number of processes ({progress.world_size} in the saved run, "
                        f"{world_size} now): the data order and each process's noise depend on it; "
                        f"launch {progress.world_size} processes")
    read_rng(state, rank)
    if recipe.train.steps < progress.step:
        raise UserError(f"train.steps = {recipe.train.steps} is below the saved step {progress.step}; "
                        "--resume only trains longer")
    return state


def _holds_run(run_dir: Path) -> bool:
    return (any((run_dir / name).exists() for name in RUN_FILES)
            or any((run_dir / name).is_dir() for name in RUN_FOLDERS))


def _readable_recipe(path: Path) -> bool:
    """config.json is there and parses (a run killed while writing it may have none, or a torn one)."""
    try:
        recipe_from_json(path)
    except UserError:
        return False
    return True


def _check_unchanged(recipe: Recipe, run_dir: Path) -> None:
    saved, new = recipe_from_json(run_dir / "config.json").to_dict(), recipe.to_dict()
    data = [f"data.{key}" for key in saved["data"] if key not in THAWED_DATA_KEYS]
    for dotted in [f"model.{key}" for key in saved["model"]] + list(FROZEN_ON_RESUME) + data:
        table, key = dotted.split(".")
        if saved[table][key] != new[table][key]:
            why = (": the data order would change, and the resumed run would not be the one it continues"
                   if table == "data" or dotted == "train.seed" else "")
            raise UserError(f"--resume cannot change {dotted} ({saved[table][key]!r} in the saved run, "
                            f"{new[table][key]!r} now){why}; start a new run with another --out")


def start_run_folder(recipe: Recipe, run_dir: Path, accelerator: Accelerator, console: Console, *,
                     restart: bool = False) -> None:
    """Once every rank has passed its checks: rank 0 shows the resolved recipe and writes config.json.
    `restart`: --resume on a run that never checkpointed; its log lines are dropped and it starts at step 0."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print_recipe(recipe, run_dir, console)
        if restart:
            console.print(f"{run_dir} has no checkpoint yet: starting it from step 0", markup=False)
    if restart:
        from sagan_cli.training.monitor import truncate_log

        together(accelerator, lambda: truncate_log(run_dir / "metrics.jsonl", -1), main_only=True,
                 what="write the run directory")
    text = json.dumps(recipe.to_dict(), indent=2) + "\n"
    together(accelerator, lambda: atomic_write(run_dir / "config.json", lambda tmp: Path(tmp).write_text(text)),
             main_only=True, what="write the run directory")
