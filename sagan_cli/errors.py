"""The one exception type the command line turns into a one-line message and exit code 2."""

import tempfile
from pathlib import Path


class UserError(Exception):
    """A problem with what the user gave us (file, recipe, option), not a bug in sagan.

    The message is shown alone on stderr, so it must name the problem and the fix.
    """


def check_writable(path: Path, option: str) -> None:
    """Fail before any work when an output file cannot be written (and never after minutes of it)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as exc:
        raise UserError(f"cannot write {option} {path} ({exc.strerror or exc}); choose a writable path") from None
