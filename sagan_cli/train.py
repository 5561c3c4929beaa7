"""The training loop: one Accelerate loop you can read top to bottom.

Per step: `d_steps` discriminator updates, then one generator update (hinge loss and TTUR by default).
- D step: fakes are drawn under no_grad (nothing back-propagates into G) and real and fake images go
  through D in ONE batch (D has no BatchNorm, so this is exact and runs spectral norm's power
  iteration once per step).
- G step: D runs in eval mode with frozen weights: gradients flow to G only and spectral norm reuses
  the vectors the D step just refined.
Exact resume: Accelerate restores models, optimizers, scaler and RNG states; the data order is a pure
function of (seed, position), and the DataLoader never touches the global RNG.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sagan_cli.checkpoint import latest_state, save_model, save_state_atomically
from sagan_cli.config import Recipe, print_recipe, recipe_from_json
from sagan_cli.errors import UserError
from sagan_cli.losses import d_loss, g_loss, gradient_penalty
from sagan_cli.models import Discriminator, Generator, gammas

GRID_SEED_OFFSET = 7919  # the fixed grid noise must not coincide with the training noise stream
STRUCTURE_SAMPLES = 256  # synthetic data: images scored by the structure checker at each sample grid
# Keys whose change would make a saved state meaningless: refused on --resume.
FROZEN_ON_RESUME = ("train.mixed_precision", "train.ema", "train.batch_size")  # batch size: the data position
RUN_FILES = ("config.json", "g.safetensors", "d.safetensors")  # a folder holding any of these is a run


class EMA(nn.Module):
    """Exponential moving average of G's weights; buffers (BatchNorm stats, spectral-norm vectors) are copied."""

    def __init__(self, generator: Generator, decay: float, start: int):
        super().__init__()
        self.model = copy.deepcopy(generator).eval().requires_grad_(False)
        self.decay, self.start = decay, start

    @torch.no_grad()
    def update(self, generator: nn.Module, step: int) -> None:
        decay = self.decay if step >= self.start else 0.0
        for ema_p, p in zip(self.model.parameters(), generator.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), generator.buffers(), strict=True):
            ema_b.copy_(b)


@dataclass
class Progress_:
    """Counters saved with the resumable state (registered with Accelerate)."""

    step: int = 0  # completed generator updates
    batches: int = 0  # data batches consumed (per process), the data position
    best_fid: float = math.inf

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def batch_indices(n: int, batch_size: int, seed: int, start_batch: int, rank: int, world: int) -> Iterator[list[int]]:
    """Endless batches of dataset indices: epoch e is a permutation seeded by (seed, e).

    Global batch b covers positions [b*B*W, (b+1)*B*W) of the concatenated epochs; rank r takes its
    slice. Starting at `start_batch` therefore resumes the exact same order.
    """
    per_step = batch_size * world
    cached_epoch, perm = -1, None
    b = start_batch
    while True:
        first = b * per_step + rank * batch_size
        out = []
        for pos in range(first, first + batch_size):
            epoch = pos // n
            if epoch != cached_epoch:
                g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                cached_epoch, perm = epoch, torch.randperm(n, generator=g).tolist()
            out.append(perm[pos % n])
        yield out
        b += 1


def _check_resume(recipe: Recipe, run_dir: Path) -> None:
    saved = recipe_from_json(run_dir / "config.json").to_dict()
    new = recipe.to_dict()
    frozen = [f"model.{k}" for k in saved["model"]] + list(FROZEN_ON_RESUME)
    for dotted in frozen:
        table, key = dotted.split(".")
        if saved[table][key] != new[table][key]:
            raise UserError(
                f"--resume cannot change {dotted} ({saved[table][key]!r} in the saved run, {new[table][key]!r} now); "
                f"start a new run with another --out"
            )


