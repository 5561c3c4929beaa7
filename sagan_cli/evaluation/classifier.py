"""A small CNN classifier trained on a labelled dataset: an offline feature space for `sagan eval`.

Inception weights do not reach every machine, and Inception features of 28x28 clothing are a
poor judge anyway. A compact classifier trained in minutes on the real data gives features
(its penultimate layer) for FID/KID/precision-recall and logits for the GAN-test accuracy.
Its numbers are comparable only between evaluations with the same classifier file, so the file
carries a hash of its weights, the dataset it learnt and its test accuracy in its metadata:

  sagan.kind              "classifier"
  sagan.classifier_config ClassifierConfig as JSON (channels, resolution, classes, width)
  sagan.weights_sha256    SHA-256 of the tensors (names, dtypes, shapes, bytes), checked on load
  sagan.dataset           identity of the training images (sagan_cli.data.datasets.dataset_identity)
  sagan.class_names       JSON list
  sagan.test_accuracy     top-1 accuracy on the test images, sagan.test_images of them
  sagan.test_set          where the test images come from
  sagan.train_images, sagan.epochs, sagan.recipe, sagan.version
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from sagan_cli import __version__
from sagan_cli.config import DataConfig
from sagan_cli.errors import UserError
from sagan_cli.interchange.checkpoint import atomic_write

KIND = "classifier"
MAX_HELD_OUT = 10000  # images held out for the test accuracy when no test set is given


@dataclass(frozen=True)
class ClassifierConfig:
    channels: int = 3  # image channels it reads (1: grayscale)
    resolution: int = 32  # image size it was trained at; other sizes are resized to it
    num_classes: int = 10  # outputs (logits)
    width: int = 16  # channels of the first conv; doubled twice, so features have 4 x width values

    @property
    def feature_dim(self) -> int:
        return 4 * self.width


@dataclass(frozen=True)
class ClassifierInfo:
    config: ClassifierConfig
    weights_sha256: str
    dataset: str
    class_names: list[str]
    test_accuracy: float
    test_images: int
    test_set: str
    train_images: int
    epochs: int
    recipe: str
    version: str
    path: Path | None = None


class Classifier(nn.Module):
    """Four conv blocks (three halve the size), global average pooling, one linear layer.

    `features(x)` is the pooled penultimate activation, `forward(x)` the logits. Input: float
    images in [-1, 1], [B, channels, resolution, resolution], as sagan's datasets yield them.
    BatchNorm makes it train in a few epochs; in eval mode an image's features do not depend
    on its batch-mates.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        widths = [config.channels, w, 2 * w, 4 * w, 4 * w]
        blocks: list[nn.Module] = []
        for i in range(4):
            blocks += [nn.Conv2d(widths[i], widths[i + 1], 3, padding=1, bias=False),
                       nn.BatchNorm2d(widths[i + 1]), nn.ReLU(inplace=True)]
            if i < 3:
                blocks.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of the weights themselves (not the file), so it can live in the file's metadata."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_classifier(path: str | Path, model: Classifier, *, dataset: str, class_names: list[str],
                    test_accuracy: float, test_images: int, test_set: str, train_images: int, epochs: int,
                    recipe: str = "recipe") -> ClassifierInfo:
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    info = ClassifierInfo(model.config, weights_sha256(state), dataset, list(class_names), float(test_accuracy),
                          int(test_images), test_set, int(train_images), int(epochs), recipe, __version__, Path(path))
    metadata = {
        "sagan.kind": KIND,
        "sagan.classifier_config": json.dumps(asdict(info.config), sort_keys=True),
        "sagan.weights_sha256": info.weights_sha256,
        "sagan.dataset": dataset,
        "sagan.class_names": json.dumps(info.class_names),
        "sagan.test_accuracy": repr(info.test_accuracy),
        "sagan.test_images": str(info.test_images),
        "sagan.test_set": test_set,
        "sagan.train_images": str(info.train_images),
        "sagan.epochs": str(info.epochs),
        "sagan.recipe": recipe,
        "sagan.version": __version__,
    }
    atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=metadata))
    return info


def _read_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise UserError(f"classifier {path} {what}; train one with `sagan classifier train RECIPE --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as classifier_file:
            return classifier_file.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"classifier {path} is not a safetensors file ({str(exc)[:120]}); "
                        "give a file written by `sagan classifier train`") from None


