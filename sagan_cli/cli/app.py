"""The `sagan` command line: thin Typer commands over functions you can call from Python.

A user error (bad file, recipe, option) raises UserError anywhere below; `main` prints it as one
line on stderr and exits with code 2. Only bugs show a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from sagan_cli import __version__
from sagan_cli.errors import UserError

app = typer.Typer(
    name="sagan",
    help="Train, sample, evaluate and inspect Self-Attention GANs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"sagan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train, sample, evaluate and inspect Self-Attention GANs (Zhang et al. 2018)."""


OverridesOption = Annotated[
    list[str] | None, typer.Option("--set", help="Override a recipe key: table.key=value (repeatable).")
]


@app.command(
    epilog="Example: sagan train recipes/quickstart.toml --out runs/quick --set train.steps=2000",
)
def train(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe (see recipes/).", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory. \\[default: runs/RECIPE_NAME]")] = None,
    overrides: OverridesOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its state/.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and exit.")] = False,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu, cuda, mps or xpu. (default: what Accelerate picks: a GPU if any)")
    ] = None,
) -> None:
    """Train a SAGAN from a recipe: checkpoints, sample grids and metrics land in the run directory."""
    from sagan_cli.config import load_recipe, print_recipe

    resolved = load_recipe(recipe, overrides or [])
    run_dir = out if out is not None else Path("runs") / resolved.name
    if dry_run:
        print_recipe(resolved, run_dir)
        return
    from sagan_cli.training.loop import run_training  # torch and accelerate load only when training

    run_training(resolved, run_dir, resume=resume, device=device)


# --- sample (issue 4) ---

DeviceOption = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda or cuda:N. (default: cuda if available, else cpu)")
]
ClassOption = Annotated[int | None, typer.Option("--class", help="Class label, for a class-conditional model.")]


