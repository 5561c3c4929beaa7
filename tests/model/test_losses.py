"""GAN losses on hand-computed inputs, and the WGAN-GP gradient penalty on linear critics."""

import math

import pytest
import torch

from sagan_cli.model.losses import LOSSES, d_loss, g_loss, gradient_penalty

REAL = torch.tensor([2.0, 0.5, 0.0, math.log(3.0)])
FAKE = torch.tensor([-2.0, 0.5, 0.0, -math.log(3.0)])


def test_hinge():
    # relu(1 - real) = [0, .5, 1, 1 - ln 3]; relu(1 + fake) = [0, 1.5, 1, 0]  (1 - ln 3 < 0 -> 0)
    assert d_loss("hinge", REAL, FAKE).item() == pytest.approx((0.5 + 1) / 4 + (1.5 + 1) / 4)
    assert g_loss("hinge", FAKE).item() == pytest.approx(-(0.5 - math.log(3.0) - 2) / 4)


def test_nonsaturating():
    # softplus(-ln 3) = ln(4/3), softplus(0) = ln 2, softplus(-2) = ln(1 + e^-2)
    sp = lambda t: math.log1p(math.exp(t))  # noqa: E731
    want_d = (sp(-2) + sp(-0.5) + sp(0) + math.log(4 / 3)) / 4 + (sp(-2) + sp(0.5) + sp(0) + math.log(4 / 3)) / 4
    assert d_loss("nonsaturating", REAL, FAKE).item() == pytest.approx(want_d, rel=1e-6)
    assert g_loss("nonsaturating", torch.tensor([0.0, math.log(3.0)])).item() == pytest.approx(
        (math.log(2) + math.log(4 / 3)) / 2, rel=1e-6)


def test_wgan():
    assert d_loss("wgan-gp", REAL, FAKE).item() == pytest.approx(FAKE.mean().item() - REAL.mean().item())
    assert g_loss("wgan-gp", FAKE).item() == pytest.approx(-FAKE.mean().item())


def test_unknown_loss_names_the_choices():
    for fn, args in ((d_loss, (REAL, FAKE)), (g_loss, (FAKE,))):
        with pytest.raises(ValueError, match="hinge"):
            fn("least-squares", *args)
    assert set(LOSSES) == {"hinge", "nonsaturating", "wgan-gp"}


def linear_critic(scale: float):
    """D(x) = scale * <w, x> with ||w|| = 1: its input gradient has norm exactly |scale| everywhere."""
    torch.manual_seed(0)
    w = torch.randn(3 * 8 * 8)
    w = (w / w.norm()).requires_grad_(True)
    return w, lambda x, labels=None: scale * (x.flatten(1) @ w) + (0 if labels is None else labels.float())


def test_gradient_penalty_is_zero_for_a_unit_gradient_critic():
    _, critic = linear_critic(1.0)
    real, fake = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(0.0, abs=1e-10)
    assert gradient_penalty(critic, real, fake, torch.tensor([0, 1, 2, 3])).item() == pytest.approx(0.0, abs=1e-10)


def test_gradient_penalty_is_positive_otherwise_and_trains_the_critic():
    w, critic = linear_critic(3.0)
    real, fake = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8, requires_grad=True)
    gp = gradient_penalty(critic, real, fake)
    assert gp.item() == pytest.approx((3.0 - 1.0) ** 2, rel=1e-5)
    gp.backward()  # the penalty must reach the critic's weights (create_graph), not the images
    assert w.grad is not None and w.grad.norm() > 0
    assert fake.grad is None
    _, half = linear_critic(0.5)
    assert gradient_penalty(half, real, fake).item() == pytest.approx(0.25, rel=1e-5)
