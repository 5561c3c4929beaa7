"""`sagan_cli.layers`, the old flat path: self-attention, spectral norm and the other building blocks, now `sagan_cli.model.layers`.

Kept so existing imports (e.g. `from sagan_cli.layers import ...`) keep working; new code imports `sagan_cli.model.layers`.
"""

from sagan_cli.model.layers import *  # noqa: F403
