"""The resumable training state: safetensors and JSON only, so resuming never unpickles anything.

A run folder may sit on a shared volume, so `--resume` must not run code from it. One state is a folder
`state/step-XXXXXXX/` written under a temporary name and renamed into place:

  models.safetensors     G, D and the EMA copy of G ("g.", "d.", "ema." prefixes)
  optimizers.safetensors Adam's moments and step counts; param groups as JSON in the metadata
  progress.json          sagan version, step, data position, best FID, number of processes, loss scalers (fp16)
  rng-rank{r}.json       every RNG of process r: Python's, NumPy's, torch's CPU and current CUDA generator
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from sagan_cli.errors import UserError

STATE_PREFIX = "step-"


@dataclass
class Progress:
    """Counters that travel with the state."""

    step: int = 0  # completed generator updates
    batches: int = 0  # data batches consumed per process: the data position
    best_fid: float = float("inf")
    world_size: int = 1  # processes that trained it: the data order and the RNG files depend on it

    def advance(self, *, d_steps: int) -> None:
        """One training step done: one G update, `d_steps` batches of real images consumed."""
        self.step += 1
        self.batches += d_steps


def latest_state(root: str | Path) -> Path | None:
    """The newest complete state folder (half-written ones keep a '.tmp-' name and are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STATE_PREFIX))
    return done[-1] if done else None


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _optimizer_tensors(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    saved = optimizer.state_dict()
    tensors = {f"{name}.{index}.{key}": value.detach().cpu().contiguous()
               for index, values in saved["state"].items() for key, value in values.items()}
    return tensors, saved["param_groups"]


def save_state(folder: Path, *, models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
               progress: Progress, scalers: dict[str, dict], rank: int, main: bool) -> None:
    """Write one process's share of the state into `folder` (rank 0: everything but the other ranks' RNGs)."""
    _write_json(folder / f"rng-rank{rank}.json", _rng_state())
    if not main:
        return
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, model in models.items()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / "models.safetensors"))
    opt_tensors, groups = {}, {}
    for name, optimizer in optimizers.items():
        values, groups[name] = _optimizer_tensors(name, optimizer)
        opt_tensors.update(values)
    save_file(opt_tensors, str(folder / "optimizers.safetensors"), metadata={"param_groups": json.dumps(groups)})
    import sagan_cli

    _write_json(folder / "progress.json", {"version": sagan_cli.__version__, **asdict(progress), "scalers": scalers})


class _Invalid(ValueError):
    """A value in a state's JSON file that is missing, of the wrong type or out of range."""


def _damaged(path: Path, why) -> UserError:
    return UserError(f"{path} is damaged ({why}); resume from an earlier state (delete this one) or start a new run")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _damaged(path, exc.strerror if isinstance(exc, OSError) and exc.strerror else exc) from None


def _int(value, what: str, low: int, high: float = float("inf")) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _Invalid(f"{what} must be an integer in [{low}, {high}], got {value!r}"[:200])
    return value


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"{what} must be a number, got {value!r}"[:200])
    return float(value)


def _ints(value, what: str, length: int, low: int, high: int) -> list[int]:
    if not isinstance(value, list) or len(value) != length:
        raise _Invalid(f"{what} must be a list of {length} integers")
    for item in value:
        _int(item, f"every entry of {what}", low, high)
    return value


