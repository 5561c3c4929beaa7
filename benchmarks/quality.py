"""Multi-seed quality: train a recipe once per seed (and per variant), score each final generator, tabulate.

    python benchmarks/quality.py recipes/fashion-mnist.toml --seeds 0 1 2 --out runs/quality-fmnist \\
        --variant attn --variant "no-attn: model.g_attention=[] model.d_attention=[]"

Each (variant, seed) run is `sagan train RECIPE --out OUT/VARIANT/seed-S --set train.seed=S ...` in a
subprocess (what a user gets), timed, with the 1-minute load average at its start and end and its mean
sampled every few seconds while it runs; then `sagan eval` scores its final g.safetensors. One seed is
noise: a difference between variants means something only next to the spread between seeds.

The metrics follow the recipe unless --metrics says otherwise: with labelled data (model.num_classes
>= 2) classifier_fid and gan_test, with a classifier (`--classifier FILE`, or trained once into
OUT/classifier.safetensors); on the built-in synthetic data also the structure score. Each variant gets
the metrics that apply to it (its overrides applied); --metrics is checked against every variant before
anything trains. Runs that are already finished (final step reached, eval JSON saved with the same
settings) are not redone, so an interrupted measurement continues where it stopped; an interrupted
training resumes from its state/. Before a run trains, its resolved recipe goes to OUT/VARIANT/seed-S.args.json:
a run folder made with other settings is refused, finished or not. The seeds come from --seeds only
(train.seed in --set or --variant is refused). The first failed run, or Ctrl-C, ends the measurement:
queued runs are dropped and running trainings are stopped (they checkpoint and resume next time).
Per-run results: OUT/VARIANT/seed-S.json; the table: stdout and OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, load  # noqa: E402

from sagan_cli.config import Recipe, load_recipe, parse_override, recipe_from_json
from sagan_cli.errors import UserError
from sagan_cli.evaluation.inception import find_inception_weights
from sagan_cli.evaluation.metrics import ALL_METRICS, CLASSIFIER_METRICS, INCEPTION_METRICS, parse_metrics
from sagan_cli.interchange.checkpoint import read_info

SAGAN = [sys.executable, "-m", "sagan_cli"]
LOAD_SAMPLE_SECONDS = 5.0
STOP_GRACE_SECONDS = 60.0  # a stopped `sagan train` finishes its step and checkpoints; then it is terminated
EVAL_FILE = "eval-quality.json"
SEED_LIMIT = 2**31  # train.seed's range (numpy's 2**32, with room for one seed per process)
# `sagan eval --metrics` name -> the result keys shown (fid and classifier_fid keep their name)
METRIC_KEYS = {"isc": ("isc_mean",), "kid": ("kid_mean",), "prc": ("precision", "recall"),
               "classifier_kid": ("classifier_kid_mean",),
               "classifier_prc": ("classifier_precision", "classifier_recall"),
               "gan_test": ("gan_test_accuracy",),
               "structure": ("structure_valid_fraction", "structure_symmetry_ratio", "structure_blob_count_accuracy")}
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Variant:
    """A named set of recipe overrides, trained under OUT/NAME/ and scored with `metrics`."""

    name: str
    overrides: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)  # `sagan eval --metrics` names, set by check_variants


@dataclass
class Measurement:
    """What every run of one invocation shares; a saved run counts as done only under the same settings."""

    recipe: str
    overrides: list[str]
    samples: int
    classifier: str | None
    jobs: int
    threads: int | None  # OMP threads of each child, None = the child's own default (jobs = 1)
    device: str | None = None


@dataclass
class RunResult:
    variant: str
    seed: int
    train_args: list[str]
    eval_settings: dict
    metrics: dict[str, float]
    train_seconds: float | None  # None: trained by an earlier invocation
    eval_seconds: float
    load_start: float | None
    load_mean: float | None
    load_end: float | None
    final_step: int
    resumed: bool = False
    jobs: int = 1


def parse_variant(text: str) -> Variant:
    """`NAME` or `NAME: table.key=value table.key=value ...`."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not VARIANT_NAME.match(name):
        raise UserError(f"--variant {text!r}: the name before ':' must be a folder name (letters, digits, . _ -)")
    overrides = rest.split()
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--variant {name}: {item!r} is not table.key=value")
    return Variant(name, overrides)


def refuse_seed_override(overrides: list[str], where: str) -> None:
    """The seeds come from --seeds: a train.seed override would silently make every run the same seed."""
    for item in overrides:
        table, key, _ = parse_override(item)
        if (table, key.strip()) == ("train", "seed"):
            raise UserError(f"{where} {item!r}: train.seed is set per run from --seeds; drop it and give --seeds")


