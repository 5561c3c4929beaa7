"""What trains: G and D laid out and `prepare`d, TTUR Adam for each, the EMA of G, and the step's phases.

`run_training` and `benchmarks/train_step.py` both build through here, so the benchmark times the
networks exactly as training runs them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.utils import parametrize

from sagan_cli.config import Recipe
from sagan_cli.model.models import Discriminator, Generator
from sagan_cli.training.step import Phases, UpdatePlan, make_optimizer, update_plan


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


class EMA(nn.Module):
    """Exponential moving average of G's weights; buffers (BatchNorm stats, spectral-norm vectors) are copied.

    The copied BatchNorm statistics are those of G's current weights, not of the average. `standing_statistics`
    re-estimates them for the averaged weights before anything samples from the EMA (BigGAN's "standing
    statistics"); the next `update` copies G's again, so training and resume never see the re-estimate.
    """

    def __init__(self, generator: Generator, decay: float, start: int, *, batch_size: int = 64,
                 standing_batches: int = 32):
        super().__init__()
        self.model = copy.deepcopy(generator).eval().requires_grad_(False)
        self.decay, self.start = decay, start
        self.batch_size, self.standing_batches = batch_size, standing_batches
        self.statistics_fresh = False

    @torch.no_grad()
    def update(self, generator: nn.Module, step: int) -> None:
        weight = 1.0 - (self.decay if step >= self.start else 0.0)
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in generator.parameters()], weight)
        torch._foreach_copy_(list(self.model.buffers()), list(generator.buffers()))
        self.statistics_fresh = False

    @torch.no_grad()
    def standing_statistics(self) -> Generator:
        """The EMA with BatchNorm's running statistics measured on its own outputs: the cumulative mean and
        variance over `standing_batches` batches of fixed noise and uniform labels. Only BatchNorm runs in
        train mode (spectral norm keeps its vectors); training's RNG is not drawn from, so it is repeatable."""
        if self.statistics_fresh or not self.standing_batches:
            return self.model
        norms = batch_norms(self.model)
        if not norms:
            return self.model
        config, device = self.model.config, next(self.model.parameters()).device
        noise = torch.Generator().manual_seed(0)
        momenta = [norm.momentum for norm in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # None: a cumulative average over every batch since the reset
            norm.train()
        try:
            with parametrize.cached():
                for _ in range(self.standing_batches):
                    z = torch.randn(self.batch_size, config.z_dim, generator=noise)
                    labels = (torch.randint(0, config.num_classes, (self.batch_size,), generator=noise)
                              if config.num_classes else None)
                    self.model(z.to(device), None if labels is None else labels.to(device))
        finally:
            for norm, momentum in zip(norms, momenta, strict=True):
                norm.momentum = momentum
                norm.eval()
        self.statistics_fresh = True
        return self.model


class BatchNormGuard:
    """Undo what a skipped step did to G's BatchNorm statistics (its forwards ran before the skip).

    Without it, one non-finite forward leaves NaN running statistics in G, the EMA copies them, and every
    later checkpoint samples NaN. Snapshot before the step; restore on the device when it was bad.
    """

    def __init__(self, generator: nn.Module):
        self.buffers = [buffer for module in batch_norms(generator) for buffer in module.buffers()]
        self.saved = [buffer.clone() for buffer in self.buffers]
        self.statistics = [buffer for buffer in self.buffers if buffer.is_floating_point()]  # not the step counts
        self.unit = torch.ones((), device=self.buffers[0].device) if self.buffers else None

    def snapshot(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def restore_if(self, g_skipped: torch.Tensor) -> None:
        """Restore when G's update was skipped or the statistics themselves are not finite; a skip of D alone
        keeps them (G's forwards were sound, and its update went ahead)."""
        if not self.buffers:
            return
        broken = torch.zeros((), device=self.unit.device)  # one kernel checks every statistic (times 1: unchanged)
        torch._amp_foreach_non_finite_check_and_unscale_(self.statistics, broken, self.unit)
        bad = torch.maximum(g_skipped, broken)
        for buffer, saved in zip(self.buffers, self.saved, strict=True):
            buffer.copy_(torch.where(bad > 0, saved, buffer))


@dataclass
class Nets:
    """What trains: G and D (DDP wrappers under multi-process), their bare modules, Adam each, the EMA."""

    generator: nn.Module
    discriminator: nn.Module
    raw_g: Generator
    raw_d: Discriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: EMA | None
    plan: UpdatePlan  # how the device's Adam skips a non-finite update

    def exported_g(self) -> Generator:
        """The generator that g.safetensors, sample grids and evaluation use: the EMA (with its own BatchNorm
        statistics) when there is one."""
        return self.ema.standing_statistics() if self.ema is not None else self.raw_g

    def state_models(self) -> dict[str, nn.Module]:
        """The modules a resumable state holds, by the names its files use."""
        models = {"g": self.raw_g, "d": self.raw_d}
        if self.ema is not None:
            models["ema"] = self.ema.model
        return models

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"g": self.opt_g, "d": self.opt_d}


def build_nets(recipe: Recipe, accelerator: Accelerator) -> Nets:
    """G, D, TTUR Adam and the EMA, laid out and `prepare`d as training uses them."""
    train, model = recipe.train, recipe.model
    generator, discriminator = Generator(model), Discriminator(model)
    if train.channels_last:
        generator = generator.to(memory_format=torch.channels_last)
        discriminator = discriminator.to(memory_format=torch.channels_last)
    device = accelerator.device
    generator, discriminator = generator.to(device), discriminator.to(device)
    ema = (EMA(generator, train.ema_decay, train.ema_start, batch_size=train.batch_size,
               standing_batches=train.ema_standing_stats) if train.ema else None)
    betas, plan = (train.beta1, train.beta2), update_plan(device.type, train.mixed_precision)
    opt_g = make_optimizer(generator, train.lr_g, betas, plan)
    opt_d = make_optimizer(discriminator, train.lr_d, betas, plan)
    # prepare() only places and (multi-process) wraps: mixed precision is the phases' one autocast
    wrapped_g, wrapped_d, opt_g, opt_d = accelerator.prepare(generator, discriminator, opt_g, opt_d)
    return Nets(wrapped_g, wrapped_d, generator, discriminator, opt_g, opt_d, ema, plan)


def make_phases(recipe: Recipe, nets: Nets, accelerator: Accelerator) -> Phases:
    """The D and G updates with every option resolved: loss, precision, layout, compiling, the flag all-reduce,
    the augmentation before D."""
    train = recipe.train
    precision = train.mixed_precision  # fp16 on a CPU too: autocast in float16 with loss scaling, as on CUDA

    def any_rank(flag: torch.Tensor) -> torch.Tensor:  # on the device: no wait
        return (accelerator.reduce(flag, reduction="sum") > 0).float()

    return Phases(generator=nets.generator, discriminator=nets.discriminator, raw_g=nets.raw_g, raw_d=nets.raw_d,
                  opt_g=_unwrap_optimizer(nets.opt_g), opt_d=_unwrap_optimizer(nets.opt_d), loss=train.loss,
                  gp_weight=train.gp_weight, precision=precision, device=accelerator.device,
                  channels_last=train.channels_last, compile=train.compile,
                  reduce_flag=any_rank if accelerator.num_processes > 1 else None, plan=nets.plan,
                  augment=train.augment)


def _unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper would sync on every step()
