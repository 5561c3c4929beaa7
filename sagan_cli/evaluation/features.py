"""Feature spaces for `sagan eval`: features through torch-fidelity, reference features cached as safetensors.

Two spaces: torch-fidelity's Inception (`inception-v3-compat`, the published FID/IS/KID/PR) and a
sagan classifier (`sagan-classifier`, registered with torch-fidelity as a feature extractor).
torch-fidelity's own cache reads its files with `torch.load` and full unpickling (utils.py,
cache_lookup_*), so anything planted in a cache folder would run. So it is never asked to cache:
features come from its extraction functions, the reference features are written here as
safetensors under a name that holds the extractor, its weights' hash and the reference's
definition (so two extractors never share an entry), and the metrics come from its functions on
features, which is what `calculate_metrics` does: the numbers are the same.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.generative_model_base import GenerativeModelBase
from torch_fidelity.helpers import vassert
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import (
    create_feature_extractor,
    get_featuresdict_from_dataset,
    get_featuresdict_from_generative_model,
)

from sagan_cli.errors import UserError
from sagan_cli.evaluation.classifier import ClassifierInfo, load_classifier, to_classifier_input
from sagan_cli.interchange.checkpoint import atomic_write

CLASSIFIER_EXTRACTOR = "sagan-classifier"
CLASSIFIER_LAYERS = {"fid": "features", "kid": "features", "prc": "features"}
# torch-fidelity's result keys -> ours (flat, as metrics.jsonl logs them); a space's prefix goes in front
NAMES = {
    KEY_METRIC_FID: "fid",
    "inception_score_mean": "isc_mean",
    "inception_score_std": "isc_std",
    "kernel_inception_distance_mean": "kid_mean",
    "kernel_inception_distance_std": "kid_std",
    "precision": "precision",
    "recall": "recall",
    "f_score": "f_score",
}


class ClassifierExtractor(FeatureExtractorBase):
    """A sagan classifier file as a torch-fidelity feature extractor: `features` and `logits`.

    torch-fidelity hands it uint8 [B, 3, H, W]; it converts them to the classifier's channels and
    size. The file comes in as `feature_extractor_weights_path`, as Inception's weights do.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs: Any):
        super().__init__(name, features_list)
        vassert(feature_extractor_weights_path is not None, "sagan-classifier needs feature_extractor_weights_path")
        self.classifier, self.info = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
        features = self.classifier.features(to_classifier_input(x, self.classifier.config))
        out = {"features": features, "logits": self.classifier.head(features)}
        return tuple(out[name] for name in self.features_list)


def register() -> None:
    """Make `sagan-classifier` known to torch-fidelity (once per process)."""
    if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(CLASSIFIER_EXTRACTOR, ClassifierExtractor)


@dataclass
class FeatureSpace:
    """One feature extractor with its weights, and how our metric names mark it."""

    extractor: str  # torch-fidelity registry name
    weights_path: Path
    weights_sha256: str
    layers: dict[str, str]  # metric (isc, fid, kid, prc) -> feature layer
    prefix: str = ""  # "" for Inception, "classifier_" for the classifier
    details: dict[str, Any] = field(default_factory=dict)  # for the protocol

    def create(self, layers: list[str], cuda: bool, verbose: bool) -> FeatureExtractorBase:
        register()
        return create_feature_extractor(self.extractor, sorted(set(layers)), cuda=cuda, verbose=verbose,
                                        feature_extractor_weights_path=str(self.weights_path))


def classifier_space(path: str | Path | None) -> tuple[FeatureSpace, ClassifierInfo]:
    """The classifier file as a feature space (loaded and hash-checked now: a bad file fails first)."""
    if path in (None, ""):
        raise UserError("classifier_* metrics and gan_test need a classifier: pass --classifier FILE "
                        "(or set eval.classifier); train one with `sagan classifier train RECIPE`")
    path = Path(path).expanduser().absolute()
    _, info = load_classifier(path)
    config = info.config
    details = {"feature_extractor": CLASSIFIER_EXTRACTOR, "path": str(path), "weights_sha256": info.weights_sha256,
               "dataset": info.dataset, "test_accuracy": info.test_accuracy, "test_images": info.test_images,
               "num_classes": config.num_classes, "channels": config.channels, "input_size": config.resolution,
               "feature_dim": config.feature_dim, "feature_layers": {"fid": "features", "kid": "features",
                                                                 "prc": "features", "gan_test": "logits"}}
    return FeatureSpace(CLASSIFIER_EXTRACTOR, path, info.weights_sha256, CLASSIFIER_LAYERS, "classifier_", details), info


