"""`sagan report` on a real tiny run: page content, a run in progress, and the page in a real browser."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import open_browser

from sagan_cli.config import recipe_from_dict
from sagan_cli.inspection.report import build_report, read_log

TINY = {
    "data": {"kind": "synthetic", "synthetic_size": 64},
    "model": {"resolution": 32, "g_ch": 16, "d_ch": 16, "z_dim": 16, "g_attention": [16], "d_attention": [8]},
    "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 2, "sample_every": 1, "log_every": 1,
              "ema_start": 1, "sample_grid": 4},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) run: 2 steps of training on synthetic data, plus an eval line as training writes it."""
    from sagan_cli.training.loop import run_training

    root = tmp_path_factory.mktemp("report") / "run"
    run_training(recipe_from_dict(json.loads(json.dumps(TINY)), name="tiny"), root)
    with (root / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "eval": {"fid": 123.4}}) + "\n")
    return root


@pytest.fixture(scope="module")
def page(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    photo = tmp_path_factory.mktemp("photo") / "photo.png"
    from PIL import Image

    Image.new("RGB", (50, 40), (200, 40, 40)).save(photo)
    return build_report(run_dir, tmp_path_factory.mktemp("out") / "report.html", images=[photo], samples=2,
                        dataset_images=1)


def _explorer(html: str) -> dict:
    return json.loads(re.search(r'id="explorer-data">(.*?)</script>', html, re.S).group(1))


def test_page_is_self_contained_and_holds_every_part(page: Path, run_dir: Path):
    html = page.read_text()
    # nothing fetched from anywhere: every src/href is a data URI or an in-page anchor
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), refs
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    # curves: one image per panel, including the eval and structure scores
    for title in ("Losses", "D outputs", "Attention gamma", "Throughput", "Evaluation: fid", "Structure: valid_fraction"):
        assert f'alt="{title}' in html, title
    # every grid of samples/ is in the slider
    grids = json.loads(re.search(r'id="grid-data">(.*?)</script>', html, re.S).group(1))
    assert [g["step"] for g in grids] == [0, 1, 2]
    assert base64.b64decode(grids[-1]["uri"].split(",", 1)[1]) == (run_dir / "samples" / "step-0000002.png").read_bytes()
    assert '&#34;resolution&#34;: 32' in html or '"resolution": 32' in html  # the recipe
    # explorer: 2 G samples, the --image and 1 dataset image for D; every row of the small maps
    subjects = _explorer(html)["subjects"]
    assert [s["network"] for s in subjects] == ["G", "G", "D", "D"]
    assert subjects[2]["label"] == "D: photo.png"
    g_layer, d_layer = subjects[0]["layers"][0], subjects[2]["layers"][0]
    assert (g_layer["name"], g_layer["feature"], g_layer["queries"], g_layer["stride"]) == ("attention.16", [16, 16], [16, 16], 1)
    assert (d_layer["name"], d_layer["feature"], d_layer["queries"]) == ("attention.8", [8, 8], [8, 8])
    rows = base64.b64decode(g_layer["rows"])
    assert len(rows) == 256 * 256 and len(g_layer["peak"]) == 256
    assert max(rows[:256]) == 255  # each row scaled to its own maximum


