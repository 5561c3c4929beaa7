"""`sagan_cli.attention`, the old flat path: attention maps, now `sagan_cli.inspection.attention`.

Kept so existing imports (e.g. `from sagan_cli.attention import ...`) keep working; new code imports `sagan_cli.inspection.attention`.
"""

from sagan_cli.inspection.attention import *  # noqa: F403
