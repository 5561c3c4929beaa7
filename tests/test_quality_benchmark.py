"""benchmarks/quality.py: finished runs are not redone, unfinished ones are, and the table's spread is right;
bad invocations fail in one line before anything trains; a failure or Ctrl-C ends every run.

The runs are built in-process (a real checkpoint at the recipe's last step, a saved eval and result) rather
than trained: two trainings and evaluations in subprocesses take minutes on a loaded 2-core machine. Where
a command must run, `SAGAN` is a short Python program that fails or sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from sagan_cli.config import load_recipe
from sagan_cli.data.structure import score_images
from sagan_cli.evaluation.features import ClassifierExtractor, FeatureSpace, fidelity_metrics
from sagan_cli.evaluation.metrics import ALL_METRICS, CLASSIFIER_METRICS, INCEPTION_METRICS
from sagan_cli.interchange.checkpoint import save_model
from sagan_cli.model.models import build_models

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quality  # noqa: E402

RECIPE = str(ROOT / "recipes" / "quickstart.toml")
OVERRIDES = ["train.steps=20", "model.g_ch=8", "model.d_ch=8"]
SCORES = {0: {"structure_valid_fraction": 0.25, "structure_symmetry_ratio": 0.9},
          1: {"structure_valid_fraction": 0.5, "structure_symmetry_ratio": 0.7},
          2: {"structure_valid_fraction": 0.125, "structure_symmetry_ratio": 0.8}}


# A stand-in for `python -m sagan_cli`: `train --out .../seed-0` fails (exit 3) once seed 1 has started; any
# other command says it started (its pid in RUN_DIR.started) and sleeps, as a long training does.
FAKE_SAGAN = [sys.executable, "-c", """
import os, pathlib, sys, time
args = sys.argv[1:]
run_dir = pathlib.Path(args[args.index("--out") + 1])
if run_dir.name == "seed-0":
    for _ in range(3000):  # a loaded machine can take seconds to start a Python
        if (run_dir.parent / "seed-1.started").exists():
            break
        time.sleep(0.02)
    sys.exit(3)
(run_dir.parent / (run_dir.name + ".started")).write_text(str(os.getpid()))
time.sleep(60)
"""]


def _variant(name: str = "recipe", overrides: list[str] | None = None) -> quality.Variant:
    return quality.Variant(name, overrides or [], metrics=["structure"])


def _measurement(overrides: list[str] = OVERRIDES, jobs: int = 1, recipe: str = RECIPE) -> quality.Measurement:
    return quality.Measurement(recipe, overrides, samples=64, classifier=None, jobs=jobs, threads=None)


def _finished_run(measurement: quality.Measurement, out: Path, seed: int, step: int = 20) -> None:
    """What a finished `sagan train` + `sagan eval` leaves: config.json, g.safetensors at `step`, eval and result JSON."""
    variant = _variant()
    run_dir = out / "recipe" / f"seed-{seed}"
    run_dir.mkdir(parents=True)
    recipe = load_recipe(RECIPE, [*OVERRIDES, f"train.seed={seed}"])
    (run_dir / "config.json").write_text(json.dumps(recipe.to_dict()))
    generator, _ = build_models(recipe.model)
    save_model(run_dir / "g.safetensors", generator, step=step)
    (run_dir / quality.EVAL_FILE).write_text(json.dumps({"metrics": SCORES[seed], "protocol": {}}))
    result = quality.RunResult(variant="recipe", seed=seed, train_args=quality.train_args(measurement, variant, seed, run_dir),
                               eval_settings=quality.eval_settings(measurement, variant), metrics=SCORES[seed],
                               train_seconds=60.0 + seed, eval_seconds=5.0, load_start=1.0, load_mean=1.5 + seed,
                               load_end=2.0, final_step=step)
    (out / "recipe" / f"seed-{seed}.json").write_text(json.dumps(asdict(result)))


def test_finished_runs_are_kept_and_tabulated_unfinished_ones_retrained(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "SAGAN", ["false"])  # any sagan command run from here fails loudly
    measurement = _measurement()
    for seed in (0, 1, 2):
        _finished_run(measurement, tmp_path, seed)

    results = quality.measure(measurement, [_variant()], [0, 1, 2], tmp_path)
    assert [(r.seed, r.metrics) for r in results] == [(seed, SCORES[seed]) for seed in (0, 1, 2)]
    text = quality.table(measurement, results, None)
    rows = [line for line in text.splitlines() if line.startswith("| recipe |")]
    assert [row.split("|")[2].strip() for row in rows[:3]] == ["0", "1", "2"]
    saved = [json.loads((tmp_path / "recipe" / f"seed-{s}.json").read_text()) for s in (0, 1, 2)]
    valid = [run["metrics"]["structure_valid_fraction"] for run in saved]
    mean, spread = statistics.mean(valid), statistics.stdev(valid)
    summary = rows[3].split("|")
    assert summary[2].strip() == "3"
    assert summary[3].strip() == f"{mean:.4g} ± {spread:.2g} ({min(valid):.4g}-{max(valid):.4g}; n=3)"
    assert summary[-3].strip() == "61"  # mean train seconds of 60, 61, 62

    # a run whose generator is short of the last step (interrupted) is trained again: here, `false` fails
    (tmp_path / "recipe" / "seed-1" / "g.safetensors").unlink()
    generator, _ = build_models(load_recipe(RECIPE, OVERRIDES).model)
    save_model(tmp_path / "recipe" / "seed-1" / "g.safetensors", generator, step=10)
    with pytest.raises(RuntimeError, match="false train .* failed"):
        quality.measure_run(measurement, _variant(), 1, tmp_path)


def test_metric_keys_name_what_sagan_eval_writes():
    """Each --metrics name maps to result keys that torch-fidelity's functions (as sagan eval calls them) produce."""
    torch.manual_seed(0)
    features = {"logits": torch.randn(40, 10), "features": torch.randn(40, 16)}
    reference = {"features": torch.randn(40, 16)}
    settings = dict(isc_splits=2, kid_subsets=10, kid_subset_size=20, prc_neighborhood=3, rng_seed=0,
                    save_cpu_ram=True, verbose=False)
    layers = {metric: ClassifierExtractor.get_default_feature_layer_for_metric(metric) for metric in INCEPTION_METRICS}
    for metric in INCEPTION_METRICS:
        for prefix in ("", "classifier_"):
            if prefix + metric not in ALL_METRICS:
                continue  # no classifier_isc
            space = FeatureSpace("sagan-classifier", Path("unused"), "0", layers, prefix)
            written = fidelity_metrics(features, reference, space, [metric], **settings)
            shown = quality.shown_metrics([prefix + metric])
            assert shown and set(shown) <= set(written), (prefix + metric, shown, written)
    assert set(CLASSIFIER_METRICS) - {"gan_test"} == {f"classifier_{m}" for m in ("fid", "kid", "prc")}
    structure = {f"structure_{key}" for key in score_images(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))}
    assert set(quality.shown_metrics(["structure"])) <= structure
    assert quality.shown_metrics(["prc", "classifier_prc"]) == ["precision", "recall", "classifier_precision",
                                                                 "classifier_recall"]


