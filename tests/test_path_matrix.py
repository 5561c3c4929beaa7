"""The path matrix: every command a user runs, on every kind of model sagan builds, together.

Each feature has tests of its own; this file runs them in combination. The cells are tiny model kinds
that cover every PAIR of values of channels x classes x arch x attention x resolution x precision
(an all-pairs construction, checked by `test_cells_cover_every_pair`). For each cell the real
CLI runs what a user would: train, train longer with --resume, sample (PNG, npz), classifier train,
eval (structure scores on synthetic data, classifier metrics from the checkpoint and from the npz),
attn-map (G and D checkpoints), report, interpolate (seeds; classes when conditional) and export
(ONNX or TorchScript, in turns; both for the port cells; each checked at three batch sizes: two by `--check`,
one here). Two cells train in two processes. Two more
cells start from the popular port's state dicts (`sagan import-port`) and go through the same commands.

A cell's commands run once per session, in one test or in whichever test needs the cell first (the
browser tests reuse a cell's report page); a failure names the cell and every command that failed:
    test_cell[c1-cond-resnet-seed-64-fp32]: "c1-cond-resnet-seed-64-fp32 report: FAIL: TypeError: ..."
Run one cell: pytest tests/test_path_matrix.py -k c1-cond-resnet-seed-64-fp32
Commands run in this process (`run_main`, torch imported once); multi-process training runs under
torchrun (`ACCELERATE_USE_CPU=true`), two gloo processes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from itertools import combinations
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from filelock import FileLock
from helpers import exported_output, run_main
from PIL import Image

FACTORS: dict[str, tuple] = {
    "channels": (1, 3),
    "classes": (0, 3),
    "arch": ("dcgan", "resnet"),
    "attention": ("seed", "paper", "none"),
    "resolution": (32, 64),
    "precision": ("fp32", "bf16", "fp16"),  # fp16 on a CPU: autocast + GradScaler("cpu")
}
PRECISION_KEY = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
CLASSIFIER_CLASSES = 3  # the classifier always learns the 3 classes of the cell's data (also for unconditional G)


class Cell(NamedTuple):
    channels: int
    classes: int
    arch: str
    attention: str
    resolution: int
    precision: str
    procs: int = 1  # 2: train and resume under torchrun (MULTI_CPU); see with_processes()
    augment: bool = False  # train.augment = AUGMENT (DiffAugment) on; see with_augment()
    export: str = "onnx,torchscript"  # the formats `sagan export` writes and checks; see with_export()

    @property
    def id(self) -> str:
        conditional = "cond" if self.classes else "uncond"
        procs = f"-{self.procs}p" if self.procs > 1 else ""
        augment = "-aug" if self.augment else ""
        return (f"c{self.channels}-{conditional}-{self.arch}-{self.attention}-{self.resolution}-{self.precision}"
                f"{procs}{augment}")


def all_pairs(factors: dict[str, tuple]) -> list[tuple]:
    """A small deterministic set of rows that holds every pair of values of every two factors.

    Greedy: each new row starts from the first pair no row holds yet, then gives each other factor the
    value that completes the most pairs still missing (ties: the first value). Rows are tuples in the
    order of `factors`.
    """
    names = list(factors)
    missing = [((a, va), (b, vb)) for a, b in combinations(range(len(names)), 2)
               for va in factors[names[a]] for vb in factors[names[b]]]
    rows: list[tuple] = []
    while missing:
        (a, va), (b, vb) = missing[0]
        row: dict[int, object] = {a: va, b: vb}
        for i in range(len(names)):
            if i in row:
                continue
            gains = [sum(((j, row[j]), (i, v)) in missing if j < i else ((i, v), (j, row[j])) in missing
                         for j in row) for v in factors[names[i]]]
            row[i] = factors[names[i]][gains.index(max(gains))]
        full = tuple(row[i] for i in range(len(names)))
        missing = [pair for pair in missing if not all(full[i] == v for i, v in pair)]
        rows.append(full)
    return rows


def with_processes(cells: list[Cell]) -> list[Cell]:
    """Two processes (a torchrun launch costs ~20 s on 2 cores, so not all-pairs): the first grayscale cell
    in bf16 and the first colour cell in fp16, so DDP meets both mixed precisions and both channel counts."""
    picks = [next(i for i, c in enumerate(cells) if c.channels == 1 and c.precision == "bf16"),
             next(i for i, c in enumerate(cells) if c.channels == 3 and c.precision == "fp16")]
    return [c._replace(procs=2) if i in picks else c for i, c in enumerate(cells)]


def with_augment(cells: list[Cell]) -> list[Cell]:
    """DiffAugment on in every other cell: each value of each factor (and one-process and two) trains with it
    somewhere and without it somewhere (checked by test_augmented_cells_meet_every_value)."""
    return [c._replace(augment=i % 2 == 0) for i, c in enumerate(cells)]


def values_missed(cells: list[Cell], setting: str, choices: tuple) -> list[str]:
    """Where a setting given in turns (augment, export) is spread too thinly: each "setting=choice: factor" whose
    cells with that choice lack a value of that factor (or of procs, augment). [] when every choice meets all."""
    every = {**FACTORS, "procs": (1, 2), "augment": (True, False)}
    return [f"{setting}={choice}: {name}" for choice in choices for name, values in every.items()
            if name != setting and {getattr(c, name) for c in cells if getattr(c, setting) == choice} != set(values)]


def with_export(cells: list[Cell]) -> list[Cell]:
    """One export format per cell (an export and its checks cost ~8 s a format): the first split of the cells,
    half and half, in which each format meets every value of every factor (test_export_formats_meet_every_value);
    the port cells export both, and tests/inspection/test_interpolate_export.py checks both formats on their own."""
    for onnx in combinations(range(len(cells)), len(cells) // 2):
        split = [c._replace(export="onnx" if i in onnx else "torchscript") for i, c in enumerate(cells)]
        if not values_missed(split, "export", EXPORT_FORMATS):
            return split
    raise AssertionError("no split of the cells gives each export format every value")


AUGMENT = "color,translation,cutout"
EXPORT_FORMATS = ("onnx", "torchscript")
CELLS = with_export(with_augment(with_processes([Cell(*row) for row in all_pairs(FACTORS)])))


def test_cells_cover_every_pair():
    """The coverage claim, checked on the cells themselves: every two factors meet in every value pair."""
    names = list(FACTORS)
    assert Cell._fields[: len(names)] == tuple(names)
    for a, b in combinations(names, 2):
        seen = {(getattr(c, a), getattr(c, b)) for c in CELLS}
        wanted = {(va, vb) for va in FACTORS[a] for vb in FACTORS[b]}
        assert seen == wanted, f"{a} x {b}: missing {sorted(wanted - seen, key=str)}"
    assert len({c.id for c in CELLS}) == len(CELLS)
    assert len(CELLS) <= 12, f"{len(CELLS)} cells: the matrix should stay small"
    multi = [c for c in CELLS if c.procs == 2]
    assert {c.channels for c in multi} == {1, 3} and {c.precision for c in multi} == {"bf16", "fp16"}


def test_export_formats_meet_every_value():
    assert values_missed(CELLS, "export", EXPORT_FORMATS) == []


def test_augmented_cells_meet_every_value():
    assert values_missed(CELLS, "augment", (True, False)) == []


# ---------------------------------------------------------------- the cells' data and recipes

def attention_sizes(cell: Cell) -> tuple[list[int], list[int]]:
    if cell.attention == "none":
        return [], []
    return [cell.resolution // 2], [cell.resolution // 4]  # G: the map before the last; D: its second map


def recipe_text(cell: Cell, data_dir: Path | None, *, steps: int = 2) -> str:
    """The cell as a TOML recipe. Colour cells train on the built-in synthetic data (structure scores);
    grayscale cells on a folder of 'L' PNGs in class sub-folders with `model.channels = 1`."""
    g_att, d_att = attention_sizes(cell)
    data = ('kind = "synthetic"\nsynthetic_size = 32' if cell.channels == 3
            else f'kind = "folder"\npath = "{data_dir}"') + "\nhflip = true"
    channels = "" if cell.channels == 3 else "channels = 1\n"
    return (f"[data]\n{data}\n"
            f'[model]\narch = "{cell.arch}"\nresolution = {cell.resolution}\nnum_classes = {cell.classes}\n{channels}'
            f'z_dim = 16\ng_ch = 8\nd_ch = 8\nattention = "{"paper" if cell.attention == "paper" else "seed"}"\n'
            f"g_attention = {g_att}\nd_attention = {d_att}\n"
            f'[train]\nsteps = {steps}\nbatch_size = 4\nmixed_precision = "{PRECISION_KEY[cell.precision]}"\n'
            "sample_grid = 4\nsample_every = 100\ncheckpoint_every = 100\nlog_every = 1\nema_start = 1\nema_standing_stats = 2\n"
            + (f'augment = "{AUGMENT}"\n' if cell.augment else ""))


def write_grey_folder(root: Path, count: int = 8) -> Path:
    """3 class folders of `count` 64x64 'L' PNGs: discs of three hues, as grayscale."""
    from sagan_cli.data.datasets import SyntheticBlobs
    from sagan_cli.model.generation import to_uint8

    blobs = SyntheticBlobs(3 * count * 4, 64, seed=3, num_classes=CLASSIFIER_CLASSES)
    written = [0] * CLASSIFIER_CLASSES
    for i in range(len(blobs)):
        image, label = blobs[i]
        if written[label] == count:
            continue
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        rgb = to_uint8(image).permute(1, 2, 0).numpy()
        Image.fromarray(rgb).convert("L").save(folder / f"{written[label]:02d}.png")
        written[label] += 1
    assert written == [count] * CLASSIFIER_CLASSES
    return root


# ---------------------------------------------------------------- running commands, recording results

class CommandFailed(AssertionError):
    pass


def first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines[-1:] or ["(no output)"])[0][:300]


@dataclass
class Context:
    cell: Cell | None
    name: str
    root: Path
    sagan: Callable[..., str]  # run the CLI in this process; returns stdout; CommandFailed on a non-zero exit
    sagan_code: Callable[..., tuple[int, str, str]]  # the same, returning (code, stdout, stderr)


def run_steps(ctx: Context, steps: list[tuple[str, Callable[[], None], tuple[str, ...]]]) -> dict[str, str]:
    """Run each (command, check, needs) in order; a command whose needs failed is not run.
    Returns {command: "ok" | "FAIL: reason" | "not run (...)"}, and the seconds each took under "seconds"."""
    results: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for command, check, needs in steps:
        failed = [n for n in needs if results.get(n) != "ok"]
        if failed:
            results[command] = f"not run ({', '.join(failed)} failed)"
            continue
        started = time.perf_counter()
        try:
            check()
            results[command] = "ok"
        except CommandFailed as exc:
            results[command] = f"FAIL: {exc}"
        except Exception as exc:  # an assertion on the output, or a bug's exception escaping main()
            where = traceback.extract_tb(exc.__traceback__)[-1]
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            results[command] = f"FAIL: {type(exc).__name__}: {detail} ({Path(where.filename).name}:{where.lineno})"
        finally:
            seconds[command] = round(time.perf_counter() - started, 1)
    return {**results, "seconds": seconds}


def make_context(cell: Cell | None, name: str, root: Path, capsys, monkeypatch) -> Context:
    monkeypatch.setenv("SAGAN_CACHE", str(root / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(root / "torch"))
    monkeypatch.delenv("SAGAN_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    # Each sample grid on synthetic data also scores 256 generated images for structure: half of a cell's
    # training time, twice per run. 16 keep the scoring (and its log line) exercised at a sixteenth of the cost.
    monkeypatch.setattr("sagan_cli.training.monitor.STRUCTURE_SAMPLES", 16)

    def sagan_code(*args) -> tuple[int, str, str]:
        return run_main([str(a) for a in args], capsys, monkeypatch)

    def sagan(*args) -> str:
        code, out, err = sagan_code(*args)
        if code != 0:
            raise CommandFailed(f"exit {code}: {first_line(err or out)}")
        assert "Traceback" not in err, err
        return out

    return Context(cell, name, root, sagan, sagan_code)


def torchrun(*args: str) -> None:
    """`sagan ARGS` in two gloo processes on the CPU, as the README shows."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "sagan_cli", *args], capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise CommandFailed(f"torchrun exit {done.returncode}: {first_line(done.stderr)}")