# Bounds on what a classifier file may ask for (it is untrusted: a huge width or class count would
# allocate until the machine is killed).
CLASSIFIER_SIZE_LIMITS = {"resolution": (8, 1024), "num_classes": (2, 100_000), "width": (1, 1024)}


def check_classifier_sizes(config: ClassifierConfig, path: Path) -> None:
    """Refuse sizes no classifier of ours has, before the model is built."""
    for key, (low, high) in CLASSIFIER_SIZE_LIMITS.items():
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise UserError(f"classifier {path} asks for {key} = {value!r}, outside {low}-{high}; the file is "
                            "damaged or not from `sagan classifier train`")
    if config.channels not in (1, 3) or isinstance(config.channels, bool):
        raise UserError(f"classifier {path} asks for channels = {config.channels!r}, not 1 or 3; the file is "
                        "damaged or not from `sagan classifier train`")


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, ClassifierInfo]:
    """The classifier a file holds (eval mode), its weights checked against their hash."""
    path = Path(path).expanduser()
    meta = _read_metadata(path)
    if meta.get("sagan.kind") != KIND:
        held = meta.get("sagan.kind")
        what = f"holds a sagan {held}" if held else "has no sagan classifier metadata"
        raise UserError(f"{path} {what}, not a classifier; train one with `sagan classifier train RECIPE`")
    try:
        config = ClassifierConfig(**json.loads(meta["sagan.classifier_config"]))
        check_classifier_sizes(config, path)
        info = ClassifierInfo(
            config, meta["sagan.weights_sha256"], meta["sagan.dataset"], json.loads(meta["sagan.class_names"]),
            float(meta["sagan.test_accuracy"]), int(meta["sagan.test_images"]), meta["sagan.test_set"],
            int(meta["sagan.train_images"]), int(meta["sagan.epochs"]), meta.get("sagan.recipe", "recipe"),
            meta.get("sagan.version", "unknown"), path)
        model = Classifier(config)
        state = load_file(str(path))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError, SafetensorError, RuntimeError) as exc:
        raise UserError(f"classifier {path} has damaged metadata or tensors ({type(exc).__name__}: {str(exc)[:100]}); "
                        "train it again with `sagan classifier train`") from None
    if weights_sha256(state) != info.weights_sha256:
        raise UserError(f"classifier {path}: its weights do not match the hash in its metadata (a damaged or "
                        "edited file); train it again with `sagan classifier train`")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"classifier {path}: its weights do not match its config ({str(exc).splitlines()[-1][:120]})") from None
    return model.to(device).eval(), info


def to_classifier_input(images: torch.Tensor, config: ClassifierConfig) -> torch.Tensor:
    """uint8 [B, 3, H, W] (what torch-fidelity hands a feature extractor) -> float [-1, 1] at the
    classifier's channels and size. Grey images arrive as three equal channels; their ITU-R 601
    luma (Pillow's "L") is that same value, and colour images become what Pillow would make of them."""
    x = images.float()
    if config.channels == 1 and x.shape[1] == 3:
        x = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif config.channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (config.resolution, config.resolution):
        x = F.interpolate(x, size=(config.resolution, config.resolution), mode="bilinear", antialias=True,
                          align_corners=False)
    return x / 127.5 - 1


