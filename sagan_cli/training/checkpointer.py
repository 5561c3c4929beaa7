"""What the loop saves and restores: the resumable state (sagan_cli/training/state.py) and the exported models.

`SkipStreak` stops a diverged run before its checkpoint would save it: the skipped-step flags stay on
the device and are read only where the loop logs or checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console

from sagan_cli.config import Recipe
from sagan_cli.errors import UserError
from sagan_cli.interchange.checkpoint import save_model
from sagan_cli.training.monitor import truncate_log
from sagan_cli.training.nets import Nets
from sagan_cli.training.state import (
    Progress,
    commit_state,
    latest_state,
    load_state,
    read_progress,
    save_state,
    together,
)
from sagan_cli.training.step import Phases


class Checkpointer:
    """state/step-N/ (models, optimizers, loss scales, RNG) for --resume; g.safetensors and d.safetensors to use."""

    def __init__(self, recipe: Recipe, run_dir: Path, accelerator: Accelerator, nets: Nets, phases: Phases):
        self.recipe, self.run_dir, self.accelerator, self.nets, self.phases = recipe, run_dir, accelerator, nets, phases
        self.state_root = run_dir / "state"
        self.saved_step = -1  # the step saved last: saving it again is a no-op

    def restore(self, folder: Path, console: Console) -> Progress:
        """Load the state in `folder`: models, optimizers, fp16 loss scales, RNG. The recipe's learning rates
        and betas apply from here on; log lines written after that state (a crash) are dropped."""
        nets, train, accelerator = self.nets, self.recipe.train, self.accelerator
        load_state(folder, models=nets.state_models(), optimizers=nets.optimizers(), rank=accelerator.process_index)
        progress, scaler_states = read_progress(folder)
        for optimizer, lr in ((nets.opt_g, train.lr_g), (nets.opt_d, train.lr_d)):
            for group in optimizer.param_groups:
                group["lr"], group["betas"] = lr, (train.beta1, train.beta2)
        for name, scaler in self.phases.scalers.items():  # fp16 loss scales
            if scaler is not None and name in scaler_states:
                scaler.load_state_dict(scaler_states[name])
        if accelerator.is_main_process:
            truncate_log(self.run_dir / "metrics.jsonl", progress.step)
            console.print(f"resumed from step {progress.step}", markup=False)
        return progress

    def save(self, progress: Progress) -> None:
        """Commit state/step-N (keeping `train.keep_checkpoints`), then rewrite the exported models."""
        if progress.step == self.saved_step:
            return
        self.check_finite(progress.step)
        self.saved_step = progress.step
        nets, accelerator, main = self.nets, self.accelerator, self.accelerator.is_main_process
        scaler_states = {name: scaler.state_dict() for name, scaler in self.phases.scalers.items()
                         if scaler is not None}
        commit_state(accelerator, self.state_root, progress.step, keep=self.recipe.train.keep_checkpoints,
                     write=lambda folder: save_state(folder, models=nets.state_models(), progress=progress,
                                                     optimizers=nets.optimizers(), scalers=scaler_states,
                                                     rank=accelerator.process_index, main=main))
        together(accelerator, lambda: self._export(progress.step), main_only=True, what="write the checkpoints")

    def check_finite(self, step: int) -> None:
        """Stop before saving a state (or exporting a model) with any non-finite tensor: weights, buffers (BatchNorm
        statistics, spectral-norm vectors), the EMA, Adam's moments. An update with finite losses and gradients
        can still overflow the weights, and nothing skips it; the state saved before stays the last good one."""
        named = [(f"{name}.{key}", value) for name, model in self.nets.state_models().items()
                 for key, value in model.state_dict().items()]
        named += [(f"optimizer {name}.{index}.{key}", value) for name, optimizer in self.nets.optimizers().items()
                  for index, values in optimizer.state_dict()["state"].items() for key, value in values.items()
                  if torch.is_tensor(value)]
        named = [(name, value) for name, value in named if value.is_floating_point()] + self._probe()
        device = self.accelerator.device  # Adam keeps its step counts on the CPU off fused/capturable devices
        finite = torch.stack([torch.isfinite(value).all().to(device) for _, value in named])
        flag = (~finite).any().float().reshape(1)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if flag.item() == 0:
            return
        bad = [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
        last = latest_state(self.state_root)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        error = UserError(f"training diverged: the state at step {step} is not finite "
                          f"({bad[0] if bad else 'on another process'}), so it was not saved ({where}); "
                          "try lower learning rates or train.mixed_precision = \"no\"")
        error.every_rank = True  # every rank reached this verdict together: the command line prints it once
        raise error

    @torch.no_grad()
    def _probe(self) -> list[tuple[str, torch.Tensor]]:
        """G's and the EMA's images of fixed noise and D's outputs on them, in eval mode (no statistics, vectors
        or RNG touched): finite weights of 1e38 are no good state either, and their outputs show it."""
        model, device, raw_d = self.recipe.model, self.accelerator.device, self.nets.raw_d
        z = torch.randn(2, model.z_dim, generator=torch.Generator().manual_seed(0)).to(device)
        labels = torch.zeros(2, dtype=torch.long, device=device) if model.num_classes else None
        outputs = []
        for name, generator in self.nets.state_models().items():
            if name == "d":
                continue
            modes = generator.training, raw_d.training
            generator.eval(), raw_d.eval()
            try:
                images = generator(z, labels)
                who = {"g": "G", "ema": "the EMA"}[name]
                outputs += [(f"{who}'s images", images), (f"D's outputs on {who}'s images", raw_d(images, labels))]
            finally:
                generator.train(modes[0]), raw_d.train(modes[1])
        return outputs

    def _export(self, step: int) -> None:
        nets, name = self.nets, self.recipe.name
        save_model(self.run_dir / "g.safetensors", nets.exported_g(), step=step, recipe=name, ema=nets.ema is not None)
        save_model(self.run_dir / "d.safetensors", nets.raw_d, step=step, recipe=name)


class SkipStreak:
    """Consecutive skipped steps, counted on the device; `check` stops the run at `train.max_bad_steps`."""

    def __init__(self, recipe: Recipe, run_dir: Path, device: torch.device):
        self.limit, self.state_root = recipe.train.max_bad_steps, run_dir / "state"
        self.current = torch.zeros((), device=device)
        self.longest = torch.zeros((), device=device)  # the longest streak since the last check

    def add(self, bad: torch.Tensor) -> None:
        self.current = (self.current + 1) * bad
        self.longest = torch.maximum(self.longest, self.current)

    def check(self, step: int) -> None:
        """Reads the device (call it only where the loop waits anyway: logging, checkpoints)."""
        longest = int(self.longest.item())
        self.longest = self.current.clone()
        if longest >= self.limit:
            last = latest_state(self.state_root)
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise UserError(
                f"training diverged: non-finite losses for {longest} consecutive steps by step {step} "
                f"({where}); try lower learning rates or train.mixed_precision = \"no\""
            )