def _grid_inputs(recipe: Recipe, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(recipe.train.seed + GRID_SEED_OFFSET + offset)
    z = torch.randn(n, recipe.model.z_dim, generator=g)
    k = recipe.model.num_classes
    y = torch.arange(n) * k // n if k else None  # classes spread evenly over the grid
    return z, y


def prepare_models(recipe: Recipe, accelerator: Accelerator):
    """G, D, their Adam optimizers (TTUR) and the EMA, laid out, compiled and `prepare`d as training uses them.

    Returns (generator, discriminator, opt_g, opt_d, ema or None); the benchmarks time exactly this.
    """
    t, m = recipe.train, recipe.model
    generator, discriminator = Generator(m), Discriminator(m)
    if t.channels_last:
        generator = generator.to(memory_format=torch.channels_last)
        discriminator = discriminator.to(memory_format=torch.channels_last)
    ema = EMA(generator, t.ema_decay, t.ema_start) if t.ema else None
    opt_g = torch.optim.Adam(generator.parameters(), lr=t.lr_g, betas=(t.beta1, t.beta2))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=t.lr_d, betas=(t.beta1, t.beta2))
    if t.compile:
        generator.compile()
        discriminator.compile()
    generator, discriminator, opt_g, opt_d = accelerator.prepare(generator, discriminator, opt_g, opt_d)
    if ema is not None:
        ema.to(accelerator.device)
    return generator, discriminator, opt_g, opt_d, ema


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

    t, m = recipe.train, recipe.model
    run_dir = Path(run_dir)
    state_root = run_dir / "state"
    # Accelerate keeps process-wide settings; drop them (not the process group) so a second run in
    # the same Python process may use another precision.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        log_with="tensorboard" if t.tensorboard else None,
        project_dir=str(run_dir),
    )
    if resume:
        if latest_state(state_root) is None or not (run_dir / "config.json").is_file():
            raise UserError(f"nothing to resume in {run_dir} (no state/ checkpoint); drop --resume to start a new run")
        _check_resume(recipe, run_dir)
    elif latest_state(state_root) is not None or any((run_dir / f).exists() for f in RUN_FILES):
        raise UserError(f"{run_dir} already holds a run; add --resume to continue it or choose another --out")
    accelerator.wait_for_everyone()  # every rank has checked before rank 0 writes config.json
    console = console or Console()
    main = accelerator.is_main_process
    dataset: Dataset = build_dataset(recipe.data, m.resolution, m.num_classes, m.channels)  # a bad data.path fails here
    if main:
        print_recipe(recipe, run_dir, console)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write the run directory {run_dir}: {exc.strerror}; choose another --out") from None
    set_seed(t.seed)
    if recipe.eval.every:
        _check_eval(recipe)  # missing Inception weights fail now, not hours into the run

    generator, discriminator, opt_g, opt_d, ema = prepare_models(recipe, accelerator)
    set_seed(t.seed + accelerator.process_index)  # same initial weights, but each process its own noise
    raw_g: Generator = accelerator.unwrap_model(generator)
    raw_d: Discriminator = accelerator.unwrap_model(discriminator)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    progress = Progress_()
    accelerator.register_for_checkpointing(progress)
    if resume:
        accelerator.load_state(str(latest_state(state_root)))
        if t.steps < progress.step:
            raise UserError(f"train.steps = {t.steps} is below the saved step {progress.step}; "
                            "--resume only trains longer")
        for opt, lr in ((opt_g, t.lr_g), (opt_d, t.lr_d)):  # load_state restored the old values
            for group in opt.param_groups:
                group["lr"], group["betas"] = lr, (t.beta1, t.beta2)
        if main:
            _truncate_log(run_dir / "metrics.jsonl", progress.step)
            console.print(f"resumed from step {progress.step}")
    if t.tensorboard:
        accelerator.init_trackers("tensorboard")

    loader = DataLoader(
        dataset,
        batch_sampler=batch_indices(len(dataset), t.batch_size, t.seed, progress.batches,
                                    accelerator.process_index, accelerator.num_processes),
        num_workers=recipe.data.workers,
        pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG untouched
        persistent_workers=recipe.data.workers > 0,
    )
    batches = iter(loader)
    device = accelerator.device
    grid_z, grid_y = _grid_inputs(recipe, t.sample_grid)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format

    def next_batch() -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = next(batches)
        progress.batches += 1
        images = images.to(device, non_blocking=True)
        if recipe.data.hflip:
            flip = torch.rand(images.shape[0]) < 0.5  # the global RNG: restored exactly on resume
            images = torch.where(flip.to(device)[:, None, None, None], images.flip(3), images)
        images = images.contiguous(memory_format=memory_format)
        return images, (labels.to(device) if m.num_classes else None)

    stop_requested = False

    def on_sigint(signum, frame):  # first Ctrl-C: finish the step, checkpoint, exit; second: abort
        nonlocal stop_requested
        stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous_handler = signal.signal(signal.SIGINT, on_sigint)

    def checkpoint() -> None:
        save_state_atomically(accelerator, state_root, progress.step, keep=t.keep_checkpoints)
        if main:
            exported = ema.model if ema is not None else raw_g
            save_model(run_dir / "g.safetensors", exported, step=progress.step, recipe=recipe.name, ema=ema is not None)
            save_model(run_dir / "d.safetensors", raw_d, step=progress.step, recipe=recipe.name)

    score_z, score_y = _grid_inputs(recipe, STRUCTURE_SAMPLES, offset=1)

    def sample_grid() -> None:
        """Fixed-noise grid; on synthetic data also the structure scores of the same generator."""
        from sagan_cli.sample import grid_image, iter_generate

        sampler = ema.model if ema is not None else raw_g
        grid = torch.cat(list(iter_generate(sampler, grid_z, grid_y, batch_size=64, device=device)))
        path = run_dir / "samples" / f"step-{progress.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid_image(grid).save(path)
        if recipe.data.kind == "synthetic":
            from sagan_cli.structure import score_images

            images = torch.cat(list(iter_generate(sampler, score_z, score_y, batch_size=64, device=device)))
            scores = score_images(images, recipe.data.synthetic_blobs_per_side)
            log_file.write(json.dumps({"step": progress.step, "structure": scores}) + "\n")
            log_file.flush()
            bar.console.print(f"step {progress.step}: valid layouts {scores['valid_fraction']:.1%}, "
                              f"symmetry ratio {scores['symmetry_ratio']:.2f}, blobs {scores['mean_blobs']:.2f}")

    def evaluate() -> None:
        """FID & co. on the EMA generator; keeps the best-FID generator as g_best.safetensors."""
        from sagan_cli.metrics import evaluate_generator

        sampler = ema.model if ema is not None else raw_g
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave training's RNG alone
            scores = evaluate_generator(sampler, recipe, num_samples=recipe.eval.num_samples,
                                        metrics=recipe.eval.metrics, device=device,
                                        batch_size=recipe.eval.batch_size, seed=t.seed)
        log_file.write(json.dumps({"step": progress.step, "eval": scores}) + "\n")
        log_file.flush()
        bar.console.print(f"step {progress.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        if "fid" in scores and scores["fid"] < progress.best_fid:
            progress.best_fid = scores["fid"]
            save_model(run_dir / "g_best.safetensors", sampler, step=progress.step, recipe=recipe.name, ema=ema is not None)
        if t.tensorboard:
            accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=progress.step)

    bar = Progress(
        TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not main,
    )
    bad_steps = 0
    window_start, window_images = time.perf_counter(), 0
    log_file = (run_dir / "metrics.jsonl").open("a") if main else None
    try:
        with bar:
            task = bar.add_task("train", total=t.steps, completed=progress.step, info="")
            if progress.step == 0 and main:
                sample_grid()  # the untrained generator: the baseline every later grid is compared with
            while progress.step < t.steps:
                out = train_step(accelerator, generator, discriminator, opt_g, opt_d, next_batch, recipe, memory_format)
                d_ok, g_ok = out.d_ok, out.g_ok
                if ema is not None:
                    ema.update(raw_g, progress.step)
                progress.step += 1
                window_images += t.batch_size * accelerator.num_processes

                bad_steps = 0 if (d_ok and g_ok) else bad_steps + 1
                if bad_steps >= t.max_bad_steps:
                    last = latest_state(state_root)
                    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                    raise UserError(
                        f"training diverged: non-finite losses for {bad_steps} consecutive steps at step {progress.step} "
                        f"({where}); try lower learning rates or train.mixed_precision = \"no\""
                    )
                last_step = progress.step == t.steps
                if progress.step % t.log_every == 0 or last_step:
                    now = time.perf_counter()
                    record = {
                        "step": progress.step,
                        "loss_d": out.loss_d.item(), "loss_g": out.loss_g.item(),
                        "d_real": out.d_real.item(), "d_fake": out.d_fake.item(),
                        "img_per_s": window_images / max(now - window_start, 1e-9),
                        "lr_g": opt_g.param_groups[0]["lr"], "lr_d": opt_d.param_groups[0]["lr"],
                        "gamma": {**{f"g.{k}": v for k, v in gammas(raw_g).items()},
                                  **{f"d.{k}": v for k, v in gammas(raw_d).items()}},
                    }
                    window_start, window_images = now, 0
                    if main:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                        bar.update(task, info=f"D {record['loss_d']:.3f}  G {record['loss_g']:.3f}  {record['img_per_s']:.0f} img/s")
                    if t.tensorboard:
                        accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=progress.step)
                bar.update(task, completed=progress.step)
                if main and (progress.step % t.sample_every == 0 or last_step):
                    sample_grid()
                if recipe.eval.every and (progress.step % recipe.eval.every == 0 or last_step):
                    failure = None
                    if main:
                        try:
                            evaluate()
                        except UserError as exc:
                            failure = exc
                    if _any_process(accelerator, failure is not None):  # also the barrier
                        raise failure or UserError("evaluation failed on the main process (see its message)")
                if progress.step % t.checkpoint_every == 0 or last_step:
                    checkpoint()
                if _any_process(accelerator, stop_requested):
                    checkpoint()
                    if main:
                        console.print(f"interrupted: checkpoint saved at step {progress.step}; continue with --resume")
                    break
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if log_file is not None:
            log_file.close()
    accelerator.wait_for_everyone()
    if t.tensorboard:
        accelerator.end_training()  # also destroys the process group: nothing collective after it
    return TrainResult(raw_g, raw_d, ema.model if ema is not None else None, progress.step, run_dir)