# ---------------------------------------------------------------- what each command must produce

def png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def check_image(path: Path, channels: int, size: int | None = None) -> None:
    image = png(path)
    assert image.mode == ("L" if channels == 1 else "RGB"), f"{path.name} is a {image.mode!r} image"
    if size is not None:
        assert image.size == (size, size), f"{path.name} is {image.size}"


def latest_state(run: Path) -> Path:
    return sorted((run / "state").glob("step-*"))[-1]


def check_run(run: Path, cell: Cell, steps: int) -> None:
    from sagan_cli.interchange.checkpoint import read_info

    for name in ("g", "d"):
        info = read_info(run / f"{name}.safetensors")
        assert info.step == steps, f"{name}.safetensors is from step {info.step}, expected {steps}"
        assert info.config.channels == cell.channels and info.config.num_classes == cell.classes
        assert info.config.arch == cell.arch and info.config.resolution == cell.resolution
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["channels"] == cell.channels
    state = latest_state(run)
    assert state.name == f"step-{steps:07d}", state.name
    progress = json.loads((state / "progress.json").read_text())
    assert progress["step"] == steps
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [line for line in lines if "loss_d" in line]
    assert [line["step"] for line in losses][-1] == steps
    assert all(np.isfinite([line["loss_d"], line["loss_g"]]).all() for line in losses), losses
    check_attention_stats(losses, cell)
    grid = sorted((run / "samples").glob("step-*.png"))[-1]
    assert grid.name == f"step-{steps:07d}.png"
    check_image(grid, cell.channels)


