"""One SAGAN training step as two phases, each a network update over explicit tensors.

- `d_phase(real, labels, z, fake_labels)`: D learns real from fake. Real and fake go through D in ONE
  batch (D has no BatchNorm, so this is exact and runs spectral norm's power iteration once).
- `g_phase(z, fake_labels)`: G learns to fool D. D runs in eval mode with frozen weights, so the
  gradient reaches G only and spectral norm reuses the vectors the D phase just refined.

Nothing in a phase waits for the device: the finiteness of each update is a device tensor handed to the
optimizer as `found_inf` (the fused Adam kernels then skip the update on the device; devices without
them read the flag on the host, see `update_plan`), and the
losses come back as device tensors that the loop reads only when it logs. Each phase is a plain function
of tensors, so it can be timed, skipped or compiled on its own (D's loss and G's loss are separate
compiled frames, one per `requires_grad` state of D's weights: pytorch issue 139476 is about sharing one).
With `train.augment`, every image D sees in either phase is first augmented (`augment.py`), eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sagan_cli.model.layers import power_iterations
from sagan_cli.model.losses import d_loss, g_loss, gradient_penalty
from sagan_cli.training.augment import make_augment

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DStats:
    loss: torch.Tensor  # D's loss (0-dim, on the device)
    real: torch.Tensor  # mean D output on the real images
    fake: torch.Tensor  # mean D output on the fakes
    bad: torch.Tensor  # 1.0 when the update was skipped (a non-finite loss or gradient), else 0.0
    diverged: torch.Tensor  # 1.0 when the skip counts towards train.max_bad_steps (not an fp16 scaler overflow)


@dataclass
class GStats:
    loss: torch.Tensor
    bad: torch.Tensor
    diverged: torch.Tensor


@dataclass(frozen=True)
class UpdatePlan:
    """How a device skips a non-finite update: fused Adam reads `found_inf` on the device (CPU, CUDA);
    elsewhere foreach Adam, which refuses `found_inf`, so the host reads the flag (one wait per update)."""

    fused: bool
    device_skip: bool


def update_plan(device_type: str, precision: str) -> UpdatePlan:
    """The optimizer implementation and loss scaling for a device type; refuses what it cannot train."""
    from sagan_cli.errors import UserError

    if precision == "fp16" and device_type not in ("cpu", "cuda"):
        raise UserError(f'train.mixed_precision = "fp16" (loss scaling) trains on cpu and cuda only, not on '
                        f'{device_type}; use "bf16" or "no" there')
    if device_type in ("cpu", "cuda"):
        return UpdatePlan(fused=True, device_skip=True)
    return UpdatePlan(fused=False, device_skip=False)  # mps, xpu, ...: foreach Adam, skipped by the host


def make_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], plan: UpdatePlan) -> torch.optim.Adam:
    """Adam as one fused kernel per step where the plan says so (CPU and CUDA), else foreach."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, fused=plan.fused,
                            foreach=None if plan.fused else True)


def not_finite(optimizer: torch.optim.Optimizer, loss: torch.Tensor, found: torch.Tensor | None = None) -> torch.Tensor:
    """1.0 when the loss or any gradient is not finite (else 0.0), on the device: no host synchronisation.

    One kernel checks every gradient (GradScaler's, with a unit scale). `found`: a flag to start from (fp16:
    the loss's own flag, kept apart to tell divergence from a scaler overflow); it is raised in place.
    """
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if found is None:
        found = loss_not_finite(loss)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones((), device=found.device))
    return found


def loss_not_finite(loss: torch.Tensor) -> torch.Tensor:
    return torch.isnan(loss.detach().float() * 0).float()  # x * 0 is NaN exactly when x is not finite


