"""One run folder, one writer (issue 22): the run lock, and workers that die with their launcher. Real processes,
real signals, real torchrun; the long version is benchmarks/kill_resume.py, whose harness these tests use."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sagan_cli.errors import UserError
from sagan_cli.training.run_lock import RunLock

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import kill_resume as harness  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="the harness reads /proc")

TINY = {**harness.SMALL, "data.synthetic_size": 64, "train.checkpoint_every": 4, "train.sample_every": 8,
        "train.ema_start": 4}


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder` (the lock file too): its mtime and content hash."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended early (exit code {proc.returncode})"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def signal_job(pids: list[int], sig: int) -> None:
    for pid in pids:
        os.kill(pid, sig)


def refused(out: Path, *, processes: int, holder: int, steps: int) -> None:
    """A second `sagan train --resume` on `out` ends (no hang) with one error line naming the holder."""
    command = harness.train_command(out, {**TINY, "train.steps": steps}, resume=True, processes=processes)
    result = subprocess.run(command, capture_output=True, text=True, env=harness.env(), timeout=180)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "in use by another sagan train" in errors[0], result.stderr[-3000:]
    assert f"pid {holder} on " in errors[0] and "since " in errors[0]
    assert "sagan_cli/" not in result.stderr  # no traceback from our code


@pytest.mark.processes
def test_a_second_run_is_refused_and_changes_nothing_and_a_killed_run_leaves_no_lock(tmp_path):
    """Single-process holder: a second `sagan train --resume` is refused and changes nothing; after SIGKILL the lock
    is free at once. (The next test does the same with 2 processes on each side, and resumes at once.)"""
    out = tmp_path / "run"
    holder = harness.start(harness.train_command(out, {**TINY, "train.steps": 100000}, resume=False, processes=1),
                           tmp_path / "holder.log")
    try:
        wait_for(lambda: harness.has_state(out), holder)
        holder.send_signal(signal.SIGSTOP)  # frozen: anything that changes now was written by the second run
        before = snapshot(out)
        step = int(max(harness.states(out))[len("step-"):])
        refused(out, processes=1, holder=holder.pid, steps=step + 1)
        assert snapshot(out) == before
        holder.send_signal(signal.SIGCONT)
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(out)  # the kernel dropped the lock with its process: nothing to clean by hand
    lock.acquire()
    lock.release()
    assert not (out / "run.lock").exists()  # a lock that is let go of takes its file with it


@pytest.mark.processes
def test_workers_die_with_their_launcher_and_the_run_resumes_bit_for_bit(tmp_path):
    """SIGKILL to torchrun alone, twice, after a checkpoint at a random moment: both workers follow it within
    seconds, the next start is not refused, and the result equals an uninterrupted 2-process run."""
    settings = {**TINY, "train.steps": 24}
    straight, out = tmp_path / "straight", tmp_path / "killed"
    assert harness.run_to_end(straight, settings, tmp_path / "straight.log", resume=False, timeout=300) == 0
    rng = random.Random(0)

    def moment(proc: subprocess.Popen, folder: Path, number: int) -> None:
        known = harness.states(folder)
        wait_for(lambda: harness.states(folder) - known, proc)  # a new checkpoint, then a random moment
        time.sleep(rng.uniform(0, 0.3))
        if number == 1:  # while it runs, a second 2-process run is refused on both ranks and changes nothing
            job = [proc.pid, *harness.descendants(proc.pid)]
            signal_job(job, signal.SIGSTOP)
            try:
                before = snapshot(folder)
                rank0 = json.loads((folder / "run.lock").read_text())["pid"]
                assert rank0 in job
                step = int(max(harness.states(folder))[len("step-"):])
                refused(folder, processes=2, holder=rank0, steps=step + 1)
                assert snapshot(folder) == before
            finally:
                signal_job(job, signal.SIGCONT)

    try:
        for number, reached, left, seconds, next_start in harness.kill_and_resume(
                out, settings, tmp_path / "killed.log", mode="launcher", kills=2, moment=moment, limit=15):
            assert (left, next_start) == (0, "resume") and seconds < 10, (number, reached, left, seconds)
    finally:
        harness.stop_all(out)
    assert harness.max_difference(straight, out) == 0
    assert harness.log_complete(out, 24, TINY["train.log_every"])
    assert harness.sagan_processes(out) == [] and harness.sagan_processes(straight) == []


def test_the_lock_names_its_holder_and_a_refused_command_leaves_no_folder(tmp_path):
    first = RunLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(UserError, match=rf"in use by another sagan train \(pid {os.getpid()} on .+, since .+\)"):
        RunLock(tmp_path / "run").acquire()  # another open file description: refused, as another process is
    first.release()
    assert not (tmp_path / "run").exists()  # the lock created the folder and nothing else was written to it


def test_peer_failure_names_only_a_closed_connection_and_only_with_peers(monkeypatch):
    """A gloo collective whose peer died: one line. A local NCCL fault or a single process: no such line (the
    real traceback stays)."""
    from sagan_cli.training.launcher import peer_failure

    closed = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "another process of this run stopped (connection closed by peer)" in peer_failure(closed)
    assert peer_failure(RuntimeError("NCCL error: unhandled cuda error (out of memory)")) is None
    assert peer_failure(ValueError("Connection closed by peer")) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert peer_failure(closed) is None
