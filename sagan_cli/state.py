"""The resumable training state: safetensors and JSON only, so resuming never unpickles anything.

A run folder may sit on a shared volume, so `--resume` must not run code from it. One state is a folder
`state/step-XXXXXXX/` written under a temporary name and renamed into place:

  models.safetensors     G, D and the EMA copy of G ("g.", "d.", "ema." prefixes)
  optimizers.safetensors Adam's moments and step counts; param groups as JSON in the metadata
  progress.json          step, data position, best FID, number of processes, loss scalers (fp16)
  rng-rank{r}.json       every RNG of process r: Python's, NumPy's, torch's CPU and current CUDA generator
"""

from __future__ import annotations

import json
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
    _write_json(folder / "progress.json", {**asdict(progress), "scalers": scalers})


def read_progress(folder: Path) -> tuple[Progress, dict[str, dict]]:
    try:
        raw = json.loads((folder / "progress.json").read_text())
        scalers = raw.pop("scalers", {})
        return Progress(**raw), scalers
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{folder} is not a readable training state ({exc}); resume from another run") from None


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
        _set_rng_state(json.loads((folder / f"rng-rank{rank}.json").read_text()))
    except (OSError, SafetensorError, RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{folder} is damaged or from another sagan version ({first}); "
                        "resume from an earlier state or start a new run") from None


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
