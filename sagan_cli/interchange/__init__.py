"""Model files in and out: sagan's own checkpoints, other projects' weights, and exports for serving.

- `checkpoint`: `save_model`, `load_model`, `read_info` (safetensors files that carry their config) and
  `atomic_write`, which every file writer in the package uses.
- `port`, `studiogan`, `biggan`: `sagan import-*`, other projects' checkpoints as sagan files, read through
  `state_reader`.
- `export`: `sagan export`, a generator as ONNX or TorchScript.

Depends on `sagan_cli.model` (and config, errors).
"""

__all__ = ["biggan", "checkpoint", "export", "port", "state_reader", "studiogan"]
