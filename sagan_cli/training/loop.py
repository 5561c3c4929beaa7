"""The training loop: set up, then one plain loop that runs a step and whatever is due after it.

The pieces it calls, one concern each: `run_folder` (what may start or resume where), `nets` (G, D, Adam,
EMA), `step` (the D and G phases), `batches` (real images and noise), `monitor` (log, grids, evaluation)
and `checkpointer` (the resumable state and the exported models).

Exact resume: the state restores models, optimizers, loss scales and every RNG, and the data order is a
pure function of (seed, position). Nothing in a step waits for the device: losses, the skip flags and
the skip streak stay on the device and are read only when the loop logs, samples or checkpoints.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, set_seed
from rich.console import Console

from sagan_cli.config import Recipe
from sagan_cli.data.datasets import build_dataset
from sagan_cli.errors import UserError
from sagan_cli.inspection.attention_stats import AttentionProbe
from sagan_cli.model.models import Discriminator, Generator
from sagan_cli.training.batches import Data, Noise
from sagan_cli.training.checkpointer import Checkpointer, SkipStreak
from sagan_cli.training.launcher import die_with_launcher
from sagan_cli.training.monitor import Monitor, TrainingLog
from sagan_cli.training.nets import BatchNormGuard, build_nets, make_phases
from sagan_cli.training.run_folder import check_run_folder, start_run_folder
from sagan_cli.training.run_lock import lock_run_folder, releases_run_lock
from sagan_cli.training.state import Progress
from sagan_cli.training.step import DStats, GStats, Phases, update_plan

EVAL_TIMEOUT = timedelta(hours=3)  # collectives wait this long while rank 0 evaluates (NCCL's default: 10 min)


@dataclass
class TrainResult:
    generator: Generator  # the trained G (unwrapped)
    discriminator: Discriminator
    ema: Generator | None
    step: int
    run_dir: Path


def train_step(phases: Phases, data: Data, noise: Noise, *, d_steps: int,
               reuse_fakes: bool) -> tuple[DStats, GStats, torch.Tensor]:
    """`d_steps` D phases, then one G phase. Returns their device stats and 1.0 when any update was skipped
    for a reason that counts towards `train.max_bad_steps` (not an fp16 loss scaler finding its level)."""
    diverged = []
    for i in range(d_steps):
        real, labels = data.next()
        d_stats = phases.d_phase(real, labels, *noise.draw(), keep_fakes=reuse_fakes and i == d_steps - 1)
        diverged.append(d_stats.diverged)
    g_stats = phases.g_phase(*((None, None) if reuse_fakes else noise.draw()))
    return d_stats, g_stats, torch.stack([*diverged, g_stats.diverged]).amax()


@releases_run_lock
def run_training(recipe: Recipe, run_dir: Path, *, resume: bool = False, console: Console | None = None,
                 device: str | None = None) -> TrainResult:
    """Train (or resume) a SAGAN as the recipe says, writing the run directory (README, `sagan train`)."""
    train, run_dir, console = recipe.train, Path(run_dir), console or Console()
    # ---- 1. processes and checks: a bad folder, recipe, dataset or weights file is refused before writing ----
    die_with_launcher()  # under torchrun: this process ends with its launcher
    accelerator = make_accelerator(recipe, run_dir, device)
    lock_run_folder(run_dir, accelerator)  # one writer per folder: a second `sagan train` on it is refused
    saved = check_run_folder(recipe, run_dir, resume=resume, world_size=accelerator.num_processes,
                             rank=accelerator.process_index)
    dataset = build_dataset(recipe.data, recipe.model.resolution, recipe.model.num_classes,  # bad data fails here
                            recipe.model.channels)
    if recipe.eval.every:
        from sagan_cli.evaluation.metrics import check_evaluation

        check_evaluation(recipe)  # missing Inception weights fail now, not hours into the run
    start_run_folder(recipe, run_dir, accelerator, console, restart=resume and saved is None)
    # ---- 2. networks, the step's phases, the saved state, the inputs, the outputs ----
    set_seed(train.seed)
    nets = build_nets(recipe, accelerator)
    set_seed(train.seed + accelerator.process_index)  # same initial weights, but each process its own noise
    phases = make_phases(recipe, nets, accelerator)
    checkpointer = Checkpointer(recipe, run_dir, accelerator, nets, phases)
    progress = Progress(world_size=accelerator.num_processes)
    if saved is not None:
        progress = checkpointer.restore(saved, console)
    if train.tensorboard:
        accelerator.init_trackers("tensorboard")
    data, noise = Data(recipe, dataset, accelerator, progress.batches), Noise(recipe, accelerator.device)
    guard, streak = BatchNormGuard(nets.raw_g), SkipStreak(recipe, run_dir, accelerator.device)
    log = TrainingLog(run_dir, accelerator, console, total=train.steps, start=progress.step,
                      tensorboard=train.tensorboard, attention=AttentionProbe(recipe, nets.raw_g, nets.raw_d, dataset))
    monitor = Monitor(recipe, run_dir, nets, log, accelerator)

    def due(every: int) -> bool:  # every `every` steps, and at the last step
        return progress.step % every == 0 or progress.step == train.steps

    # ---- 3. train: a step, then whatever is due at that step ----
    with log, StopOnCtrlC(accelerator, every=train.log_every) as stop:
        if progress.step == 0:
            monitor.sample_grid(0)  # the untrained generator: the baseline every later grid is compared with
        while progress.step < train.steps:
            guard.snapshot()
            d_stats, g_stats, bad = train_step(phases, data, noise, d_steps=train.d_steps,
                                               reuse_fakes=train.reuse_fakes)
            guard.restore_if(g_stats.bad)  # a skipped G update leaves G's BatchNorm statistics as they were
            if nets.ema is not None:
                nets.ema.update(nets.raw_g, progress.step)
            streak.add(bad)
            progress.advance(d_steps=train.d_steps)
            log.count_images(train.batch_size * accelerator.num_processes)  # images generated, as 0.1.0 counted
            if due(train.log_every):
                streak.check(progress.step)
                log.write_step(progress.step, d_stats, g_stats, nets)
            else:
                log.progress(progress.step)
            if due(train.sample_every):
                monitor.sample_grid(progress.step)
            if recipe.eval.every and due(recipe.eval.every):
                monitor.evaluate(progress)
            if due(train.checkpoint_every):
                streak.check(progress.step)
                checkpointer.save(progress)
            if stop.requested(progress.step):
                streak.check(progress.step)
                checkpointer.save(progress)  # once per step: nothing to do right after a scheduled save
                log.say(f"interrupted: checkpoint saved at step {progress.step}; continue with --resume")
                break
    accelerator.wait_for_everyone()
    if train.tensorboard:
        accelerator.end_training()  # also destroys the process group: nothing collective after it
    return TrainResult(nets.raw_g, nets.raw_d, nets.ema.model if nets.ema is not None else None, progress.step, run_dir)


def make_accelerator(recipe: Recipe, run_dir: Path, device: str | None = None) -> Accelerator:
    """A fresh Accelerator (a second run in this process may differ), patient while rank 0 evaluates.

    `device` (--device): cpu, or the type of device Accelerate picks here (cuda, mps, xpu); anything else is
    refused, as is a precision the device cannot train (`update_plan`), before anything is written."""
    wanted = _device_type(device)
    AcceleratorState._reset_state(reset_partial_state=False)
    patience = [InitProcessGroupKwargs(timeout=EVAL_TIMEOUT)] if recipe.eval.every else None
    # mixed_precision="no": the recipe alone sets the precision (the phases' one autocast), never the
    # ACCELERATE_MIXED_PRECISION that `accelerate config` leaves behind (prepare() would wrap the forwards in it)
    accelerator = Accelerator(log_with="tensorboard" if recipe.train.tensorboard else None, project_dir=str(run_dir),
                              kwargs_handlers=patience, mixed_precision="no", cpu=wanted == "cpu")
    found = accelerator.device.type
    if wanted is not None and wanted != found:
        raise UserError(f"--device {device} is not available here (training would run on {found}); "
                        f"leave --device out or give {found}")
    update_plan(found, recipe.train.mixed_precision)  # e.g. fp16 on mps: refused now, not at step 1
    return accelerator


def _device_type(device: str | None) -> str | None:
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device; give cpu, cuda, mps or xpu") from None
    if parsed.index is not None:
        raise UserError(f"--device {device}: training takes a device type (cpu, cuda, mps, xpu); choose the GPUs "
                        "with CUDA_VISIBLE_DEVICES or `accelerate launch`") from None
    return parsed.type


class StopOnCtrlC:
    """First Ctrl-C: finish the step, checkpoint, exit 0; a second one aborts. Ranks agree every `every` steps."""

    def __init__(self, accelerator: Accelerator, *, every: int):
        self.accelerator, self.every, self.flag = accelerator, every, False

    def __enter__(self) -> StopOnCtrlC:
        self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)

    def _handler(self, signum, frame) -> None:
        self.flag = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def requested(self, step: int) -> bool:
        if self.accelerator.num_processes == 1:
            return self.flag
        if step % self.every:  # ranks agree at log steps only, where the loop waits for the device anyway
            return False
        flag = torch.tensor([float(self.flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