@dataclass
class StepOutput:
    loss_d: torch.Tensor
    loss_g: torch.Tensor
    d_real: torch.Tensor  # mean D output on real images (last D step)
    d_fake: torch.Tensor
    d_ok: bool  # the losses were finite on every process and the update was applied
    g_ok: bool


def train_step(
    accelerator: Accelerator,
    generator: nn.Module,
    discriminator: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    next_batch,
    recipe: Recipe,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> StepOutput:
    """One iteration: `d_steps` D updates, then one G update. Models/optimizers come from accelerator.prepare."""
    t, m = recipe.train, recipe.model
    device = accelerator.device
    raw_d: Discriminator = accelerator.unwrap_model(discriminator)

    def fake_labels(n: int) -> torch.Tensor | None:
        return torch.randint(0, m.num_classes, (n,), device=device) if m.num_classes else None

    # ---- discriminator: fakes under no_grad, real and fake through D in one batch ----
    discriminator.train()
    raw_d.requires_grad_(True)
    d_ok = True
    for _ in range(t.d_steps):
        real, labels = next_batch()
        n = real.shape[0]
        fl = fake_labels(n)
        with torch.no_grad(), accelerator.autocast():
            fake = generator(torch.randn(n, m.z_dim, device=device), fl)
        with accelerator.autocast():
            both = torch.cat([real, fake.to(real.dtype)]).contiguous(memory_format=memory_format)
            logits = discriminator(both, None if labels is None else torch.cat([labels, fl])).float()
            d_real, d_fake = logits.split(n)
            loss_d = d_loss(t.loss, d_real, d_fake)
            if t.loss == "wgan-gp":
                raw_d.eval()  # spectral norm keeps the vectors this step's forward just refined
                loss_d = loss_d + t.gp_weight * gradient_penalty(raw_d, real, fake, labels)
                raw_d.train()
        opt_d.zero_grad(set_to_none=True)
        accelerator.backward(loss_d)
        finite = _all_finite(accelerator, loss_d)
        d_ok = d_ok and finite
        if finite:
            opt_d.step()

    # ---- generator: D frozen and in eval mode (no weight grads, no second power iteration) ----
    raw_d.eval().requires_grad_(False)
    with accelerator.autocast():
        fl = fake_labels(t.batch_size)
        fake = generator(torch.randn(t.batch_size, m.z_dim, device=device), fl)
        loss_g = g_loss(t.loss, raw_d(fake.contiguous(memory_format=memory_format), fl).float())
    opt_g.zero_grad(set_to_none=True)
    accelerator.backward(loss_g)
    g_ok = _all_finite(accelerator, loss_g)
    if g_ok:
        opt_g.step()
    return StepOutput(loss_d.detach(), loss_g.detach(), d_real.detach().mean(), d_fake.detach().mean(), d_ok, g_ok)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step (written after the last checkpoint of a crashed run)."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(x for x in lines if json.loads(x).get("step", 0) <= step))


def _check_eval(recipe: Recipe) -> None:
    from sagan_cli.metrics import INCEPTION_METRICS, find_inception_weights, parse_metrics

    chosen = parse_metrics(recipe.eval.metrics, recipe.data)
    if any(m in INCEPTION_METRICS for m in chosen):
        find_inception_weights(recipe.eval.inception_weights or None)


def _all_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (all ranks must take the same decision)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bool(bad.item() == 0)


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)
