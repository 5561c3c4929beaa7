"""`sagan report`: one self-contained HTML page about a run (finished or in progress).

The page holds the training curves (matplotlib SVGs as data URIs: vector, no JavaScript library to
inline, and the plotting code we already depend on), the fixed-noise grids with a step slider, the
resolved recipe and the attention explorer (explorer.py). Jinja2 fills one template; the page's small
script and stylesheet sit beside it in templates/ and are inlined, so nothing is fetched when it opens.
A run in progress may lack any file, or have a half-written last log line or grid: those are skipped.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from sagan_cli.errors import UserError

RUN_MARKERS = ("config.json", "metrics.jsonl", "samples", "g.safetensors", "d.safetensors")
GRID_NAME = re.compile(r"step-(\d+)\.png$")
TEMPLATES = Path(__file__).with_name("templates")


@dataclass
class RunLog:
    """metrics.jsonl as series: name -> ([steps], [values])."""

    series: dict[str, tuple[list[int], list[float]]]
    last_step: int
    skipped_lines: int


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        raise UserError(f"run directory {run_dir} does not exist; give the --out folder of `sagan train`")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory; give the --out folder of `sagan train`")
    if not any((run_dir / name).exists() for name in RUN_MARKERS):
        raise UserError(
            f"{run_dir} is not a sagan run (no config.json, metrics.jsonl, samples/ or checkpoints);"
            " give the --out folder of `sagan train`"
        )


def read_log(path: Path) -> RunLog:
    """Parse metrics.jsonl: training lines, {"step","structure"} and {"step","eval"} lines alike."""
    series: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    skipped, last = 0, 0

    def add(name: str, step: int, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return
        series[name][0].append(step)
        series[name][1].append(float(value))

    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            skipped += 1  # e.g. the line training is writing right now
            continue
        last = max(last, step)
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, dict):  # gamma, structure, eval
                for sub_key, sub_value in value.items():
                    add(f"{key}/{sub_key}", step, sub_value)
            else:
                add(key, step, value)
    return RunLog(dict(series), last, skipped)


PANELS = (  # title, series chosen by prefix or name, y label
    ("Losses", ("loss_d", "loss_g"), "loss"),
    ("D outputs", ("d_real", "d_fake"), "mean D(x)"),
    ("Attention gamma", ("gamma/",), "gamma"),
    ("Throughput", ("img_per_s",), "images / s"),
    ("Learning rates", ("lr_g", "lr_d"), "lr"),
)


ATTENTION_PANELS = (  # metrics.jsonl key, its uniform-attention reference, title, y label
    ("attn_distance", "attn_distance_uniform", "Attention distance", "mean distance (map pixels)"),
    ("attn_entropy", "attn_entropy_uniform", "Attention entropy", "entropy (nats)"),
)


@dataclass
class Panel:
    title: str
    names: list[str]  # the series drawn
    ylabel: str
    reference: str | None = None  # a series drawn as a flat dashed line: what uniform attention gives


def _attention_panels(log: RunLog) -> list[Panel]:
    """Per attention layer: its distance and its entropy over steps, beside uniform attention's on that map."""
    layers = sorted({name.split("/", 1)[1] for name in log.series if name.startswith("attn_distance/")})
    return [Panel(f"{title}: {layer}", [f"{key}/{layer}"], ylabel, f"{reference}/{layer}")
            for layer in layers for key, reference, title, ylabel in ATTENTION_PANELS
            if f"{key}/{layer}" in log.series]


