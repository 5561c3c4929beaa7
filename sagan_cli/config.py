"""Recipes: typed dataclasses read from TOML, overridden with `--set`, validated key by key.

Every key has a default, so a recipe only states what differs. Unknown keys, wrong types and
bad values raise `UserError` naming the key (`model.resolution`), never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from sagan_cli.errors import UserError

RESOLUTIONS = (32, 64, 128, 256)
CHANNELS = (1, 3)  # grayscale or RGB
# Channel counts fixed by the data; folder and LSUN images are converted to whatever model.channels says.
DATA_CHANNELS = {"idx": 1, "cifar10-bin": 3, "synthetic": 3}


@dataclass
class DataConfig:
    kind: str = "synthetic"  # folder | lsun | synthetic | idx (MNIST-family files) | cifar10-bin (CIFAR-10 binary)
    path: str = ""  # folder of images (class sub-folders give labels), an LSUN *_lmdb directory, or the IDX/CIFAR files' folder
    split: str = "train"  # idx, cifar10-bin: train (train-*, data_batch_*) | test (t10k-*, test_batch.bin)
    hflip: bool = False  # random horizontal flips of real images
    workers: int = 0  # DataLoader worker processes (0: load in the training process)
    max_images: int = 0  # use at most this many images of the dataset (0: all)
    synthetic_size: int = 20000  # synthetic: number of images in the dataset
    synthetic_seed: int = 0  # synthetic: the dataset is a pure function of this seed
    synthetic_blobs_per_side: int = 1  # synthetic: blobs on each side of the mirror axis (2: four blobs)
    synthetic_radius_min: float = 0.10  # synthetic: smallest blob radius, as a fraction of the image size
    synthetic_radius_max: float = 0.16  # synthetic: largest blob radius, as a fraction of the image size


@dataclass
class ModelConfig:
    arch: str = "dcgan"  # dcgan (popular port, transposed convs) | resnet (the paper's ImageNet model)
    resolution: int = 64  # output size: 32, 64, 128 or 256
    num_classes: int = 0  # > 0: conditional BatchNorm in G and a projection discriminator
    channels: int = 3  # image channels, 1 (grayscale) or 3; a recipe that leaves it out takes the data's (1 for idx)
    z_dim: int = 128  # noise dimension
    g_ch: int = 64  # generator width multiplier
    d_ch: int = 64  # discriminator width multiplier
    attention: str = "seed"  # seed (popular port: value C, no pooling) | paper (value C/2, pooled key/value)
    g_attention: list[int] = field(default_factory=lambda: [32])  # feature-map sizes with attention in G
    d_attention: list[int] = field(default_factory=lambda: [32])  # feature-map sizes with attention in D
    g_spectral_norm: bool = True  # spectral norm on G's convs/linears
    d_spectral_norm: bool = True  # spectral norm on D's convs/linears
    sn_last_layer: bool = False  # also on the last layer of each network
    init: str = "orthogonal"  # weight init: orthogonal | normal | xavier | default (PyTorch's)
    bn_eps: float = 1e-5  # BatchNorm epsilon in G (StudioGAN: 1e-4)
    g_widths: list[int] = field(default_factory=list)  # resnet: G widths, 4x4 stem then each block ([]: from g_ch)
    d_widths: list[int] = field(default_factory=list)  # resnet: D widths, one per block ([]: from d_ch)
    d_block_sizes: list[int] = field(default_factory=list)  # resnet: D map size after each block ([]: R/2 .. 4, 4)
    d_shortcut_relu: bool = False  # resnet: D's residual shortcuts (not the first block's) see relu(x) (StudioGAN)
    shared_embedding: int = 0  # resnet, conditional: one shared class embedding of this size; G's BN gain/bias are SN linears of it (BigGAN); 0: per-block tables
    hierarchical_z: bool = False  # resnet, with shared_embedding: z split into equal chunks, the first to the stem, one per G block, fed to its BN linears (BigGAN)

    def g_sizes(self) -> list[int]:
        """Feature-map sizes after each generator block: where G attention may sit."""
        first = 4 if self.arch == "dcgan" else 8
        last = self.resolution // 2 if self.arch == "dcgan" else self.resolution
        return [2**i for i in range(int(math.log2(first)), int(math.log2(last)) + 1)]

    def d_sizes(self) -> list[int]:
        """Feature-map sizes after each discriminator block: where D attention may sit (after the first
        block of that size). Without `d_block_sizes`: R/2, ..., 4 (the resnet D's extra 4x4 block not listed)."""
        if self.d_block_sizes:
            return list(self.d_block_sizes)
        return [2**i for i in range(int(math.log2(self.resolution)) - 1, 1, -1)]

    def hierarchical_slots(self) -> int:
        """Chunks of z with hierarchical_z: one for the stem, one per G block."""
        return len(self.g_sizes()) + 1

    def default_d_block_sizes(self) -> list[int]:
        """The resnet D's blocks: one halving block per size R/2 .. 4, then one more at 4x4."""
        return [*[2**i for i in range(int(math.log2(self.resolution)) - 1, 1, -1)], 4]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        config = _build(cls, values, "model")
        validate_model(config)
        return config

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


@dataclass
class TrainConfig:
    steps: int = 10000  # generator updates
    batch_size: int = 64  # images per process per step
    seed: int = 0  # seeds weights, noise, data order
    mixed_precision: str = "no"  # no | fp16 | bf16
    lr_g: float = 1e-4  # two time-scale update rule: G slower ...
    lr_d: float = 4e-4  # ... than D
    beta1: float = 0.0  # Adam betas, as in the paper
    beta2: float = 0.9  # second-moment decay (beta1 = 0: no momentum, as in the paper)
    loss: str = "hinge"  # hinge | nonsaturating | wgan-gp
    gp_weight: float = 10.0  # wgan-gp: gradient penalty weight
    d_steps: int = 1  # discriminator updates per generator update
    reuse_fakes: bool = True  # the G update reuses the last D update's fakes (one G forward per step, not two)
    ema: bool = True  # keep an exponential moving average of G (exported as g.safetensors)
    ema_decay: float = 0.999  # weight of the running average at each step (0.999: ~1000-step horizon)
    ema_start: int = 1000  # EMA copies G until this step, then averages
    ema_standing_stats: int = 32  # batches of G forwards that re-estimate the EMA's BatchNorm statistics (0: G's)
    checkpoint_every: int = 1000  # steps between checkpoints (and always at the last step)
    keep_checkpoints: int = 2  # resumable states kept in state/
    sample_every: int = 500  # steps between fixed-noise sample grids
    sample_grid: int = 64  # images in each grid
    log_every: int = 50  # steps between metrics.jsonl lines
    max_bad_steps: int = 5  # stop after this many consecutive non-finite losses
    tensorboard: bool = False  # also log through Accelerate's TensorBoard tracker
    compile: bool = False  # torch.compile the D and G phases' forward+loss (on CPU no faster, ~1 min of compiling)
    channels_last: bool = True  # NHWC memory format: on a 2-core CPU +22% img/s, -10% memory (benchmarks/train_step.py)
    augment: str = ""  # DiffAugment policy before D, real and fake: comma-separated color, translation, cutout ("": off)


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations during training (0: never)
    num_samples: int = 5000  # generated images per evaluation
    metrics: list[str] = field(default_factory=lambda: ["fid"])  # fid, isc, kid, prc (Inception); classifier_fid, classifier_kid, classifier_prc, gan_test (eval.classifier); structure
    inception_weights: str = ""  # path to torch-fidelity's Inception weights (offline use)
    classifier: str = ""  # a `sagan classifier train` file: the feature space of classifier_* and gan_test
    batch_size: int = 64  # generator batch size while evaluating


@dataclass
class Recipe:
    name: str = "recipe"  # the recipe file's stem, recorded in checkpoints
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TABLES = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}

