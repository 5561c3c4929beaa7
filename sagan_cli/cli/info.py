"""`sagan info`: what this installation can do, for bug reports and for a first look at a new machine."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

from sagan_cli import __version__
from sagan_cli.errors import UserError


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def system_info() -> dict[str, Any]:
    """Versions, devices and offline readiness, as plain data (the command prints it, tests read it)."""
    import torch

    info: dict[str, Any] = {
        "sagan": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: _version(name) for name in ("torchvision", "accelerate", "torch-fidelity", "safetensors")},
        "cpu_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "cpu_bf16": True,  # autocast to bf16 runs on any CPU torch supports (slow without AMX/AVX512-BF16)
        "cuda_gpus": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["cuda_gpus"].append({
                "index": index,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "bf16": torch.cuda.is_bf16_supported(),
                "capability": f"{props.major}.{props.minor}",
            })
    info["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    from sagan_cli.evaluation.inception import find_inception_weights

    try:
        weights = find_inception_weights()
        info["inception_weights"] = str(weights.path)
    except UserError as exc:
        info["inception_weights"] = None
        info["inception_weights_help"] = str(exc)
    return info
