"""What a run shows while it trains: metrics.jsonl, TensorBoard and the progress bar (`TrainingLog`), and the
fixed-noise sample grids, structure scores and evaluations (`Monitor`).

Only rank 0 writes. Grids and evaluations run under `state.together`: the other ranks wait, and a failure
on rank 0 stops every rank with the same one-line error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as ProgressBar

from sagan_cli.config import Recipe
from sagan_cli.inspection.attention_stats import AttentionProbe
from sagan_cli.interchange.checkpoint import atomic_write, save_model
from sagan_cli.model.models import gammas
from sagan_cli.training.nets import Nets
from sagan_cli.training.state import Progress, together
from sagan_cli.training.step import DStats, GStats

GRID_SEED_OFFSET = 7919  # the fixed grid noise must not coincide with the training noise stream
STRUCTURE_SAMPLES = 256  # synthetic data: images scored by the structure checker at each sample grid


class TrainingLog:
    """metrics.jsonl (rank 0), TensorBoard through Accelerate, the progress bar, and the img/s window.

    (`report.RunLog` is the other side: it reads metrics.jsonl back.)
    """

    def __init__(self, run_dir: Path, accelerator: Accelerator, console: Console, *, total: int, start: int,
                 tensorboard: bool, attention: AttentionProbe | None = None):
        self.main, self.accelerator, self.tensorboard = accelerator.is_main_process, accelerator, tensorboard
        self.attention = attention if self.main else None  # the probe runs where the line is written
        self.file = (run_dir / "metrics.jsonl").open("a") if self.main else None
        self.bar = ProgressBar(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                               console=console, disable=not self.main)
        self.task = self.bar.add_task("train", total=total, completed=start, info="")
        self.window_start, self.window_images = time.perf_counter(), 0

    def __enter__(self) -> TrainingLog:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.bar.__exit__(*exc)
        finally:
            if self.file is not None:
                self.file.close()

    def write(self, record: dict, say: str | None = None) -> None:
        if self.main:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.say(say)
        if self.tensorboard:
            scalars = {key: value for key, value in record.items() if isinstance(value, float)}
            scalars.update({f"eval/{key}": value for key, value in record.get("eval", {}).items()})
            self.accelerator.log(scalars, step=record["step"])

    def say(self, text: str | None) -> None:
        if self.main and text:
            self.bar.console.print(text, markup=False)  # may hold user text (paths, names): never markup

    def count_images(self, images: int) -> None:
        self.window_images += images

    def progress(self, step: int) -> None:
        self.bar.update(self.task, completed=step)

    def write_step(self, step: int, d_stats: DStats, g_stats: GStats, nets: Nets) -> None:
        """One log line (waits for the device): losses, D's outputs, img/s since the last line, lr, gammas, and
        each attention layer's distance and entropy (attention_stats.py; rank 0 only, timed outside img/s)."""
        now = time.perf_counter()
        img_per_s = self.window_images / max(now - self.window_start, 1e-9)
        self.window_start, self.window_images = now, 0
        loss_d, loss_g, d_real, d_fake = torch.stack([d_stats.loss, g_stats.loss, d_stats.real, d_stats.fake]).tolist()
        self.write({
            "step": step, "loss_d": loss_d, "loss_g": loss_g, "d_real": d_real, "d_fake": d_fake,
            "img_per_s": img_per_s, "lr_g": nets.opt_g.param_groups[0]["lr"], "lr_d": nets.opt_d.param_groups[0]["lr"],
            "gamma": {**{f"g.{name}": value for name, value in gammas(nets.raw_g).items()},
                      **{f"d.{name}": value for name, value in gammas(nets.raw_d).items()}},
            **(self.attention.measure() if self.attention is not None else {}),
        })
        self.window_start = time.perf_counter()  # the probe's time is not training time
        self.bar.update(self.task, completed=step, info=f"D {loss_d:.3f}  G {loss_g:.3f}  {img_per_s:.0f} img/s")


def grid_inputs(recipe: Recipe, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed noise (and evenly spread classes) of the sample grids: the same at every step."""
    grid_rng = torch.Generator().manual_seed(recipe.train.seed + GRID_SEED_OFFSET + offset)
    z = torch.randn(n, recipe.model.z_dim, generator=grid_rng)
    classes = recipe.model.num_classes
    return z, (torch.arange(n) * classes // n if classes else None)


def truncate_log(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines past the resumed step (written after the last checkpoint of a crashed run), and a torn
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


class Monitor:
    """Sample grids (and structure scores on synthetic data) and evaluations of the exported generator."""

    def __init__(self, recipe: Recipe, run_dir: Path, nets: Nets, log: TrainingLog, accelerator: Accelerator):
        self.recipe, self.run_dir, self.nets, self.log, self.accelerator = recipe, run_dir, nets, log, accelerator

    def sample_grid(self, step: int) -> None:
        together(self.accelerator, lambda: self._sample_grid(step), main_only=True, what="write the sample grid")

    def evaluate(self, progress: Progress) -> None:
        """FID & co.; the best FID so far is kept in `progress` and its generator as g_best.safetensors."""
        together(self.accelerator, lambda: self._evaluate(progress), main_only=True, what="evaluate")

    def _sample_grid(self, step: int) -> None:
        from sagan_cli.model.generation import grid_image, iter_generate

        recipe, sampler, device = self.recipe, self.nets.exported_g(), self.accelerator.device
        grid_z, grid_labels = grid_inputs(recipe, recipe.train.sample_grid)
        grid = torch.cat(list(iter_generate(sampler, grid_z, grid_labels, batch_size=64, device=device)))
        path = self.run_dir / "samples" / f"step-{step:07d}.png"
        atomic_write(path, lambda tmp: grid_image(grid).save(tmp, format="png"))
        if recipe.data.kind == "synthetic":
            from sagan_cli.data.structure import score_images

            score_z, score_labels = grid_inputs(recipe, STRUCTURE_SAMPLES, offset=1)
            images = torch.cat(list(iter_generate(sampler, score_z, score_labels, batch_size=64, device=device)))
            scores = score_images(images, recipe.data.synthetic_blobs_per_side)
            self.log.write({"step": step, "structure": scores},
                           f"step {step}: valid layouts {scores['valid_fraction']:.1%}, "
                           f"symmetry ratio {scores['symmetry_ratio']:.2f}, blobs {scores['mean_blobs']:.2f}")

    def _evaluate(self, progress: Progress) -> None:
        from sagan_cli.evaluation.metrics import evaluate_generator

        recipe, sampler, device = self.recipe, self.nets.exported_g(), self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave training's RNG alone
            scores = evaluate_generator(sampler, recipe, num_samples=recipe.eval.num_samples,
                                        metrics=recipe.eval.metrics, device=device,
                                        batch_size=recipe.eval.batch_size, seed=recipe.train.seed)
        self.log.write({"step": progress.step, "eval": scores},
                       f"step {progress.step}: " + ", ".join(f"{key} {value:.4g}" for key, value in scores.items()))
        fid = scores.get("fid", scores.get("classifier_fid"))  # Inception FID, else the classifier's
        if fid is not None and fid < progress.best_fid:
            progress.best_fid = fid
            save_model(self.run_dir / "g_best.safetensors", sampler, step=progress.step, recipe=recipe.name,
                       ema=self.nets.ema is not None)
