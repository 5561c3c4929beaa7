"""How good a generator is: `sagan eval`'s metrics and the feature spaces they are measured in.

- `metrics`: `evaluate` and `evaluate_generator` (FID, IS, KID, precision/recall, GAN-test accuracy).
- `features`: feature spaces (Inception through torch-fidelity, our classifier) and cached reference features.
- `inception`: `find_inception_weights`, the local Inception-v3 weights, checked before any work.
- `classifier`: the small CNN trained on a labelled dataset (`sagan train-classifier`), an offline feature space.

Depends on `sagan_cli.data`, `sagan_cli.interchange` and `sagan_cli.model`.
"""

__all__ = ["classifier", "features", "inception", "metrics"]