@app.command(epilog="Example: sagan sample --ckpt runs/quick/g.safetensors -n 1000 --out samples/ --seed 1")
def sample(
    ckpt: Annotated[Path, typer.Option("--ckpt", help="Generator checkpoint (a run's g.safetensors).")],
    n: Annotated[int, typer.Option("-n", "--num", help="Number of images.")] = 64,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("samples"),
    seed: Annotated[int, typer.Option("--seed", help="Noise seed: the same seed gives byte-identical files.")] = 0,
    class_: Annotated[
        int | None, typer.Option("--class", help="Class of every image (conditional G; default: all classes, evenly)")
    ] = None,
    truncation: Annotated[
        float | None, typer.Option("--truncation", help="Draw noise from a normal truncated to [-T, T].")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per generator call.")] = 64,
    device: DeviceOption = None,
    fmt: Annotated[
        str, typer.Option("--format", help="png: one file per image; npz: samples.npz (images, labels).")
    ] = "png",
) -> None:
    """Generate images from a generator checkpoint: numbered PNGs (or one .npz) plus grid.png."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sagan_cli.inspection.sample import sample_images

    started = time.perf_counter()
    bar = Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True, disable=n <= batch_size)
    task = bar.add_task("sampling", total=n)

    def show(done: int) -> None:  # the bar appears with the first batch, after every check has passed
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done)

    try:
        path = sample_images(ckpt, n, out, seed=seed, classes=class_, truncation=truncation, batch_size=batch_size,
                             device=device, fmt=fmt, on_batch=show)
    finally:
        if bar.live.is_started:
            bar.stop()
    print(f"wrote {n} images to {path} ({n / (time.perf_counter() - started):.1f} images/s)")


# --- attn-map (issue 4) ---


def attn_map(
    image: Annotated[
        Path | None, typer.Argument(help="Image D looks at (any format Pillow reads); omit with a generator.")
    ] = None,
    # required (`...`): it follows the optional IMAGE, so it needs a default in Python
    ckpt: Annotated[Path, typer.Option("--ckpt", help="d.safetensors (looks at IMAGE) or g.safetensors.")] = ...,
    points: Annotated[
        list[str] | None,
        typer.Option("--points", "-p", help="Query pixel x,y of the model-size image (repeatable; default: 5 spread)."),
    ] = None,
    layers: Annotated[
        list[str] | None, typer.Option("--layer", help="Attention layer, e.g. attention.32 (repeatable; default: all)")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Generator checkpoints: noise seed of the image to draw.")] = 0,
    class_: ClassOption = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Figure (PNG).")] = Path("attn-map.png"),
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write per point and layer: argmax pixel, entropy, gamma.")
    ] = None,
    device: DeviceOption = None,
) -> None:
    """Show where each attention layer looks from chosen pixels (paper Fig. 1). Alias: visualize-attention."""
    from sagan_cli.cli.attn_map_command import attn_map_command

    attn_map_command(
        ckpt, image, points=points, layers=layers, seed=seed, class_=class_, out=out, json_path=json_path, device=device
    )
    print(f"wrote {out}" + (f" and {json_path}" if json_path else ""))


_ATTN_EPILOG = "Example: sagan attn-map photo.jpg --ckpt runs/quick/d.safetensors -p 16,16 -p 40,20 --json attn.json"
app.command("attn-map", epilog=_ATTN_EPILOG)(attn_map)
app.command("visualize-attention", hidden=True, epilog=_ATTN_EPILOG)(attn_map)

# --- eval (issue 5) ---


@app.command(
    name="eval",
    epilog="Example: sagan eval --ckpt runs/quick/g.safetensors --data recipes/quickstart.toml -n 1000 "
    "--inception-weights weights-inception-2015-12-05-6726825d.pth --json runs/quick/eval.json",
)
def eval_(
    data: Annotated[
        Path, typer.Option("--data", help="Reference: a recipe (.toml), a run's config.json, or a folder of images.",
                           show_default=False)
    ],
    ckpt: Annotated[Path | None, typer.Option("--ckpt", help="Generator checkpoint (g.safetensors).")] = None,
    samples: Annotated[
        Path | None, typer.Option("--samples", help="A folder of images or `sagan sample --format npz` output.")
    ] = None,
    n: Annotated[
        int | None, typer.Option("-n", "--num", help="Images to score. \\[default: 10000 for --ckpt, all for --samples]")
    ] = None,
    metrics: Annotated[
        str | None, typer.Option("--metrics", help="Any of fid,isc,kid,prc (Inception), classifier_fid,classifier_kid,"
                                 "classifier_prc,gan_test (--classifier), structure (synthetic data, no weights). "
                                 "\\[default: fid,isc,kid; with --classifier: classifier_fid,classifier_kid"
                                 "(,gan_test if the samples have classes)]")
    ] = None,
    classifier: Annotated[
        Path | None, typer.Option("--classifier", help="A `sagan classifier train` file: the feature space of "
                                  "classifier_* metrics and gan_test (no Inception needed).")
    ] = None,
    inception_weights: Annotated[
        Path | None, typer.Option("--inception-weights", help="torch-fidelity's Inception weights file. "
                                     "\\[default: $SAGAN_INCEPTION_WEIGHTS, else $TORCH_HOME/hub/checkpoints/]")
    ] = None,
    reference: Annotated[
        int | None, typer.Option("--ref-n", help="Reference images (a fixed subset). \\[default: as -n]")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per generator/Inception call.")] = 64,
    device: DeviceOption = None,
    seed: Annotated[int, typer.Option("--seed", help="Noise and label seed of the generated samples.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write values and protocol to this file.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No torch-fidelity progress on stderr.")] = False,
) -> None:
    """Score a generator or saved samples against a dataset: FID, IS, KID, precision/recall, GAN-test (torch-fidelity)."""
    from sagan_cli.cli.eval_command import eval_command

    eval_command(ckpt=ckpt, samples=samples, data=data, num_samples=n, metrics=metrics, classifier=classifier,
                 inception_weights=inception_weights, reference_count=reference, batch_size=batch_size,
                 device=device, seed=seed, json_path=json_path, verbose=not quiet)


# --- classifier (issue 12) ---

classifier_app = typer.Typer(help="Train a small classifier on labelled data: an offline feature space for `sagan eval`.",
                             no_args_is_help=True)
app.add_typer(classifier_app, name="classifier")


@classifier_app.command(
    "train",
    epilog="Example: sagan classifier train recipes/fashion-mnist.toml --out classifiers/fashion-mnist.safetensors",
)
def classifier_train(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe: its \\[data] table and model.resolution, model.num_classes.",
                                           show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output file. \\[default: classifiers/RECIPE_NAME.safetensors]")] = None,
    overrides: OverridesOption = None,
    test_overrides: Annotated[
        list[str] | None, typer.Option("--test-set", help="The test images: the recipe's data with this data.key=value "
                                       "(repeatable). \\[default: hold out 10% of the data, at most 10000 images]")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training images.")] = 3,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per step.")] = 128,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate (decays to 0 on a cosine).")] = 2e-3,
    width: Annotated[int, typer.Option("--width", help="Channels of the first conv (features: 4 x width).")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seeds weights, data order and the held-out split.")] = 0,
    device: DeviceOption = None,
) -> None:
    """Train a classifier on a recipe's labelled data; saves weights, test accuracy and a hash (safetensors)."""
    from sagan_cli.evaluation.classifier import train_from_recipe

    train_from_recipe(recipe, out=out, overrides=overrides or [], test_overrides=test_overrides or [],
                             epochs=epochs, batch_size=batch_size, lr=lr, width=width, seed=seed, device=device)

# --- info (issue 6) ---


@app.command(epilog="Example: sagan info --json")
def info(
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Versions, devices (CPU threads, CUDA GPUs, bf16) and whether FID's Inception weights are available offline."""
    import json

    from rich.console import Console
    from rich.table import Table

    from sagan_cli.cli.info import system_info

    details = system_info()
    if as_json:
        print(json.dumps(details, indent=2))
        return
    table = Table(title="sagan info", show_header=False)
    for key, value in details.items():
        if key == "cuda_gpus":
            value = "; ".join(f"{gpu['index']}: {gpu['name']}, {gpu['memory_gib']} GiB, bf16 {gpu['bf16']}"
                              for gpu in value) or "none"
        table.add_row(key, "not found" if value is None else str(value))
    Console().print(table)


# --- report, interpolate, import-port, export (issue 13) ---


@app.command(epilog="Example: sagan report runs/quick --out runs/quick/report.html --image photo.jpg")
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (the --out of `sagan train`), finished or not.",
                                            show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file. \\[default: RUN_DIR/report.html]")] = None,
    images: Annotated[
        list[Path] | None, typer.Option("--image", help="A real image for D's attention explorer (repeatable).")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", help="Generated images in the explorer (G).")] = 4,
    dataset_images: Annotated[
        int, typer.Option("--dataset-images", help="Images of the run's dataset in the explorer (D).")
    ] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Noise seed of the explorer's generated images.")] = 0,
    device: DeviceOption = None,
) -> None:
    """One self-contained HTML page: curves, sample grids over time, the recipe and an attention explorer."""
    from sagan_cli.inspection.report import build_report

    path = build_report(run_dir, out, images=images, samples=samples, dataset_images=dataset_images,
                        seed=seed, device=device)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


@app.command(
    "import-port",
    epilog="Example: sagan import-port --g models/sagan_celeb/1000000_G.pth --d models/sagan_celeb/1000000_D.pth "
    "--out runs/port",
)
def import_port(
    g: Annotated[Path | None, typer.Option("--g", help="The port's generator state dict (e.g. 1000000_G.pth).")] = None,
    d: Annotated[Path | None, typer.Option("--d", help="The port's discriminator state dict (optional).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for g.safetensors, d.safetensors, config.json.")] = ...,
) -> None:
    """Convert heykeetae/Self-Attention-GAN checkpoints (64x64) into sagan checkpoints: same noise, same images."""
    from sagan_cli.interchange.port import import_port as convert

    for path in convert(g, d, out):
        print(f"wrote {path}")


@app.command(
    "import-studiogan",
    epilog="Example: sagan import-studiogan --g \"model=G_ema-best-weights-step=100000.pth\" "
    "--d \"model=D-best-weights-step=100000.pth\" --config SAGAN.yaml --out runs/studiogan-cifar10",
)
def import_studiogan(
    g: Annotated[Path | None, typer.Option("--g", help="StudioGAN's generator file (model=G-...-step=N.pth or G_ema).")] = None,
    d: Annotated[Path | None, typer.Option("--d", help="StudioGAN's discriminator file (optional).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="StudioGAN's config (e.g. SAGAN.yaml), checked against "
                                                "the weights (optional: the shapes say it all).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for g.safetensors, d.safetensors, config.json.")] = ...,
) -> None:
    """Convert PyTorch-StudioGAN's SAGAN checkpoints (resnet backbone, 32-256) into sagan checkpoints."""
    from sagan_cli.interchange.studiogan import import_studiogan as convert

    for path in convert(g, d, out, config):
        print(f"wrote {path}")


@app.command(
    "import-biggan",
    epilog="Example: sagan import-biggan --g weights/138k/G_ema.pth --d weights/138k/D.pth --out runs/biggan128",
)
def import_biggan(
    g: Annotated[Path | None, typer.Option("--g", help="BigGAN-PyTorch's generator state dict (G_ema.pth or G.pth).")] = None,
    d: Annotated[Path | None, typer.Option("--d", help="BigGAN-PyTorch's discriminator state dict (D.pth, optional).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for g.safetensors, d.safetensors, config.json.")] = ...,
    d_inplace_relu: Annotated[bool, typer.Option(
        "--d-inplace-relu", help="D trained by BigGAN-PyTorch's early code with --D_nl inplace_relu (its shortcuts "
        "saw relu(x)); the current code's out-of-place ReLU is the default.")] = False,
) -> None:
    """Convert ajbrock/BigGAN-PyTorch checkpoints (shared embedding, hierarchical z) into sagan checkpoints."""
    from sagan_cli.interchange.biggan import import_biggan as convert

    for path in convert(g, d, out, d_shortcut_relu=d_inplace_relu):
        print(f"wrote {path}")


@app.command(
    epilog="Example: sagan interpolate --ckpt runs/quick/g.safetensors --seeds 0,5,9 --steps 10 --classes 0,3,7 "
    "--out interp/",
)
def interpolate(
    ckpt: Annotated[Path, typer.Option("--ckpt", help="Generator checkpoint (a run's g.safetensors).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("interpolation"),
    seeds: Annotated[str, typer.Option("--seeds", help="Noise seeds to pass through, in order.")] = "0,1,2,3",
    steps: Annotated[int, typer.Option("--steps", help="Frames per segment, endpoints included.")] = 8,
    mode: Annotated[str, typer.Option("--mode", help="slerp (great circle, norm kept between the ends) or lerp.")] = "slerp",
    classes: Annotated[
        str | None, typer.Option("--classes", help="Conditional G: also interpolate between these classes, e.g. 0,3,7.")
    ] = None,
    class_: Annotated[int | None, typer.Option("--class", help="Class of the seed interpolation. \\[default: 0]")] = None,
    truncation: Annotated[float | None, typer.Option("--truncation", help="Truncate the noise to [-T, T].")] = None,
    animation: Annotated[str, typer.Option("--animation", help="gif or webp.")] = "gif",
    frame_ms: Annotated[int, typer.Option("--frame-ms", help="Milliseconds per animation frame.")] = 120,
    device: DeviceOption = None,
) -> None:
    """Latent interpolation between seeds (and between classes): PNG sheets and an animated GIF/WebP."""
    from sagan_cli.inspection.interpolate import interpolate as run

    for path in run(ckpt, out, seeds=seeds, steps=steps, mode=mode, classes=classes, class_=class_,
                    truncation=truncation, animation=animation, frame_ms=frame_ms, device=device):
        print(f"wrote {path}")


@app.command(epilog="Example: sagan export --ckpt runs/quick/g.safetensors --format onnx --out generator.onnx")
def export(
    ckpt: Annotated[Path, typer.Option("--ckpt", help="Generator checkpoint (a run's g.safetensors).")],
    fmt: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output file. \\[default: CKPT with .onnx / .pt]")] = None,
    check: Annotated[int, typer.Option("--check", help="Batch size compared with the original model after export "
                                        "(besides the traced batch size, 2).")] = 5,
) -> None:
    """Export a generator (class input when conditional; spectral norm folded) for serving, then verify it."""
    from sagan_cli.interchange.export import check_batch_sizes, export_generator

    path, difference = export_generator(ckpt, fmt, out, check_samples=check)
    runner = "onnxruntime" if fmt == "onnx" else "the reloaded TorchScript module"
    traced, other = check_batch_sizes(check)
    print(f"wrote {path}; max |difference| to the original at batch sizes {traced} (traced) and {other} "
          f"({runner}): {difference:.3g}")


def main() -> None:
    """Entry point of the `sagan` script: user errors become one line on stderr and exit code 2."""
    from sagan_cli.training.launcher import die_with_launcher

    die_with_launcher()  # under torchrun, before torch loads: a launcher killed during start-up takes us along
    try:
        app(standalone_mode=False)
    except UserError as exc:
        if not getattr(exc, "every_rank", False) or os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)  # an error every process raised is printed once
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        from sagan_cli.training.launcher import peer_failure

        if line := peer_failure(exc):  # another process of the run died: one line, not a collective's traceback
            print(f"error: {line}", file=sys.stderr)
            sys.exit(1)
        # Usage errors (unknown option, bad value). Typer >= 0.20 vendors click, so match by shape.
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "")
        hint = f" (see `sagan {command} --help`)" if command else " (see `sagan --help`)"
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)

if __name__ == "__main__":
    main()
