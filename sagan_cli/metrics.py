"""`sagan_cli.metrics`, the old flat path: sagan eval's library, now `sagan_cli.evaluation.metrics`.

Kept so existing imports (e.g. `from sagan_cli.metrics import ...`) keep working; new code imports `sagan_cli.evaluation.metrics`.
"""

from sagan_cli.evaluation.metrics import *  # noqa: F403