def check_seeds(seeds: list[int]) -> None:
    for seed in seeds:
        if not 0 <= seed < SEED_LIMIT:
            raise UserError(f"--seeds {seed}: a seed must be in [0, 2**31) (train.seed's range)")
    repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
    if repeated:
        raise UserError(f"--seeds lists {', '.join(map(str, repeated))} more than once: a seed is one run")


def choose_metrics(recipe: Recipe, where: str) -> list[str]:
    """The metrics that apply to the recipe without Inception weights: classifier ones need labels."""
    metrics = []
    if recipe.model.num_classes >= 2:
        metrics += ["classifier_fid", "gan_test"]
    if recipe.data.kind == "synthetic":
        metrics.append("structure")
    if not metrics:
        raise UserError(f"{where}: no metric applies without Inception weights (unlabelled, not synthetic); "
                        "give --metrics (e.g. fid with SAGAN_INCEPTION_WEIGHTS set)")
    return metrics


def check_metrics(text: str, recipe: Recipe, where: str) -> list[str]:
    """--metrics as `sagan eval` reads them against this recipe's data, checked now rather than after training."""
    metrics = parse_metrics(text, recipe.data)
    if "gan_test" in metrics and recipe.model.num_classes == 0:
        raise UserError(f"{where}: --metrics gan_test needs a class-conditional model (model.num_classes > 0)")
    if any(metric in INCEPTION_METRICS for metric in metrics):
        find_inception_weights(None)
    return metrics


def check_variants(recipe_path: Path, overrides: list[str], variants: list[Variant], metrics: str | None) -> None:
    """Each variant's recipe loads and its metrics apply to it (its own overrides applied): set variant.metrics."""
    refuse_seed_override(overrides, "--set")
    for variant in variants:
        refuse_seed_override(variant.overrides, f"--variant {variant.name}")
        recipe = load_recipe(recipe_path, [*overrides, *variant.overrides])
        where = f"{recipe_path} (variant {variant.name})"
        variant.metrics = check_metrics(metrics, recipe, where) if metrics else choose_metrics(recipe, where)


def needs_classifier(metrics: list[str]) -> bool:
    return any(metric in CLASSIFIER_METRICS for metric in metrics)


class LoadSampler:
    """The 1-minute load average at start, every few seconds while a run lasts, and at its end."""

    def __init__(self, every: float = LOAD_SAMPLE_SECONDS):
        self.every, self.samples, self._stop = every, [load()], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(load())

    def stop(self) -> tuple[float, float, float]:
        self._stop.set()
        self._thread.join()
        self.samples.append(load())
        return self.samples[0], statistics.fmean(self.samples), self.samples[-1]


def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads is not None:  # torch reads these at start-up for its intra-op pool
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


class Stopped(RuntimeError):
    """A command not started because the measurement is ending (a run failed, or Ctrl-C)."""


class Children:
    """The sagan processes running now, so that ending the measurement stops them instead of leaving them to run.

    They share our process group: Ctrl-C in a terminal reaches them too (`sagan train` then finishes its
    step, checkpoints and exits), so on Ctrl-C they are given `grace` seconds before being terminated.
    """

    def __init__(self, grace: float | None = None):
        self.grace = STOP_GRACE_SECONDS if grace is None else grace
        self.closed, self._stopping, self._running, self._lock = False, False, set(), threading.Lock()

    def close(self) -> None:
        """Start no more commands (a run failed: the measurement ends)."""
        with self._lock:
            self.closed = True

    def check_open(self, what: str) -> None:
        if self.closed:
            raise Stopped(f"{what}: not started, the measurement is ending")

    def run(self, cmd: list[str], out, env: dict[str, str]) -> int:
        with self._lock:
            self.check_open(" ".join(cmd))
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            self._running.add(process)
        try:
            return process.wait()
        finally:
            if process.poll() is not None:  # still running after Ctrl-C here: stop() ends it
                with self._lock:
                    self._running.discard(process)

    def stop(self, *, interrupted: bool) -> None:
        """Start nothing more; ask the running ones to stop (SIGINT, unless Ctrl-C already did), then terminate.

        A second call (Ctrl-C while waiting) terminates at once.
        """
        with self._lock:
            grace = 0.0 if self._stopping else self.grace
            self.closed = self._stopping = True
            processes = list(self._running)
        if not interrupted:
            for process in processes:
                process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_logged(cmd: list[str], log: Path, env: dict[str, str], children: Children) -> None:
    """Run a sagan command with its output in `log`; a failure ends the measurement with the log's tail."""
    with log.open("a", encoding="utf-8") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        returncode = children.run(cmd, out, env)
    if returncode:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {returncode}); the end of {log}:\n{tail}")