def _main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    code = quality.main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, named", [
    (["--metrics", "fdi"], "unknown metric 'fdi'"),
    (["--metrics", "gan_test"], "gan_test"),  # quickstart is unconditional
    (["--seeds", "0", "-1"], "--seeds -1"),
    (["--seeds", "2147483648"], "--seeds 2147483648"),
    (["--seeds", "0", "1", "0"], "--seeds lists 0 more than once"),
    (["--set", "train.seed=5"], "train.seed"),
    (["--variant", "a: model.g_ch=16 train.seed=5"], "--variant a"),
    (["--variant", "a: train.nope=1"], "train.nope"),
])
def test_bad_invocations_fail_in_one_line_before_anything_is_written(args, named, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quality, "SAGAN", ["false"])
    out = tmp_path / "out"
    code, err = _main([RECIPE, "--out", str(out), *args], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert named in err and "Traceback" not in err
    assert not out.exists()


def test_out_that_is_a_file_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(quality, "SAGAN", ["false"])
    (tmp_path / "out").write_text("keep me\n")
    code, err = _main([RECIPE, "--out", str(tmp_path / "out"), "--seeds", "0"], capsys)
    assert code == 2 and err.startswith(f"error: --out {tmp_path / 'out'}") and len(err.splitlines()) == 1, err
    assert (tmp_path / "out").read_text() == "keep me\n"


def test_metrics_follow_each_variants_overrides():
    """A labelled recipe gets classifier metrics; its unconditional variant is refused before training."""
    labelled = ROOT / "recipes" / "fashion-mnist.toml"
    variants = [quality.Variant("cond"), quality.Variant("synthetic", ["data.kind=synthetic", "model.num_classes=0",
                                                                        "model.channels=3"])]
    quality.check_variants(labelled, [], variants, None)
    assert variants[0].metrics == ["classifier_fid", "gan_test"] and variants[1].metrics == ["structure"]
    uncond = [quality.Variant("uncond", ["model.num_classes=0"])]
    with pytest.raises(quality.UserError, match="variant uncond.*no metric applies"):
        quality.check_variants(labelled, [], uncond, None)
    with pytest.raises(quality.UserError, match="variant uncond.*gan_test needs a class-conditional"):
        quality.check_variants(labelled, [], uncond, "classifier_fid,gan_test")
    quality.check_variants(labelled, [], variants[:1], "classifier_kid,gan_test")
    assert variants[0].metrics == ["classifier_kid", "gan_test"]


def test_a_run_folder_made_with_other_settings_is_refused_even_unfinished(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "SAGAN", ["false"])
    (tmp_path / "recipe").mkdir()
    with pytest.raises(RuntimeError, match="false train .* failed"):  # the training "fails" at once ...
        quality.measure_run(_measurement(), _variant(), 0, tmp_path)
    record = json.loads((tmp_path / "recipe" / "seed-0.args.json").read_text())  # ... after its settings were saved
    assert record["recipe"]["train"]["steps"] == 20 and record["recipe"]["train"]["seed"] == 0
    with pytest.raises(quality.UserError, match=r"recipe/seed-0 was made with other settings \(differing: "
                                                r"train\.steps; see seed-0\.args\.json\)"):
        quality.measure_run(_measurement([*OVERRIDES, "train.steps=30"]), _variant(), 0, tmp_path)
    with pytest.raises(quality.UserError, match="differing: model.g_attention"):
        quality.measure_run(_measurement(), _variant(overrides=["model.g_attention=[]"]), 0, tmp_path)
    # the same settings from another folder, with the recipe path spelled otherwise: not refused (it trains)
    monkeypatch.chdir(ROOT / "recipes")
    with pytest.raises(RuntimeError, match="false train quickstart.toml .* failed"):
        quality.measure_run(_measurement(recipe="quickstart.toml"), _variant(), 0, tmp_path)


def test_a_failed_run_cancels_the_queue_and_stops_the_running_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "SAGAN", FAKE_SAGAN)
    (tmp_path / "recipe").mkdir()
    with pytest.raises(RuntimeError, match=r"train .*seed-0 .*failed \(exit 3\)"):
        quality.measure(_measurement(jobs=2), [_variant()], [0, 1, 2, 3], tmp_path, quality.Children(grace=30))
    # seed 1 stopped by SIGINT at once, not after its 60 s sleep or the 30 s grace (timed from its start: a loaded
    # machine may take seconds to start the two Pythons)
    assert time.time() - (tmp_path / "recipe" / "seed-1.started").stat().st_mtime < 15
    with pytest.raises(ProcessLookupError):  # seed 1's child is gone
        os.kill(int((tmp_path / "recipe" / "seed-1.started").read_text()), 0)
    for seed in (2, 3):  # queued: never started, nothing written
        assert not list((tmp_path / "recipe").glob(f"seed-{seed}*"))