def curve_panels(log: RunLog) -> list[dict]:
    """One SVG per panel (eval and structure scores: one panel per score, they live on different scales)."""
    from matplotlib.figure import Figure

    groups: list[Panel] = []
    for title, keys, ylabel in PANELS:
        names = [name for name in log.series
                 if any(name == key or (key.endswith("/") and name.startswith(key)) for key in keys)]
        groups.append(Panel(title, sorted(names), ylabel))
        if title == "Attention gamma":
            groups += _attention_panels(log)
    for prefix, title in (("eval/", "Evaluation"), ("structure/", "Structure")):
        for name in sorted(series_name for series_name in log.series if series_name.startswith(prefix)):
            groups.append(Panel(f"{title}: {name[len(prefix):]}", [name], name[len(prefix):]))
    panels = []
    for group in groups:
        if not group.names:
            continue
        fig = Figure(figsize=(4.6, 2.8), layout="constrained")
        ax = fig.subplots()
        for name in group.names:
            steps, values = log.series[name]
            ax.plot(steps, values, label=name, linewidth=1.2, marker="o" if len(steps) < 20 else None, markersize=3)
        if group.reference in log.series:
            uniform = log.series[group.reference][1][-1]
            ax.axhline(uniform, color="0.45", linestyle="--", linewidth=1.2, label=f"uniform attention ({uniform:.3g})")
            # from 0 (looks only at the query itself) to above the uniform line (looks everywhere alike)
            ax.set_ylim(0, 1.12 * max(uniform, *(max(log.series[name][1]) for name in group.names)))
        ax.set_title(group.title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(group.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(group.names) > 1 or group.reference in log.series:
            ax.legend(fontsize=7, loc="lower right" if group.reference in log.series else "best")
        buf = io.BytesIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
        uri = "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        drawn = group.names + ([group.reference] if group.reference in log.series else [])
        panels.append({"title": group.title, "uri": uri, "series": drawn})
    return panels


def sample_grids(folder: Path) -> list[dict]:
    """samples/step-XXXXXXX.png in step order, as data URIs; unreadable (half-written) files are skipped."""
    from PIL import Image

    grids = []
    if not folder.is_dir():
        return grids
    for path in sorted(folder.iterdir()):
        match = GRID_NAME.match(path.name)
        if not match:
            continue
        try:
            with Image.open(path) as picture:
                picture.load()
            data = path.read_bytes()
        except (OSError, SyntaxError, ValueError):
            continue
        grids.append({"step": int(match.group(1)), "uri": "data:image/png;base64," + base64.b64encode(data).decode()})
    return grids


def _recipe_text(run_dir: Path) -> tuple[str | None, dict | None]:
    path = run_dir / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    return json.dumps(raw, indent=2), raw if isinstance(raw, dict) else None


def explorer_subjects(run_dir: Path, recipe: dict | None, *, images, samples: int, dataset_images: int,
                      seed: int, device) -> tuple[list[dict], list[str]]:
    """The explorer's images and rows, plus notes on what is missing (e.g. no checkpoint yet)."""
    from dataclasses import asdict

    from sagan_cli.inspection.explorer import discriminator_subjects, generator_subjects, real_images
    from sagan_cli.interchange.checkpoint import load_model

    notes, subjects = [], []
    g_path, d_path = run_dir / "g.safetensors", run_dir / "d.safetensors"
    if g_path.is_file():
        generator, _ = load_model(g_path, expect="generator", device=device)
        subjects += generator_subjects(generator, samples, seed)
    else:
        notes.append("no g.safetensors yet (training writes it at its first checkpoint)")
    if d_path.is_file():
        discriminator, _ = load_model(d_path, expect="discriminator", device=device)
        config = discriminator.config
        dataset = None
        if dataset_images > 0 and recipe is not None:
            dataset = _dataset(run_dir / "config.json", config, notes)
        pictures = real_images(images, dataset, dataset_images, config.resolution, config.channels)
        subjects += discriminator_subjects(discriminator, pictures)
    else:
        if images:
            raise UserError(f"--image needs the run's discriminator, and {d_path} does not exist yet")
        notes.append("no d.safetensors yet (training writes it at its first checkpoint)")
    if not subjects and not notes:
        notes.append("this model has no self-attention layers")
    return [asdict(subject) for subject in subjects], notes


def _dataset(config_path: Path, model_config, notes: list[str]):
    """The run's dataset as D saw it (its resolution and channels: a grayscale folder run reads its
    images in grayscale), or None with a note when it cannot be opened here (moved, another machine)."""
    from sagan_cli.config import recipe_from_json
    from sagan_cli.data.datasets import build_dataset

    try:
        data = recipe_from_json(config_path).data
        return build_dataset(data, model_config.resolution, model_config.num_classes, model_config.channels)
    except UserError as exc:
        notes.append(f"the run's dataset is not available here, so no dataset images: {exc}")
        return None


def build_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    images: list[str | Path] | None = None,
    samples: int = 4,
    dataset_images: int = 4,
    seed: int = 0,
    device: str | None = "cpu",
) -> Path:
    """Write the run's report page (default RUN_DIR/report.html) and return its path."""
    import jinja2

    from sagan_cli import __version__
    from sagan_cli.errors import check_writable
    from sagan_cli.interchange.checkpoint import write_output
    from sagan_cli.model.generation import resolve_device

    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    out = Path(out) if out is not None else run_dir / "report.html"
    check_writable(out, "--out")
    if samples < 0 or dataset_images < 0:
        raise UserError("--samples and --dataset-images must be >= 0")
    torch_device = resolve_device(device)
    log = read_log(run_dir / "metrics.jsonl")
    recipe_text, recipe = _recipe_text(run_dir)
    grids = sample_grids(run_dir / "samples")
    subjects, notes = explorer_subjects(run_dir, recipe, images=list(images or []), samples=samples,
                                        dataset_images=dataset_images, seed=seed, device=torch_device)
    from matplotlib import colormaps

    lut = (colormaps["inferno"](range(256))[:, :3] * 255).round().astype("uint8")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    page = env.get_template("report.html.j2").render(
        title=f"sagan report: {run_dir.resolve().name}",
        run_dir=str(run_dir),
        version=__version__,
        last_step=log.last_step,
        target_steps=(recipe or {}).get("train", {}).get("steps") if recipe else None,
        skipped_lines=log.skipped_lines,
        panels=curve_panels(log),
        grids=grids,
        recipe_text=recipe_text,
        explorer={"subjects": subjects, "lut": base64.b64encode(lut.tobytes()).decode("ascii")},
        notes=notes,
        script=(TEMPLATES / "report.js").read_text(encoding="utf-8"),
        style=(TEMPLATES / "report.css").read_text(encoding="utf-8"),
    )
    write_output(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"), "--out")
    return out