def final_step_reached(run_dir: Path) -> int | None:
    """The step of run_dir/g.safetensors when it is the recipe's last step, else None."""
    config, generator = run_dir / "config.json", run_dir / "g.safetensors"
    if not (config.is_file() and generator.is_file()):
        return None
    steps = json.loads(config.read_text())["train"]["steps"]
    step = read_info(generator).step
    return step if step == steps else None


def train_args(measurement: Measurement, variant: Variant, seed: int, run_dir: Path) -> list[str]:
    args = ["train", measurement.recipe, "--out", str(run_dir), "--set", f"train.seed={seed}"]
    for item in (*measurement.overrides, *variant.overrides):
        args += ["--set", item]
    if measurement.device:
        args += ["--device", measurement.device]
    return args


def eval_settings(measurement: Measurement, variant: Variant) -> dict:
    classifier = measurement.classifier if needs_classifier(variant.metrics) else None
    return {"samples": measurement.samples, "metrics": variant.metrics, "classifier": classifier}


def run_settings(measurement: Measurement, variant: Variant, seed: int) -> dict:
    """What makes a run the run it is: its resolved recipe (not the path as spelled) and the device."""
    recipe = load_recipe(measurement.recipe, [*measurement.overrides, *variant.overrides, f"train.seed={seed}"])
    return {"recipe": json.loads(json.dumps(recipe.to_dict())), "device": measurement.device}


def check_run_settings(settings: dict, args: list[str], run_dir: Path, record: Path) -> None:
    """Refuse a run folder made with other settings, finished or not; then record ours before anything trains."""
    if record.is_file():
        saved = json.loads(record.read_text())
        recorded = {key: saved.get(key) for key in settings}
    elif (run_dir / "config.json").is_file():  # trained before the record existed: its resolved recipe says
        recorded = {"recipe": json.loads(json.dumps(recipe_from_json(run_dir / "config.json").to_dict())),
                    "device": settings["device"]}
    else:
        recorded = settings
    if recorded != settings:
        differ = sorted(f"{table}.{key}" for table, values in settings["recipe"].items() if isinstance(values, dict)
                        for key in values if recorded["recipe"].get(table, {}).get(key) != values[key])
        if recorded["device"] != settings["device"]:
            differ.append("--device")
        raise UserError(f"{run_dir} was made with other settings (differing: {', '.join(differ) or 'recipe'}; "
                        f"see {record.name if record.is_file() else 'its config.json'}); choose another --out")
    record.write_text(json.dumps({**settings, "train_args": args}, indent=2) + "\n")


def measure_run(measurement: Measurement, variant: Variant, seed: int, out: Path,
                children: Children | None = None) -> RunResult:
    """Train (unless finished) and score (unless scored with the same settings) one seed of one variant."""
    children = children or Children()
    run_dir = out / variant.name / f"seed-{seed}"
    result_file = out / variant.name / f"seed-{seed}.json"
    log = out / variant.name / f"seed-{seed}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    args = train_args(measurement, variant, seed, run_dir)
    check_run_settings(run_settings(measurement, variant, seed), args, run_dir,
                       out / variant.name / f"seed-{seed}.args.json")
    saved = json.loads(result_file.read_text()) if result_file.is_file() else None
    env = child_env(measurement.threads)
    final_step = final_step_reached(run_dir)
    timing: dict = {"train_seconds": None, "load_start": None, "load_mean": None, "load_end": None}
    resumed, trained_now = False, final_step is None
    if trained_now:
        if (run_dir / "state").is_dir():
            resumed = True
            args_now = [*args, "--resume"]
        else:
            if run_dir.exists():  # stopped before its first checkpoint: nothing to keep
                shutil.rmtree(run_dir)
            args_now = args
        sampler, started = LoadSampler(), time.perf_counter()
        try:
            run_logged([*SAGAN, *args_now], log, env, children)
        finally:
            seconds = time.perf_counter() - started
            load_start, load_mean, load_end = sampler.stop()
        timing = {"train_seconds": seconds, "load_start": load_start, "load_mean": load_mean, "load_end": load_end}
        final_step = final_step_reached(run_dir)
        if final_step is None:
            raise RuntimeError(f"{run_dir}: training ended without g.safetensors at its last step (see {log})")
    elif saved is not None:
        timing = {key: saved[key] for key in timing}
        resumed = saved.get("resumed", False)
    settings = eval_settings(measurement, variant)
    eval_file = run_dir / EVAL_FILE
    if not trained_now and saved is not None and saved["eval_settings"] == settings and eval_file.is_file():
        return RunResult(**saved)
    cmd = [*SAGAN, "eval", "--ckpt", str(run_dir / "g.safetensors"), "--data", str(run_dir / "config.json"),
           "-n", str(measurement.samples), "--metrics", ",".join(variant.metrics), "--json", str(eval_file), "-q"]
    if settings["classifier"]:
        cmd += ["--classifier", settings["classifier"]]
    if measurement.device:
        cmd += ["--device", measurement.device]
    started = time.perf_counter()
    run_logged(cmd, log, env, children)
    scored = json.loads(eval_file.read_text())["metrics"]
    result = RunResult(variant=variant.name, seed=seed, train_args=args, eval_settings=settings,
                       metrics={key: scored[key] for key in shown_metrics(variant.metrics) if key in scored},
                       eval_seconds=time.perf_counter() - started, final_step=final_step, resumed=resumed,
                       jobs=measurement.jobs, **timing)
    result_file.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def shown_metrics(metrics: list[str]) -> list[str]:
    return [key for metric in metrics for key in METRIC_KEYS.get(metric, (metric,))]


