"""`sagan eval`'s library: FID, IS, KID, precision/recall and GAN-test accuracy, offline-first.

torch-fidelity downloads its Inception weights on first use, assumes CUDA, crashes on numpy 2 for
conditional generators and unpickles its own cache. So here: the Inception weights come from a
local file (or we fail at once saying how to get one), a generator is wrapped as unconditional
with its labels drawn inside `forward`, and features go through torch-fidelity's extractors with
the reference features cached by `sagan_cli.features` as safetensors.
Two feature spaces: Inception (`fid`, `isc`, `kid`, `prc`) and a sagan classifier trained on the
data (`classifier_fid`, `classifier_kid`, `classifier_prc`, and `gan_test`: the classifier's
accuracy on a conditional generator's samples against their intended classes, Shmelkov et al.
2018). Output names carry the space, so the two are never mixed up in one table or log.
The synthetic data also gets the structure checker's scores, which need no weights at all.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.generative_model_modulewrapper import GenerativeModelModuleWrapper
from torch_fidelity.noise import random_normal

from sagan_cli import __version__
from sagan_cli.classifier import ClassifierInfo
from sagan_cli.config import DataConfig, Recipe
from sagan_cli.data import build_dataset, dataset_identity
from sagan_cli.errors import UserError
from sagan_cli.features import (
    FeatureSpace,
    check_cache_writable,
    check_classifier,
    classifier_space,
    extract,
    fidelity_metrics,
    reference_features,
)
from sagan_cli.sample import to_uint8
from sagan_cli.structure import score_images

FEATURE_EXTRACTOR = "inception-v3-compat"  # also for precision/recall: torch-fidelity's default there is VGG16 (a download)
INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[1]
OFFICIAL_SHA256_PREFIX = INCEPTION_FILE.rsplit("-", 1)[1].split(".")[0]  # torch hub names files NAME-<sha256[:8]>.pth
WEIGHTS_ENV = "SAGAN_INCEPTION_WEIGHTS"
INCEPTION_METRICS = ("fid", "isc", "kid", "prc")
CLASSIFIER_METRICS = ("classifier_fid", "classifier_kid", "classifier_prc", "gan_test")
ALL_METRICS = (*INCEPTION_METRICS, *CLASSIFIER_METRICS, "structure")
INCEPTION_LAYERS = {"isc": "logits_unbiased", "fid": "2048", "kid": "2048", "prc": "2048"}
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


def inception_space(weights: InceptionWeights) -> FeatureSpace:
    return FeatureSpace(FEATURE_EXTRACTOR, weights.path, weights.sha256, INCEPTION_LAYERS)


def check_evaluation(recipe: Recipe) -> None:
    """What training checks before step 1: the metric names, the Inception weights, the classifier."""
    chosen = parse_metrics(recipe.eval.metrics, recipe.data)
    if any(m in INCEPTION_METRICS for m in chosen):
        find_inception_weights(recipe.eval.inception_weights or None)
    if any(m in CLASSIFIER_METRICS for m in chosen):
        _, info = classifier_space(recipe.eval.classifier or None)
        m = recipe.model
        check_classifier(info, resolution=m.resolution, channels=getattr(m, "channels", 3),
                         num_classes=m.num_classes, gan_test="gan_test" in chosen, labelled=m.num_classes > 0)


class _Sampler(nn.Module):
    """G as torch-fidelity wants it: noise in, uint8 B x 3 x H x W out (grey images as 3 equal channels).

    Labels are drawn here, from their own seeded generator, because torch-fidelity's own label path
    (num_classes > 0) uses `np.int`, gone in numpy 2; `drawn` records them for the GAN-test. `kept`
    collects the images for the structure checker, so both see the very same samples.
    """

    def __init__(self, generator: nn.Module, seed: int, keep: bool):
        super().__init__()
        self.generator = generator
        self.classes = generator.config.num_classes
        self.labels = torch.Generator().manual_seed(seed)
        self.kept: list[torch.Tensor] | None = [] if keep else None
        self.drawn: list[torch.Tensor] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        device = next(self.generator.parameters()).device
        y = None
        if self.classes:
            y = torch.randint(self.classes, (z.shape[0],), generator=self.labels)
            self.drawn.append(y)
            y = y.to(device)
        images = _rgb(to_uint8(self.generator(z.to(device), y)))
        if self.kept is not None:
            self.kept.append(images.cpu())
        return images


def _draw(sampler: _Sampler, n: int, batch_size: int, seed: int) -> None:
    """Run the sampler as torch-fidelity would (same noise source and order), without Inception."""
    rng = np.random.RandomState(seed)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            sampler(random_normal(rng, (min(batch_size, n - start), sampler.generator.config.z_dim)))


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """Feature extractors take 3 channels: a grey image is repeated (channel dim -3)."""
    return images.expand(*images.shape[:-3], 3, *images.shape[-2:]) if images.shape[-3] == 1 else images


class UInt8Images(Dataset):
    """Images as torch-fidelity reads them (uint8 [3, H, W], no label): a tensor or a sagan dataset."""

    def __init__(self, source: torch.Tensor | Dataset, indices: list[int] | None = None):
        self.source = source
        self.indices = list(range(len(source))) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.source[self.indices[i]]
        return _rgb(item if isinstance(self.source, torch.Tensor) else to_uint8(item[0]))

    def stack(self) -> torch.Tensor:
        return torch.stack([self[i] for i in range(len(self))])


class _Reference(Dataset):
    """The reference images, built only on a feature-cache miss."""

    def __init__(self, data: DataConfig, resolution: int, count: int, num_classes: int = 0):
        self.data, self.resolution, self.count, self.num_classes = data, resolution, count, num_classes
        self._images: UInt8Images | None = None

    @property
    def images(self) -> UInt8Images:
        if self._images is None:
            full = build_dataset(self.data, self.resolution, self.num_classes)
            order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))  # a fixed random subset: a prefix could be one class
            self._images = UInt8Images(full, sorted(order[: self.count].tolist()))
        return self._images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def reference_classes(data: DataConfig, num_classes: int) -> int:
    """The class count the reference images are built with: it changes the pixels of the synthetic
    data only (class k has disc hue k/K), and a folder or LMDB is the same images either way."""
    return num_classes if data.kind == "synthetic" else 0


def _spaces(chosen: list[str], inception_weights: str | Path | None,
            classifier: str | Path | None) -> list[tuple[FeatureSpace, list[str], ClassifierInfo | None]]:
    """(feature space, its metrics without prefix, classifier info) for each space the metrics need."""
    spaces = []
    inception = [m for m in chosen if m in INCEPTION_METRICS]
    if inception:
        spaces.append((inception_space(find_inception_weights(inception_weights)), inception, None))
    wanted = [m.removeprefix("classifier_") for m in chosen if m in CLASSIFIER_METRICS]
    if wanted:
        space, info = classifier_space(classifier)
        spaces.append((space, wanted, info))
    return spaces


def _label_classes(labels: torch.Tensor | None, classifier_classes: int) -> int:
    """The class count saved samples claim: the classifier's when every label is one of its classes."""
    if labels is None or len(labels) == 0 or int(labels.min()) < 0:
        return 0
    return classifier_classes if int(labels.max()) < classifier_classes else int(labels.max()) + 1


