"""Kill a 2-process (gloo, CPU) training run with SIGKILL at random moments, resume after each kill, and compare
the result with an uninterrupted 2-process run (issues 18 and 22). Prints a table (not a test; the short version
is tests/training/test_run_lock.py, which imports this harness).

  python benchmarks/kill_resume.py --kill launcher --kills 5   # SIGKILL to torchrun alone (its workers must follow)
  python benchmarks/kill_resume.py --kill group --kills 5      # SIGKILL to torchrun and every worker at once

A row per kill: the step the run had logged when it was killed, how many sagan processes were left 30 s later
(and how long the last one took to go), and what the next start did: resume, or start over when the kill
came before the first checkpoint (nothing to resume). At the end: max |difference| of every tensor in
g.safetensors and d.safetensors against the straight run (0 is bit for bit), and whether metrics.jsonl holds
every logged step exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "recipes" / "quickstart.toml"
# The quickstart recipe, shrunk for a shared 2-core CPU; checkpoints every 25 steps as in the issue.
SMALL = {"model.g_ch": 16, "model.d_ch": 16, "train.batch_size": 4, "data.synthetic_size": 256,
         "train.log_every": 1, "train.sample_every": 50, "train.checkpoint_every": 25, "train.ema_start": 50}


def env() -> dict[str, str]:
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def train_command(out: Path, settings: dict, *, resume: bool, processes: int = 2, recipe: Path = QUICKSTART) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone"] if processes > 1 else []
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    return [sys.executable, *launcher, "-m", "sagan_cli", "train", str(recipe), "--out", str(out), *sets,
            *(["--resume"] if resume else [])]


def start(command: list[str], log: Path) -> subprocess.Popen:
    """The launcher in a session of its own (as a scheduler starts a job); its output appended to `log`."""
    with open(log, "a") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env(), start_new_session=True)


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parents


def descendants(pid: int) -> list[int]:
    parents, found, frontier = _parents(), [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def sagan_processes(out: Path) -> list[int]:
    """Live (not zombie) processes of a sagan run on `out`: the launcher and its workers."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and b"sagan_cli" in argv and str(out).encode() in argv:
            pids.append(int(entry))
    return pids


def kill(proc: subprocess.Popen, mode: str) -> None:
    """SIGKILL to the launcher alone, or to the launcher and every process under it at once."""
    victims = [proc.pid] + (descendants(proc.pid) if mode == "group" else [])
    if mode == "group":
        for pid in victims:  # freeze first, so no worker notices the others dying before its own kill
            _signal(pid, signal.SIGSTOP)
    for pid in victims:
        _signal(pid, signal.SIGKILL)
    proc.wait()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(out: Path, limit: float = 30.0) -> tuple[int, float]:
    """(processes left after `limit` seconds, seconds until the last one went)."""
    began = time.monotonic()
    while time.monotonic() - began < limit:
        if not sagan_processes(out):
            return 0, time.monotonic() - began
        time.sleep(0.1)
    return len(sagan_processes(out)), limit


def stop_all(out: Path) -> None:
    for pid in sagan_processes(out):
        _signal(pid, signal.SIGKILL)


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss_d" in record:
            steps.append(record["step"])
    return steps


def has_state(out: Path) -> bool:
    state = out / "state"
    return state.is_dir() and any(p.name.startswith("step-") for p in state.iterdir())


def states(out: Path) -> set[str]:
    state = out / "state"
    return {p.name for p in state.iterdir() if p.name.startswith("step-")} if state.is_dir() else set()