def _fields(raw, what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    if not isinstance(raw, dict):
        raise _Invalid(f"{what} must be a JSON object")
    missing = [key for key in required if key not in raw]
    extra = [key for key in raw if key not in required + optional]
    if missing or extra:
        raise _Invalid(f"{what}: missing {missing}" if missing else f"{what}: unexpected {extra}")
    return raw


SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def _check_scaler(raw, what: str) -> dict:
    _fields(raw, what, SCALER_KEYS)
    for key in ("scale", "growth_factor", "backoff_factor"):
        if not _number(raw[key], f"{what}.{key}") > 0 or not math.isfinite(raw[key]):
            raise _Invalid(f"{what}.{key} must be a finite number > 0, got {raw[key]!r}")
    _int(raw["growth_interval"], f"{what}.growth_interval", 1)
    _int(raw["_growth_tracker"], f"{what}._growth_tracker", 0)
    return raw


def read_progress(folder: Path) -> tuple[Progress, dict[str, dict]]:
    """progress.json, fully checked; a state written by another sagan release is refused (its layout may differ)."""
    import sagan_cli  # the version now (the release sets it), not at import

    path = folder / "progress.json"
    raw = _read_json(path)
    version = raw.get("version") if isinstance(raw, dict) else None
    if isinstance(raw, dict) and version != sagan_cli.__version__:
        written = f"sagan {version}" if isinstance(version, str) else "sagan 0.1.0 or earlier"
        raise UserError(f"{folder} was written by {written}, and this is sagan {sagan_cli.__version__}: a state "
                        "resumes only with the release that wrote it; finish the run with that release or start "
                        "a new run (its g.safetensors and d.safetensors still load)")
    try:
        _fields(raw, "progress.json", ("version", "step", "batches", "best_fid", "world_size", "scalers"))
        progress = Progress(step=_int(raw["step"], "step", 0), batches=_int(raw["batches"], "batches", 0),
                            best_fid=_number(raw["best_fid"], "best_fid"),
                            world_size=_int(raw["world_size"], "world_size", 1))
        scalers = _fields(raw["scalers"], "scalers", (), ("d", "g"))
        return progress, {name: _check_scaler(value, f"scalers.{name}") for name, value in scalers.items()}
    except _Invalid as exc:
        raise _damaged(path, exc) from None


def read_rng(folder: Path, rank: int) -> dict:
    """rng-rank{rank}.json, fully checked (every generator's state has a fixed layout and range)."""
    path = folder / f"rng-rank{rank}.json"
    raw = _read_json(path)
    try:
        _fields(raw, path.name, ("python", "numpy", "torch"), ("cuda",))
        python = raw["python"]
        if not isinstance(python, list) or len(python) != 3:
            raise _Invalid("python must be [version, state, gauss]")
        _int(python[0], "python's version", 1, 3)
        _ints(python[1], "python's state", 625, 0, 2**32 - 1)
        _int(python[1][-1], "python's position", 0, 624)
        if python[2] is not None:
            _number(python[2], "python's gauss")
        numpy = raw["numpy"]
        if not isinstance(numpy, list) or len(numpy) != 5 or numpy[0] != "MT19937":
            raise _Invalid('numpy must be ["MT19937", keys, position, has_gauss, cached]')
        _ints(numpy[1], "numpy's keys", 624, 0, 2**32 - 1)
        _int(numpy[2], "numpy's position", 0, 624)
        _int(numpy[3], "numpy's has_gauss", 0, 1)
        _number(numpy[4], "numpy's cached gaussian")
        _ints(raw["torch"], "torch", torch.get_rng_state().numel(), 0, 255)
        if "cuda" in raw:
            length = torch.cuda.get_rng_state().numel() if torch.cuda.is_available() else len(raw["cuda"])
            _ints(raw["cuda"], "cuda", length, 0, 255)
    except _Invalid as exc:
        raise _damaged(path, exc) from None
    return raw


def load_state(folder: Path, *, models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
               rank: int) -> None:
    """Restore models, optimizers and this process's RNGs from `folder` (every process calls it)."""
    try:
        tensors = load_file(str(folder / "models.safetensors"))
        for name, model in models.items():
            prefix = f"{name}."
            model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        with safe_open(str(folder / "optimizers.safetensors"), framework="pt") as f:  # one read: tensors + groups
            groups = json.loads(f.metadata()["param_groups"])
            opt_tensors = {key: f.get_tensor(key) for key in f.keys()}
        for name, optimizer in optimizers.items():
            params = [p for group in optimizer.param_groups for p in group["params"]]
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in opt_tensors.items():
                owner, index, field = key.split(".", 2)
                if owner == name:
                    param = params[int(index)]
                    if value.shape == param.shape:  # Adam's moments in the parameter's layout (channels_last):
                        value = torch.empty_like(param, dtype=value.dtype).copy_(value)  # fused kernels assume it
                    state.setdefault(int(index), {})[field] = value
            optimizer.load_state_dict({"state": state, "param_groups": groups[name]})
    except (OSError, SafetensorError, RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{folder} is damaged or from another sagan version ({first}); "
                        "resume from an earlier state or start a new run") from None
    _set_rng_state(read_rng(folder, rank))


def together(accelerator, action, *, main_only: bool = False, what: str = "write the run folder"):
    """Run `action()` (on rank 0 alone with `main_only`) so that a failure on ANY rank stops EVERY rank
    with the same one-line error, instead of leaving the others waiting in a collective.

    The flag exchange doubles as the barrier. Single process: just the call, errors as raised.
    """
    if accelerator.num_processes == 1:
        try:
            return action()
        except OSError as exc:
            raise UserError(f"cannot {what} ({exc.strerror or exc}: {exc.filename}); "
                            "free some space or choose another --out") from None
    result, failure = None, None
    if accelerator.is_main_process or not main_only:
        try:
            result = action()
        except UserError as exc:
            failure = str(exc)
        except OSError as exc:
            failure = (f"cannot {what} ({exc.strerror or exc}: {exc.filename}); "
                       "free some space or choose another --out")
    flag = torch.tensor([float(failure is not None)], device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() > 0:
        from accelerate.utils import gather_object

        messages = [m for m in gather_object([failure]) if m]
        error = UserError(messages[0] if messages else f"a process failed to {what}")
        error.every_rank = True  # the command line prints it once, on rank 0
        raise error
    return result


def commit_state(accelerator, root: Path, step: int, *, keep: int, write) -> Path:
    """Run `write(tmp_folder)` on every process, then rename the folder into place and drop old ones.

    A crash mid-write leaves only a '.tmp-' folder behind, and the previous state stays the newest.
    A failure on any process (disk full, unwritable folder) stops every process with one message.
    """
    final = root / f"{STATE_PREFIX}{step:07d}"
    if final.is_dir():  # already saved at this step: the folder is complete, keep it
        return final
    tmp = root / f".tmp-{STATE_PREFIX}{step:07d}"

    def start() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def finish() -> None:
        os.replace(tmp, final)
        states = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(STATE_PREFIX))
        for old in states[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    together(accelerator, start, main_only=True, what="write the training state")
    together(accelerator, lambda: write(tmp), what="write the training state")
    together(accelerator, finish, main_only=True, what="write the training state")
    return final
