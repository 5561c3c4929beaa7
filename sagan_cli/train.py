"""The training loop: set up, then one plain loop that schedules the D and G phases (sagan_cli/step.py).

Exact resume: the state (sagan_cli/state.py) restores models, optimizers, loss scalers and every RNG; the
data order is a pure function of (seed, position), and the DataLoader never touches the global RNG.
Nothing in a step waits for the device: losses, the skip flags and the bad-step streak stay on the
device and are read only when the loop logs, samples or checkpoints.
"""

from __future__ import annotations

import copy
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, set_seed
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as Bar
from torch import nn
from torch.utils.data import DataLoader

from sagan_cli.checkpoint import atomic_write, save_model
from sagan_cli.config import Recipe, print_recipe, recipe_from_json
from sagan_cli.errors import UserError
from sagan_cli.models import Discriminator, Generator, gammas
from sagan_cli.state import Progress, commit_state, latest_state, load_state, read_progress, save_state, together
from sagan_cli.step import Phases, make_optimizer

GRID_SEED_OFFSET = 7919  # the fixed grid noise must not coincide with the training noise stream
STRUCTURE_SAMPLES = 256  # synthetic data: images scored by the structure checker at each sample grid
# Keys whose change would make a saved state meaningless: refused on --resume.
FROZEN_ON_RESUME = ("train.mixed_precision", "train.ema", "train.batch_size")  # batch size: the data position
RUN_FILES = ("config.json", "g.safetensors", "d.safetensors")  # a folder holding any of these is a run
EVAL_TIMEOUT = timedelta(hours=3)  # collectives wait this long while rank 0 evaluates (NCCL's default: 10 min)


class EMA(nn.Module):
    """Exponential moving average of G's weights; buffers (BatchNorm stats, spectral-norm vectors) are copied."""

    def __init__(self, generator: Generator, decay: float, start: int):
        super().__init__()
        self.model = copy.deepcopy(generator).eval().requires_grad_(False)
        self.decay, self.start = decay, start

    @torch.no_grad()
    def update(self, generator: nn.Module, step: int) -> None:
        weight = 1.0 - (self.decay if step >= self.start else 0.0)
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in generator.parameters()], weight)
        torch._foreach_copy_(list(self.model.buffers()), list(generator.buffers()))


