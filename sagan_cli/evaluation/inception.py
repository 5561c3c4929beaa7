"""Inception-v3 for FID, IS, KID and precision/recall: torch-fidelity's weights from a local file.

torch-fidelity would download its weights on first use; sagan never does. The file comes from
--inception-weights, $SAGAN_INCEPTION_WEIGHTS or torch hub's cache, and is checked (loaded with
weights_only, its key layers' shapes, its SHA-256) before any work, so a wrong file is one clear line.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from sagan_cli.errors import UserError

INCEPTION_FILE = URL_INCEPTION_V3.rsplit("/", 1)[1]
OFFICIAL_SHA256_PREFIX = INCEPTION_FILE.rsplit("-", 1)[1].split(".")[0]  # torch hub names files NAME-<sha256[:8]>.pth
WEIGHTS_ENV = "SAGAN_INCEPTION_WEIGHTS"


@dataclass(frozen=True)
class InceptionWeights:
    path: Path
    sha256: str



def hub_weights_path() -> Path:
    """Where torch-fidelity itself would cache the downloaded file (honours $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def missing_weights_message() -> str:
    return (f"no Inception weights: download {URL_INCEPTION_V3} and pass --inception-weights FILE "
            f"(or set {WEIGHTS_ENV}=FILE, or save it as {hub_weights_path()}); "
            "`--metrics structure` needs no weights (synthetic data)")


def find_inception_weights(path: str | Path | None = None) -> InceptionWeights:
    """The flag's file, else $SAGAN_INCEPTION_WEIGHTS, else torch-fidelity's hub cache; never downloads."""
    if path in (None, ""):
        path = os.environ.get(WEIGHTS_ENV) or None
    if path is None:
        if not hub_weights_path().is_file():
            raise UserError(missing_weights_message())
        path = hub_weights_path()
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise UserError(f"Inception weights {path} do not exist; {missing_weights_message()}")
    file_status = path.stat()
    return InceptionWeights(path, _check_weights(str(path), file_status.st_size, file_status.st_mtime_ns))


@lru_cache(maxsize=4)
def _check_weights(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a readable Inception state dict (cached per file version: training evaluates often).

    Loaded with weights_only=True first, so a hostile pickle never runs, and a wrong or damaged file
    is a one-line error here instead of a traceback inside torch-fidelity.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or non-weights file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"Inception weights {path} are not a readable PyTorch weights file ({first}); "
                        f"download them again from {URL_INCEPTION_V3}") from None
    probes = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
              "fc.weight": (1008, 2048)}
    for key, shape in probes.items():
        value = state.get(key) if isinstance(state, dict) else None
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            raise UserError(f"{path} is not torch-fidelity's Inception-v3 state dict ({key} missing or mis-shaped); "
                            f"download {URL_INCEPTION_V3}")
    digest = hashlib.sha256()
    with open(path, "rb") as weights_file:
        for chunk in iter(lambda: weights_file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