def check_attention_stats(lines: list[dict], cell: Cell) -> None:
    """Every log line has each attention layer's distance and entropy (rank 0's probe), within what the layer's
    map allows: 0 <= entropy <= log(keys) (the uniform value), 0 <= distance <= the map's diagonal."""
    g_att, d_att = attention_sizes(cell)
    layers = {f"g.attention.{s}": s for s in g_att} | {f"d.attention.{s}": s for s in d_att}
    for line in lines:
        if not layers:
            assert not any(k.startswith("attn_") for k in line), line
            continue
        for key in ("attn_distance", "attn_entropy", "attn_distance_uniform", "attn_entropy_uniform"):
            assert set(line[key]) == set(layers), (key, line[key])
        for layer, size in layers.items():
            entropy, uniform = line["attn_entropy"][layer], line["attn_entropy_uniform"][layer]
            assert 0 <= entropy <= uniform + 1e-4 and 0 <= line["attn_distance"][layer] <= size * 2**0.5, line


def check_export(ckpt: Path, out: Path, fmt: str) -> None:
    """The exported file gives the checkpoint's images at batch size 1 (`sagan export --check 5` has compared
    the traced batch size and 5 already)."""
    from sagan_cli.interchange.checkpoint import load_model
    from sagan_cli.model.generation import make_noise

    g, info = load_model(ckpt, expect="generator", device="cpu")
    config = info.config
    for batch in (1,):
        z = make_noise(batch, config.z_dim, seed=batch)
        y = torch.arange(batch) % config.num_classes if config.num_classes else None
        with torch.no_grad():
            expected = g(z, y)
        got = exported_output(out, fmt, z, y)
        assert got.shape == (batch, config.channels, config.resolution, config.resolution), \
            f"batch {batch}: shape {tuple(got.shape)}"
        difference = float((got - expected).abs().max())
        assert difference < 1e-4, f"batch {batch}: max |difference| {difference:.3g}"


