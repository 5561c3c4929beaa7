"""Helpers shared by tests in several folders (tests/ is on sys.path through its conftest.py):
the `sagan` entry point run in this process, a tiny training recipe, an independent Frechet distance,
what an exported generator draws, and a headless browser."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from sagan_cli.cli import main
from sagan_cli.config import recipe_from_dict

# ---- the command line, in this process ----


def main_exit_code() -> int:
    """Run the real entry point with the current sys.argv; its exit code (success returns normally)."""
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code or 0


def run_main(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """The real `sagan` entry point, in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["sagan", *args])
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    code = main_exit_code()
    out, err = capsys.readouterr()
    return code, out, err


def sagan_main(*args: object) -> tuple[int, str, str]:
    """`sagan ARGS` through the real entry point in this process, without pytest fixtures (module-scoped ones
    may call it): (exit code, stdout, stderr). Half a second instead of a new interpreter importing torch."""
    stdout, stderr, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["sagan", *map(str, args)]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main_exit_code()
    finally:
        sys.argv = argv
    return code, stdout.getvalue(), stderr.getvalue()


def assert_one_error_line(code: int, out: str, err: str, names: list[str]) -> None:
    assert "Traceback" not in out + err, out + err
    lines = err.splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: "), err
    for name in names:
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"


# ---- training ----

TINY = {
    "data": {"kind": "synthetic", "synthetic_size": 64},
    "model": {"resolution": 32, "g_ch": 16, "d_ch": 16, "g_attention": [16], "d_attention": [8]},
    "train": {"steps": 4, "batch_size": 8, "checkpoint_every": 2, "sample_every": 2, "log_every": 1,
              "ema_start": 1, "sample_grid": 4, "ema_standing_stats": 2},
}


def tiny_recipe(**overrides):
    """TINY with `table__key=value` overrides: a 4-step synthetic run that trains in seconds."""
    raw = json.loads(json.dumps(TINY))
    for dotted, value in overrides.items():
        table, key = dotted.split("__")
        raw.setdefault(table, {})[key] = value
    return recipe_from_dict(raw, name="tiny")


def weights(result) -> dict[str, torch.Tensor]:
    """Every tensor of a training result's G, D and EMA, copied, keyed g./d./ema. (for exact comparisons)."""
    tensors = {f"g.{k}": v for k, v in result.generator.state_dict().items()}
    tensors.update({f"d.{k}": v for k, v in result.discriminator.state_dict().items()})
    if result.ema is not None:
        tensors.update({f"ema.{k}": v for k, v in result.ema.state_dict().items()})
    return {k: v.detach().clone() for k, v in tensors.items()}


# ---- evaluation and export ----


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of Gaussians fitted to feature rows, derived independently of torch-fidelity.

    With n < d samples, tr sqrt(Ca Cb) is the nuclear norm of Xa Xb^T / sqrt((n-1)(m-1)) for the
    centred feature matrices (the square roots of the eigenvalues of Ca Cb are its singular values),
    which is exact and takes milliseconds where scipy.linalg.sqrtm on 2048 x 2048 takes minutes here.
    """
    xa, xb = a - a.mean(0), b - b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    nuclear = scipy.linalg.svdvals(xa @ xb.T).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * nuclear)


def exported_output(path, fmt: str, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """What an exported generator (ONNX through onnxruntime, or TorchScript) draws for z (and labels y)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {"z": z.numpy()} | ({"y": y.numpy()} if y is not None else {})
        return torch.from_numpy(session.run(None, feed)[0])
    module = torch.jit.load(str(path))
    with torch.no_grad():
        return module(z, y) if y is not None else module(z)


# ---- the report page in a real browser (Debian's chromium + chromium-driver, driven by selenium) ----


def open_browser(tmp_path: Path):
    """Headless chromium driven by selenium; skips the test when either is missing."""
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1280,1400",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=driver_path)
    return webdriver.Chrome(options=options, service=service)


# Runs `sagan` commands one after the other in one fresh process: [[exit code, stderr], ...] as JSON.
_COMMANDS = """
import contextlib, io, json, sys
from sagan_cli.cli import main
done = []
for args in json.loads(sys.argv[1]):
    sys.argv, err = ["sagan", *args], io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    done.append([code, err.getvalue()])
print(json.dumps(done))
"""


def sagan_in_one_process(*commands: list[object], preexec_fn=None, env: dict | None = None) -> list[tuple[int, str]]:
    """The real command line in a fresh process (nothing this test process loaded helps it), several commands
    in that one process: one `import torch` instead of one per command. (exit code, stderr) for each; a crash
    (a traceback, running out of memory under `preexec_fn`'s limits) ends the process and fails the test."""
    done = subprocess.run([sys.executable, "-c", _COMMANDS, json.dumps([list(map(str, c)) for c in commands])],
                          capture_output=True, text=True, preexec_fn=preexec_fn, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    return [tuple(result) for result in json.loads(done.stdout.splitlines()[-1])]
