"""One run folder, one writer (README, `sagan train`): rank 0 holds an OS lock on DIR/run.lock for the life of the run.

The lock is `flock(2)` on an open file: the kernel drops it when the holder's process ends, however it ends
(SIGKILL and the OOM killer included), so there is never a stale lock to clean by hand. The file records the
holder (pid, host, start time) for the refusal message; a run that ends normally removes it, a killed one
leaves it behind, unlocked and harmless. `lock_run_folder` is collective: when rank 0 is refused, every rank
stops with the same one-line error, before anything in the folder is written.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

from sagan_cli.errors import UserError
from sagan_cli.training.state import together

LOCK_NAME = "run.lock"
# flock is not available on every file system (Lustre mounted without -o flock, some FUSE and SMB mounts):
# the run goes on unlocked, with a warning, rather than refusing to train there at all.
UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}

_held: list[RunLock] = []  # locks this process holds; `releases_run_lock` lets go of those its call took


class RunLock:
    """An exclusive, non-blocking lock on `run_dir / run.lock`; `acquire` refuses a held one, naming the holder."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path, self.fd, self.created = Path(run_dir), Path(run_dir) / LOCK_NAME, None, False

    def acquire(self) -> None:
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(f"{self.run_dir} is in use by another sagan train ({holder}); wait for it to end or "
                                "stop it, or choose another --out") from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in UNSUPPORTED:
                    raise
                print(f"warning: the file system of {self.run_dir} cannot lock {LOCK_NAME} ({exc.strerror}); "
                      "training without the run lock: never start a second run on this folder", file=sys.stderr)
                return
            if _same_file(fd, self.path):
                break
            os.close(fd)  # a holder that just ended removed the file we locked: lock the new one
        self.fd = fd
        since = datetime.now().astimezone().isoformat(timespec="seconds")
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        except OSError:
            pass  # a full disk: the lock holds all the same; a refused run then names no holder

    def release(self) -> None:
        if self.fd is not None:
            try:
                if _same_file(self.fd, self.path):
                    self.path.unlink()  # while still locked: a newcomer that opened it re-checks the inode
            except OSError:
                pass  # a read-only or vanished folder: the lock itself goes with the descriptor
            os.close(self.fd)
            self.fd = None
        self._tidy()

    def _tidy(self) -> None:
        if self.created:  # a folder this command created and nothing wrote to goes away again (a refused run)
            try:
                self.run_dir.rmdir()
            except OSError:
                pass


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_holder(fd: int) -> str:
    """'pid P on HOST, since TIME' from the lock file (the holder may still be writing it: retry briefly)."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0))
            return f"pid {info['pid']} on {info['host']}, since {info['since']}"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "holder unknown"


def _close_in_child() -> None:
    """A forked child (a DataLoader worker) must not keep the lock alive after its parent died."""
    for lock in _held:
        if lock.fd is not None:
            os.close(lock.fd)
            lock.fd = None


os.register_at_fork(after_in_child=_close_in_child)


def lock_run_folder(run_dir: Path, accelerator) -> None:
    """Rank 0 takes the run lock (until the `releases_run_lock` call returns); a refusal stops every rank."""
    lock = RunLock(run_dir)

    def take() -> None:
        lock.acquire()
        _held.append(lock)

    together(accelerator, take, main_only=True, what="lock the run folder")


def releases_run_lock(func):
    """Decorator: the run locks taken during the call are released when it returns or raises."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        depth = len(_held)
        try:
            return func(*args, **kwargs)
        finally:
            while len(_held) > depth:
                _held.pop().release()

    return wrapper