def explorer(html: str) -> dict:
    return json.loads(re.search(r'id="explorer-data">(.*?)</script>', html, re.S).group(1))


def model_steps(ctx: Context, *, g: Path, d: Path, data: Path, classifier_recipe: Path, cell: Cell,
                run: Path, structure: bool, trained: str, attention: tuple[list[int], list[int]],
                data_folder: Path | None = None) -> list:
    """The commands after training (or import): every one a user runs on a G and D checkpoint."""
    root, sagan = ctx.root, ctx.sagan
    conditional = cell.classes > 0
    g_att, d_att = attention
    classifier = root / "classifier.safetensors"
    image_for_d = root / "s-png" / "000000.png"
    photo = root / "photo.jpg"  # a user's colour photo, for D whatever its channels
    Image.new("RGB", (50, 40), (200, 40, 40)).save(photo)
    protocol: dict = {}  # the last eval's --json protocol

    def sample_png():
        out = sagan("sample", "--ckpt", g, "-n", 6, "-b", 4, "--out", root / "s-png", "--seed", 1, "--device", "cpu")
        assert "wrote 6 images" in out
        names = sorted(p.name for p in (root / "s-png").iterdir())
        assert names == [f"{i:06d}.png" for i in range(6)] + ["grid.png"], names
        for name in names[:6]:
            check_image(root / "s-png" / name, cell.channels, cell.resolution)
        check_image(root / "s-png" / "grid.png", cell.channels)
        if conditional:  # one class, truncated noise
            sagan("sample", "--ckpt", g, "-n", 2, "--class", cell.classes - 1, "--truncation", 0.5,
                  "--out", root / "s-class", "--device", "cpu")
            check_image(root / "s-class" / "000001.png", cell.channels, cell.resolution)

    def sample_npz():
        sagan("sample", "--ckpt", g, "-n", 6, "--out", root / "s-npz", "--format", "npz", "--seed", 1, "--device", "cpu")
        with np.load(root / "s-npz" / "samples.npz") as npz:
            images, labels = npz["images"], npz["labels"]
        assert images.shape == (6, cell.resolution, cell.resolution, cell.channels) and images.dtype == np.uint8
        assert images.std() > 0, "blank samples"
        expected = np.arange(6) * cell.classes // 6 if conditional else np.full(6, -1)
        assert labels.tolist() == expected.tolist(), labels
        # the same seed names the same images in either format, whatever the batch size
        pngs = np.stack([np.asarray(png(root / "s-png" / f"{i:06d}.png")) for i in range(6)])
        assert np.array_equal(pngs.reshape(images.shape), images), "the npz images differ from the PNGs of the same seed"

    def classifier_train():
        out = sagan("classifier", "train", classifier_recipe, "--set", f"model.num_classes={CLASSIFIER_CLASSES}",
                    "--out", classifier, "--epochs", 1, "--batch-size", 16, "--width", 8, "--device", "cpu")
        assert f"wrote {classifier}" in out
        from sagan_cli.evaluation.classifier import load_classifier

        _, info = load_classifier(classifier)
        assert info.config.channels == cell.channels, \
            f"a {cell.channels}-channel model's data gave a {info.config.channels}-channel classifier"
        assert info.config.num_classes == CLASSIFIER_CLASSES

    def eval_json(*args) -> dict:
        if "--classifier" in args:
            assert classifier.is_file(), "no classifier file (classifier train failed)"
        out = root / "eval.json"
        out.unlink(missing_ok=True)
        sagan("eval", *args, "--json", out, "-q", "--device", "cpu", "-b", 8)
        written = json.loads(out.read_text())
        values = written["metrics"]
        protocol.clear()
        protocol.update(written["protocol"])
        assert all(np.isfinite(v) for v in values.values()), values
        return values

    def eval_structure():
        values = eval_json("--ckpt", g, "--data", data, "--metrics", "structure", "-n", 16)
        assert "structure_valid_fraction" in values, values

    def eval_classifier():
        wanted = "classifier_fid,classifier_kid" + (",gan_test" if conditional else "")
        values = eval_json("--ckpt", g, "--data", data, "--classifier", classifier, "--metrics", wanted,
                           "-n", 16, "--ref-n", 16)
        assert {"classifier_fid", "classifier_kid_mean"} <= set(values), values
        assert protocol["num_samples"] == 16 and protocol["num_reference"] == 16, protocol
        assert ("gan_test_accuracy" in values) == conditional, values

    def eval_samples():
        values = eval_json("--samples", root / "s-npz" / "samples.npz", "--data", data, "--classifier", classifier,
                           "--ref-n", 12)
        assert "classifier_fid" in values and ("gan_test_accuracy" in values) == conditional, values
        assert protocol["num_samples"] == 6 and protocol["num_reference"] == 12, protocol

    def eval_samples_png():  # the folder `sagan sample` wrote: its 6 images, not its grid.png as a seventh
        reference = data_folder or data  # grayscale cells: --data is the folder of training images itself
        values = eval_json("--samples", root / "s-png", "--data", reference, "--classifier", classifier, "--ref-n", 12)
        assert "classifier_fid" in values, values
        assert protocol["num_samples"] == 6, f"scored {protocol['num_samples']} images of a folder of 6 samples"

    def attn_map(which: str):
        def check():
            ckpt, out = (g, root / "attn-g.png") if which == "g" else (d, root / "attn-d.png")
            args = ["attn-map", *([image_for_d] if which == "d" else []), "--ckpt", ckpt, "--out", out,
                    "--json", out.with_suffix(".json"), "-p", "3,4", "--device", "cpu"]
            if which == "g":
                args += ["--seed", 2, *(["--class", 1] if conditional else [])]
                args += [a for size in g_att[-1:] for a in ("--layer", f"attention.{size}")]
            if cell.attention == "none":  # nothing to show: one clear error line, exit 2
                code, stdout, err = ctx.sagan_code(*args)
                assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and "self-attention" in err, \
                    (code, stdout, err)
                return
            sagan(*args)
            summary = json.loads(out.with_suffix(".json").read_text())
            sizes = g_att[-1:] if which == "g" else d_att
            assert list(summary["layers"]) == [f"attention.{s}" for s in sizes], summary["layers"].keys()
            assert png(out).size[0] > 100
        return check

    def report():
        out = root / "report.html"
        sagan("report", run, "--out", out, "--samples", 1, "--dataset-images", 1, "--image", photo,
              "--device", "cpu")
        html = out.read_text()
        if cell.attention == "none":  # no explorer, a note instead
            assert 'id="explorer-data"' not in html and "no self-attention layers" in html
            return
        subjects = explorer(html)["subjects"]
        assert [s["network"] for s in subjects] == ["G", "D", "D"], [s["network"] for s in subjects]
        assert [layer["name"] for layer in subjects[0]["layers"]] == [f"attention.{s}" for s in g_att]
        assert [layer["name"] for layer in subjects[1]["layers"]] == [f"attention.{s}" for s in d_att]
        for subject in subjects:  # the explorer's picture decodes, at the model's size
            with Image.open(BytesIO(base64.b64decode(subject["png"].split(",", 1)[1]))) as picture:
                assert picture.size == (cell.resolution, cell.resolution), picture.size

    def interpolate():
        out = root / "interp"
        options = ["--classes", "0,2", "--class", 1, "--animation", "webp"] if conditional else []
        sagan("interpolate", "--ckpt", g, "--out", out, "--seeds", "1,2", "--steps", 3, "--device", "cpu", *options)
        kind = "webp" if conditional else "gif"
        expected = [f"seeds-slerp.{kind}", "seeds-slerp.png"] + ([f"classes.{kind}", "classes.png"] if conditional else [])
        assert sorted(p.name for p in out.iterdir()) == sorted(expected)
        sheet = png(out / "seeds-slerp.png")
        assert sheet.mode == ("L" if cell.channels == 1 else "RGB"), sheet.mode
        assert sheet.size == (2 + 3 * (cell.resolution + 2), 2 + (cell.resolution + 2)), sheet.size

    def export(fmt: str):
        def check():
            out = root / ("g.onnx" if fmt == "onnx" else "g.pt")
            text = sagan("export", "--ckpt", g, "--format", fmt, "--out", out, "--check", 5)
            assert "max |difference|" in text and "batch sizes 2 (traced) and 5" in text, text
            check_export(g, out, fmt)
        return check

    steps = [
        ("sample-png", sample_png, (trained,)),
        ("sample-npz", sample_npz, (trained,)),
        ("classifier-train", classifier_train, ()),
    ]
    if structure:
        steps.append(("eval-structure", eval_structure, (trained,)))
    steps += [
        ("eval-classifier", eval_classifier, (trained,)),  # each needs the classifier file, checked below
        ("eval-samples", eval_samples, ("sample-npz",)),
        ("eval-samples-png", eval_samples_png, ("sample-png",)),
        ("attn-map-g", attn_map("g"), (trained,)),
        ("attn-map-d", attn_map("d"), (trained, "sample-png")),
        ("report", report, (trained,)),
        ("interpolate", interpolate, (trained,)),
    ]
    steps += [(f"export-{fmt}", export(fmt), (trained,)) for fmt in cell.export.split(",")]
    return steps


