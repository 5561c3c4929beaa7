"""sagan: train, sample, evaluate and inspect Self-Attention GANs."""

__version__ = "0.1.0"