class Phases:
    """The D and G updates of one step; everything is resolved here, once, never inside the loop.

    `generator`/`discriminator` are what trains (DDP wrappers under multi-process), `raw_d` the bare D
    used frozen in the G phase. With `reuse_fakes`, the D phase's fakes are drawn with G's graph kept,
    and the G phase reuses them: one G forward per step instead of two.
    """

    def __init__(self, *, generator: nn.Module, discriminator: nn.Module, raw_g: nn.Module, raw_d: nn.Module,
                 opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, loss: str, gp_weight: float,
                 precision: str, device: torch.device, channels_last: bool, compile: bool = False,
                 reduce_flag=None, plan: UpdatePlan | None = None, augment: str = ""):
        self.generator, self.discriminator, self.raw_g, self.raw_d = generator, discriminator, raw_g, raw_d
        # eager: each network's power iterations batched into a few kernels before its training forward
        self.power_iterations = (lambda model: None) if compile else power_iterations
        self.opt_g, self.opt_d = opt_g, opt_d
        self.loss, self.gp_weight = loss, gp_weight
        self.device = device
        self.plan = plan or update_plan(device.type, precision)
        self.dtype = HALF.get(precision)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # fp16 only: one loss scaler per network, so an overflow in D does not lower G's scale
        self.scalers = {name: torch.amp.GradScaler(device.type) if precision == "fp16" else None for name in "dg"}
        self.reduce_flag = reduce_flag or (lambda flag: flag)  # multi-process: the max over every rank
        self.pending_fake: torch.Tensor | None = None  # un-augmented: the G phase draws its own augmentation
        self.pending_labels: torch.Tensor | None = None
        # DiffAugment before D (eager, outside the compiled frames); "" is the identity: no op, no random draw
        self.augment = make_augment(augment)
        # torch.compile G's forward, D's loss and G's loss as separate frames (a graph that produced both
        # the fakes and D's loss would be freed by D's backward before the G phase needs it); the
        # backward passes run the compiled backward graphs, and the fused Adam steps stay eager.
        self.fakes = torch.compile(self._fakes) if compile else self._fakes
        self.d_forward = torch.compile(self._d_forward) if compile else self._d_forward
        self.g_forward = torch.compile(self._g_forward) if compile else self._g_forward

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def _update(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, scaler,
                base_loss: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward and Adam step, skipped when the loss or a gradient is not finite. Returns (skipped, diverged):
        under fp16 an overflow the scaler answers by lowering its scale (the loss finite, the scale still > 1) is
        routine, above all while it finds its level at the start, and does not count as divergence.
        `base_loss`: the loss whose finiteness tells (WGAN-GP: without the penalty, whose gradients are scaled)."""
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:  # fp32/bf16: one flag, and every skip counts
            loss.backward()
            bad = self.reduce_flag(not_finite(optimizer, loss))
            self._step(optimizer, bad)
            return bad, bad
        scaler.scale(loss).backward()  # fp16: scale the loss, then unscale the gradients (GradScaler tracks overflows)
        scaler.unscale_(optimizer)
        loss_bad = loss_not_finite(loss if base_loss is None else base_loss)
        bad, loss_bad = self.reduce_flag(torch.stack([not_finite(optimizer, loss, loss_bad.clone()), loss_bad])).unbind()
        self._step(optimizer, bad)
        diverged = bad * torch.maximum(loss_bad, (scaler._scale <= 1).float())  # the scale before update()
        scaler.update()
        return bad, diverged

    def _step(self, optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
        if self.plan.device_skip:  # fused Adam skips on the device
            optimizer.found_inf = bad
            optimizer.step()
        elif not bad.item():  # foreach Adam refuses found_inf: the host decides
            optimizer.step()

    def penalty_scale(self) -> torch.Tensor | None:
        """fp16: D's loss scale, for the gradient penalty's inner gradient (it must not underflow either)."""
        scaler = self.scalers["d"]
        return None if scaler is None else scaler.scale(torch.ones((), device=self.device))

    def _fakes(self, z: torch.Tensor, fake_labels: torch.Tensor | None) -> torch.Tensor:
        self.power_iterations(self.raw_g)
        with self.autocast():
            return self.generator(z, fake_labels)

    def _d_forward(self, real: torch.Tensor, labels: torch.Tensor | None, fake: torch.Tensor,
                   fake_labels: torch.Tensor | None):
        with self.autocast():
            both = torch.cat([real, fake.to(real.dtype)]).contiguous(memory_format=self.memory_format)
            both_labels = None if labels is None else torch.cat([labels, fake_labels])
            d_real, d_fake = self.discriminator(both, both_labels).float().split(real.shape[0])
            return d_loss(self.loss, d_real, d_fake), d_real, d_fake

    def _g_forward(self, fake: torch.Tensor, fake_labels: torch.Tensor | None) -> torch.Tensor:
        with self.autocast():
            return g_loss(self.loss, self.raw_d(fake.contiguous(memory_format=self.memory_format), fake_labels).float())

    def d_phase(self, real: torch.Tensor, labels: torch.Tensor | None, z: torch.Tensor,
                fake_labels: torch.Tensor | None, *, keep_fakes: bool = False) -> DStats:
        """One D update on a real batch and fakes from `z`; `keep_fakes` keeps G's graph for the G phase."""
        self.raw_d.train().requires_grad_(True)
        self.power_iterations(self.raw_d)
        with torch.set_grad_enabled(keep_fakes):
            fake = self.fakes(z, fake_labels)
        if keep_fakes:
            self.pending_fake, self.pending_labels = fake, fake_labels
        # D sees (and WGAN-GP penalises between) the augmented images: independent draws for real and fake
        real, fake = self.augment(real), self.augment(fake.detach())
        loss, d_real, d_fake = self.d_forward(real, labels, fake, fake_labels)
        base_loss = loss
        if self.loss == "wgan-gp":  # twice differentiated: eager, outside any compiled frame
            self.raw_d.eval()  # spectral norm keeps the vectors this phase's forward just refined
            with self.autocast():
                loss = loss + self.gp_weight * gradient_penalty(self.raw_d, real, fake, labels,
                                                                scale=self.penalty_scale())
            self.raw_d.train()
        bad, diverged = self._update(self.opt_d, loss, self.scalers["d"], base_loss)
        return DStats(loss.detach(), d_real.detach().mean(), d_fake.detach().mean(), bad, diverged)

    def g_phase(self, z: torch.Tensor | None, fake_labels: torch.Tensor | None) -> GStats:
        """One G update; z None: the fakes the last D phase kept (their graph through G is still alive)."""
        self.raw_d.eval().requires_grad_(False)
        if z is None:
            fake, fake_labels = self.pending_fake, self.pending_labels
            self.pending_fake = self.pending_labels = None
        else:
            fake = self.fakes(z, fake_labels)
        loss = self.g_forward(self.augment(fake), fake_labels)
        bad, diverged = self._update(self.opt_g, loss, self.scalers["g"])
        return GStats(loss.detach(), bad, diverged)