def test_attention_distance_and_entropy_are_logged_and_drawn(page: Path, run_dir: Path):
    """Each log line holds every attention layer's distance and entropy (keyed as gamma); the page draws them."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "loss_d" in line]
    assert [line["step"] for line in logged] == [1, 2]
    for line in logged:
        for key in ("attn_distance", "attn_entropy", "attn_distance_uniform", "attn_entropy_uniform"):
            assert set(line[key]) == set(line["gamma"]) == {"g.attention.16", "d.attention.8"}, key
        assert line["attn_entropy_uniform"] == pytest.approx({"g.attention.16": math.log(256),
                                                              "d.attention.8": math.log(64)})
        assert 0 < line["attn_distance"]["g.attention.16"] <= 16 * math.sqrt(2)
    html = page.read_text()
    for layer in ("g.attention.16", "d.attention.8"):
        for title, key in (("Attention distance", "attn_distance"), ("Attention entropy", "attn_entropy")):
            assert f'alt="{title}: {layer}: {key}/{layer}, {key}_uniform/{layer}"' in html
    assert html.index('alt="Attention gamma') < html.index('alt="Attention distance') < html.index('alt="Throughput')


def test_rows_match_the_models_attention(run_dir: Path):
    """The page's quantised rows are the model's attention rows (the same image, the same query)."""
    import torch

    from sagan_cli.inspection.attention import captured_inputs
    from sagan_cli.inspection.explorer import generator_subjects
    from sagan_cli.interchange.checkpoint import load_model
    from sagan_cli.model.generation import generate
    from sagan_cli.model.models import attention_layers

    g, _ = load_model(run_dir / "g.safetensors")
    subject = generator_subjects(g, 1, seed=5)[0]
    layer = attention_layers(g)["attention.16"]
    with captured_inputs({"attention.16": layer}) as inputs:
        generate(g, 1, seed=5, batch_size=1)
    with torch.inference_mode():
        exact = layer.attention_weights(inputs["attention.16"], [(3, 7)])[0, 0]
    stored = torch.frombuffer(bytearray(base64.b64decode(subject.layers[0]["rows"])), dtype=torch.uint8)
    row = stored.reshape(256, 256)[7 * 16 + 3].float()
    assert torch.allclose(row / 255, exact / exact.max(), atol=0.5 / 255 + 1e-6)
    assert subject.layers[0]["peak"][7 * 16 + 3] == pytest.approx(float(exact.max()), rel=1e-3)


def test_large_maps_keep_a_query_grid_and_pooled_keys():
    import torch

    from sagan_cli.inspection.explorer import layer_rows, query_stride
    from sagan_cli.model.layers import SelfAttention

    assert [query_stride(s, s) for s in (8, 16, 32, 64, 128)] == [1, 1, 2, 4, 8]
    torch.manual_seed(0)
    record = layer_rows(SelfAttention(16), torch.randn(1, 16, 64, 64), "attention.64")
    assert record["queries"] == [16, 16] and record["keys"] == [32, 32] and record["stride"] == 4
    assert len(base64.b64decode(record["rows"])) == 256 * 32 * 32


def test_run_in_progress_and_torn_files(run_dir: Path, tmp_path: Path):
    """Before the first checkpoint: no checkpoints, a half-written log line and a torn grid are skipped."""
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("state", "*.safetensors"))
    with (partial / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss_d": 0.')
    (partial / "samples" / "step-0000003.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert read_log(partial / "metrics.jsonl").skipped_lines == 1
    html = build_report(partial).read_text()
    assert "no g.safetensors yet" in html and "no d.safetensors yet" in html
    assert "1 unreadable log line(s) skipped" in html
    grids = json.loads(re.search(r'id="grid-data">(.*?)</script>', html, re.S).group(1))
    assert [g["step"] for g in grids] == [0, 1, 2]
    only_config = tmp_path / "fresh"
    only_config.mkdir()
    shutil.copy(run_dir / "config.json", only_config)
    assert "No metrics logged yet" in build_report(only_config).read_text()


def test_cli_writes_the_page(run_dir: Path, tmp_path: Path):
    out = tmp_path / "r.html"
    done = subprocess.run([sys.executable, "-m", "sagan_cli", "report", str(run_dir), "--out", str(out),
                           "--samples", "1", "--dataset-images", "0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and out.stat().st_size > 10_000


# ---- the page in a real browser (Debian's chromium + chromium-driver, driven by selenium) ----


def test_page_in_a_real_browser(page: Path, tmp_path: Path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = open_browser(tmp_path)
    try:
        browser.get(page.resolve().as_uri())
        layers = browser.find_element(By.ID, "layers")
        WebDriverWait(browser, 10).until(lambda b: layers.get_attribute("data-ready") == "true")
        canvas = browser.find_elements(By.CSS_SELECTOR, "#layers canvas")[0]
        before = canvas.get_attribute("data-row")
        plain = browser.execute_script("return arguments[0].toDataURL()", canvas)

        def hover(x: int, y: int) -> str:  # x, y: CSS pixels from the canvas' top-left corner (256 px wide)
            ActionChains(browser).move_to_element_with_offset(canvas, x - 128, y - 128).perform()
            return browser.execute_script("return arguments[0].toDataURL()", canvas)

        first = hover(20, 20)
        assert canvas.get_attribute("data-row") is not None and before is None
        second = hover(228, 196)  # the middles of 8-px cells: robust to sub-pixel layout
        assert first != plain and second != first, "hovering a different pixel must change the overlay"
        assert layers.get_attribute("data-query") == "28,24"
        # the D image: pick it, hover, and its layer draws too
        browser.execute_script("const s = document.getElementById('subject'); s.value = 2;"
                               "s.dispatchEvent(new Event('change'));")
        WebDriverWait(browser, 10).until(lambda b: layers.get_attribute("data-ready") == "true")
        canvas = browser.find_elements(By.CSS_SELECTOR, "#layers canvas")[0]
        assert "D attention.8" in browser.find_element(By.ID, "layers").text
        unhovered = browser.execute_script("return arguments[0].toDataURL()", canvas)
        assert hover(100, 100) != unhovered
        # the slider swaps the grid
        browser.execute_script("const s = document.getElementById('grid-slider'); s.value = 0;"
                               "s.dispatchEvent(new Event('input'));")
        assert browser.find_element(By.ID, "grid-step").text == "step 0"
        # the attention distance and entropy panels: one image per layer and statistic, drawn
        panels = browser.find_elements(By.CSS_SELECTOR, 'img[alt^="Attention distance"], img[alt^="Attention entropy"]')
        assert len(panels) == 4
        assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 300", img)
                   for img in panels)
        shot = tmp_path / "report.png"
        browser.save_screenshot(str(shot))
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
    finally:
        browser.quit()
    from PIL import Image, ImageStat

    with Image.open(shot) as img:
        stats = ImageStat.Stat(img.convert("L"))
    assert stats.stddev[0] > 10, "the screenshot is blank"
    import os

    if os.environ.get("SAGAN_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["SAGAN_KEEP_SCREENSHOT"])