def check_classifier(info: ClassifierInfo, *, resolution: int, channels: int | None, num_classes: int,
                     gan_test: bool, labelled: bool) -> None:
    """Refuse a classifier that was not trained on images like these (its numbers would mean nothing)."""
    config, name = info.config, info.path
    if config.resolution != resolution:
        raise UserError(f"classifier {name} was trained on {config.resolution}x{config.resolution} images, these are "
                        f"{resolution}x{resolution}: train one with model.resolution = {resolution}")
    if channels is not None and config.channels != channels:
        raise UserError(f"classifier {name} reads {config.channels}-channel images, this generator makes "
                        f"{channels}-channel ones: train the classifier on the generator's data")
    if gan_test and not labelled:
        raise UserError("gan_test needs intended classes: a class-conditional generator (model.num_classes > 0) "
                        "or the .npz `sagan sample --format npz` writes for one; drop gan_test for this one")
    if gan_test and num_classes != config.num_classes:
        raise UserError(f"classifier {name} knows {config.num_classes} classes, the samples have {num_classes}: "
                        "gan_test needs a classifier trained on the generator's classes")


def extract(source: Dataset | GenerativeModelBase, extractor: FeatureExtractorBase, *, num_samples: int,
            batch_size: int, cuda: bool, seed: int, verbose: bool) -> dict[str, torch.Tensor]:
    """torch-fidelity's own feature extraction of a dataset or a generator (its noise, its order)."""
    if isinstance(source, GenerativeModelBase):
        return get_featuresdict_from_generative_model(source, extractor, num_samples, batch_size, cuda, seed, verbose)
    return get_featuresdict_from_dataset(source, extractor, batch_size, cuda, True, verbose)


def cache_root() -> Path:
    """$SAGAN_CACHE/fidelity, else $XDG_CACHE_HOME/sagan/fidelity, else ~/.cache/sagan/fidelity."""
    base = os.environ.get("SAGAN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sagan"
    return Path(base).expanduser() / "fidelity"


def check_cache_writable() -> None:
    """Fail before any work when the feature cache cannot be written (not after minutes of it)."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as exc:
        raise UserError(f"cannot write the feature cache {root} ({exc.strerror or exc}); "
                        "set SAGAN_CACHE to a writable folder") from None


def reference_cache_path(space: FeatureSpace, layers: list[str], definition: str) -> Path:
    """The cache file of one reference set in one feature space; the extractor and weights are in the name."""
    key = hashlib.sha256(f"{definition}|{space.extractor}|{space.weights_sha256}|{','.join(layers)}".encode())
    return cache_root() / f"sagan-ref-{space.extractor}-{space.weights_sha256[:12]}-{key.hexdigest()[:20]}.safetensors"


def _read_cache(path: Path, space: FeatureSpace, layers: list[str]) -> dict[str, torch.Tensor] | None:
    """The cached features, or None when absent, unreadable or made by another extractor (then rebuilt)."""
    try:
        with safe_open(str(path), framework="pt") as cache_file:
            meta = cache_file.metadata() or {}
            if (meta.get("extractor"), meta.get("weights_sha256")) != (space.extractor, space.weights_sha256):
                return None
            return {layer: cache_file.get_tensor(layer) for layer in layers}
    except (SafetensorError, OSError, ValueError, KeyError):
        return None


def reference_features(space: FeatureSpace, layers: list[str], definition: str, images: Callable[[], Dataset], *,
                       batch_size: int, cuda: bool, verbose: bool) -> tuple[dict[str, torch.Tensor], Path]:
    """Features of the reference images: from the safetensors cache, else computed and cached.

    `definition` names the images (dataset identity, size, classes, count); `images` builds them
    only on a miss, so a hit opens no dataset at all.
    """
    layers = sorted(set(layers))
    path = reference_cache_path(space, layers, definition)
    cached = _read_cache(path, space, layers)
    if cached is not None:
        return cached, path
    dataset = images()
    features = extract(dataset, space.create(layers, cuda, verbose), num_samples=len(dataset),
                       batch_size=batch_size, cuda=cuda, seed=0, verbose=verbose)
    tensors = {layer: features[layer].float().contiguous() for layer in layers}
    meta = {"extractor": space.extractor, "weights_sha256": space.weights_sha256, "reference": definition}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    except OSError as exc:
        raise UserError(f"cannot write the feature cache {path.parent} ({exc.strerror or exc}); "
                        "set SAGAN_CACHE to a writable folder") from None
    return tensors, path


def fidelity_metrics(features: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None,
                     space: FeatureSpace, metrics: list[str], **settings: Any) -> dict[str, float]:
    """isc/fid/kid/prc from features with torch-fidelity's functions, named with the space's prefix.

    `settings` are calculate_metrics keyword arguments (isc_splits, kid_subset_size, rng_seed, ...).
    """
    raw: dict[str, float] = {}
    verbose = settings.get("verbose", False)
    if "isc" in metrics:
        raw.update(isc_featuresdict_to_metric(features, space.layers["isc"], **settings))
    if "fid" in metrics:
        stats = [fid_featuresdict_to_statistics(feature_dict, space.layers["fid"])
                 for feature_dict in (features, reference)]
        raw.update(fid_statistics_to_metric(*stats, verbose))
    if "kid" in metrics:
        raw.update(kid_featuresdict_to_metric(features, reference, space.layers["kid"], **settings))
    if "prc" in metrics:
        raw.update(prc_featuresdict_to_metric(features, reference, space.layers["prc"], **settings))
    return {space.prefix + NAMES[k]: float(v) for k, v in raw.items() if k in NAMES}
