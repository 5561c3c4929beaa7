"""Helpers shared by the throughput benchmarks: subprocess workers, memory, matmul peak, the port's model.

Every configuration runs in a fresh subprocess so that its peak memory is its own (a process's peak
resident set size never goes down) and a crash or out-of-memory in one row does not end the table.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

# The popular PyTorch port's 64x64 model, in our terms: the configuration its ~19 img/s refers to.
PORT_MODEL = dict(arch="dcgan", resolution=64, g_ch=64, d_ch=64, z_dim=128, g_attention=[16, 32], d_attention=[8, 4])
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load() -> float:
    """The 1-minute load average: on a shared machine, numbers taken above ~cores + 0.5 are suspect."""
    return os.getloadavg()[0]


def rss_bytes() -> int:
    """Current resident set size (Linux /proc); the peak where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory above the moment `start()` is called: RSS high-water mark on CPU (allocator caches and
    kernel scratch included), `max_memory_allocated` on CUDA. Meaningful once per fresh process."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.before = rss_bytes()

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return max(torch.cuda.max_memory_allocated() - self.before, 0)
        return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.before, 0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def matmul_peak(device: str, precision: str, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of n x n matmuls in this dtype: the ceiling the model's FLOP/s are compared with."""
    import torch

    dtype = getattr(torch, DTYPES[precision])
    if device.startswith("cuda"):
        n = max(n, 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def worker(script: str, args: list[str], timeout: float | None = None) -> dict:
    """Run `script --worker ARGS` in a fresh Python; its last stdout line is a JSON result."""
    cmd = [sys.executable, script, "--worker", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode} (out of memory?)"]
        return {"error": lines[-1][:70]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def fmt_mem(nbytes: float) -> str:
    return f"{nbytes / 2**20:7.0f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:7.2f} GiB"


def fmt_flops(flops: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.1f} {unit}"
    return f"{flops:.0f} "


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def environment(device: str) -> str:
    """One line naming what the numbers were measured on."""
    import platform

    import torch

    if device.startswith("cuda"):
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " \
               f"{torch.backends.cpu.get_cpu_capability()}"
    return f"torch {torch.__version__}, {device}: {what}, load {load():.2f}"


def explicit_attention_up_to(max_positions: int) -> None:
    """MEASUREMENT ONLY: make SelfAttention use the explicit N x M matrix (no SDPA) on maps of at most
    `max_positions` query positions, to see what that would gain; layers.py owns the real decision."""
    if max_positions <= 0:
        return
    import torch

    from sagan_cli.model.layers import SelfAttention

    fused = SelfAttention.forward

    def forward(self, x):
        if x.shape[2] * x.shape[3] > max_positions:
            return fused(self, x)
        q, k, v = self._qkv(x)
        weights = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # [B, N, M]
        return self._finish(x, v @ weights.transpose(1, 2))

    SelfAttention.forward = forward
