"""`sagan_cli.sample`, the old flat path: now `sagan_cli.model.generation` (noise, labels, `generate`, `to_uint8`)
and `sagan_cli.inspection.sample` (`sample_images`, the PNG / NPZ writer).

Kept so existing imports (e.g. `from sagan_cli.sample import generate`) keep working; new code imports the new paths.
"""

from sagan_cli.inspection.sample import *  # noqa: F403
from sagan_cli.model.generation import *  # noqa: F403