def test_ctrl_c_stops_the_running_runs_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("Ctrl-C reaches the main thread only")
    fake = [FAKE_SAGAN[0], "-c", FAKE_SAGAN[2].replace('run_dir.name == "seed-0"', "False")]  # all sleep
    monkeypatch.setattr(quality, "SAGAN", fake)
    monkeypatch.setattr(quality, "STOP_GRACE_SECONDS", 0.5)  # not signalled by a terminal: terminated after this
    out = tmp_path / "out"

    interrupted = []

    def interrupt_once_both_run():
        for _ in range(3000):  # a loaded machine can take seconds to start a Python
            if all((out / "recipe" / f"seed-{seed}.started").exists() for seed in (0, 1)):
                break
            time.sleep(0.02)
        interrupted.append(time.monotonic())
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=interrupt_once_both_run, daemon=True).start()
    code, err = _main([RECIPE, "--out", str(out), "--seeds", "0", "1", "2", "--jobs", "2", "--metrics", "structure",
                       *(arg for item in OVERRIDES for arg in ("--set", item))], capsys)
    assert code == 130 and err.startswith("error: interrupted") and len(err.splitlines()) == 1, err
    assert time.monotonic() - interrupted[0] < 15  # stopped at once, not after the 60 s sleeps
    assert not list((out / "recipe").glob("seed-2*"))
    for seed in (0, 1):  # terminated and reaped, not left sleeping
        with pytest.raises(ProcessLookupError):
            os.kill(int((out / "recipe" / f"seed-{seed}.started").read_text()), 0)


def test_summary_counts_the_values_each_metric_has(tmp_path):
    measurement = _measurement()
    runs = []
    for seed, metrics in enumerate([{"structure_valid_fraction": 0.5, "classifier_fid": 3.0},
                                    {"structure_valid_fraction": 0.25}, {"structure_valid_fraction": 0.75}]):
        run = quality.RunResult(variant="v", seed=seed, train_args=[], eval_settings={"metrics": ["structure"]},
                                metrics=metrics, train_seconds=1.0, eval_seconds=1.0, load_start=None, load_mean=None,
                                load_end=None, final_step=20)
        runs.append(run)
    runs[0].eval_settings = {"metrics": ["classifier_fid", "structure"]}
    text = quality.table(measurement, runs, None)
    header = next(line for line in text.splitlines() if line.startswith("| variant | runs |"))
    summary = [line for line in text.splitlines() if line.startswith("| v |")][-1].split("|")
    assert header.split("|")[3].strip().startswith("classifier_fid")  # the union of the runs' metrics, in order
    assert summary[2].strip() == "3"
    assert summary[3].strip() == "3 ± 0 (3-3; n=1)"
    assert summary[4].strip().endswith("; n=3)")
