"""The SAGAN generator and discriminator, in two families, built from a ModelConfig.

dcgan:  the popular PyTorch port's 64x64 model (transposed convs, LeakyReLU D), generalised to 32-256.
resnet: the paper's ImageNet model (residual up/down blocks, width `ch`).

Channel widths follow one rule per family, so any resolution gets a sensible network:
  dcgan  G: ch * min(8, R / 2s) channels at size s;   D: the mirror image.
  resnet G: ch * min(16, R / s) channels at size s;  D: ch * min(16, R / 2s), plus one extra block at 4x4.
At R = 64 (dcgan) and R = 128 (resnet) these are exactly the port's and the paper's widths.
Self-attention sits after every block whose output size is listed in g_attention / d_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sagan_cli.config import ModelConfig, validate_model
from sagan_cli.model.layers import (
    ClassBatchNorm2d,
    DCGANDownBlock,
    DCGANUpBlock,
    ResDownBlock,
    ResUpBlock,
    SelfAttention,
    init_weights,
    sn,
)


def _attention(sizes: list[int], widths: dict[int, int], config: ModelConfig, use_sn: bool) -> nn.ModuleDict:
    return nn.ModuleDict(
        {str(size): SelfAttention(widths[size], config.attention, use_sn, init=config.init)
         for size in sorted(set(sizes))}
    )


def _stages(blocks: nn.ModuleList, sizes: list[int], attention: nn.ModuleDict) -> list[tuple[nn.Module, nn.Module | None]]:
    """(block, the attention after it or None), in order: where attention sits is data, fixed at build time.

    A plain list (the modules stay registered under `blocks` and `attention`, so checkpoints keep their
    keys); a block past the last size (the resnet D's extra 4x4 block) gets none.
    """
    after = [attention[str(size)] if str(size) in attention else None for size in sizes]
    return list(zip(blocks, after + [None] * (len(blocks) - len(after)), strict=True))


def _check_labels(y: torch.Tensor | None, num_classes: int) -> None:
    if num_classes and y is None:
        raise ValueError(f"this model is class-conditional ({num_classes} classes): pass labels y")


class Generator(nn.Module):
    """z (and class labels) -> images in [-1, 1], `config.channels` of them (`to_rgb` keeps its name when 1:
    checkpoints store it)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        validate_model(config)
        self.config = config
        resolution, base_width, num_classes, use_sn = (config.resolution, config.g_ch, config.num_classes,
                                                       config.g_spectral_norm)
        last_sn = use_sn and config.sn_last_layer
        sizes = config.g_sizes()
        # BigGAN: one class embedding shared by every block (no spectral norm), z split over stem and blocks
        self.shared = (init_weights(nn.Embedding(num_classes, config.shared_embedding), config.init)
                       if config.shared_embedding else None)
        self.z_chunk = config.z_dim // config.hierarchical_slots() if config.hierarchical_z else 0
        if config.arch == "dcgan":
            widths = {size: base_width * min(8, resolution // (2 * size)) for size in sizes}
            self.stem = None
            blocks = [DCGANUpBlock(config.z_dim, widths[4], num_classes, use_sn, config.init, stem=True,
                                   eps=config.bn_eps)]
            blocks += [DCGANUpBlock(widths[size // 2], widths[size], num_classes, use_sn, config.init,
                                    eps=config.bn_eps) for size in sizes[1:]]
            self.final_bn = None
            self.to_rgb = sn(nn.ConvTranspose2d(widths[sizes[-1]], config.channels, 4, 2, 1), last_sn, config.init)
        else:
            widths = {size: base_width * min(16, resolution // size) for size in [4, *sizes]}
            if config.g_widths:
                widths = dict(zip([4, *sizes], config.g_widths, strict=True))
            stem_z = self.z_chunk if config.hierarchical_z else config.z_dim
            self.stem = sn(nn.Linear(stem_z, 4 * 4 * widths[4]), use_sn, config.init)
            cond_dim = config.shared_embedding + (self.z_chunk if config.hierarchical_z else 0)
            blocks = [ResUpBlock(widths[size // 2], widths[size], num_classes, use_sn, config.init, eps=config.bn_eps,
                                 cond_dim=cond_dim)
                      for size in sizes]
            self.final_bn = ClassBatchNorm2d(widths[resolution], 0, eps=config.bn_eps)
            self.to_rgb = sn(nn.Conv2d(widths[resolution], config.channels, 3, padding=1), last_sn, config.init)
        self.stem_channels = widths[4]
        self.blocks = nn.ModuleList(blocks)
        self.attention = _attention(config.g_attention, widths, config, use_sn)
        self.stages = _stages(self.blocks, sizes, self.attention)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        _check_labels(y, self.config.num_classes)
        conditions = [y] * len(self.blocks)
        if self.shared is not None:  # BigGAN: each block's BN sees [shared(y), its z chunk]
            embedded = self.shared(y)
            conditions = [embedded] * len(self.blocks)
            if self.z_chunk:
                z, *chunks = torch.split(z, self.z_chunk, dim=1)
                conditions = [torch.cat([embedded, chunk], 1) for chunk in chunks]
        if self.stem is None:
            h = z.view(z.shape[0], -1, 1, 1)
        else:
            h = self.stem(z).view(z.shape[0], self.stem_channels, 4, 4)
        for (block, attention), condition in zip(self.stages, conditions, strict=True):
            h = block(h, condition)
            if attention is not None:
                h = attention(h)
        if self.final_bn is not None:
            h = F.relu(self.final_bn(h))
        return torch.tanh(self.to_rgb(h))


class Discriminator(nn.Module):
    """images (and class labels) -> one realness score per image (projection term when conditional)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        validate_model(config)
        self.config = config
        resolution, base_width, use_sn = config.resolution, config.d_ch, config.d_spectral_norm
        last_sn = use_sn and config.sn_last_layer
        sizes = config.d_sizes()  # resolution/2, ..., 4
        if config.arch == "dcgan":
            widths = {size: base_width * min(8, resolution // (2 * size)) for size in sizes}
            blocks = [DCGANDownBlock(config.channels, widths[sizes[0]], use_sn, config.init)]
            blocks += [DCGANDownBlock(widths[2 * size], widths[size], use_sn, config.init) for size in sizes[1:]]
            self.head = sn(nn.Conv2d(widths[4], 1, 4), last_sn, config.init)  # 4x4 -> 1x1, as in the port
        else:
            # one width and one output size per block; the default: a halving block per size, one more at 4x4
            block_sizes = config.d_block_sizes or config.default_d_block_sizes()
            block_widths = config.d_widths or [base_width * min(16, resolution // (2 * size)) for size in block_sizes]
            inputs = [(config.channels, resolution), *zip(block_widths, block_sizes, strict=True)]
            blocks = [ResDownBlock(cin, cout, use_sn, config.init, first=index == 0, down=size < size_in,
                                   shortcut_relu=config.d_shortcut_relu)
                      for index, ((cin, size_in), cout, size) in enumerate(zip(inputs, block_widths, block_sizes, strict=False))]
            widths = {}
            for size, width in zip(block_sizes, block_widths, strict=True):
                widths.setdefault(size, width)  # attention sits after the first block of its size
            sizes = [size if index == 0 or size != block_sizes[index - 1] else -1
                     for index, size in enumerate(block_sizes)]  # -1: a repeated size, no attention after it
            self.head = sn(nn.Linear(block_widths[-1], 1), last_sn, config.init)
            widths[0] = block_widths[-1]
        self.blocks = nn.ModuleList(blocks)
        self.attention = _attention(config.d_attention, widths, config, use_sn)
        self.stages = _stages(self.blocks, sizes, self.attention)
        # projection discriminator (Miyato & Koyama 2018): + <embed(y), phi(x)>
        features = widths[0] if config.arch == "resnet" else widths[4]
        self.embed = (sn(nn.Embedding(config.num_classes, features), use_sn, config.init) if config.num_classes
                      else None)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        _check_labels(y, self.config.num_classes)
        h = x
        for block, attention in self.stages:
            h = block(h)
            if attention is not None:
                h = attention(h)
        if self.config.arch == "dcgan":
            out = self.head(h).flatten(1).sum(1)
            features = h.sum(dim=(2, 3))
        else:
            features = F.relu(h).sum(dim=(2, 3))
            out = self.head(features).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y) * features).sum(1)
        return out


def attention_layers(model: nn.Module) -> dict[str, SelfAttention]:
    """Every SelfAttention in a model, by qualified name (e.g. 'attention.32')."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SelfAttention)}


def gammas(model: nn.Module) -> dict[str, float]:
    """Each attention layer's gamma: how much the network has chosen to use non-local evidence."""
    return {name: float(layer.gamma.detach()) for name, layer in attention_layers(model).items()}


def build_models(config: ModelConfig) -> tuple[Generator, Discriminator]:
    return Generator(config), Discriminator(config)