CHOICES = {
    "data.kind": ("folder", "lsun", "synthetic", "idx", "cifar10-bin"),
    "data.split": ("train", "test"),
    "model.arch": ("dcgan", "resnet"),
    "model.attention": ("seed", "paper"),
    "model.init": ("orthogonal", "normal", "xavier", "default"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.loss": ("hinge", "nonsaturating", "wgan-gp"),
}
AUGMENT_OPS = ("color", "translation", "cutout")  # train.augment's policy names (sagan_cli/training/augment.py)
METRICS = ("fid", "isc", "kid", "prc", "classifier_fid", "classifier_kid", "classifier_prc", "gan_test",
           "structure")  # classifier_* and gan_test: eval.classifier; structure: synthetic data only, no weights


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return `value` as type `hint` or raise a UserError naming `key`."""
    name = getattr(hint, "__name__", str(hint))
    if hint is bool:
        matches = isinstance(value, bool)
    elif hint is int:
        matches = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        matches = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if matches else value
    elif hint is str:
        matches = isinstance(value, str)
    elif hint in (list[int], list[str]):
        inner = int if hint == list[int] else str
        name = f"list of {inner.__name__}"
        matches = isinstance(value, list) and all(
            isinstance(item, inner) and not isinstance(item, bool) for item in value
        )
    else:  # pragma: no cover - a field type this function does not know
        raise TypeError(f"unsupported config type {hint!r} for {key}")
    if not matches:
        raise UserError(f"{key} must be a {name}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], table: str) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"[{table}] must be a table, got {values!r}")
    hints = get_type_hints(cls)
    known = {recipe_field.name for recipe_field in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise UserError(
                f"unknown recipe key {table}.{key} (known keys: {', '.join(sorted(known))})"
            )
    kwargs = {k: _check_type(f"{table}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise UserError(f"{key} {message}")


# Upper bounds on the size-like model keys, for recipes and for files alike (a checkpoint's metadata is
# untrusted: num_classes = 10**11 once made `sagan sample` allocate until the machine was killed). Each is far
# above any published GAN (BigGAN: 1,000 classes, z 120-128, width 96-128); resolution, channels and attention
# sizes are limited to a few values below.
MODEL_SIZE_LIMITS = {"num_classes": 100_000, "z_dim": 4096, "g_ch": 1024, "d_ch": 1024, "shared_embedding": 4096}


def validate_model(model: ModelConfig) -> None:
    for key, choices in CHOICES.items():
        if key.startswith("model."):
            value = getattr(model, key.split(".")[1])
            _require(value in choices, key, f"must be one of {', '.join(choices)}, got {value!r}")
    _require(model.resolution in RESOLUTIONS, "model.resolution",
             f"must be one of {RESOLUTIONS}, got {model.resolution}")
    _require(model.num_classes >= 0, "model.num_classes", "must be >= 0")
    _require(model.channels in CHANNELS, "model.channels", f"must be 1 (grayscale) or 3 (RGB), got {model.channels}")
    for key in ("z_dim", "g_ch", "d_ch"):
        _require(getattr(model, key) > 0, f"model.{key}", "must be > 0")
    for key, limit in MODEL_SIZE_LIMITS.items():
        _require(getattr(model, key) <= limit, f"model.{key}", f"= {getattr(model, key)}, beyond what sagan builds "
                 f"(at most {limit})")
    for key in ("g_ch", "d_ch"):
        _require(getattr(model, key) % 8 == 0, f"model.{key}", "must be a multiple of 8 (attention uses C/8 channels)")
    _require(0 < model.bn_eps <= 0.1, "model.bn_eps", f"must be in (0, 0.1], got {model.bn_eps}")
    _validate_widths(model)
    _validate_biggan(model)
    for key, allowed in (("g_attention", model.g_sizes()), ("d_attention", sorted(set(model.d_sizes()), reverse=True))):
        for size in getattr(model, key):
            _require(
                size in allowed,
                f"model.{key}",
                f"has size {size}, but a {model.arch} model at resolution {model.resolution} "
                f"has feature maps of sizes {allowed} there",
            )


def _validate_biggan(model: ModelConfig) -> None:
    """shared_embedding and hierarchical_z: a conditional resnet G; z split evenly over the stem and blocks."""
    _require(model.shared_embedding >= 0, "model.shared_embedding", "must be >= 0 (0: per-block class tables)")
    if model.shared_embedding:
        _require(model.arch == "resnet", "model.shared_embedding",
                 f"applies to the resnet arch only (model.arch is {model.arch!r}); leave it out")
        _require(model.num_classes > 0, "model.shared_embedding",
                 "needs a class-conditional model (model.num_classes > 0); leave it out or set num_classes")
    if model.hierarchical_z:
        _require(model.shared_embedding > 0, "model.hierarchical_z",
                 "needs model.shared_embedding > 0 (the z chunks join the shared class embedding)")
        slots = model.hierarchical_slots()
        _require(model.z_dim % slots == 0, "model.hierarchical_z",
                 f"splits z into {slots} equal chunks (the stem and {slots - 1} blocks at resolution "
                 f"{model.resolution}): model.z_dim = {model.z_dim} must be a multiple of {slots} (BigGAN 128: 120)")


def _validate_widths(model: ModelConfig) -> None:
    """g_widths, d_widths and d_block_sizes: resnet only, one entry per stage, multiples of 8."""
    for key in ("g_widths", "d_widths", "d_block_sizes", "d_shortcut_relu"):
        _require(not getattr(model, key) or model.arch == "resnet", f"model.{key}",
                 f"applies to the resnet arch only (model.arch is {model.arch!r}); leave it out")
    if model.arch != "resnet":
        return
    stages = len(model.g_sizes()) + 1
    _require(not model.g_widths or len(model.g_widths) == stages, "model.g_widths",
             f"must list {stages} widths at resolution {model.resolution} (the 4x4 stem, then each block), "
             f"got {len(model.g_widths)}")
    sizes = model.d_block_sizes
    if sizes:
        ok = sizes[0] in (model.resolution, model.resolution // 2) and sizes[-1] >= 4 and all(
            b in (a, a // 2) for a, b in zip([model.resolution, *sizes], sizes, strict=False))
        longest = model.resolution.bit_length() + 2  # every halving, plus a few blocks that keep the size
        ok = ok and len(sizes) <= longest
        _require(ok and len(sizes) >= 2 and sizes[0] == model.resolution // 2, "model.d_block_sizes",
                 f"must start at {model.resolution // 2} (the first block halves), keep or halve the size at each "
                 f"block and end at 4 or more, in at most {longest} blocks, got {sizes}")
    blocks = len(sizes or model.default_d_block_sizes())
    _require(not model.d_widths or len(model.d_widths) == blocks, "model.d_widths",
             f"must list {blocks} widths (one per D block), got {len(model.d_widths)}")
    for key in ("g_widths", "d_widths"):
        for width in getattr(model, key):
            _require(0 < width <= 8192 and width % 8 == 0, f"model.{key}",
                     f"entries must be positive multiples of 8 (attention uses C/8 channels), got {width}")


def validate(recipe: Recipe) -> Recipe:
    validate_model(recipe.model)
    for key, choices in CHOICES.items():
        table, name = key.split(".")
        if table == "model":
            continue  # validate_model checked these
        value = getattr(getattr(recipe, table), name)
        _require(value in choices, key, f"must be one of {', '.join(choices)}, got {value!r}")
    data, train, evaluation = recipe.data, recipe.train, recipe.eval
    _require(data.kind == "synthetic" or bool(data.path), "data.path",
             f"must be set for data.kind = {data.kind!r} (a folder of images, an LSUN *_lmdb directory, "
             "or the folder of the IDX or CIFAR-10 binary files)")
    fixed = DATA_CHANNELS.get(data.kind)
    _require(fixed is None or recipe.model.channels == fixed, "model.channels",
             f"is {recipe.model.channels} but data.kind = {data.kind!r} has {fixed}-channel images: "
             f"set model.channels = {fixed} or leave it out")
    _require(data.workers >= 0, "data.workers", "must be >= 0")
    _require(data.max_images >= 0, "data.max_images", "must be >= 0 (0 means all)")
    _require(data.synthetic_size > 0, "data.synthetic_size", "must be > 0")
    _require(1 <= data.synthetic_blobs_per_side <= 4, "data.synthetic_blobs_per_side", "must be 1 to 4")
    _require(0.05 <= data.synthetic_radius_min <= data.synthetic_radius_max <= 0.2, "data.synthetic_radius_min",
             "and data.synthetic_radius_max must satisfy 0.05 <= min <= max <= 0.2 (fractions of the image size)")
    for key in ("steps", "batch_size", "d_steps", "checkpoint_every", "keep_checkpoints",
                "sample_every", "sample_grid", "log_every", "max_bad_steps"):
        _require(getattr(train, key) > 0, f"train.{key}", "must be > 0")
    for key in ("lr_g", "lr_d"):
        _require(getattr(train, key) > 0, f"train.{key}", "must be > 0")
    for key in ("beta1", "beta2", "ema_decay"):
        _require(0 <= getattr(train, key) < 1, f"train.{key}", "must be in [0, 1)")
    _require(train.ema_start >= 0, "train.ema_start", "must be >= 0")
    _require(0 <= train.ema_standing_stats <= 10_000, "train.ema_standing_stats", "must be in [0, 10000]")
    _require(0 <= train.seed < 2**31, "train.seed",  # process k seeds with seed + k: numpy's range is [0, 2**32)
             f"must be in [0, 2**31) (numpy's seed range, with room for one seed per process), got {train.seed}")
    _require(train.gp_weight >= 0, "train.gp_weight", "must be >= 0")
    names = augment_policy(train.augment)
    for name in names:
        _require(name in AUGMENT_OPS, "train.augment", f"has unknown policy name {name!r}; allowed: "
                 f"{', '.join(AUGMENT_OPS)}, comma-separated (\"\" turns augmentation off)")
        _require(names.count(name) == 1, "train.augment", f"lists {name!r} more than once")
    _require(evaluation.every >= 0, "eval.every", "must be >= 0 (0 turns evaluation off)")
    _require(evaluation.num_samples > 0, "eval.num_samples", "must be > 0")
    _require(evaluation.batch_size > 0, "eval.batch_size", "must be > 0")
    for metric in evaluation.metrics:
        _require(metric in METRICS, "eval.metrics", f"entries must be among {', '.join(METRICS)}, got {metric!r}")
    needs_classifier = [metric for metric in evaluation.metrics
                        if metric.startswith("classifier_") or metric == "gan_test"]
    _require(bool(evaluation.classifier) or not needs_classifier, "eval.classifier",
             f"must be set for eval.metrics {', '.join(needs_classifier)} (train one with `sagan classifier train`)")
    _require("gan_test" not in evaluation.metrics or recipe.model.num_classes > 0, "eval.metrics",
             "has gan_test, which needs a class-conditional model (model.num_classes > 0)")
    return recipe


def augment_policy(text: str) -> list[str]:
    """train.augment's names in order: "color, cutout" -> ["color", "cutout"]; "" (or blanks) -> []."""
    return [name.strip() for name in text.split(",")] if text.strip() else []


def parse_override(text: str) -> tuple[str, str, Any]:
    """`table.key=value` -> (table, key, value); the value is read as TOML, else taken as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set expects table.key=value (e.g. train.steps=100), got {text!r}")
    dotted, raw = text.split("=", 1)
    table, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return table, key, value


def recipe_from_dict(raw: dict[str, Any], name: str = "recipe") -> Recipe:
    for table in raw:
        if table not in TABLES:
            raise UserError(f"unknown recipe table [{table}] (known tables: {', '.join(TABLES)})")
    parts = {table: _build(cls, raw.get(table, {}), table) for table, cls in TABLES.items()}
    if "channels" not in raw.get("model", {}):  # resolved here, so config.json and checkpoints state it
        parts["model"].channels = DATA_CHANNELS.get(parts["data"].kind, 3)
    return validate(Recipe(name=name, **parts))


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a TOML recipe, apply `--set` overrides, validate. Raises UserError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist (see recipes/ for examples)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"recipe {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read recipe {path} ({exc.strerror or exc}); check its permissions") from None
    for text in overrides:
        table, key, value = parse_override(text)
        raw.setdefault(table, {})
        if not isinstance(raw[table], dict):
            raise UserError(f"[{table}] must be a table, got {raw[table]!r}")
        raw[table][key] = value
    return recipe_from_dict(raw, name=path.stem)


def recipe_from_json(path: str | Path) -> Recipe:
    """Re-read a run's config.json (the resolved recipe saved at the start of training)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a readable resolved recipe ({exc}); give a run's config.json "
                        "as written by `sagan train`") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a resolved recipe (a JSON object); give a run's config.json")
    name = raw.pop("name", "recipe")
    return recipe_from_dict(raw, name=name)


def print_recipe(recipe: Recipe, run_dir: Path, console=None) -> None:
    """The resolved recipe as a table; values that differ from the defaults are highlighted."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    defaults = Recipe().to_dict()
    table = Table(title=escape(f"recipe '{recipe.name}' -> {run_dir}"), show_lines=False)  # user text: no markup
    table.add_column("key")
    table.add_column("value")
    for section, values in recipe.to_dict().items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            changed = defaults[section][key] != value
            text = escape(str(value))
            table.add_row(escape(f"{section}.{key}"), f"[bold]{text}[/bold]" if changed else text)
    console.print(table)