def ensure_classifier(path: Path, recipe: Path, overrides: list[str], epochs: int | None, log: Path,
                      device: str | None = None, children: Children | None = None) -> dict:
    """Train the classifier once (test images: the recipe's test split where it has one); return its metadata."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [*SAGAN, "classifier", "train", str(recipe), "--out", str(path)]
        for item in overrides:
            cmd += ["--set", item]
        if load_recipe(recipe, overrides).data.kind in ("idx", "cifar10-bin"):
            cmd += ["--test-set", "data.split=test"]
        if epochs is not None:
            cmd += ["--epochs", str(epochs)]
        if device:
            cmd += ["--device", device]
        run_logged(cmd, log, child_env(None), children or Children())
    from sagan_cli.evaluation.classifier import load_classifier

    _, info = load_classifier(path)
    return {"path": str(path), "test_accuracy": info.test_accuracy, "weights_sha256": info.weights_sha256}


def summarise(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (n - 1; 0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"


def machine() -> str:
    import torch

    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"


def table(measurement: Measurement, results: list[RunResult], classifier: dict | None) -> str:
    """The markdown table: one row per run, then mean ± std (min-max; n) per variant and metric."""
    keys = shown_metrics([metric for metric in ALL_METRICS if any(metric in r.eval_settings["metrics"] for r in results)])
    lines = [f"# Quality: `{measurement.recipe}`" + (f" with {' '.join(measurement.overrides)}"
                                                       if measurement.overrides else ""), ""]
    lines.append(f"- machine: {machine()}; jobs={measurement.jobs}"
                 + (f" ({measurement.threads} threads each: wall times are not those of a lone run)"
                    if measurement.jobs > 1 else ""))
    lines.append(f"- metrics: {', '.join(keys)}; {measurement.samples} samples per run vs the training images")
    if classifier:
        lines.append(f"- classifier: {classifier['path']} (test accuracy {classifier['test_accuracy']:.1%}, "
                     f"sha256 {classifier['weights_sha256'][:12]})")
    lines.append(f"- measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load = 1-minute load average; "
                 "std = sample standard deviation (n - 1)")
    lines += ["", "| variant | seed | " + " | ".join(keys) + " | train s | eval s | load start/mean/end |",
              "|" + " --- |" * (len(keys) + 5)]
    for result in results:
        loads = "/".join(_number(v, 2) for v in (result.load_start, result.load_mean, result.load_end))
        train = _number(result.train_seconds, 4) + (" (resumed)" if result.resumed else "")
        lines.append(f"| {result.variant} | {result.seed} | " + " | ".join(_number(result.metrics.get(k), 4) for k in keys)
                     + f" | {train} | {_number(result.eval_seconds, 3)} | {loads} |")
    lines += ["", "| variant | runs | " + " | ".join(f"{k} mean ± std (min-max; n)" for k in keys)
              + " | train s mean | load mean |", "|" + " --- |" * (len(keys) + 4)]
    for variant in dict.fromkeys(r.variant for r in results):
        runs = [r for r in results if r.variant == variant]
        cells = []
        for key in keys:
            values = [r.metrics[key] for r in runs if key in r.metrics]
            if not values:
                cells.append("-")
                continue
            s = summarise(values)
            cells.append(f"{_number(s['mean'], 4)} ± {_number(s['std'], 2)} "
                         f"({_number(s['min'], 4)}-{_number(s['max'], 4)}; n={s['n']})")
        trains = [r.train_seconds for r in runs if r.train_seconds is not None]
        loads = [r.load_mean for r in runs if r.load_mean is not None]
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells)
                     + f" | {_number(statistics.fmean(trains) if trains else None, 4)}"
                     + f" | {_number(statistics.fmean(loads) if loads else None, 2)} |")
    return "\n".join(lines) + "\n"


def measure(measurement: Measurement, variants: list[Variant], seeds: list[int], out: Path,
            children: Children | None = None) -> list[RunResult]:
    """Every (variant, seed) run, `jobs` at a time; results in variant, seed order.

    The first failure (or Ctrl-C) ends it: queued runs never start, running ones are stopped, and the
    first error is raised once they have exited.
    """
    children = children or Children()

    def job(variant: Variant, seed: int) -> RunResult:
        children.check_open(f"{variant.name} seed {seed}")  # a worker may take it before the queue is cancelled
        try:
            return measure_run(measurement, variant, seed, out, children)
        except BaseException:
            children.close()
            raise

    with ThreadPoolExecutor(max_workers=measurement.jobs) as pool:
        futures = [pool.submit(job, variant, seed) for variant in variants for seed in seeds]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        except KeyboardInterrupt:
            _stop(pool, futures, children, interrupted=True)
            raise
        errors = [future.exception() for future in futures if future.done() and future.exception() is not None]
        if errors:
            _stop(pool, futures, children, interrupted=False)
            raise next((error for error in errors if not isinstance(error, Stopped)), errors[0])
        return [future.result() for future in futures]


def _stop(pool: ThreadPoolExecutor, futures: list[Future], children: Children, *, interrupted: bool) -> None:
    for future in futures:
        future.cancel()
    pool.shutdown(wait=False, cancel_futures=True)
    children.stop(interrupted=interrupted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every run (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar="'NAME[: KEY=VALUE ...]'",
                        help="a named set of overrides, separated by spaces (none inside a value: [16,8]) (repeatable); "
                             "default: one variant, 'recipe'")
    parser.add_argument("--out", type=Path, help="default: runs/quality-RECIPE_NAME")
    parser.add_argument("--samples", type=int, default=10000, help="generated images scored per run (sagan eval -n)")
    parser.add_argument("--metrics", help="sagan eval metrics (default: those that apply to the recipe)")
    parser.add_argument("--classifier", type=Path, help="default: OUT/classifier.safetensors, trained when missing")
    parser.add_argument("--classifier-epochs", type=int, help="epochs when the classifier is trained here")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once, each with cores // jobs threads")
    parser.add_argument("--device", help="passed to sagan train and sagan eval")
    args = parser.parse_args(argv)
    children = Children()
    try:
        variants = [parse_variant(text) for text in args.variant] or [Variant("recipe")]
        if len({v.name for v in variants}) != len(variants):
            raise UserError("--variant names must differ")
        if args.jobs < 1 or args.samples < 1:
            raise UserError("--jobs and --samples must be at least 1")
        check_seeds(args.seeds)
        check_variants(args.recipe, args.overrides, variants, args.metrics)  # now, not after an hour of training
        out = args.out or Path("runs") / f"quality-{args.recipe.stem}"
        try:
            for variant in variants:
                (out / variant.name).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--out {out}: cannot make its folders ({exc.strerror or exc})") from None
        classifier = None
        if any(needs_classifier(variant.metrics) for variant in variants):
            classifier = ensure_classifier(args.classifier or out / "classifier.safetensors", args.recipe,
                                           args.overrides, args.classifier_epochs, out / "classifier.log", args.device,
                                           children)
        threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
        measurement = Measurement(str(args.recipe), args.overrides, args.samples,
                                  classifier and classifier["path"], args.jobs, threads, args.device)
        results = measure(measurement, variants, args.seeds, out, children)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        children.stop(interrupted=True)
        print("error: interrupted; run the same command again to continue (finished runs are kept, "
              "stopped trainings resume)", file=sys.stderr)
        return 130
    text = table(measurement, results, classifier)
    (out / "table.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
