"""`sagan eval`'s library: FID, IS, KID, precision/recall and GAN-test accuracy, offline-first.

torch-fidelity downloads its Inception weights on first use, assumes CUDA, crashes on numpy 2 for
conditional generators and unpickles its own cache. So here: the Inception weights come from a
local file (`sagan_cli.evaluation.inception`; or we fail at once saying how to get one), a generator is wrapped as unconditional
with its labels drawn inside `forward`, and features go through torch-fidelity's extractors with
the reference features cached by `sagan_cli.evaluation.features` as safetensors.
Two feature spaces: Inception (`fid`, `isc`, `kid`, `prc`) and a sagan classifier trained on the
data (`classifier_fid`, `classifier_kid`, `classifier_prc`, and `gan_test`: the classifier's
accuracy on a conditional generator's samples against their intended classes, Shmelkov et al.
2018). Output names carry the space, so the two are never mixed up in one table or log.
The synthetic data also gets the structure checker's scores, which need no weights at all.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.generative_model_modulewrapper import GenerativeModelModuleWrapper
from torch_fidelity.noise import random_normal

from sagan_cli import __version__
from sagan_cli.config import DATA_CHANNELS, DataConfig, Recipe
from sagan_cli.data.datasets import build_dataset, dataset_identity
from sagan_cli.data.structure import score_images
from sagan_cli.errors import UserError
from sagan_cli.evaluation.classifier import ClassifierInfo
from sagan_cli.evaluation.features import (
    FeatureSpace,
    check_cache_writable,
    check_classifier,
    classifier_space,
    extract,
    fidelity_metrics,
    reference_features,
)
from sagan_cli.evaluation.inception import OFFICIAL_SHA256_PREFIX, InceptionWeights, find_inception_weights
from sagan_cli.model.generation import to_uint8

FEATURE_EXTRACTOR = "inception-v3-compat"  # also for precision/recall: torch-fidelity's default there is VGG16 (a download)
INCEPTION_METRICS = ("fid", "isc", "kid", "prc")
CLASSIFIER_METRICS = ("classifier_fid", "classifier_kid", "classifier_prc", "gan_test")
ALL_METRICS = (*INCEPTION_METRICS, *CLASSIFIER_METRICS, "structure")
INCEPTION_LAYERS = {"isc": "logits_unbiased", "fid": "2048", "kid": "2048", "prc": "2048"}
KID_SUBSETS = 100
PRC_NEIGHBORHOOD = 3
MIN_SAMPLES = PRC_NEIGHBORHOOD + 2  # precision/recall needs more points than neighbours


@dataclass
class EvalResult:
    metrics: dict[str, float]
    protocol: dict[str, Any] = field(default_factory=dict)


def parse_metrics(metrics: str | list[str] | tuple[str, ...], data: DataConfig) -> list[str]:
    """Validated, ordered metric names; synthetic data always adds `structure` (it is free)."""
    names = [metric.strip().lower() for metric in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    names = [metric for metric in names if metric]
    for name in names:
        if name not in ALL_METRICS:
            raise UserError(f"--metrics: unknown metric {name!r}; choose from {','.join(ALL_METRICS)}")
    if "structure" in names and data.kind != "synthetic":
        raise UserError("--metrics structure scores only the built-in synthetic data (data.kind = 'synthetic'); drop it")
    if data.kind == "synthetic":
        names.append("structure")
    chosen = [metric for metric in ALL_METRICS if metric in names]
    if not chosen:
        raise UserError(f"--metrics is empty; choose from {','.join(ALL_METRICS)}")
    return chosen


def inception_space(weights: InceptionWeights) -> FeatureSpace:
    return FeatureSpace(FEATURE_EXTRACTOR, weights.path, weights.sha256, INCEPTION_LAYERS)


def check_evaluation(recipe: Recipe) -> None:
    """What training checks before step 1: the metric names, the Inception weights, the classifier."""
    chosen = parse_metrics(recipe.eval.metrics, recipe.data)
    if any(metric in INCEPTION_METRICS for metric in chosen):
        find_inception_weights(recipe.eval.inception_weights or None)
    if any(metric in CLASSIFIER_METRICS for metric in chosen):
        _, info = classifier_space(recipe.eval.classifier or None)
        model = recipe.model
        check_classifier(info, resolution=model.resolution, channels=getattr(model, "channels", 3),
                         num_classes=model.num_classes, gan_test="gan_test" in chosen, labelled=model.num_classes > 0)


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

    def __init__(self, data: DataConfig, resolution: int, count: int, num_classes: int = 0, channels: int = 3):
        self.data, self.resolution, self.count, self.num_classes = data, resolution, count, num_classes
        # read as the model reads them: a grayscale model's folder or LSUN images in grayscale (then
        # repeated to 3 channels for the extractor, as its generated images are); IDX, CIFAR-10 and
        # synthetic data have their own fixed channels
        self.channels = channels if data.kind not in DATA_CHANNELS else DATA_CHANNELS[data.kind]
        self._images: UInt8Images | None = None

    @property
    def images(self) -> UInt8Images:
        if self._images is None:
            full = build_dataset(self.data, self.resolution, self.num_classes,
                                 None if self.data.kind in DATA_CHANNELS else self.channels)
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
    inception = [metric for metric in chosen if metric in INCEPTION_METRICS]
    if inception:
        spaces.append((inception_space(find_inception_weights(inception_weights)), inception, None))
    wanted = [metric.removeprefix("classifier_") for metric in chosen if metric in CLASSIFIER_METRICS]
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
    if isinstance(source, nn.Module):
        num_classes = source.config.num_classes
        n = num_samples if num_samples is not None else 10000
        device = torch.device(device) if device is not None else next(source.parameters()).device
    else:
        n = min(num_samples, len(source)) if num_samples is not None else len(source)
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        labels = labels[:n] if labels is not None else None
    _check_inputs(spaces, source, n=n, batch_size=batch_size, resolution=resolution, num_classes=num_classes,
                  labels=labels)
    started = time.perf_counter()
    protocol: dict[str, Any] = {"num_samples": n, "image_size": resolution, "seed": seed, "device": device.type,
                                "metrics": chosen, "sagan": __version__}
    reference = _Reference(replace(data, hflip=False), resolution, reference_count or n,
                           reference_classes(data, num_classes or 0), source_channels(source))
    values: dict[str, float] = {}
    keep = "structure" in chosen  # the structure checker scores the very images the feature spaces saw
    kept: torch.Tensor | None = None
    for space, wanted, _ in spaces:
        scores, images = _score(space, wanted, source, n=n, labels=labels, reference=reference, device=device,
                                batch_size=batch_size, seed=seed, verbose=verbose, keep=keep and kept is None,
                                protocol=protocol)
        values.update(scores)
        kept = images if kept is None else kept
    if keep:
        kept = kept if kept is not None else _images_for_structure(source, n=n, batch_size=batch_size, seed=seed)
        scores = score_images(kept, blobs_per_side=data.synthetic_blobs_per_side)
        values.update({f"structure_{key}": value for key, value in scores.items()})
    protocol["seconds"] = round(time.perf_counter() - started, 2)
    return EvalResult(values, protocol)


def source_channels(source: nn.Module | UInt8Images) -> int:
    """The channels of what is evaluated: a generator's config, else the saved samples' own (1 for the
    grayscale .npz or 'L'-mode PNGs `sagan sample` writes for a grayscale model)."""
    if isinstance(source, nn.Module):
        return getattr(source.config, "channels", 3)
    if isinstance(source.source, torch.Tensor):
        return int(source.source.shape[1])
    return getattr(source.source, "channels", 3)


def _check_inputs(spaces, source: nn.Module | UInt8Images, *, n: int, batch_size: int, resolution: int,
                  num_classes: int | None, labels: torch.Tensor | None) -> None:
    """Refuse, before any work, what would fail (or mean nothing) after minutes of feature extraction."""
    if n < MIN_SAMPLES or batch_size < 1:
        raise UserError(f"-n must be >= {MIN_SAMPLES} (got {n}) and --batch-size >= 1 (got {batch_size})")
    is_generator = isinstance(source, nn.Module)
    for _, wanted, info in spaces:
        if info is not None:
            channels = getattr(source.config, "channels", 3) if is_generator else None
            classes = num_classes if is_generator else _label_classes(labels, info.config.num_classes)
            check_classifier(info, resolution=resolution, channels=channels, num_classes=classes or 0,
                             gan_test="gan_test" in wanted, labelled=bool(classes))
    if any(metric in ("fid", "kid", "prc") for _, wanted, _ in spaces for metric in wanted):
        check_cache_writable()


def _images_for_structure(source: nn.Module | UInt8Images, *, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """The n images the structure checker scores when no feature space drew them already."""
    if not isinstance(source, nn.Module):
        return UInt8Images(source.source, source.indices[:n]).stack()
    sampler = _Sampler(source, seed, keep=True)
    was_training = source.training
    try:
        source.eval()
        _draw(sampler, n, batch_size, seed)
    finally:
        source.train(was_training)
    return torch.cat(sampler.kept)


def _score(space: FeatureSpace, wanted: list[str], source: nn.Module | UInt8Images, *, n: int,
           labels: torch.Tensor | None, reference: _Reference, device: torch.device, batch_size: int, seed: int,
           verbose: bool, keep: bool, protocol: dict[str, Any]) -> tuple[dict[str, float], torch.Tensor | None]:
    """One feature space's metrics (and, with `keep`, the generated images); records its protocol."""
    cuda = device.type == "cuda"
    layers = [space.layers[metric] for metric in wanted if metric in space.layers]
    layers += ["logits"] if "gan_test" in wanted else []
    paired = [metric for metric in wanted if metric in ("fid", "kid", "prc")]  # against the reference set
    options = dict(batch_size=batch_size, cuda=cuda, verbose=verbose)
    with torch.cuda.device(device) if cuda else nullcontext():  # torch-fidelity's .cuda() means the current device
        extractor = space.create(layers, cuda, verbose)
        features, drawn_labels, kept = _features(extractor, source, n=n, seed=seed, keep=keep, **options)
        labels = drawn_labels if isinstance(source, nn.Module) else labels
        ref_features, cache = None, None
        if paired:
            identity = dataset_identity(reference.data, reference.resolution, reference.num_classes)
            definition = f"{identity}|{reference.resolution}|{reference.num_classes}|{reference.count}"
            if reference.channels == 1 and reference.data.kind not in DATA_CHANNELS:  # others keep their caches
                definition += "|grayscale"
            ref_features, cache = reference_features(space, [space.layers[metric] for metric in paired], definition,
                                                     lambda: reference, **options)
            protocol.update({"num_reference": len(next(iter(ref_features.values()))), "dataset": identity,
                             "reference_num_classes": reference.num_classes})
    settings = {
        "isc_splits": max(1, min(10, n // 100)),  # splits of >= 100 images: a 1-image split always scores 1
        "kid_subsets": KID_SUBSETS,
        "kid_subset_size": min(1000, n, protocol["num_reference"]) if paired else None,
        "prc_neighborhood": PRC_NEIGHBORHOOD,
    }
    fidelity_names = [metric for metric in wanted if metric in INCEPTION_METRICS]  # gan_test is ours
    values = fidelity_metrics(features, ref_features, space, fidelity_names, rng_seed=seed, save_cpu_ram=True,
                              verbose=verbose, **{key: value for key, value in settings.items() if value is not None})
    if "gan_test" in wanted:
        hits = features["logits"].argmax(1).cpu() == labels
        values["gan_test_accuracy"] = hits.sum().item() / len(hits)
    protocol.update(_space_protocol(space, cache, settings))
    return values, kept


def _features(extractor, source: nn.Module | UInt8Images, *, n: int, seed: int, keep: bool, batch_size: int,
              cuda: bool, verbose: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """The features of n images of `source`, the labels a generator drew for them, and (`keep`) the images."""
    if not isinstance(source, nn.Module):
        images = UInt8Images(source.source, source.indices[:n])
        features = extract(images, extractor, num_samples=n, batch_size=batch_size, cuda=cuda, seed=seed,
                           verbose=verbose)
        return features, None, images.stack() if keep else None
    sampler = _Sampler(source, seed, keep=keep)  # a fresh one per space: the same labels in each
    wrapped = GenerativeModelModuleWrapper(sampler, source.config.z_dim, "normal", 0, make_eval=True)
    was_training = source.training
    try:
        features = extract(wrapped, extractor, num_samples=n, batch_size=batch_size, cuda=cuda, seed=seed,
                           verbose=verbose)
    finally:
        source.train(was_training)
    labels = torch.cat(sampler.drawn) if sampler.drawn else None
    return features, labels, torch.cat(sampler.kept) if keep else None


def _space_protocol(space: FeatureSpace, cache: Path | None, settings: dict[str, Any]) -> dict[str, Any]:
    """What a reader needs to compare these numbers with others: extractor, weights, cache, settings."""
    if space.extractor != FEATURE_EXTRACTOR:
        return {"classifier": {**space.details, "reference_cache": str(cache) if cache else None, **settings},
                "torch_fidelity": torch_fidelity.__version__}
    return {
        "reference_cache": str(cache) if cache else None,
        "feature_extractor": FEATURE_EXTRACTOR,
        "feature_extractor_input_size": 299,
        "feature_extractor_weights": str(space.weights_path),
        "feature_extractor_weights_sha256": space.weights_sha256,
        "feature_extractor_weights_official": space.weights_sha256.startswith(OFFICIAL_SHA256_PREFIX),
        **settings,
        "torch_fidelity": torch_fidelity.__version__,
    }


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
