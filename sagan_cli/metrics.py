"""`sagan eval`: FID, IS, KID and precision/recall through torch-fidelity, offline-first.

torch-fidelity downloads its Inception weights on first use, assumes CUDA, crashes on numpy 2 for
conditional generators and re-reads the reference data on every call. So here: the weights come
from a local file (or we fail at once saying how to get one), a generator is wrapped as
unconditional with its labels drawn inside `forward`, and the reference features are cached under
a name built from the dataset identity, the resolution, the reference count and the weights'
SHA-256, so a second evaluation against the same data never opens it.
The synthetic data also gets the structure checker's scores, which need no weights at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.generative_model_modulewrapper import GenerativeModelModuleWrapper
from torch_fidelity.noise import random_normal

from sagan_cli import __version__
from sagan_cli.checkpoint import load_model, write_output
from sagan_cli.config import DataConfig, Recipe, load_recipe, recipe_from_json
from sagan_cli.data import build_dataset, dataset_identity, open_image
from sagan_cli.errors import UserError, check_writable
from sagan_cli.sample import resolve_device
from sagan_cli.sample import to_rgb_uint8 as to_uint8  # Inception takes 3 channels, also from a grayscale model
from sagan_cli.structure import score_images

FEATURE_EXTRACTOR = "inception-v3-compat"  # also for precision/recall: torch-fidelity's default there is VGG16 (a download)
INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[1]
OFFICIAL_SHA256_PREFIX = INCEPTION_FILE.rsplit("-", 1)[1].split(".")[0]  # torch hub names files NAME-<sha256[:8]>.pth
WEIGHTS_ENV = "SAGAN_INCEPTION_WEIGHTS"
INCEPTION_METRICS = ("fid", "isc", "kid", "prc")
ALL_METRICS = (*INCEPTION_METRICS, "structure")
# torch-fidelity's result keys -> ours (flat, as metrics.jsonl logs them)
NAMES = {
    "frechet_inception_distance": "fid",
    "inception_score_mean": "isc_mean",
    "inception_score_std": "isc_std",
    "kernel_inception_distance_mean": "kid_mean",
    "kernel_inception_distance_std": "kid_std",
    "precision": "precision",
    "recall": "recall",
    "f_score": "f_score",
}
KID_SUBSETS = 100
PRC_NEIGHBORHOOD = 3
MIN_SAMPLES = PRC_NEIGHBORHOOD + 2  # precision/recall needs more points than neighbours


@dataclass(frozen=True)
class InceptionWeights:
    path: Path
    sha256: str


@dataclass
class EvalResult:
    metrics: dict[str, float]
    protocol: dict[str, Any] = field(default_factory=dict)


def hub_weights_path() -> Path:
    """Where torch-fidelity itself would cache the downloaded file (honours $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def missing_weights_message() -> str:
    return (f"no Inception weights: download {URL_INCEPTION_V3} and pass --inception-weights FILE "
            f"(or set {WEIGHTS_ENV}=FILE, or save it as {hub_weights_path()}); "
            "`--metrics structure` needs no weights (synthetic data)")


def find_inception_weights(path: str | Path | None = None) -> InceptionWeights:
    """The flag's file, else $SAGAN_INCEPTION_WEIGHTS, else torch-fidelity's hub cache; never downloads."""
    if path in (None, ""):
        path = os.environ.get(WEIGHTS_ENV) or None
    if path is None:
        if not hub_weights_path().is_file():
            raise UserError(missing_weights_message())
        path = hub_weights_path()
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise UserError(f"Inception weights {path} do not exist; {missing_weights_message()}")
    st = path.stat()
    return InceptionWeights(path, _check_weights(str(path), st.st_size, st.st_mtime_ns))


@lru_cache(maxsize=4)
def _check_weights(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a readable Inception state dict (cached per file version: training evaluates often).

    Loaded with weights_only=True first, so a hostile pickle never runs, and a wrong or damaged file
    is a one-line error here instead of a traceback inside torch-fidelity.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or non-weights file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"Inception weights {path} are not a readable PyTorch weights file ({first}); "
                        f"download them again from {URL_INCEPTION_V3}") from None
    probes = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
              "fc.weight": (1008, 2048)}
    for key, shape in probes.items():
        value = state.get(key) if isinstance(state, dict) else None
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            raise UserError(f"{path} is not torch-fidelity's Inception-v3 state dict ({key} missing or mis-shaped); "
                            f"download {URL_INCEPTION_V3}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_metrics(metrics: str | list[str] | tuple[str, ...], data: DataConfig) -> list[str]:
    """Validated, ordered metric names; synthetic data always adds `structure` (it is free)."""
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    names = [m for m in names if m]
    for name in names:
        if name not in ALL_METRICS:
            raise UserError(f"--metrics: unknown metric {name!r}; choose from {','.join(ALL_METRICS)}")
    if "structure" in names and data.kind != "synthetic":
        raise UserError("--metrics structure scores only the built-in synthetic data (data.kind = 'synthetic'); drop it")
    if data.kind == "synthetic":
        names.append("structure")
    chosen = [m for m in ALL_METRICS if m in names]
    if not chosen:
        raise UserError(f"--metrics is empty; choose from {','.join(ALL_METRICS)}")
    return chosen


def cache_root() -> Path:
    """$SAGAN_CACHE/fidelity, else $XDG_CACHE_HOME/sagan/fidelity, else ~/.cache/sagan/fidelity."""
    base = os.environ.get("SAGAN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sagan"
    return Path(base).expanduser() / "fidelity"


class _Sampler(nn.Module):
    """G as torch-fidelity wants it: noise in, uint8 B x 3 x H x W out.

    Labels are drawn here, from their own seeded generator, because torch-fidelity's own label path
    (num_classes > 0) uses `np.int`, gone in numpy 2. `kept` collects the images for the structure
    checker, so both see the very same samples.
    """

    def __init__(self, generator: nn.Module, seed: int, keep: bool):
        super().__init__()
        self.generator = generator
        self.classes = generator.config.num_classes
        self.labels = torch.Generator().manual_seed(seed)
        self.kept: list[torch.Tensor] | None = [] if keep else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        device = next(self.generator.parameters()).device
        y = None
        if self.classes:
            y = torch.randint(self.classes, (z.shape[0],), generator=self.labels).to(device)
        images = to_uint8(self.generator(z.to(device), y))
        if self.kept is not None:
            self.kept.append(images.cpu())
        return images


def _draw(sampler: _Sampler, n: int, batch_size: int, seed: int) -> None:
    """Run the sampler as torch-fidelity would (same noise source and order), without Inception."""
    rng = np.random.RandomState(seed)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            sampler(random_normal(rng, (min(batch_size, n - start), sampler.generator.config.z_dim)))


class UInt8Images(Dataset):
    """Images as torch-fidelity reads them (uint8 [3, H, W], no label): a tensor or a sagan dataset."""

    def __init__(self, source: torch.Tensor | Dataset, indices: list[int] | None = None):
        self.source = source
        self.indices = list(range(len(source))) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.source[self.indices[i]]
        return item if isinstance(self.source, torch.Tensor) else to_uint8(item[0])

    def stack(self) -> torch.Tensor:
        return torch.stack([self[i] for i in range(len(self))])


class _Reference(Dataset):
    """The reference images, built only when torch-fidelity misses its cache and asks for them."""

    def __init__(self, data: DataConfig, resolution: int, count: int):
        self.data, self.resolution, self.count = data, resolution, count
        self._images: UInt8Images | None = None

    @property
    def images(self) -> UInt8Images:
        if self._images is None:
            full = build_dataset(self.data, self.resolution)
            order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))  # a fixed random subset: a prefix could be one class
            self._images = UInt8Images(full, sorted(order[: self.count].tolist()))
        return self._images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _reference(data: DataConfig, resolution: int, count: int, weights: InceptionWeights) -> tuple[_Reference, str, int, str]:
    """(lazy reference, torch-fidelity cache name, image count, dataset identity)."""
    data = replace(data, hflip=False)
    identity = dataset_identity(data, resolution)
    key = hashlib.sha256(f"{identity}|{resolution}|{count}|{FEATURE_EXTRACTOR}|{weights.sha256}".encode())
    name = f"sagan-ref-{key.hexdigest()[:20]}"
    reference = _Reference(data, resolution, count)
    note = cache_root() / f"{name}.json"  # the image count, so a cache hit needs no dataset at all
    try:
        actual = int(json.loads(note.read_text())["num_images"])
    except (OSError, ValueError, KeyError, TypeError):
        actual = len(reference)
        try:
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(json.dumps({"num_images": actual, "dataset": identity, "weights_sha256": weights.sha256}))
        except OSError as exc:
            raise UserError(f"cannot write the statistics cache {note.parent} ({exc.strerror or exc}); "
                            "set SAGAN_CACHE to a writable folder") from None
    return reference, name, actual, identity


