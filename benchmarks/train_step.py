"""Training throughput: `sagan_cli.training.loop.train_step` (D phase + G phase, hinge, TTUR), timed as it trains.

    python benchmarks/train_step.py                                    # both models, every variant (slow)
    python benchmarks/train_step.py --models dcgan64 --precisions fp32 --compile off --channels-last off on
    python benchmarks/train_step.py --models dcgan64 --reuse-fakes on off   # one G forward per step, or two
    python benchmarks/train_step.py --models dcgan64 --profile         # where one iteration's time goes

Models: dcgan64 is the popular port's 64x64 model (attention at 16 and 32 in G, 8 and 4 in D, width 64,
z 128, batch 64; the port trains at ~19 img/s on a 2-core CPU). resnet128 is recipes/imagenet128.toml's
model (the paper's: attention at 32, 1000 classes); batch 256 on CUDA as in the paper, 8 on CPU (a
256-image iteration takes minutes there), so its CPU img/s is a small-batch number.

What is timed is what trains: networks, fused Adam and the phases are built by `build_nets` and
`make_phases` as `run_training` does (mixed precision as the phases' one autocast, channels_last and
`torch.compile` as `train.channels_last` / `train.compile` do), and the real `train_step` runs on a
fixed in-memory batch of real (synthetic-blob) images: no data loading.

aten ops/iter: every ATen operator one eager iteration dispatches (a TorchDispatchMode around one
`train_step`, fp32, batch 4): a machine-independent count of the launch overhead that bounds small
models on a GPU, where each operator is at least one kernel launch.

Each configuration runs in a fresh subprocess. img/s: median over --iters iterations after warm-up
(compiled models get one extra warm-up iteration: the G step's frozen, eval-mode D is a second graph).
Peak memory: above the built models (CPU: peak RSS, allocator caches included; CUDA: max allocated),
so it covers activations, gradients and Adam's state. FLOPs: `FlopCounterMode` around one eager fp32
iteration (convolutions, matmuls, attention; the layout, precision and compilation do not change them),
compared with the best FLOP/s of large matmuls in the same dtype measured by this script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PORT_MODEL,
    PeakMemory,
    environment,
    explicit_attention_up_to,
    fmt_flops,
    fmt_mem,
    load,
    matmul_peak,
    summary,
    sync,
    worker,
)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("dcgan64", "resnet128")


def model_config(name: str):
    from sagan_cli.config import ModelConfig, load_recipe

    if name == "dcgan64":
        return ModelConfig(**PORT_MODEL)
    return load_recipe(ROOT / "recipes" / "imagenet128.toml").model


def default_batch(name: str, device: str) -> int:
    return 64 if name == "dcgan64" else (256 if device.startswith("cuda") else 8)


def build(name: str, device: str, batch: int, precision: str, compiled: bool, channels_last: bool,
          reuse_fakes: bool = True):
    """Phases, a fixed batch and the noise source, exactly as `run_training` sets them up."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from sagan_cli.config import Recipe, TrainConfig
    from sagan_cli.data.datasets import SyntheticBlobs
    from sagan_cli.training.batches import Noise
    from sagan_cli.training.nets import build_nets, make_phases

    model = model_config(name)
    train = TrainConfig(batch_size=batch, mixed_precision={"fp32": "no"}.get(precision, precision), compile=compiled,
                        channels_last=channels_last, ema=False, reuse_fakes=reuse_fakes)  # EMA: not part of the step
    recipe = Recipe(name="benchmark", model=model, train=train)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=device == "cpu")
    set_seed(0)
    nets = build_nets(recipe, accelerator)
    phases = make_phases(recipe, nets, accelerator)
    # --- a fixed batch of real images instead of the DataLoader ---
    data = SyntheticBlobs(batch, model.resolution, num_classes=model.num_classes)
    items = [data[i] for i in range(batch)]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.stack([x for x, _ in items]).to(accelerator.device).contiguous(memory_format=memory_format)
    labels = torch.tensor([y for _, y in items], device=accelerator.device) if model.num_classes else None

    class FixedBatch:
        def next(self):
            return images, labels

    return phases, FixedBatch(), Noise(recipe, accelerator.device), reuse_fakes


def step(args) -> None:
    from sagan_cli.training.loop import train_step

    phases, data, noise, reuse_fakes = args
    return train_step(phases, data, noise, d_steps=1, reuse_fakes=reuse_fakes)


def measure(name: str, device: str, batch: int, precision: str, compiled: bool, channels_last: bool,
            iters: int, warmup: int, reuse_fakes: bool) -> dict:
    memory = PeakMemory(device)
    args = build(name, device, batch, precision, compiled, channels_last, reuse_fakes)
    memory.start()
    times = []
    for _ in range(warmup + int(compiled) + iters):
        start = time.perf_counter()
        _, _, bad = step(args)
        sync(device)
        times.append(time.perf_counter() - start)
    return {**summary(times[-iters:]), "first_s": times[0], "peak_bytes": memory.peak(), "finite": float(bad) == 0,
            "load": load()}