def evaluate(source: nn.Module | UInt8Images, data: DataConfig, resolution: int, *, metrics: str | list[str],
             num_samples: int | None = None, reference_count: int | None = None,
             inception_weights: str | Path | None = None, classifier: str | Path | None = None,
             device: str | torch.device | None = None, batch_size: int = 64, seed: int = 0, verbose: bool = False,
             num_classes: int | None = None, labels: torch.Tensor | None = None) -> EvalResult:
    """Score a generator (drawn straight into torch-fidelity) or a set of uint8 images against `data`.

    The one code path behind `sagan eval` and evaluation during training. `reference_count`
    defaults to the number of evaluated images (balanced sets suit KID and precision/recall).
    `num_classes` is the model's class count (a generator's own config wins): the synthetic
    reference images depend on it. `labels` are the intended classes of saved samples (GAN-test).
    """
    chosen = parse_metrics(metrics, data)
    spaces = _spaces(chosen, inception_weights, classifier)  # bad weights or classifier fail before any work
    is_generator = isinstance(source, nn.Module)
    if is_generator:
        num_classes = source.config.num_classes
        n = num_samples if num_samples is not None else 10000
        dev = torch.device(device) if device is not None else next(source.parameters()).device
    else:
        n = min(num_samples, len(source)) if num_samples is not None else len(source)
        dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        labels = labels[:n] if labels is not None else None
    if n < MIN_SAMPLES or batch_size < 1:
        raise UserError(f"-n must be >= {MIN_SAMPLES} (got {n}) and --batch-size >= 1 (got {batch_size})")
    for _, wanted, info in spaces:
        if info is not None:
            channels = getattr(source.config, "channels", 3) if is_generator else None
            classes = num_classes if is_generator else _label_classes(labels, info.config.num_classes)
            check_classifier(info, resolution=resolution, channels=channels, num_classes=classes or 0,
                             gan_test="gan_test" in wanted, labelled=bool(classes))
    if any(m in ("fid", "kid", "prc") for _, wanted, _ in spaces for m in wanted):
        check_cache_writable()
    started = time.perf_counter()
    protocol: dict[str, Any] = {"num_samples": n, "image_size": resolution, "seed": seed, "device": dev.type,
                                "metrics": chosen, "sagan": __version__}
    reference = _Reference(replace(data, hflip=False), resolution, reference_count or n,
                           reference_classes(data, num_classes or 0))
    values: dict[str, float] = {}
    kept: torch.Tensor | None = None
    keep = "structure" in chosen
    if is_generator and keep and not spaces:
        sampler = _Sampler(source, seed, keep=True)
        was_training = source.training
        try:
            source.eval()
            _draw(sampler, n, batch_size, seed)
        finally:
            source.train(was_training)
        kept = torch.cat(sampler.kept)
    for space, wanted, _ in spaces:
        scores, images = _score(space, wanted, source, n=n, labels=labels, reference=reference, device=dev,
                                batch_size=batch_size, seed=seed, verbose=verbose, keep=keep and kept is None,
                                protocol=protocol)
        values.update(scores)
        kept = images if kept is None else kept
    if keep and kept is None:
        kept = UInt8Images(source.source, source.indices[:n]).stack()
    if kept is not None:
        scores = score_images(kept, blobs_per_side=data.synthetic_blobs_per_side)
        values.update({f"structure_{k}": v for k, v in scores.items()})
    protocol["seconds"] = round(time.perf_counter() - started, 2)
    return EvalResult(values, protocol)


