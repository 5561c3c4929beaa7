"""What the loop saves and restores: the resumable state (sagan_cli/state.py) and the exported models.

`SkipStreak` stops a diverged run before its checkpoint would save it: the skipped-step flags stay on
the device and are read only where the loop logs or checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console

from sagan_cli.checkpoint import save_model
from sagan_cli.config import Recipe
from sagan_cli.errors import UserError
from sagan_cli.monitor import truncate_log
from sagan_cli.nets import Nets
from sagan_cli.state import Progress, commit_state, latest_state, load_state, read_progress, save_state, together
from sagan_cli.step import Phases


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
        self.saved_step = progress.step
        nets, accelerator, main = self.nets, self.accelerator, self.accelerator.is_main_process
        scaler_states = {name: scaler.state_dict() for name, scaler in self.phases.scalers.items()
                         if scaler is not None}
        commit_state(accelerator, self.state_root, progress.step, keep=self.recipe.train.keep_checkpoints,
                     write=lambda folder: save_state(folder, models=nets.state_models(), progress=progress,
                                                     optimizers=nets.optimizers(), scalers=scaler_states,
                                                     rank=accelerator.process_index, main=main))
        together(accelerator, lambda: self._export(progress.step), main_only=True, what="write the checkpoints")

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