def cell_steps(ctx: Context) -> list:
    cell, root = ctx.cell, ctx.root
    data_dir = write_grey_folder(root / "data") if cell.channels == 1 else None
    recipe = root / f"{cell.id}.toml"
    recipe.write_text(recipe_text(cell, data_dir))
    run = root / "run"

    def train():
        args = ["train", recipe, "--out", run]
        torchrun(*map(str, args)) if cell.procs > 1 else ctx.sagan(*args)
        check_run(run, cell, 2)

    def resume():
        args = ["train", recipe, "--out", run, "--resume", "--set", "train.steps=4"]
        torchrun(*map(str, args)) if cell.procs > 1 else ctx.sagan(*args)
        check_run(run, cell, 4)

    def fp16_scaling():  # loss scaling really ran: the state keeps both networks' scalers
        progress = json.loads((latest_state(run) / "progress.json").read_text())
        assert set(progress.get("scalers") or {}) == {"d", "g"}, \
            f"fp16 asked for, but no loss scalers were saved (progress.json scalers: {progress.get('scalers')}): ran fp32"

    def resume_exact():  # 2 steps + 2 resumed steps = 4 straight steps, bit for bit (models, EMA, D)
        from safetensors.torch import load_file

        straight = root / "run-straight"
        ctx.sagan("train", recipe, "--out", straight, "--set", "train.steps=4")
        for name in ("g.safetensors", "d.safetensors", "state/step-0000004/models.safetensors"):
            a, b = load_file(run / name), load_file(straight / name)
            differ = [k for k in a if not torch.equal(a[k], b[k])]
            assert a.keys() == b.keys() and not differ, f"{name}: resumed != straight in {differ[:3]}"

    fp16 = [("fp16-scaling", fp16_scaling, ("resume",))] if cell.precision == "fp16" else []
    exact = [("resume-exact", resume_exact, ("resume",))] if cell.procs == 1 else []  # torchrun: ~20 s a launch
    return [("train", train, ()), ("resume", resume, ("train",)), *fp16, *exact,
            *model_steps(ctx, g=run / "g.safetensors", d=run / "d.safetensors", data=run / "config.json",
                         classifier_recipe=recipe, cell=cell, run=run, structure=cell.channels == 3,
                         trained="resume", attention=attention_sizes(cell), data_folder=data_dir)]