class BatchNormGuard:
    """Undo what a skipped step did to G's BatchNorm statistics (its forwards ran before the skip).

    Without it, one non-finite forward leaves NaN running statistics in G, the EMA copies them, and every
    later checkpoint samples NaN. Snapshot before the step; restore on the device when it was bad.
    """

    def __init__(self, generator: nn.Module):
        self.buffers = [b for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in m.buffers()]
        self.saved = [b.clone() for b in self.buffers]

    def snapshot(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def restore_if(self, bad: torch.Tensor) -> None:
        for buffer, saved in zip(self.buffers, self.saved, strict=True):
            buffer.copy_(torch.where(bad > 0, saved, buffer))


def batch_indices(n: int, batch_size: int, seed: int, start_batch: int, rank: int, world: int) -> Iterator[list[int]]:
    """Endless batches of dataset indices: epoch e is a permutation seeded by (seed, e).

    Global batch b covers positions [b*B*W, (b+1)*B*W) of the concatenated epochs; rank r takes its
    slice. Starting at `start_batch` therefore resumes the exact same order.
    """
    per_step = batch_size * world
    cached_epoch, perm = -1, None
    batch = start_batch
    while True:
        first = batch * per_step + rank * batch_size
        indices = []
        for position in range(first, first + batch_size):
            epoch = position // n
            if epoch != cached_epoch:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                cached_epoch, perm = epoch, torch.randperm(n, generator=gen).tolist()
            indices.append(perm[position % n])
        yield indices
        batch += 1


def grid_inputs(recipe: Recipe, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed noise (and evenly spread classes) of the sample grids: the same at every step."""
    gen = torch.Generator().manual_seed(recipe.train.seed + GRID_SEED_OFFSET + offset)
    z = torch.randn(n, recipe.model.z_dim, generator=gen)
    classes = recipe.model.num_classes
    return z, (torch.arange(n) * classes // n if classes else None)


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

    def exported_g(self) -> Generator:
        return self.ema.model if self.ema is not None else self.raw_g


def build_nets(recipe: Recipe, accelerator: Accelerator) -> Nets:
    """G, D, TTUR Adam and the EMA, laid out and `prepare`d as training uses them (the benchmarks too)."""
    train, model = recipe.train, recipe.model
    generator, discriminator = Generator(model), Discriminator(model)
    if train.channels_last:
        generator = generator.to(memory_format=torch.channels_last)
        discriminator = discriminator.to(memory_format=torch.channels_last)
    device = accelerator.device
    generator, discriminator = generator.to(device), discriminator.to(device)
    ema = EMA(generator, train.ema_decay, train.ema_start) if train.ema else None
    betas = (train.beta1, train.beta2)
    opt_g = make_optimizer(generator, train.lr_g, betas, device)
    opt_d = make_optimizer(discriminator, train.lr_d, betas, device)
    # prepare() only places and (multi-process) wraps: mixed precision is the phases' one autocast
    wrapped_g, wrapped_d, opt_g, opt_d = accelerator.prepare(generator, discriminator, opt_g, opt_d)
    return Nets(wrapped_g, wrapped_d, generator, discriminator, opt_g, opt_d, ema)


def make_phases(recipe: Recipe, nets: Nets, accelerator: Accelerator) -> Phases:
    train = recipe.train
    precision = train.mixed_precision
    if precision == "fp16" and accelerator.device.type == "cpu":
        precision = "no"  # CPU has no fp16 speed-up; as before, fp16 on a CPU trains in fp32

    def any_rank(flag: torch.Tensor) -> torch.Tensor:  # on the device: no wait
        return (accelerator.reduce(flag, reduction="sum") > 0).float()

    return Phases(generator=nets.generator, discriminator=nets.discriminator, raw_g=nets.raw_g, raw_d=nets.raw_d,
                  opt_g=_unwrap_optimizer(nets.opt_g), opt_d=_unwrap_optimizer(nets.opt_d), loss=train.loss,
                  gp_weight=train.gp_weight, precision=precision, device=accelerator.device,
                  channels_last=train.channels_last, compile=train.compile,
                  reduce_flag=any_rank if accelerator.num_processes > 1 else None)


def _unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper would sync on every step()


class Data:
    """Endless (real images, labels) batches at the recipe's data position, on the device."""

    def __init__(self, recipe: Recipe, dataset, accelerator: Accelerator, start_batch: int):
        self.device = accelerator.device
        self.hflip, self.classes = recipe.data.hflip, recipe.model.num_classes
        self.memory_format = torch.channels_last if recipe.train.channels_last else torch.contiguous_format
        loader = DataLoader(
            dataset,
            batch_sampler=batch_indices(len(dataset), recipe.train.batch_size, recipe.train.seed, start_batch,
                                        accelerator.process_index, accelerator.num_processes),
            num_workers=recipe.data.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(recipe.train.seed),  # keeps the global RNG untouched
            persistent_workers=recipe.data.workers > 0,
        )
        self.batches = iter(loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = next(self.batches)
        images = images.to(self.device, non_blocking=True)
        if self.hflip:
            flip = torch.rand(images.shape[0], device=self.device) < 0.5  # the device RNG: restored on resume
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        images = images.contiguous(memory_format=self.memory_format)
        return images, (labels.to(self.device, non_blocking=True) if self.classes else None)


class Noise:
    """Training noise and fake labels, drawn on the device from its RNG (restored exactly on resume)."""

    def __init__(self, recipe: Recipe, device: torch.device):
        self.n, self.z_dim, self.classes, self.device = recipe.train.batch_size, recipe.model.z_dim, recipe.model.num_classes, device

    def draw(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(self.n, self.z_dim, device=self.device)
        return z, (torch.randint(0, self.classes, (self.n,), device=self.device) if self.classes else None)


def train_step(phases: Phases, data: Data, noise: Noise, *, d_steps: int, reuse_fakes: bool):
    """`d_steps` D phases, then one G phase. Returns the device tensors the loop logs."""
    skipped = []
    for i in range(d_steps):
        real, labels = data.next()
        d_stats = phases.d_phase(real, labels, *noise.draw(), keep_fakes=reuse_fakes and i == d_steps - 1)
        skipped.append(d_stats.bad)
    g_stats = phases.g_phase(*((None, None) if reuse_fakes else noise.draw()))
    return d_stats, g_stats, torch.stack([*skipped, g_stats.bad]).amax()  # 1.0 when any update was skipped


class RunLog:
    """metrics.jsonl (rank 0), TensorBoard through Accelerate, and the progress bar."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, console: Console, total: int, start: int,
                 tensorboard: bool):
        self.main, self.accelerator, self.tensorboard = accelerator.is_main_process, accelerator, tensorboard
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a") if self.main else None
        self.bar = Bar(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not self.main)
        self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def write(self, record: dict, say: str | None = None) -> None:
        if self.main:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if say:
                self.bar.console.print(say)
        if self.tensorboard:
            flat = {k: v for k, v in record.items() if isinstance(v, float)}
            flat.update({f"eval/{k}": v for k, v in record.get("eval", {}).items()})
            self.accelerator.log(flat, step=record["step"])

    def progress(self, step: int, info: str | None = None) -> None:
        self.bar.update(self.task, completed=step, **({"info": info} if info is not None else {}))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@dataclass
class TrainResult:
    generator: Generator  # the trained G (unwrapped)
    discriminator: Discriminator
    ema: Generator | None
    step: int
    run_dir: Path


def run_training(recipe: Recipe, run_dir: Path, *, resume: bool = False, console: Console | None = None) -> TrainResult:
    """Train (or resume) a SAGAN as the recipe says, writing the run directory of DESIGN.md."""
    from sagan_cli.data import build_dataset

    train, run_dir, console = recipe.train, Path(run_dir), console or Console()
    state_root = run_dir / "state"
    # ---- set up: processes, run folder, data, networks, saved state ----
    AcceleratorState._reset_state(reset_partial_state=False)  # a second run in this process may differ
    accelerator = Accelerator(log_with="tensorboard" if train.tensorboard else None, project_dir=str(run_dir),
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=EVAL_TIMEOUT)] if recipe.eval.every else None)
    main, device = accelerator.is_main_process, accelerator.device
    saved = _check_run_folder(recipe, run_dir, resume, accelerator.num_processes)
    dataset = build_dataset(recipe.data, recipe.model.resolution, recipe.model.num_classes,  # bad data.path fails here
                            recipe.model.channels)
    if recipe.eval.every:
        _check_eval(recipe)  # missing Inception weights fail now, not hours into the run
    accelerator.wait_for_everyone()  # every rank has checked before rank 0 writes
    if main:
        print_recipe(recipe, run_dir, console)
    together(accelerator, lambda: _write_config(recipe, run_dir), main_only=True, what="write the run directory")
    set_seed(train.seed)
    nets = build_nets(recipe, accelerator)
    set_seed(train.seed + accelerator.process_index)  # same initial weights, but each process its own noise
    progress, scalers = Progress(world_size=accelerator.num_processes), {}
    if saved is not None:
        progress, scalers = _resume(recipe, saved, nets, accelerator, run_dir, console)
    phases = make_phases(recipe, nets, accelerator)
    for name, scaler in phases.scalers.items():  # fp16 loss scales
        if scaler is not None and name in scalers:
            scaler.load_state_dict(scalers[name])
    if train.tensorboard:
        accelerator.init_trackers("tensorboard")
    data, noise = Data(recipe, dataset, accelerator, progress.batches), Noise(recipe, device)
    guard = BatchNormGuard(nets.raw_g)
    streak = torch.zeros((), device=device)  # consecutive skipped steps, and the longest since the last check
    worst = torch.zeros((), device=device)
    log = RunLog(run_dir, accelerator, console, train.steps, progress.step, train.tensorboard)
    stop = _StopOnCtrlC()

    def checkpoint() -> None:
        _check_streak(recipe, worst, progress.step, state_root)
        commit_state(accelerator, state_root, progress.step, train.keep_checkpoints,
                     lambda folder: save_state(folder, models=_state_models(nets), progress=progress,
                                               optimizers={"g": nets.opt_g, "d": nets.opt_d},
                                               scalers=_scaler_states(phases), rank=accelerator.process_index, main=main))
        together(accelerator, lambda: _export(nets, recipe, run_dir, progress.step), main_only=True,
                 what="write the checkpoints")

    # ---- train ----
    window_start, window_images = time.perf_counter(), 0
    try:
        with log.bar:
            if progress.step == 0:  # the untrained generator: the baseline every later grid is compared with
                together(accelerator, lambda: _sample_grid(recipe, nets, run_dir, 0, log), main_only=True,
                         what="write the sample grid")
            while progress.step < train.steps:
                guard.snapshot()
                d_stats, g_stats, bad = train_step(phases, data, noise, d_steps=train.d_steps,
                                                   reuse_fakes=train.reuse_fakes)
                guard.restore_if(bad)
                if nets.ema is not None:
                    nets.ema.update(nets.raw_g, progress.step)
                streak = (streak + 1) * bad
                worst = torch.maximum(worst, streak)
                progress.step += 1
                progress.batches += train.d_steps
                window_images += train.batch_size * accelerator.num_processes  # images generated per step, as in 0.1.0
                last_step = progress.step == train.steps
                if progress.step % train.log_every == 0 or last_step:
                    _check_streak(recipe, worst, progress.step, state_root)
                    worst = streak.clone()
                    now = time.perf_counter()
                    record = _record(progress.step, d_stats, g_stats, nets, window_images / max(now - window_start, 1e-9))
                    window_start, window_images = now, 0
                    log.write(record)
                    log.progress(progress.step, f"D {record['loss_d']:.3f}  G {record['loss_g']:.3f}  "
                                                f"{record['img_per_s']:.0f} img/s")
                else:
                    log.progress(progress.step)
                if progress.step % train.sample_every == 0 or last_step:
                    together(accelerator, lambda: _sample_grid(recipe, nets, run_dir, progress.step, log),
                             main_only=True, what="write the sample grid")
                if recipe.eval.every and (progress.step % recipe.eval.every == 0 or last_step):
                    together(accelerator, lambda: _evaluate(recipe, nets, run_dir, progress, log, device),
                             main_only=True, what="evaluate")
                if progress.step % train.checkpoint_every == 0 or last_step:
                    checkpoint()
                if stop.requested(accelerator, every=train.log_every, step=progress.step):
                    checkpoint()
                    if main:
                        console.print(f"interrupted: checkpoint saved at step {progress.step}; continue with --resume")
                    break
    finally:
        stop.restore()
        log.close()
    accelerator.wait_for_everyone()
    if train.tensorboard:
        accelerator.end_training()  # also destroys the process group: nothing collective after it
    return TrainResult(nets.raw_g, nets.raw_d, nets.ema.model if nets.ema is not None else None, progress.step, run_dir)


# ---- the pieces the loop calls ----

def _check_run_folder(recipe: Recipe, run_dir: Path, resume: bool, world: int) -> Path | None:
    """The state to resume from (None for a new run); refuses what would overwrite or corrupt a run."""
    state = latest_state(run_dir / "state")
    if not resume:
        if state is not None or any((run_dir / f).exists() for f in RUN_FILES):
            raise UserError(f"{run_dir} already holds a run; add --resume to continue it or choose another --out")
        return None
    if state is None or not (run_dir / "config.json").is_file():
        raise UserError(f"nothing to resume in {run_dir} (no state/ checkpoint); drop --resume to start a new run")
    saved = recipe_from_json(run_dir / "config.json").to_dict()
    new = recipe.to_dict()
    for dotted in [f"model.{k}" for k in saved["model"]] + list(FROZEN_ON_RESUME):
        table, key = dotted.split(".")
        if saved[table][key] != new[table][key]:
            raise UserError(f"--resume cannot change {dotted} ({saved[table][key]!r} in the saved run, "
                            f"{new[table][key]!r} now); start a new run with another --out")
    progress, _ = read_progress(state)
    if progress.world_size != world:
        raise UserError(f"--resume cannot change the number of processes ({progress.world_size} in the saved run, "
                        f"{world} now): the data order and each process's noise depend on it; "
                        f"launch {progress.world_size} processes")
    if recipe.train.steps < progress.step:
        raise UserError(f"train.steps = {recipe.train.steps} is below the saved step {progress.step}; "
                        "--resume only trains longer")
    return state


def _write_config(recipe: Recipe, run_dir: Path) -> None:
    text = json.dumps(recipe.to_dict(), indent=2) + "\n"
    atomic_write(run_dir / "config.json", lambda tmp: Path(tmp).write_text(text))


def _state_models(nets: Nets) -> dict[str, nn.Module]:
    models = {"g": nets.raw_g, "d": nets.raw_d}
    if nets.ema is not None:
        models["ema"] = nets.ema.model
    return models


def _resume(recipe: Recipe, folder: Path, nets: Nets, accelerator: Accelerator, run_dir: Path,
            console: Console) -> tuple[Progress, dict[str, dict]]:
    """Load the state in `folder`; returns its progress and the fp16 loss scalers' states."""
    load_state(folder, models=_state_models(nets), optimizers={"g": nets.opt_g, "d": nets.opt_d},
               rank=accelerator.process_index)
    progress, scalers = read_progress(folder)
    train = recipe.train
    for optimizer, lr in ((nets.opt_g, train.lr_g), (nets.opt_d, train.lr_d)):  # new learning rates apply
        for group in optimizer.param_groups:
            group["lr"], group["betas"] = lr, (train.beta1, train.beta2)
    if accelerator.is_main_process:
        _truncate_log(run_dir / "metrics.jsonl", progress.step)
        console.print(f"resumed from step {progress.step}")
    return progress, scalers


def _scaler_states(phases: Phases) -> dict[str, dict]:
    return {name: scaler.state_dict() for name, scaler in phases.scalers.items() if scaler is not None}


def _export(nets: Nets, recipe: Recipe, run_dir: Path, step: int) -> None:
    save_model(run_dir / "g.safetensors", nets.exported_g(), step=step, recipe=recipe.name, ema=nets.ema is not None)
    save_model(run_dir / "d.safetensors", nets.raw_d, step=step, recipe=recipe.name)


def _check_streak(recipe: Recipe, worst: torch.Tensor, step: int, state_root: Path) -> None:
    """Stop once `max_bad_steps` consecutive steps were skipped (read here, at log and checkpoint steps only)."""
    longest = int(worst.item())
    if longest >= recipe.train.max_bad_steps:
        last = latest_state(state_root)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise UserError(
            f"training diverged: non-finite losses for {longest} consecutive steps by step {step} "
            f"({where}); try lower learning rates or train.mixed_precision = \"no\""
        )


def _record(step: int, d_stats, g_stats, nets: Nets, img_per_s: float) -> dict:
    loss_d, loss_g, d_real, d_fake = torch.stack([d_stats.loss, g_stats.loss, d_stats.real, d_stats.fake]).tolist()
    return {
        "step": step, "loss_d": loss_d, "loss_g": loss_g, "d_real": d_real, "d_fake": d_fake, "img_per_s": img_per_s,
        "lr_g": nets.opt_g.param_groups[0]["lr"], "lr_d": nets.opt_d.param_groups[0]["lr"],
        "gamma": {**{f"g.{k}": v for k, v in gammas(nets.raw_g).items()},
                  **{f"d.{k}": v for k, v in gammas(nets.raw_d).items()}},
    }


def _sample_grid(recipe: Recipe, nets: Nets, run_dir: Path, step: int, log: RunLog) -> None:
    """Fixed-noise grid; on synthetic data also the structure scores of the same generator."""
    from sagan_cli.sample import grid_image, iter_generate

    sampler, device = nets.exported_g(), next(nets.raw_g.parameters()).device
    grid_z, grid_y = grid_inputs(recipe, recipe.train.sample_grid)
    grid = torch.cat(list(iter_generate(sampler, grid_z, grid_y, batch_size=64, device=device)))
    path = run_dir / "samples" / f"step-{step:07d}.png"
    atomic_write(path, lambda tmp: grid_image(grid).save(tmp, format="png"))
    if recipe.data.kind == "synthetic":
        from sagan_cli.structure import score_images

        score_z, score_y = grid_inputs(recipe, STRUCTURE_SAMPLES, offset=1)
        images = torch.cat(list(iter_generate(sampler, score_z, score_y, batch_size=64, device=device)))
        scores = score_images(images, recipe.data.synthetic_blobs_per_side)
        log.write({"step": step, "structure": scores},
                  f"step {step}: valid layouts {scores['valid_fraction']:.1%}, "
                  f"symmetry ratio {scores['symmetry_ratio']:.2f}, blobs {scores['mean_blobs']:.2f}")


def _evaluate(recipe: Recipe, nets: Nets, run_dir: Path, progress: Progress, log: RunLog, device) -> None:
    """FID & co. on the EMA generator; keeps the best-FID generator as g_best.safetensors."""
    from sagan_cli.metrics import evaluate_generator

    sampler = nets.exported_g()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave training's RNG alone
        scores = evaluate_generator(sampler, recipe, num_samples=recipe.eval.num_samples, metrics=recipe.eval.metrics,
                                    device=device, batch_size=recipe.eval.batch_size, seed=recipe.train.seed)
    log.write({"step": progress.step, "eval": scores},
              f"step {progress.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    fid = scores.get("fid", scores.get("classifier_fid"))  # Inception FID, else the classifier's
    if fid is not None and fid < progress.best_fid:
        progress.best_fid = fid
        save_model(run_dir / "g_best.safetensors", sampler, step=progress.step, recipe=recipe.name,
                   ema=nets.ema is not None)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (written after the last checkpoint of a crashed run), and a torn
    last line; rewritten atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn by a crash mid-write
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))


def _check_eval(recipe: Recipe) -> None:
    from sagan_cli.metrics import check_evaluation

    check_evaluation(recipe)


class _StopOnCtrlC:
    """First Ctrl-C: finish the step, checkpoint, exit 0; a second one aborts."""

    def __init__(self):
        self.flag = False
        self.previous = signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame) -> None:
        self.flag = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def requested(self, accelerator: Accelerator, *, every: int, step: int) -> bool:
        if accelerator.num_processes == 1:
            return self.flag
        if step % every:  # ranks agree only where they talk: every `log_every` steps
            return False
        flag = torch.tensor([float(self.flag)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self.previous)
