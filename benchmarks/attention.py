"""Benchmark the SelfAttention block: fused SDPA path vs the explicit N x M matrix (`reference_forward`).

    python benchmarks/attention.py                      # the table: maps 16, 32, 64, 128 at batch 8
    python benchmarks/attention.py --acceptance         # the issue's two pass/fail configurations
    python benchmarks/attention.py --small                # small maps (4, 8, 16) at typical widths

Each number is forward + backward (w.r.t. the input and every parameter) of one block with gamma != 0.

Memory: each path runs once, alone, in a fresh subprocess. On CPU the peak is the process's peak
resident set size during the run (`ru_maxrss`) minus its resident size just before it: what the
operating system actually had to provide, allocator caches and kernel scratch buffers included (torch.
profiler's `profile_memory` sees only ATen allocations). A fresh process keeps an earlier run's
high-water mark from hiding this one's; the ~50 MiB floor at tiny sizes is the first backward's own
setup. On CUDA the peak is `torch.cuda.max_memory_allocated` above what was allocated before the run.
Time: both paths in one subprocess, alternating run by run after a warm-up round, so load from other
processes on a shared machine hits both alike. Medians over `--repeats`; the speed-up is the median of
the per-round ratios; (min-max) and the load average (last column) show contention.

Small maps (--small, 2 shared cores, 30 repeats): the fused path was as fast or faster (paired ratios
0.93x-1.63x, the two below 1 within noise), so SelfAttention.forward uses it at every size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# (map size, channels) used by default: typical widths where SAGANs put attention at each size.
DEFAULT_CONFIGS = ((16, 256), (32, 256), (64, 128), (128, 64))
SMALL_CONFIGS = ((4, 512), (8, 256), (8, 512), (16, 128), (16, 256), (8, 64), (16, 64))  # widths G/D use there
# The acceptance: (map, C, batch, what is compared, required ratio reference / fused).
ACCEPTANCE = ((64, 64, 4, "time", 1.5), (128, 64, 4, "memory", 10.0))


def _rss_kb() -> int:
    """Current resident set size in KiB (Linux); falls back to the peak where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _setup(variant: str, batch: int, channels: int, size: int, device: str):
    import torch

    from sagan_cli.model.layers import SelfAttention

    torch.manual_seed(0)
    block = SelfAttention(channels, variant).to(device)
    with torch.no_grad():
        block.gamma.fill_(0.5)
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    cuda = device.startswith("cuda")

    def step(path: str) -> float:
        start = time.perf_counter()
        (block(x) if path == "fused" else block.reference_forward(x)).backward(grad)
        if cuda:
            torch.cuda.synchronize()
        x.grad = None
        block.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def measure_time(variant: str, batch: int, channels: int, size: int, device: str, repeats: int,
                 paths: tuple[str, ...] = ("fused", "reference")) -> dict:
    """Both paths in one process, alternating run by run, so background load hits both alike."""
    step = _setup(variant, batch, channels, size, device)
    times = {p: [] for p in paths}
    for i in range(repeats + 1):
        for path in paths[:: 1 if i % 2 else -1]:
            t = step(path)
            if i:  # the first round is a warm-up (lazy init, allocator growth)
                times[path].append(t)
    result = {p: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)} for p, t in times.items()}
    # the speed-up as the median of per-round ratios: each round's two runs saw about the same load
    if "reference" in times:
        result["speedup"] = statistics.median(r / f for r, f in zip(times["reference"], times["fused"], strict=True))
    return result


def measure_memory(variant: str, path: str, batch: int, channels: int, size: int, device: str) -> dict:
    """Peak memory of one forward + backward of one path, alone in a fresh process."""
    import torch

    step = _setup(variant, batch, channels, size, device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_kb() * 1024
    step(path)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"peak_bytes": max(peak, 0)}


def _worker(*args: str) -> dict:
    args = [sys.executable, __file__, "--worker", *args]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode} (out of memory?)"])[-1][:60]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt_mem(nbytes: int) -> str:
    return f"{nbytes / 2**20:9.1f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:9.2f} GiB"


def _available_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return float("inf")