def max_difference(a: Path, b: Path) -> float:
    """max |a - b| over every tensor of g.safetensors and d.safetensors (inf when names or shapes differ)."""
    import torch
    from safetensors.torch import load_file

    worst = 0.0
    for name in ("g.safetensors", "d.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        if x.keys() != y.keys():
            return float("inf")
        for key in x:
            if x[key].shape != y[key].shape:
                return float("inf")
            if not torch.equal(x[key], y[key]):
                diff = (x[key].double() - y[key].double()).abs().max().item()
                worst = max(worst, diff if diff == diff else float("inf"))
    return worst


def log_complete(out: Path, steps: int, log_every: int) -> bool:
    """Every logged step exactly once, in order; the structure scores of every grid exactly once."""
    expected = sorted({*range(log_every, steps + 1, log_every), steps})
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    structure = [r["step"] for r in lines if "structure" in r]
    return logged_steps(out) == expected and len(structure) == len(set(structure))


def run_to_end(out: Path, settings: dict, log: Path, *, resume: bool, timeout: float = 900) -> int:
    proc = start(train_command(out, settings, resume=resume), log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill(proc, "group")


def kill_and_resume(out: Path, settings: dict, log: Path, *, mode: str, kills: int, moment, limit: float = 30.0):
    """Start, kill when `moment(proc, out, kill_number)` returns, resume ... `kills` times, then run to the
    end. Yields a row per kill: (kill number, step reached, processes left at 30 s, seconds to go, next start)."""
    resume = False
    for number in range(1, kills + 1):
        proc = start(train_command(out, settings, resume=resume), log)
        moment(proc, out, number)
        finished = proc.poll() is not None
        if not finished:
            kill(proc, mode)
        left, seconds = wait_gone(out, limit)
        stop_all(out)  # whatever is left must not spoil the next start
        reached = max(logged_steps(out), default=0)
        if has_state(out):
            resume, next_start = True, "resume"
        else:  # killed before the first checkpoint: nothing to resume, start over
            shutil.rmtree(out, ignore_errors=True)
            resume, next_start = False, "start over"
        yield number, reached, left, seconds, "finished first" if finished else next_start
    code = run_to_end(out, settings, log, resume=resume)
    if code != 0:
        raise RuntimeError(f"the last start failed (exit code {code}); see {log}")


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def random_moment(rng: random.Random, steps: int, startup_share: float = 0.25):
    """A kill moment: a random time in the first 10 s of a start (imports, rendezvous, lock, resume) with
    probability `startup_share`, else once the log reaches a random step past the resumed checkpoint (plus up to
    half a second)."""
    def wait(proc: subprocess.Popen, out: Path, number: int) -> None:
        if rng.random() < startup_share:
            deadline = time.monotonic() + rng.uniform(0.5, 10.0)
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            return
        first = max((int(name[len("step-"):]) for name in states(out)), default=0) + 1  # the resumed step
        target = rng.randint(first, steps - 1) if first < steps else steps
        stale = _inode(out / "metrics.jsonl")  # lines past the checkpoint stay until the new start rewrites the log
        while (max(logged_steps(out), default=0) < target or _inode(out / "metrics.jsonl") == stale) \
                and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.5))
    return wait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill", choices=["launcher", "group"], default="launcher")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--startup-share", type=float, default=0.25, help="share of kills during start-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep the run folders here")
    args = parser.parse_args()
    settings = {**SMALL, "train.steps": args.steps}
    base = args.keep or Path(tempfile.mkdtemp(prefix="kill-resume-"))
    base.mkdir(parents=True, exist_ok=True)
    straight, killed, log = base / "straight", base / f"killed-{args.kill}", base / f"{args.kill}.log"
    shutil.rmtree(killed, ignore_errors=True)
    began = time.monotonic()
    if not (straight / "g.safetensors").exists():
        shutil.rmtree(straight, ignore_errors=True)
        if run_to_end(straight, settings, base / "straight.log", resume=False) != 0:
            sys.exit(f"the straight run failed; see {base / 'straight.log'}")
        (base / "straight.json").write_text(json.dumps({"seconds": time.monotonic() - began}))
    straight_s = json.loads((base / "straight.json").read_text())["seconds"]
    print(f"{args.kills} x SIGKILL to the {'launcher alone' if args.kill == 'launcher' else 'whole job'}, "
          f"{args.steps} steps, 2 gloo processes; straight run {straight_s:.0f} s; "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'kill':>4}  {'step reached':>12}  {'left at 30 s':>12}  {'gone after':>10}  next start")
    began, restarts = time.monotonic(), 0
    moment = random_moment(random.Random(args.seed), args.steps, args.startup_share)
    for number, reached, left, seconds, next_start in kill_and_resume(killed, settings, log, mode=args.kill,
                                                                      kills=args.kills, moment=moment):
        restarts += next_start == "start over"
        print(f"{number:>4}  {reached:>12}  {left:>12}  {seconds:>9.1f}s  {next_start}", flush=True)
    total = time.monotonic() - began
    print(f"final max |G, D difference| vs the straight run: {max_difference(straight, killed):.3g}; "
          f"metrics.jsonl complete (every step once): {log_complete(killed, args.steps, SMALL['train.log_every'])}; "
          f"started over {restarts}x (killed before the first checkpoint); "
          f"sagan processes left now: {len(sagan_processes(killed))}; wall {total:.0f} s; "
          f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
