"""The command line: the Typer `app`, its entry point `main`, and each command's glue.

- `app`: every `sagan` command as a thin Typer function; torch loads only when a command needs it.
- `attn_map_command`, `eval_command`, `info`: the commands with more than a call's worth of glue.

The only package that may import from every other; nothing imports from it (but `python -m sagan_cli`).
"""

from sagan_cli.cli.app import app, main

__all__ = ["app", "main"]
