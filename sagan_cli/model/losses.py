"""GAN losses as plain functions of the discriminator's outputs (logits)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

LOSSES = ("hinge", "nonsaturating", "wgan-gp")


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss (without the gradient penalty, see `gradient_penalty`)."""
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    if kind == "nonsaturating":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "wgan-gp":
        return fake.mean() - real.mean()
    raise ValueError(f"unknown loss {kind!r}; choose from {LOSSES}")


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """Generator loss: hinge and WGAN share -E[D(G(z))]; non-saturating is -log sigmoid(D(G(z)))."""
    if kind in ("hinge", "wgan-gp"):
        return -fake.mean()
    if kind == "nonsaturating":
        return F.softplus(-fake).mean()
    raise ValueError(f"unknown loss {kind!r}; choose from {LOSSES}")


def gradient_penalty(
    discriminator: Callable[..., torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """WGAN-GP: E[(||grad_x D(x)||_2 - 1)^2] at random points between real and fake images.

    `scale` (fp16): the inner gradient is taken of the scaled output, as the loss's are, then unscaled, so
    that fp16 intermediate gradients neither underflow nor go unnoticed when they overflow."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    # The penalty is differentiated twice; the fused attention kernels have no double backward,
    # so this one forward uses the math kernel (D's maps are small where this loss is used).
    with sdpa_kernel([SDPBackend.MATH]):
        out = discriminator(mixed, labels) if labels is not None else discriminator(mixed)
        total = out.sum() if scale is None else out.float().sum() * scale
        (grad,) = torch.autograd.grad(total, mixed, create_graph=True)
    if scale is not None:
        grad = grad / scale
    return ((grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()