# ---------------------------------------------------------------- cells from the popular port

PORT_CELL = Cell(3, 0, "dcgan", "seed", 64, "fp32", 1)  # what import-port makes: the port's 64x64 model


def port_steps(ctx: Context, *, torch03: bool) -> list:
    """import-port, then every command. torch03: state dicts as PyTorch 0.3 saved them (no num_batches_tracked)."""
    from port_weights import port_discriminator_state, port_generator_state

    root = ctx.root
    g_state, d_state = port_generator_state(), port_discriminator_state()
    if torch03:
        g_state = {k: v for k, v in g_state.items() if not k.endswith("num_batches_tracked")}
    torch.save(g_state, root / "G.pth")
    torch.save(d_state, root / "D.pth")
    out = root / "port"
    recipe = root / "port-data.toml"  # the data the imported model is scored against (and its classifier learns)
    recipe.write_text('[data]\nkind = "synthetic"\nsynthetic_size = 32\n[model]\nresolution = 64\ng_attention = []\n'
                      "d_attention = []\n")

    def import_port():
        text = ctx.sagan("import-port", "--g", root / "G.pth", "--d", root / "D.pth", "--out", out)
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "d.safetensors", "g.safetensors"], text

    steps = [("import-port", import_port, ())]
    model = model_steps(ctx, g=out / "g.safetensors", d=out / "d.safetensors", data=recipe, classifier_recipe=recipe,
                        cell=PORT_CELL, run=out, structure=True, trained="import-port",
                        attention=([16, 32], [8, 4]))  # the port's layers (test_port's CONV_DIM model)
    if torch03:  # the import itself is the point; one command shows the model works
        model = [step for step in model if step[0] == "sample-png"]
    return steps + model