def held_out_split(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, test indices): a fixed random `fraction` (at most MAX_HELD_OUT) is held out."""
    test = min(MAX_HELD_OUT, max(1, round(count * fraction)))
    if count - test < 1:
        raise UserError(f"the data has {count} image(s): too few to hold some out for the test accuracy")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[test:]), sorted(order[:test])


@torch.no_grad()
def accuracy(model: Classifier, data: Dataset, batch_size: int, device: torch.device, workers: int = 0) -> float:
    """Top-1 accuracy on a labelled sagan dataset (float images in [-1, 1])."""
    model.eval()
    correct = total = 0
    for images, labels in DataLoader(data, batch_size=batch_size, num_workers=workers):
        predicted = model(images.to(device)).argmax(1).cpu()
        correct += int((predicted == labels).sum())
        total += len(labels)
    return correct / max(1, total)


def train_classifier(data: DataConfig, resolution: int, num_classes: int, out: str | Path, *,
                     test_data: DataConfig | None = None, test_fraction: float = 0.1, epochs: int = 3,
                     batch_size: int = 128, lr: float = 2e-3, width: int = 16, seed: int = 0,
                     device: str | torch.device = "cpu", recipe: str = "recipe", progress: bool = False,
                     channels: int | None = None) -> ClassifierInfo:
    """Train on `data` (labels from the dataset), measure test accuracy, save to `out`.

    `channels` is what the recipe's models read (model.channels): a grayscale folder or LSUN recipe
    gets a 1-channel classifier, which `eval --classifier` accepts for its generators. None: the data's own.

    The test images are `test_data` when given, else a held-out random `test_fraction` of `data`.
    Adam with a cosine-decaying learning rate; no augmentation (the features should describe the data).
    """
    from sagan_cli.data.datasets import build_dataset, dataset_identity

    if num_classes < 2:
        raise UserError("a classifier needs labels: set model.num_classes (>= 2) to the dataset's class count")
    if epochs < 1 or batch_size < 1 or width < 1 or lr <= 0 or not 0 < test_fraction < 1:
        raise UserError("--epochs, --batch-size and --width must be >= 1, --lr > 0, and the test fraction in (0, 1)")
    for key, value in (("width", width), ("num_classes", num_classes), ("resolution", resolution)):
        low, high = CLASSIFIER_SIZE_LIMITS[key]
        if not low <= value <= high:  # the bounds every classifier file is read with: never write one they refuse
            raise UserError(f"classifier {key} = {value} is outside {low}-{high}, which `eval --classifier` reads")
    data = replace(data, hflip=False)
    full = build_dataset(data, resolution, num_classes, channels)
    channels = int(full[0][0].shape[0])
    if test_data is not None:
        test_set = build_dataset(replace(test_data, hflip=False), resolution, num_classes, channels)
        train_set: Dataset = full
        where = f"{test_data.kind} {test_data.path}".strip()
    else:
        train_idx, test_idx = held_out_split(len(full), test_fraction, seed)
        train_set, test_set = Subset(full, train_idx), Subset(full, test_idx)
        where = f"held out: {len(test_idx)} random images of the training data (seed {seed})"
    torch.manual_seed(seed)
    device = torch.device(device)
    model = Classifier(ClassifierConfig(channels, resolution, num_classes, width)).to(device)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=len(train_set) > batch_size,
                        num_workers=data.workers, generator=torch.Generator().manual_seed(seed))
    total = epochs * len(loader)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    started = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        seen = loss_sum = 0.0
        for images, labels in loader:
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / seen:.4f} ({time.perf_counter() - started:.0f} s)")
    test_accuracy = accuracy(model, test_set, batch_size, device, data.workers)
    names = list(getattr(full, "class_names", []) or [str(label) for label in range(num_classes)])
    return save_classifier(out, model, dataset=dataset_identity(data, resolution, num_classes), class_names=names,
                           test_accuracy=test_accuracy, test_images=len(test_set), test_set=where,
                           train_images=len(train_set), epochs=epochs, recipe=recipe)


def train_from_recipe(recipe_path: str | Path, *, out: str | Path | None = None, overrides: list[str] = (),
                      test_overrides: list[str] = (), device: str | None = None, **options) -> ClassifierInfo:
    """`sagan classifier train`: the recipe's data, resolution and class count; `test_overrides`
    (data.key=value) turn the recipe's data into the test set, else part of the data is held out."""
    from sagan_cli.config import load_recipe
    from sagan_cli.errors import check_writable
    from sagan_cli.model.generation import resolve_device

    recipe = load_recipe(recipe_path, list(overrides))
    for text in test_overrides:
        if not text.strip().startswith("data."):
            raise UserError(f"--test-set takes data.key=value (the test images' [data] keys), got {text!r}")
    test_data = load_recipe(recipe_path, [*overrides, *test_overrides]).data if test_overrides else None
    out = Path(out) if out is not None else Path("classifiers") / f"{recipe.name}.safetensors"
    check_writable(out, "--out")  # now, not after minutes of training
    info = train_classifier(recipe.data, recipe.model.resolution, recipe.model.num_classes, out,
                            test_data=test_data, device=resolve_device(device), recipe=recipe.name,
                            progress=True, channels=recipe.model.channels, **options)
    print(f"wrote {out}: {info.config.channels}-channel {info.config.resolution}x{info.config.resolution}, "
          f"{info.config.num_classes} classes, test accuracy {info.test_accuracy:.2%} on {info.test_images} images "
          f"({info.test_set}); weights sha256 {info.weights_sha256[:12]}")
    return info