def count_flops(name: str, device: str, batch: int, reuse_fakes: bool) -> dict:
    """FLOPs of one eager fp32 iteration, and the ATen operators it dispatches at batch 4."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    args = build(name, device, batch, "fp32", False, False, reuse_fakes)
    with FlopCounterMode(display=False) as counter:
        step(args)
    small = build(name, device, 4, "fp32", False, False, reuse_fakes)
    step(small)  # the first call initialises Adam's state
    with CountOps() as ops:
        step(small)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return {"flops": counter.get_total_flops(), "by_op": by_op, "aten_ops": sum(ops.ops.values()),
            "top_ops": ops.ops.most_common(8)}


def profile(name: str, device: str, batch: int, precision: str, channels_last: bool, rows: int) -> None:
    """Where one eager iteration's time goes: torch.profiler's operator table (self time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    args = build(name, device, batch, precision, False, channels_last)
    step(args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        step(args)
        sync(device)
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=48))
    print(f"load during the profile: {load():.2f}")


def _worker_main(argv: list[str]) -> None:
    explicit_attention_up_to(int(argv.pop()))
    mode, name, device, batch, reuse = argv[0], argv[1], argv[2], int(argv[3]), argv[4] == "1"
    if mode == "flops":
        result = count_flops(name, device, batch, reuse)
    else:
        precision, compiled, channels_last, iters, warmup = argv[5], argv[6] == "1", argv[7] == "1", int(argv[8]), int(argv[9])
        result = measure(name, device, batch, precision, compiled, channels_last, iters, warmup, reuse)
    print(json.dumps(result))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2:])
        return
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", "--device", nargs="+", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, default=None,
                        help="images per iteration (default: 64 for dcgan64; 256 on CUDA, 8 on CPU for resnet128)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations after warm-up (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2; +1 compiled)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"], help="torch.compile G and D")
    parser.add_argument("--channels-last", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--reuse-fakes", nargs="+", default=["on"], choices=["off", "on"],
                        help="train.reuse_fakes: the G phase reuses the D phase's fakes (default on)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration before it is abandoned")
    parser.add_argument("--explicit-attention", type=int, default=0, metavar="N",
                        help="measurement only: attention through the explicit N x M matrix on maps with <= N "
                             "positions (default 0: never; layers.py decides what training uses)")
    parser.add_argument("--profile", action="store_true",
                        help="print the profiler table of one eager iteration per model/precision/layout instead")
    parser.add_argument("--rows", type=int, default=25, help="profiler table rows (default 25)")
    args = parser.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    explicit = str(args.explicit_attention)

    if args.profile:
        explicit_attention_up_to(args.explicit_attention)
        for device in devices:
            for name in args.models:
                for precision in args.precisions:
                    for cl in args.channels_last:
                        batch = args.batch or default_batch(name, device)
                        print(f"\n== {name} batch {batch}, {device} {precision}, channels_last {cl} ==", flush=True)
                        profile(name, device, batch, precision, cl == "on", args.rows)
        return

    for device in devices:
        print(environment(device), flush=True)
        peaks = {p: matmul_peak(device, p) for p in args.precisions}
        print("matmul peak (2048^3 on CPU, 8192^3 on CUDA): "
              + ", ".join(f"{p} {fmt_flops(f)}FLOP/s" for p, f in peaks.items()), flush=True)
        if args.explicit_attention:
            print(f"MEASUREMENT ONLY: attention via the explicit matrix on maps of <= {explicit} positions")
        print(f"{'model':9} {'B':>3} {'prec':4} {'compile':7} {'layout':6} {'reuse':5} | {'img/s':>6} {'(min-max)':>13} "
              f"{'s/iter':>6} | {'peak mem':>11} | {'FLOP/iter':>9} {'FLOP/s':>9} {'of peak':>7} | aten ops | load",
              flush=True)
        for name in args.models:
            batch = args.batch or default_batch(name, device)
            for reuse in args.reuse_fakes:
                flops = worker(__file__, ["flops", name, device, str(batch), str(int(reuse == "on")), explicit], args.timeout)
                for precision in args.precisions:
                    for comp in args.compile:
                        for cl in args.channels_last:
                            r = worker(__file__, ["time", name, device, str(batch), str(int(reuse == "on")), precision,
                                                  str(int(comp == "on")), str(int(cl == "on")), str(args.iters),
                                                  str(args.warmup), explicit], args.timeout)
                            row = f"{name:9} {batch:3} {precision:4} {comp:7} {'NHWC' if cl == 'on' else 'NCHW':6} {reuse:5} |"
                            if "error" in r:
                                print(f"{row} failed: {r['error']}", flush=True)
                                continue
                            rate = batch / r["median_s"]
                            row += f" {rate:6.1f} ({batch / r['max_s']:5.1f}-{batch / r['min_s']:5.1f}) {r['median_s']:6.2f} |"
                            row += f" {fmt_mem(r['peak_bytes']):>11} |"
                            if "flops" in flops:
                                achieved = flops["flops"] / r["median_s"]
                                row += f" {fmt_flops(flops['flops']):>9} {fmt_flops(achieved):>9} {achieved / peaks[precision]:6.0%}  |"
                                row += f" {flops['aten_ops']:8d} |"
                            else:
                                row += f" {'?':>9} {'?':>9} {'?':>7} | {'?':>8} |"
                            print(f"{row} {r['load']:4.1f}{'' if r['finite'] else '  (non-finite loss!)'}", flush=True)


if __name__ == "__main__":
    main()
