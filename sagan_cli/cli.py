"""The `sagan` command line: thin Typer commands over functions you can call from Python.

A user error (bad file, recipe, option) raises UserError anywhere below; `main` prints it as one
line on stderr and exits with code 2. Only bugs show a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sagan_cli import __version__
from sagan_cli.errors import UserError

app = typer.Typer(
    name="sagan",
    help="Train, sample, evaluate and inspect Self-Attention GANs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"sagan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train, sample, evaluate and inspect Self-Attention GANs (Zhang et al. 2018)."""


@app.command(
    epilog="Example: sagan train recipes/quickstart.toml --out runs/quick --set train.steps=2000",
)
def train(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe (see recipes/).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory. [default: runs/RECIPE_NAME]")] = None,
    overrides: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a recipe key: table.key=value (repeatable).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its state/.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and exit.")] = False,
) -> None:
    """Train a SAGAN from a recipe: checkpoints, sample grids and metrics land in the run directory."""
    from sagan_cli.config import load_recipe
    from sagan_cli.train import print_recipe, run_training

    resolved = load_recipe(recipe, overrides or [])
    run_dir = out if out is not None else Path("runs") / resolved.name
    if dry_run:
        print_recipe(resolved, run_dir)
        return
    run_training(resolved, run_dir, resume=resume)


# --- sample (issue 4) ---

# --- attn-map (issue 4) ---

# --- eval (issue 5) ---

# --- info (issue 6) ---


def main() -> None:
    """Entry point of the `sagan` script: user errors become one line on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        # Usage errors (unknown option, bad value). Typer >= 0.20 vendors click, so match by shape.
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        hint = f" (see `sagan {command} --help`)" if command else " (see `sagan --help`)"
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)

if __name__ == "__main__":
    main()
