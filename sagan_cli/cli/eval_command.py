"""`sagan eval` as a command: read the inputs (checkpoint, samples, --data), evaluate, print, write --json.

The library behind it is `sagan_cli.evaluation.metrics.evaluate`; this module only resolves what the user
named and shows the result.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sagan_cli.config import DataConfig, load_recipe, recipe_from_json
from sagan_cli.data.datasets import build_dataset, open_image
from sagan_cli.errors import UserError, check_writable
from sagan_cli.evaluation.features import classifier_space
from sagan_cli.evaluation.inception import find_inception_weights
from sagan_cli.evaluation.metrics import (
    CLASSIFIER_METRICS,
    INCEPTION_METRICS,
    EvalResult,
    UInt8Images,
    evaluate,
    parse_metrics,
)
from sagan_cli.interchange.checkpoint import load_model, write_output
from sagan_cli.model.generation import resolve_device

DEFAULT_METRICS = "fid,isc,kid"
DEFAULT_CLASSIFIER_METRICS = "classifier_fid,classifier_kid"  # + gan_test when the samples have classes


def _is_grayscale(path: Path) -> bool:
    """Whether an image file holds one channel (as `sagan sample` writes a grayscale model's PNGs)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode in ("1", "L", "LA", "I", "I;16", "F")
    except (OSError, ValueError):
        return False  # the dataset reports unreadable files itself


DEFLATE_MAX_RATIO = 1100  # deflate expands at most ~1032:1; a member claiming more is lying


# What a damaged .npz raises while numpy reads it: a bad zip directory, corrupt deflate data (zlib.error), an
# encrypted member (RuntimeError), an unknown compression method (NotImplementedError), a truncated member.
NPZ_ERRORS = (OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error)


def check_npz_sizes(path: Path) -> None:
    """Refuse an .npz whose array headers ask for more bytes than the file can hold, before numpy
    allocates them (numpy sizes its buffer from the header: a tiny file could ask for terabytes)."""
    try:
        with zipfile.ZipFile(path) as archive:
            on_disk = path.stat().st_size
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(member, max_header_size=10000)
                wanted = int(np.prod(shape, dtype=object)) * dtype.itemsize
                possible = min(info.file_size, DEFLATE_MAX_RATIO * min(info.compress_size, on_disk) + 1024)
                if wanted > possible:
                    raise UserError(f"{path}: its {info.filename} says {dtype} {tuple(shape)} ({wanted:,} bytes), "
                                    "more than the file holds; the file is damaged")
    except NPZ_ERRORS as exc:
        raise UserError(f"{path} is not an .npz with an `images` array ({str(exc)[:120]}); "
                        "write one with `sagan sample --format npz`") from None


def load_samples(path: Path) -> tuple[UInt8Images, int, torch.Tensor | None]:
    """(images, their size, intended labels or None) from a folder of images or a `sagan sample --format npz` file.

    A folder is read at its first image's size (others are resized and center-cropped to it) and
    has no labels; an .npz has them when its `labels` are all >= 0 (a conditional generator's).
    """
    if path.is_dir():
        images = build_dataset(DataConfig(kind="folder", path=str(path)), 32)
        first = images.files[0]
        images.resolution = min(open_image(first).size)  # one walk of the folder, read at its size
        images.channels = 1 if _is_grayscale(first) else 3  # a grayscale model's 'L'-mode PNGs: a grayscale reference
        return UInt8Images(images), images.resolution, None
    if path.suffix.lower() != ".npz" or not path.is_file():
        raise UserError(f"--samples {path}: give a folder of images or the .npz that `sagan sample --format npz` writes")
    check_npz_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            images = npz["images"]
            labels = npz["labels"] if "labels" in npz.files else None
    except (*NPZ_ERRORS, KeyError) as exc:
        raise UserError(f"{path} is not an .npz with an `images` array ({str(exc)[:120]}); "
                        "write one with `sagan sample --format npz`") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3) or images.shape[1] != images.shape[2]:
        raise UserError(f"{path}: `images` must be uint8 N x H x W x 3 (or x 1, grayscale) with H = W, "
                        f"got {images.dtype} {images.shape}")
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu" or (labels < 0).any()):
        labels = None  # -1: an unconditional generator's samples
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return UInt8Images(tensor), int(images.shape[1]), None if labels is None else torch.from_numpy(labels).long()