def compare(variant: str, batch: int, channels: int, size: int, device: str, repeats: int) -> dict:
    """Measure both paths for one configuration (each in fresh processes), print a table row, return the numbers."""
    shape = [variant, str(batch), str(channels), str(size), device]
    n = size * size
    # the reference holds about three B x N x M fp32 matrices at once (logits, softmax, its gradient);
    # on a shared machine, skip it rather than wake the out-of-memory killer
    need = 3 * 4 * batch * n * (n // 4 if variant == "paper" else n)
    if device == "cpu" and need > 0.8 * _available_bytes():
        skipped = {"error": f"skipped: needs ~{need / 2**30:.0f} GiB"}
        result = {"fused": _worker("memory", "fused", *shape), "reference": skipped}
        result["fused"].update(_worker("time-fused", *shape, str(repeats)).get("fused", {}))
        timing = {"reference": skipped}
    else:
        result = {p: _worker("memory", p, *shape) for p in ("fused", "reference")}
        timing = _worker("time", *shape, str(repeats))
    for path, r in result.items():
        r.update(timing.get(path, timing if "error" in timing else {}))
    result["speedup"] = timing.get("speedup", float("nan"))
    row = f"{device:5} {variant:6} {batch:3} {channels:4} {size:4}x{size:<4}"
    for r in (result["fused"], result["reference"]):
        if "error" in r:
            row += f" | {'failed: ' + r['error']:>40}"
        else:
            row += f" | {r['median_s'] * 1e3:8.1f} ms ({r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}) {_fmt_mem(r['peak_bytes'])}"
    fused, ref = result["fused"], result["reference"]
    if "error" not in fused and "error" not in ref:
        row += f" | {result['speedup']:5.2f}x {ref['peak_bytes'] / max(fused['peak_bytes'], 1):6.1f}x"
    print(f"{row} | {os.getloadavg()[0]:4.1f}", flush=True)
    return result


def header() -> None:
    print(f"{'dev':5} {'var':6} {'B':>3} {'C':>4} {'map':9} | {'fused: median ms (min-max), peak memory':>40}"
          f" | {'reference (explicit N x M matrix)':>40} | ref/fused: time memory | load", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        if sys.argv[2] == "memory":
            path, variant, batch, channels, size, device = sys.argv[3:9]
            print(json.dumps(measure_memory(variant, path, int(batch), int(channels), int(size), device)))
        else:
            variant, batch, channels, size, device, repeats = sys.argv[3:9]
            paths = ("fused",) if sys.argv[2] == "time-fused" else ("fused", "reference")
            print(json.dumps(measure_time(variant, int(batch), int(channels), int(size), device, int(repeats), paths)))
        return
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", "-B", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--channels", "-C", type=int, nargs="+", default=None,
                        help="channels, one per size (default: 256, 256, 128, 64 for 16, 32, 64, 128)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="feature-map sizes (default 16 32 64 128)")
    parser.add_argument("--small", action="store_true", help="small maps (4-32) instead, to place the explicit-path threshold")
    parser.add_argument("--variants", nargs="+", default=["seed", "paper"], choices=["seed", "paper"])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement, after one warm-up (default 5)")
    parser.add_argument("--acceptance", action="store_true", help="run the issue's two acceptance configurations")
    args = parser.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.2f}")

    if args.acceptance:
        # the seed variant: full N x N attention, the one whose explicit matrix is largest
        header()
        ok = True
        for size, channels, batch, what, need in ACCEPTANCE:
            r = compare("seed", batch, channels, size, "cpu", args.repeats if what == "time" else 1)
            if "error" in r["fused"]:
                passed, got = False, float("nan")
            elif "error" in r["reference"]:
                passed, got = what == "memory", float("inf")  # the reference ran out of memory
            else:
                got = r["speedup"] if what == "time" else r["reference"]["peak_bytes"] / max(r["fused"]["peak_bytes"], 1)
                passed = got >= need
            ok &= passed
            print(f"acceptance: {size}x{size} C={channels} B={batch} {what}: reference/fused = {got:.2f}x "
                  f"(need >= {need}x): {'PASS' if passed else 'FAIL'}", flush=True)
        sys.exit(0 if ok else 1)

    if args.sizes:
        channels = args.channels or [64] * len(args.sizes)
        if len(channels) == 1:
            channels = channels * len(args.sizes)
        configs = list(zip(args.sizes, channels, strict=True))
    else:
        configs = list(SMALL_CONFIGS if args.small else DEFAULT_CONFIGS)
        if args.channels:
            configs = [(s, c) for (s, _), c in zip(configs, args.channels, strict=False)]
    header()
    for device in devices:
        for variant in args.variants:
            for size, channels in configs:
                compare(variant, args.batch, channels, size, device, args.repeats)


if __name__ == "__main__":
    main()
