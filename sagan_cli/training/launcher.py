"""Workers that die with their launcher (README, "Multi-GPU and mixed precision").

torchrun (and `accelerate launch` with several processes) starts each worker in a session of its own, so when
the launcher alone is killed (kill -9, the OOM killer, a scheduler that signals only the main process), nothing
reaches the workers: they would train on, or wait forever in a collective, holding memory, the GPU and the run
lock. Under such a launcher each sagan process therefore
  - asks the kernel for SIGKILL when its parent exits (Linux `prctl(PR_SET_PDEATHSIG)`; torchrun's agent starts
    its workers from its main thread, whose exit is the process's), and
  - watches its parent from a thread every `POLL_S` seconds, which also covers a parent that died before the
    prctl call and systems without prctl: the parent it compares with is the one recorded when `sagan_cli` was
    imported (`sagan_cli.PARENT_PID`), before torch loads.
A plain `sagan train` has no launcher to watch: it keeps running when its shell goes (nohup, tmux).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

import sagan_cli

LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")  # set by torchrun / accelerate launch for each worker
OFF_SWITCH = "SAGAN_WATCH_LAUNCHER"  # "0": never watch (a launcher that lets its workers outlive it on purpose)
POLL_S = 1.0
PR_SET_PDEATHSIG = 1

_watching = False


def under_launcher() -> bool:
    return os.environ.get(OFF_SWITCH, "1") != "0" and any(name in os.environ for name in LAUNCHER_VARS)


def die_with_launcher() -> None:
    """Under a launcher, make this process end within `POLL_S` seconds of its launcher (at once on Linux).
    Idempotent; a no-op without a launcher."""
    global _watching
    if _watching or not under_launcher():
        return
    _watching = True
    parent = sagan_cli.PARENT_PID
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the watcher thread alone
    if os.getppid() != parent:  # the launcher died before prctl could arm
        _launcher_gone(parent)
    threading.Thread(target=_watch, args=(parent,), name="sagan-launcher-watch", daemon=True).start()


def _watch(parent: int) -> None:
    event = threading.Event()
    while not event.wait(POLL_S):
        if os.getppid() != parent:
            _launcher_gone(parent)


def _launcher_gone(parent: int) -> None:
    rank = os.environ.get("RANK", "?")
    try:
        os.write(2, f"error: the launcher (pid {parent}) is gone; process {os.getpid()} (rank {rank}) stops; "
                    "continue the run with --resume\n".encode())
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


# What a collective raises in the survivors when another process of the run died (gloo, at once, from the closed
# connection). Not NCCL's generic errors: those also stand for this process's own faults (out of memory, a
# mismatched collective), whose traceback must not be replaced by a line blaming another process.
PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_failure(exc: BaseException) -> str | None:
    """The one line `sagan` prints when a collective failed because another process stopped, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not isinstance(exc, RuntimeError):
        return None
    text = f"{type(exc).__name__}: {exc}"
    sign = next((sign for sign in PEER_SIGNS if sign in text), None)
    if sign is None:
        return None
    return (f"another process of this run stopped ({sign.lower()}); process {os.getpid()} (rank "
            f"{os.environ.get('RANK', '?')}) stops too; continue the run with --resume")
