"""Training throughput: `sagan_cli.train.train_step` (D step + G step, hinge, TTUR), timed as it trains.

    python benchmarks/train_step.py                                    # both models, every variant (slow)
    python benchmarks/train_step.py --models dcgan64 --precisions fp32 --compile off --channels-last off on
    python benchmarks/train_step.py --models dcgan64 --profile         # where one iteration's time goes

Models: dcgan64 is the popular port's 64x64 model (attention at 16 and 32 in G, 8 and 4 in D, width 64,
z 128, batch 64; the port trains at ~19 img/s on a 2-core CPU). resnet128 is recipes/imagenet128.toml's
model (the paper's: attention at 32, 1000 classes); batch 256 on CUDA as in the paper, 8 on CPU (a
256-image iteration takes minutes there), so its CPU img/s is a small-batch number.

What is timed is what trains: models and optimizers are built and `accelerator.prepare`d as
`run_training` does (mixed precision through `Accelerator(mixed_precision=...)`, channels_last and
`torch.compile` as `train.channels_last` / `train.compile` do), and the real `train_step` runs on a
fixed in-memory batch of real (synthetic-blob) images through a `next_batch` closure: no data loading.

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


def build(name: str, device: str, batch: int, precision: str, compiled: bool, channels_last: bool):
    """Models, optimizers and a `next_batch` closure exactly as `run_training` sets them up."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from sagan_cli.config import Recipe, TrainConfig
    from sagan_cli.data import SyntheticBlobs
    from sagan_cli.train import prepare_models

    m = model_config(name)
    t = TrainConfig(batch_size=batch, mixed_precision={"fp32": "no"}.get(precision, precision),
                    compile=compiled, channels_last=channels_last, ema=False)  # EMA: not part of the timed step
    recipe = Recipe(name="benchmark", model=m, train=t)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=device == "cpu")
    set_seed(0)
    generator, discriminator, opt_g, opt_d, _ = prepare_models(recipe, accelerator)  # as run_training does
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    # --- a fixed batch of real images instead of the DataLoader ---
    data = SyntheticBlobs(batch, m.resolution, num_classes=m.num_classes)
    items = [data[i] for i in range(batch)]
    images = torch.stack([x for x, _ in items]).to(accelerator.device)
    labels = torch.tensor([y for _, y in items], device=accelerator.device) if m.num_classes else None

    def next_batch():
        return images.contiguous(memory_format=memory_format), labels

    return accelerator, generator, discriminator, opt_g, opt_d, next_batch, recipe, memory_format


def measure(name: str, device: str, batch: int, precision: str, compiled: bool, channels_last: bool,
            iters: int, warmup: int) -> dict:
    from sagan_cli.train import train_step

    memory = PeakMemory(device)
    args = build(name, device, batch, precision, compiled, channels_last)
    memory.start()
    times = []
    for _ in range(warmup + int(compiled) + iters):
        start = time.perf_counter()
        out = train_step(*args)
        sync(device)
        times.append(time.perf_counter() - start)
    ok = bool(out.d_ok and out.g_ok)
    return {**summary(times[-iters:]), "first_s": times[0], "peak_bytes": memory.peak(), "finite": ok, "load": load()}


def count_flops(name: str, device: str, batch: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from sagan_cli.train import train_step

    args = build(name, device, batch, "fp32", False, False)
    with FlopCounterMode(display=False) as counter:
        train_step(*args)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return {"flops": counter.get_total_flops(), "by_op": by_op}


def profile(name: str, device: str, batch: int, precision: str, channels_last: bool, rows: int) -> None:
    """Where one eager iteration's time goes: torch.profiler's operator table (self time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from sagan_cli.train import train_step

    args = build(name, device, batch, precision, False, channels_last)
    train_step(*args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        train_step(*args)
        sync(device)
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=48))
    print(f"load during the profile: {load():.2f}")


def _worker_main(argv: list[str]) -> None:
    explicit_attention_up_to(int(argv.pop()))
    mode, name, device, batch = argv[0], argv[1], argv[2], int(argv[3])
    if mode == "flops":
        result = count_flops(name, device, batch)
    else:
        precision, compiled, channels_last, iters, warmup = argv[4], argv[5] == "1", argv[6] == "1", int(argv[7]), int(argv[8])
        result = measure(name, device, batch, precision, compiled, channels_last, iters, warmup)
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
        print(f"{'model':9} {'B':>3} {'prec':4} {'compile':7} {'layout':6} | {'img/s':>6} {'(min-max)':>13} "
              f"{'s/iter':>6} | {'peak mem':>11} | {'FLOP/iter':>9} {'FLOP/s':>9} {'of peak':>7} | load", flush=True)
        for name in args.models:
            batch = args.batch or default_batch(name, device)
            flops = worker(__file__, ["flops", name, device, str(batch), explicit], args.timeout)
            for precision in args.precisions:
                for comp in args.compile:
                    for cl in args.channels_last:
                        r = worker(__file__, ["time", name, device, str(batch), precision, str(int(comp == "on")),
                                              str(int(cl == "on")), str(args.iters), str(args.warmup), explicit], args.timeout)
                        row = f"{name:9} {batch:3} {precision:4} {comp:7} {'NHWC' if cl == 'on' else 'NCHW':6} |"
                        if "error" in r:
                            print(f"{row} failed: {r['error']}", flush=True)
                            continue
                        rate = batch / r["median_s"]
                        row += f" {rate:6.1f} ({batch / r['max_s']:5.1f}-{batch / r['min_s']:5.1f}) {r['median_s']:6.2f} |"
                        row += f" {fmt_mem(r['peak_bytes']):>11} |"
                        if "flops" in flops:
                            achieved = flops["flops"] / r["median_s"]
                            row += f" {fmt_flops(flops['flops']):>9} {fmt_flops(achieved):>9} {achieved / peaks[precision]:6.0%}  |"
                        else:
                            row += f" {'?':>9} {'?':>9} {'?':>7} |"
                        print(f"{row} {r['load']:4.1f}{'' if r['finite'] else '  (non-finite loss!)'}", flush=True)


if __name__ == "__main__":
    main()
