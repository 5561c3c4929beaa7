"""Sampling throughput: the generator alone (`sagan_cli.model.generation.generate`) and end to end to PNG files
(`sagan_cli.inspection.sample.sample_images`, checkpoint load and PNG writing included).

    python benchmarks/sample.py                                   # 1000 images, every variant
    python benchmarks/sample.py -n 256 --precisions fp32 --compile off    # a quick look

The default generator is the popular port's 64x64 dcgan G (attention at 16 and 32, width 64, z 128),
whose port samples at ~137 img/s on a 2-core CPU; --model resnet128 takes recipes/imagenet128.toml's G.
Weights are random (throughput does not depend on them). Each configuration runs in a fresh subprocess:
img/s is n divided by the median over --repeats whole calls after one warm-up call; peak memory is
above the loaded generator (CPU: peak RSS; CUDA: max allocated). bf16 is `torch.autocast` around
`generate`; compiled is `Generator.compile()`; NHWC is `generator.to(memory_format=torch.channels_last)`.
The end-to-end row (`sample_images`, which always uses NHWC and fp32) writes into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import nullcontext
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
    worker,
)

ROOT = Path(__file__).resolve().parent.parent


def make_generator(model: str, device: str):
    import torch

    from sagan_cli.config import ModelConfig, load_recipe
    from sagan_cli.model.models import Generator

    torch.manual_seed(0)
    cfg = ModelConfig(**PORT_MODEL) if model == "dcgan64" else load_recipe(ROOT / "recipes" / "imagenet128.toml").model
    return Generator(cfg).to(device)


def measure_generate(model: str, device: str, n: int, batch: int, precision: str, compiled: bool,
                     channels_last: bool, repeats: int) -> dict:
    import torch

    from sagan_cli.model.generation import generate

    generator = make_generator(model, device)
    if channels_last:
        generator = generator.to(memory_format=torch.channels_last)
    if compiled:
        generator.compile()
    autocast = (torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if precision == "bf16" else nullcontext())
    memory = PeakMemory(device)
    memory.start()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with autocast:
            images, _ = generate(generator, n, batch_size=batch, device=device)
        times.append(time.perf_counter() - start)
    assert images.shape[0] == n and images.dtype == torch.uint8
    return {**summary(times[1:]), "first_s": times[0], "peak_bytes": memory.peak(), "load": load()}


def measure_end_to_end(model: str, device: str, n: int, batch: int, repeats: int) -> dict:
    from sagan_cli.inspection.sample import sample_images
    from sagan_cli.interchange.checkpoint import save_model

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_model(Path(tmp) / "g.safetensors", make_generator(model, "cpu"), step=0)
        memory = PeakMemory(device)
        memory.start()
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            sample_images(ckpt, n, Path(tmp) / f"out{i}", batch_size=batch, device=device)
            times.append(time.perf_counter() - start)
        return {**summary(times[1:]), "first_s": times[0], "peak_bytes": memory.peak(), "load": load()}


def count_flops(model: str, device: str, batch: int) -> dict:
    """FLOPs of one image (matmuls, convolutions, attention), from one eager eval-mode batch.

    A plain forward rather than `generate`: FlopCounterMode breaks `parametrize.cached()` (torch 2.15).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    generator = make_generator(model, device).eval()
    z = torch.randn(batch, generator.config.z_dim, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device) if generator.config.num_classes else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        generator(z, y)
    return {"flops_per_image": counter.get_total_flops() / batch}


def _worker_main(argv: list[str]) -> None:
    explicit_attention_up_to(int(argv.pop()))
    mode, model, device, n, batch, repeats = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5])
    if mode == "flops":
        result = count_flops(model, device, batch)
    elif mode == "png":
        result = measure_end_to_end(model, device, n, batch, repeats)
    else:
        precision, compiled, channels_last = argv[6], argv[7] == "1", argv[8] == "1"
        result = measure_generate(model, device, n, batch, precision, compiled, channels_last, repeats)
    print(json.dumps(result))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2:])
        return
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", "--device", nargs="+", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--model", default="dcgan64", choices=["dcgan64", "resnet128"])
    parser.add_argument("-n", type=int, default=1000, help="images per timed call (default 1000)")
    parser.add_argument("--batch", type=int, default=64, help="generator batch size (default 64, as `sagan sample`)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up call (default 3)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--channels-last", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--no-png", action="store_true", help="skip the end-to-end sample_images row")
    parser.add_argument("--explicit-attention", type=int, default=0, metavar="N",
                        help="measurement only: attention through the explicit N x M matrix on maps with <= N "
                             "positions (default 0: never; layers.py decides what sampling uses)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration before it is abandoned")
    args = parser.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    common = [args.model]
    explicit = [str(args.explicit_attention)]
    for device in devices:
        print(environment(device), flush=True)
        peaks = {p: matmul_peak(device, p) for p in args.precisions}
        print("matmul peak: " + ", ".join(f"{p} {fmt_flops(f)}FLOP/s" for p, f in peaks.items()), flush=True)
        sizes = [device, str(args.n), str(args.batch), str(args.repeats)]
        flops = worker(__file__, ["flops", *common, *sizes, *explicit], args.timeout).get("flops_per_image")
        if args.explicit_attention:
            print(f"MEASUREMENT ONLY: attention via the explicit matrix on maps of <= {args.explicit_attention} positions")
        print(f"{args.model} G, n={args.n}, batch {args.batch}; {fmt_flops(flops or 0)}FLOP per image")
        print(f"{'what':20} {'prec':4} {'compile':7} {'layout':6} | {'img/s':>6} {'(min-max)':>13} | "
              f"{'peak mem':>11} | {'FLOP/s':>9} {'of peak':>7} | load", flush=True)
        rows = [("generate", p, c, cl) for p in args.precisions for c in args.compile for cl in args.channels_last]
        if not args.no_png:
            rows.append(("sample_images (PNG)", "fp32", "off", "on"))
        for what, precision, comp, cl in rows:
            if what == "generate":
                r = worker(__file__, ["gen", *common, *sizes, precision, str(int(comp == "on")), str(int(cl == "on")), *explicit], args.timeout)
            else:
                r = worker(__file__, ["png", *common, *sizes, *explicit], args.timeout)
            row = f"{what:20} {precision:4} {comp:7} {'NHWC' if cl == 'on' else 'NCHW':6} |"
            if "error" in r:
                print(f"{row} failed: {r['error']}", flush=True)
                continue
            rate = args.n / r["median_s"]
            row += f" {rate:6.1f} ({args.n / r['max_s']:5.1f}-{args.n / r['min_s']:5.1f}) | {fmt_mem(r['peak_bytes']):>11} |"
            if flops:
                row += f" {fmt_flops(flops * rate):>9} {flops * rate / peaks[precision]:6.0%}  |"
            print(f"{row} {r['load']:4.1f}", flush=True)


if __name__ == "__main__":
    main()
