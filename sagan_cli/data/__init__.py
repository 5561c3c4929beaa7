"""Training images: the datasets, the raw formats they come in, and the synthetic data's structure checker.

- `datasets`: `build_dataset` (image folder, LSUN LMDB, IDX, CIFAR-10, synthetic) and `dataset_identity`.
- `formats`: MNIST-family IDX files and CIFAR-10 binary batches, read as distributed.
- `structure`: `score_images`, the synthetic dataset's mirrored-disc checker.

Depends only on `sagan_cli.config` and `sagan_cli.errors`.
"""

__all__ = ["datasets", "formats", "structure"]