def _fidelity(input1: Any, n: int, reference: _Reference | None, ref_count: int, cache_name: str | None,
              metrics: list[str], weights: InceptionWeights, cuda: bool, batch_size: int, seed: int,
              verbose: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """One torch-fidelity call; returns (our metric names -> values, the settings used)."""
    settings = {
        "isc_splits": max(1, min(10, n // 100)),  # splits of >= 100 images: a 1-image split always scores 1
        "kid_subsets": KID_SUBSETS,
        "kid_subset_size": min(1000, n, ref_count) if reference is not None else None,
        "prc_neighborhood": PRC_NEIGHBORHOOD,
    }
    raw = torch_fidelity.calculate_metrics(
        input1=input1, input1_model_num_samples=n, input2=reference, input2_cache_name=cache_name,
        cache_root=str(cache_root()), cache=True, cuda=cuda, batch_size=batch_size, rng_seed=seed,
        feature_extractor=FEATURE_EXTRACTOR, feature_extractor_weights_path=str(weights.path),
        save_cpu_ram=True, datasets_download=False, verbose=verbose,
        **{m: m in metrics for m in INCEPTION_METRICS},
        **{k: v for k, v in settings.items() if v is not None},
    )
    return {NAMES[k]: float(v) for k, v in raw.items() if k in NAMES}, settings


def evaluate(source: nn.Module | UInt8Images, data: DataConfig, resolution: int, *, metrics: str | list[str],
             num_samples: int | None = None, reference_count: int | None = None,
             inception_weights: str | Path | None = None, device: str | torch.device | None = None,
             batch_size: int = 64, seed: int = 0, verbose: bool = False) -> EvalResult:
    """Score a generator (drawn straight into torch-fidelity) or a set of uint8 images against `data`.

    The one code path behind `sagan eval` and evaluation during training. `reference_count`
    defaults to the number of evaluated images (balanced sets suit KID and precision/recall).
    """
    chosen = parse_metrics(metrics, data)
    inception = [m for m in chosen if m in INCEPTION_METRICS]
    weights = find_inception_weights(inception_weights) if inception else None  # fail before any work
    is_generator = isinstance(source, nn.Module)
    if is_generator:
        n = num_samples if num_samples is not None else 10000
        dev = torch.device(device) if device is not None else next(source.parameters()).device
    else:
        n = min(num_samples, len(source)) if num_samples is not None else len(source)
        dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if n < MIN_SAMPLES or batch_size < 1:
        raise UserError(f"-n must be >= {MIN_SAMPLES} (got {n}) and --batch-size >= 1 (got {batch_size})")
    started = time.perf_counter()
    protocol: dict[str, Any] = {"num_samples": n, "image_size": resolution, "seed": seed, "device": dev.type,
                                "metrics": chosen, "sagan": __version__}
    values: dict[str, float] = {}
    if is_generator:
        sampler = _Sampler(source, seed, keep="structure" in chosen)
        was_training = source.training
        try:
            if weights is not None:
                wrapped = GenerativeModelModuleWrapper(sampler, source.config.z_dim, "normal", 0, make_eval=True)
                values = _score(wrapped, n, data, resolution, reference_count, inception, weights, dev,
                                batch_size, seed, verbose, protocol)
            else:
                source.eval()
                _draw(sampler, n, batch_size, seed)
        finally:
            source.train(was_training)
        kept = torch.cat(sampler.kept) if sampler.kept is not None else None
    else:
        images = UInt8Images(source.source, source.indices[:n])
        if weights is not None:
            values = _score(images, n, data, resolution, reference_count, inception, weights, dev,
                            batch_size, seed, verbose, protocol)
        kept = images.stack() if "structure" in chosen else None
    if kept is not None:
        scores = score_images(kept, blobs_per_side=data.synthetic_blobs_per_side)
        values.update({f"structure_{k}": v for k, v in scores.items()})
    protocol["seconds"] = round(time.perf_counter() - started, 2)
    return EvalResult(values, protocol)


def _score(input1: Any, n: int, data: DataConfig, resolution: int, reference_count: int | None,
           inception: list[str], weights: InceptionWeights, dev: torch.device, batch_size: int,
           seed: int, verbose: bool, protocol: dict[str, Any]) -> dict[str, float]:
    """The Inception metrics; records what defines them (reference, weights, settings) in `protocol`."""
    reference, name, ref_count, identity = None, None, 0, None
    if any(m in inception for m in ("fid", "kid", "prc")):
        reference, name, ref_count, identity = _reference(data, resolution, reference_count or n, weights)
    cuda = dev.type == "cuda"
    with torch.cuda.device(dev) if cuda else nullcontext():  # torch-fidelity's .cuda() means the current device
        values, settings = _fidelity(input1, n, reference, ref_count, name, inception, weights, cuda,
                                     batch_size, seed, verbose)
    protocol.update({
        "num_reference": ref_count if reference is not None else None,
        "dataset": identity,
        "reference_cache": str(cache_root() / name) if name else None,
        "feature_extractor": FEATURE_EXTRACTOR,
        "feature_extractor_input_size": 299,
        "feature_extractor_weights": str(weights.path),
        "feature_extractor_weights_sha256": weights.sha256,
        "feature_extractor_weights_official": weights.sha256.startswith(OFFICIAL_SHA256_PREFIX),
        "torch_fidelity": torch_fidelity.__version__,
        **settings,
    })
    return values


def evaluate_generator(generator: nn.Module, recipe: Recipe, *, num_samples: int, metrics: list[str] | str,
                       inception_weights: str | Path | None = None, device: str | torch.device | None = None,
                       batch_size: int = 64, seed: int = 0) -> dict[str, float]:
    """Flat metric values (fid, isc_mean, ..., structure_*) for the training loop.

    Pass the unwrapped generator (not a DDP wrapper); its train/eval mode is restored afterwards.
    The weights default to the recipe's eval.inception_weights, then the usual lookup.
    """
    weights = inception_weights or recipe.eval.inception_weights or None
    return evaluate(generator, recipe.data, generator.config.resolution, metrics=metrics, num_samples=num_samples,
                    inception_weights=weights, device=device, batch_size=batch_size, seed=seed).metrics


def load_samples(path: Path) -> tuple[UInt8Images, int]:
    """(images, their size) from a folder of images or the .npz `sagan sample --format npz` writes.

    A folder is read at its first image's size (others are resized and center-cropped to it).
    """
    if path.is_dir():
        images = build_dataset(DataConfig(kind="folder", path=str(path)), 32)
        images.resolution = min(open_image(images.files[0]).size)  # one walk of the folder, read at its size
        return UInt8Images(images), images.resolution
    if path.suffix.lower() != ".npz" or not path.is_file():
        raise UserError(f"--samples {path}: give a folder of images or the .npz that `sagan sample --format npz` writes")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images = npz["images"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path} is not an .npz with an `images` array ({str(exc)[:120]}); "
                        "write one with `sagan sample --format npz`") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise UserError(f"{path}: `images` must be uint8 N x H x W x 3 with H = W, got {images.dtype} {images.shape}")
    return UInt8Images(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()), int(images.shape[1])


def resolve_data(path: Path) -> DataConfig:
    """--data: a recipe (its [data] table), a run's config.json, or a folder of images."""
    if path.is_dir():
        return DataConfig(kind="folder", path=str(path))
    if path.is_file() and path.suffix.lower() == ".toml":
        return load_recipe(path).data
    if path.is_file() and path.suffix.lower() == ".json":
        return recipe_from_json(path).data
    raise UserError(f"--data {path}: give a recipe (.toml), a run's config.json, or a folder of images")


def eval_command(*, ckpt: Path | None, samples: Path | None, data: Path, num_samples: int | None, metrics: str,
                 inception_weights: Path | None, reference_count: int | None, batch_size: int, device: str | None,
                 seed: int, json_path: Path | None, verbose: bool) -> EvalResult:
    """`sagan eval`: check the inputs, evaluate, print a table, write --json."""
    if (ckpt is None) == (samples is None):
        raise UserError("give exactly one of --ckpt G.safetensors or --samples DIR_OR_NPZ")
    data_config = resolve_data(data)
    if json_path is not None:
        check_writable(json_path, "--json")  # now, not after minutes of evaluation
    chosen = parse_metrics(metrics, data_config)
    if any(m in INCEPTION_METRICS for m in chosen):
        find_inception_weights(inception_weights)  # a missing file fails before the checkpoint loads
    dev = resolve_device(device)
    if ckpt is not None:
        source, info = load_model(ckpt, expect="generator", device=dev)
        resolution = info.config.resolution
    else:
        source, resolution = load_samples(samples)
    result = evaluate(source, data_config, resolution, metrics=chosen, num_samples=num_samples,
                      reference_count=reference_count, inception_weights=inception_weights, device=dev,
                      batch_size=batch_size, seed=seed, verbose=verbose)
    result.protocol["source"] = str(ckpt or samples)
    if ckpt is not None:
        result.protocol["checkpoint_step"] = info.step
    _print(result)
    if json_path is not None:
        text = json.dumps({"metrics": result.metrics, "protocol": result.protocol}, indent=2) + "\n"
        write_output(json_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), "--json")
    return result


def _print(result: EvalResult) -> None:
    p = result.protocol
    table = Table(title=f"sagan eval: {escape(str(p['source']))}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:.4f}")
    caption = f"{p['num_samples']} samples at {p['image_size']}px"
    if p.get("num_reference"):
        caption += f" vs {p['num_reference']} reference images"
    if p.get("feature_extractor_weights_sha256"):
        caption += f"; Inception sha256 {p['feature_extractor_weights_sha256'][:12]}"
        if not p["feature_extractor_weights_official"]:
            caption += " (NOT torch-fidelity's released weights: not comparable with published scores)"
    if "fid" in result.metrics and p["num_samples"] < 2048:
        caption += "; FID below 2048 samples is biased upwards: compare only equal-n numbers"
    console = Console()
    console.print(table)
    console.print(caption + f"; {p['seconds']:.1f} s", soft_wrap=True)
