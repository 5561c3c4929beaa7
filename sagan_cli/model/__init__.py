"""The model: what a SAGAN is, independent of how it is trained, evaluated or stored.

- `layers`: self-attention (`SelfAttention`), spectrally normalised layers, conditional BatchNorm, residual blocks.
- `models`: `Generator` and `Discriminator` in two families, built from a `ModelConfig`.
- `losses`: `d_loss`, `g_loss` and `gradient_penalty` as plain functions of D's logits.
- `generation`: driving a generator: `make_noise`, `make_labels`, `generate`, `iter_generate`, `to_uint8`.

Depends only on `sagan_cli.config` and `sagan_cli.errors`.
"""

__all__ = ["generation", "layers", "losses", "models"]
