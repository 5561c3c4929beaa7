"""`sagan_cli.models`, the old flat path: the generator and discriminator, now `sagan_cli.model.models`.

Kept so existing imports (e.g. `from sagan_cli.models import ...`) keep working; new code imports `sagan_cli.model.models`.
"""

from sagan_cli.model.models import *  # noqa: F403
