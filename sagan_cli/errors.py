"""The one exception type the command line turns into a one-line message and exit code 2."""


class UserError(Exception):
    """A problem with what the user gave us (file, recipe, option), not a bug in sagan.

    The message is shown alone on stderr, so it must name the problem and the fix.
    """
