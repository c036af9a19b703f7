"""Advisory file locks, so several processes can share one results directory without corrupting it.

* one lock per run id, taken without waiting: a run another process is working on is skipped, not repeated;
* one lock around the leaderboard rewrite, taken with waiting: every process writes its run records first and
  then rebuilds the tables under this lock, so the last rewrite always sees every finished record.

``fcntl.flock`` locks belong to the open file and vanish when the process dies (even on ``kill -9``), so a
crashed run never leaves a stale lock behind. The lock files themselves are empty and stay in ``DIR/locks/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class RunLock:
    """A non-blocking exclusive lock on ``path``; :meth:`acquire` says whether it was free."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """Hold a blocking exclusive lock on ``path`` for the duration of the ``with`` block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