def _score(space: FeatureSpace, wanted: list[str], source: nn.Module | UInt8Images, *, n: int,
           labels: torch.Tensor | None, reference: _Reference, device: torch.device, batch_size: int, seed: int,
           verbose: bool, keep: bool, protocol: dict[str, Any]) -> tuple[dict[str, float], torch.Tensor | None]:
    """One feature space's metrics (and, with `keep`, the generated images); records its protocol."""
    dev = device
    cuda = dev.type == "cuda"
    layers = [space.layers[m] for m in wanted if m in space.layers] + (["logits"] if "gan_test" in wanted else [])
    kept = None
    with torch.cuda.device(dev) if cuda else nullcontext():  # torch-fidelity's .cuda() means the current device
        extractor = space.create(layers, cuda, verbose)
        if isinstance(source, nn.Module):
            sampler = _Sampler(source, seed, keep=keep)  # a fresh one per space: the same labels in each
            wrapped = GenerativeModelModuleWrapper(sampler, source.config.z_dim, "normal", 0, make_eval=True)
            was_training = source.training
            try:
                features = extract(wrapped, extractor, num_samples=n, batch_size=batch_size, cuda=cuda, seed=seed,
                                   verbose=verbose)
            finally:
                source.train(was_training)
            labels = torch.cat(sampler.drawn) if sampler.drawn else None
            kept = torch.cat(sampler.kept) if keep else None
        else:
            images = UInt8Images(source.source, source.indices[:n])
            features = extract(images, extractor, num_samples=n, batch_size=batch_size, cuda=cuda, seed=seed,
                               verbose=verbose)
            kept = images.stack() if keep else None
        binary = [m for m in wanted if m in ("fid", "kid", "prc")]
        ref_features, cache = None, None
        if binary:
            identity = dataset_identity(reference.data, reference.resolution, reference.num_classes)
            definition = f"{identity}|{reference.resolution}|{reference.num_classes}|{reference.count}"
            ref_features, cache = reference_features(space, [space.layers[m] for m in binary], definition,
                                                     lambda: reference, batch_size=batch_size, cuda=cuda,
                                                     verbose=verbose)
            ref_count = len(next(iter(ref_features.values())))
            protocol.update({"num_reference": ref_count, "dataset": identity,
                             "reference_num_classes": reference.num_classes})
    settings = {
        "isc_splits": max(1, min(10, n // 100)),  # splits of >= 100 images: a 1-image split always scores 1
        "kid_subsets": KID_SUBSETS,
        "kid_subset_size": min(1000, n, ref_count) if binary else None,
        "prc_neighborhood": PRC_NEIGHBORHOOD,
    }
    values = fidelity_metrics(features, ref_features, space, [m for m in wanted if m in INCEPTION_METRICS],
                              rng_seed=seed, save_cpu_ram=True, verbose=verbose,
                              **{k: v for k, v in settings.items() if v is not None})
    if "gan_test" in wanted:
        hits = features["logits"].argmax(1).cpu() == labels
        values["gan_test_accuracy"] = hits.sum().item() / len(hits)
    if space.extractor == FEATURE_EXTRACTOR:
        weights = space.weights_path
        protocol.update({
            "reference_cache": str(cache) if cache else None,
            "feature_extractor": FEATURE_EXTRACTOR,
            "feature_extractor_input_size": 299,
            "feature_extractor_weights": str(weights),
            "feature_extractor_weights_sha256": space.weights_sha256,
            "feature_extractor_weights_official": space.weights_sha256.startswith(OFFICIAL_SHA256_PREFIX),
            **settings,
        })
    else:
        protocol["classifier"] = {**space.details, "reference_cache": str(cache) if cache else None, **settings}
    protocol["torch_fidelity"] = torch_fidelity.__version__
    return values, kept


def evaluate_generator(generator: nn.Module, recipe: Recipe, *, num_samples: int, metrics: list[str] | str,
                       inception_weights: str | Path | None = None, classifier: str | Path | None = None,
                       device: str | torch.device | None = None, batch_size: int = 64,
                       seed: int = 0) -> dict[str, float]:
    """Flat metric values (fid, isc_mean, classifier_fid, gan_test_accuracy, ..., structure_*) for training.

    Pass the unwrapped generator (not a DDP wrapper); its train/eval mode is restored afterwards.
    The weights default to the recipe's eval.inception_weights, then the usual lookup; the
    classifier to eval.classifier.
    """
    weights = inception_weights or recipe.eval.inception_weights or None
    return evaluate(generator, recipe.data, generator.config.resolution, metrics=metrics, num_samples=num_samples,
                    inception_weights=weights, classifier=classifier or recipe.eval.classifier or None,
                    device=device, batch_size=batch_size, seed=seed).metrics
