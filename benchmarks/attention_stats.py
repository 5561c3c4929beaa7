"""What the attention distance/entropy probe costs, and that it changes nothing: the same training run
twice in one process, without and with the probe at every log step.

    python benchmarks/attention_stats.py                         # recipes/quickstart.toml, 3 windows of 50 steps
    python benchmarks/attention_stats.py --windows 2 --window 10 # quicker: 2 windows of 10 steps per run
    python benchmarks/attention_stats.py --recipe recipes/cifar10.toml --windows 2 --device cuda

Each run builds G, D, Adam and the phases as `run_training` does (`build_nets`, `make_phases`, the real
`Data` and `Noise`, the recipe's seed) and runs `--windows` windows of `--window` steps (default train.log_every)
with `train_step`; the probing run also calls `AttentionProbe.measure()` after each window, as `TrainingLog`
does at each log line. cost = probe time / (train.log_every x median step time): the share of a log window
the probe adds. The probe's first call (it also reads the fixed dataset images) is shown apart.
Identical: both runs end with bit-equal G and D (parameters and buffers) and the same global RNG state.
The EMA update is left out (it reads G, and the probe writes nothing G holds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load, sync  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(recipe, device: str, windows: int, window: int, probe: bool) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from sagan_cli.data.datasets import build_dataset
    from sagan_cli.inspection.attention_stats import AttentionProbe
    from sagan_cli.training.batches import Data, Noise
    from sagan_cli.training.loop import train_step
    from sagan_cli.training.nets import build_nets, make_phases

    train = recipe.train
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="no")
    dataset = build_dataset(recipe.data, recipe.model.resolution, recipe.model.num_classes, recipe.model.channels)
    set_seed(train.seed)
    nets = build_nets(recipe, accelerator)
    set_seed(train.seed)
    phases = make_phases(recipe, nets, accelerator)
    data, noise = Data(recipe, dataset, accelerator, 0), Noise(recipe, accelerator.device)
    attention = AttentionProbe(recipe, nets.raw_g, nets.raw_d, dataset) if probe else None
    step_times, probe_times, logged = [], [], {}
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(window):
            train_step(phases, data, noise, d_steps=train.d_steps, reuse_fakes=train.reuse_fakes)
        sync(device)
        step_times.append((time.perf_counter() - start) / window)
        if attention is not None:
            start = time.perf_counter()
            logged = attention.measure()
            sync(device)
            probe_times.append(time.perf_counter() - start)
    state = {f"g.{k}": v.detach().cpu().clone() for k, v in nets.raw_g.state_dict().items()}
    state.update({f"d.{k}": v.detach().cpu().clone() for k, v in nets.raw_d.state_dict().items()})
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state() if device.startswith("cuda") else None)
    return {"step_times": step_times, "probe_times": probe_times, "state": state, "rng": rng, "logged": logged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.toml"))
    parser.add_argument("--windows", type=int, default=3, help="log windows per run")
    parser.add_argument("--window", type=int, default=0, help="steps per window (default: train.log_every)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], help="recipe override table.key=value")
    args = parser.parse_args()

    import torch

    from sagan_cli.config import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    log_every = recipe.train.log_every
    window = args.window or log_every
    plain = run(recipe, args.device, args.windows, window, probe=False)
    probed = run(recipe, args.device, args.windows, window, probe=True)
    step_plain, step_probed = statistics.median(plain["step_times"]), statistics.median(probed["step_times"])
    probe_s = statistics.median(probed["probe_times"][1:] or probed["probe_times"])
    identical = plain["state"].keys() == probed["state"].keys() and all(
        torch.equal(plain["state"][k], probed["state"][k]) for k in plain["state"])
    same_rng = all((a is None and b is None) or torch.equal(a, b) for a, b in zip(plain["rng"], probed["rng"], strict=True))
    print(f"{recipe.name}: {args.device}, batch {recipe.train.batch_size}, log_every {log_every}, "
          f"{args.windows} windows of {window} steps per run, load {load():.1f}")
    print("| run | median s/step | probe s (first call) | probe / log window |")
    print("| --- | --- | --- | --- |")
    print(f"| without probe | {step_plain:.4f} | - | - |")
    print(f"| with probe | {step_probed:.4f} | {probe_s:.4f} ({probed['probe_times'][0]:.4f}) | "
          f"{100 * probe_s / (log_every * step_probed):.2f}% |")
    print(f"identical G and D after {args.windows * window} steps: {identical}; same global RNG state: {same_rng}")
    for key, values in probed["logged"].items():
        print(f"{key}: " + ", ".join(f"{name} {value:.3f}" for name, value in values.items()))


if __name__ == "__main__":
    main()