SPECIAL = {"port": False, "port-torch03": True}
# the two-process cells first: their launches are the longest items, so they start while the others run
ALL_IDS = [c.id for c in sorted(CELLS, key=lambda c: -c.procs)] + list(SPECIAL)


# ---------------------------------------------------------------- one run per cell per session, shared by tests

@pytest.fixture(scope="session")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every xdist worker of this session sees (one pipeline per cell, whichever test asks first)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "path-matrix"
    root.mkdir(exist_ok=True)
    return root


def cell_results(name: str, shared_root: Path, capsys, monkeypatch) -> tuple[dict[str, str], Path]:
    """Run the cell's commands once (under a lock) and return {command: "ok" | reason} and its folder."""
    root = shared_root / name
    with FileLock(str(shared_root / f"{name}.lock")):
        done = root / "results.json"
        if not done.is_file():
            root.mkdir(exist_ok=True)
            cell = next((c for c in CELLS if c.id == name), None)
            ctx = make_context(cell, name, root, capsys, monkeypatch)
            steps = cell_steps(ctx) if cell is not None else port_steps(ctx, torch03=SPECIAL[name])
            done.write_text(json.dumps(run_steps(ctx, steps), indent=1))
        return json.loads(done.read_text()), root


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.processes) if name.endswith("-2p") else name
                                  for name in ALL_IDS])