def without_sample_grid(images: UInt8Images, path: Path) -> UInt8Images:
    """The images of a `sagan sample` folder (000000.png, ...) without its grid.png, an overview, not a sample."""
    if not path.is_dir() or not (path / "000000.png").is_file():
        return images
    folder = images.source
    return UInt8Images(folder, [i for i in images.indices if folder.files[i] != folder.root / "grid.png"])


def resolve_data(path: Path) -> tuple[DataConfig, int]:
    """--data: a recipe (its [data] table and model.num_classes), a run's config.json, or a folder of images."""
    if path.is_dir():
        return DataConfig(kind="folder", path=str(path)), 0
    if path.is_file() and path.suffix.lower() == ".toml":
        recipe = load_recipe(path)
        return recipe.data, recipe.model.num_classes
    if path.is_file() and path.suffix.lower() == ".json":
        recipe = recipe_from_json(path)
        return recipe.data, recipe.model.num_classes
    raise UserError(f"--data {path}: give a recipe (.toml), a run's config.json, or a folder of images")


def eval_command(*, ckpt: Path | None, samples: Path | None, data: Path, num_samples: int | None,
                 metrics: str | None, inception_weights: Path | None, reference_count: int | None, batch_size: int,
                 device: str | None, seed: int, json_path: Path | None, verbose: bool,
                 classifier: Path | None = None) -> EvalResult:
    """`sagan eval`: check the inputs, evaluate, print a table, write --json.

    Without --metrics: fid,isc,kid, or with --classifier classifier_fid,classifier_kid (and
    gan_test when the samples have intended classes).
    """
    if (ckpt is None) == (samples is None):
        raise UserError("give exactly one of --ckpt G.safetensors or --samples DIR_OR_NPZ")
    data_config, data_classes = resolve_data(data)
    if json_path is not None:
        check_writable(json_path, "--json")  # now, not after minutes of evaluation
    if metrics is not None:
        chosen = parse_metrics(metrics, data_config)
        if any(metric in INCEPTION_METRICS for metric in chosen):
            find_inception_weights(inception_weights)  # a missing file fails before the checkpoint loads
        if any(metric in CLASSIFIER_METRICS for metric in chosen):
            classifier_space(classifier)
    torch_device = resolve_device(device)
    labels = None
    if ckpt is not None:
        source, info = load_model(ckpt, expect="generator", device=torch_device)
        resolution, labelled = info.config.resolution, info.config.num_classes > 0
    else:
        source, resolution, labels = load_samples(samples)
        source = without_sample_grid(source, samples)
        labelled = labels is not None
    if metrics is None:
        metrics = DEFAULT_METRICS if classifier is None else DEFAULT_CLASSIFIER_METRICS + (",gan_test" if labelled else "")
    result = evaluate(source, data_config, resolution, metrics=metrics, num_samples=num_samples,
                      reference_count=reference_count, inception_weights=inception_weights, classifier=classifier,
                      device=torch_device, batch_size=batch_size, seed=seed, verbose=verbose, num_classes=data_classes,
                      labels=labels)
    result.protocol["source"] = str(ckpt or samples)
    if ckpt is not None:
        result.protocol["checkpoint_step"] = info.step
    _print(result)
    if json_path is not None:
        text = json.dumps({"metrics": result.metrics, "protocol": result.protocol}, indent=2) + "\n"
        write_output(json_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), "--json")
    return result


def _print(result: EvalResult) -> None:
    protocol = result.protocol
    table = Table(title=f"sagan eval: {escape(str(protocol['source']))}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:.4f}")
    caption = f"{protocol['num_samples']} samples at {protocol['image_size']}px"
    if protocol.get("num_reference"):
        caption += f" vs {protocol['num_reference']} reference images"
    if protocol.get("feature_extractor_weights_sha256"):
        caption += f"; Inception sha256 {protocol['feature_extractor_weights_sha256'][:12]}"
        if not protocol["feature_extractor_weights_official"]:
            caption += " (NOT torch-fidelity's released weights: not comparable with published scores)"
    if "classifier" in protocol:
        classifier = protocol["classifier"]
        caption += (f"; classifier_* and gan_test: classifier sha256 {classifier['weights_sha256'][:12]} "
                    f"(test accuracy {classifier['test_accuracy']:.1%}), comparable only with scores from the same "
                    "classifier file")
    if ("fid" in result.metrics or "classifier_fid" in result.metrics) and protocol["num_samples"] < 2048:
        caption += "; FID below 2048 samples is biased upwards: compare only equal-n numbers"
    console = Console()
    console.print(table)
    console.print(caption + f"; {protocol['seconds']:.1f} s", soft_wrap=True)