def test_cell(name: str, shared_root: Path, capsys, monkeypatch):
    results, _ = cell_results(name, shared_root, capsys, monkeypatch)
    seconds = results.pop("seconds")
    print(f"{name}: " + ", ".join(f"{command} {'ok' if status == 'ok' else 'FAIL'} {seconds.get(command, 0)}s"
                                  for command, status in results.items()))
    failures = [f"{name} {command}: {status}" for command, status in results.items() if status != "ok"]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- the report page in a real browser

BROWSER_CELLS = [next(c.id for c in CELLS if c.channels == channels and c.attention != "none") for channels in (1, 3)]


@pytest.mark.parametrize("name", BROWSER_CELLS)
def test_report_in_a_browser(name: str, shared_root: Path, capsys, monkeypatch, tmp_path: Path):
    from helpers import open_browser  # skips without chromium and chromedriver

    browser = open_browser(tmp_path)
    try:
        results, root = cell_results(name, shared_root, capsys, monkeypatch)
        assert results.get("report") == "ok", f"{name} report: {results.get('report')}"
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        browser.get((root / "report.html").resolve().as_uri())
        layers = browser.find_element(By.ID, "layers")
        for subject in (0, 1):  # a generated image (G), then the --image (D)
            browser.execute_script("const s = document.getElementById('subject'); s.value = arguments[0];"
                                   "s.dispatchEvent(new Event('change'));", subject)
            WebDriverWait(browser, 10).until(lambda b: layers.get_attribute("data-ready") == "true")
            canvas = browser.find_elements(By.CSS_SELECTOR, "#layers canvas")[0]
            plain = browser.execute_script("return arguments[0].toDataURL()", canvas)
            shots = []
            for x, y in ((20, 20), (228, 196)):
                ActionChains(browser).move_to_element_with_offset(canvas, x - 128, y - 128).perform()
                shots.append(browser.execute_script("return arguments[0].toDataURL()", canvas))
            assert plain != shots[0] != shots[1], f"{name}: hovering subject {subject} does not move the overlay"
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, f"{name}: {errors}"
    finally:
        browser.quit()
