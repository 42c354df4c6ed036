"""One run per work dir: an advisory lock held for the life of a run.

Two runs writing one work dir interleave their logs and overwrite each other's checkpoints, and
the second one's start-up cleanup deletes the first one's checkpoint in flight. The lock is an
``flock`` on ``<work_dir>/.lock``: the kernel releases it when the process ends however it ends
(a kill included), so a stale lock cannot block the next run. The file records the holder (pid,
host, start time) for the message the second run prints. Where ``fcntl`` is missing (Windows)
no lock is taken.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import IO, Optional

from ..config import ConfigError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"


class WorkDirBusyError(ConfigError):
    """Another run holds the work dir; the message names it and what to do."""


class WorkDirLock:
    """Hold the lock on ``work_dir`` from :meth:`acquire` until :meth:`release` or the process ends."""

    def __init__(self, work_dir: Path) -> None:
        self.path = Path(work_dir) / LOCK_NAME
        self._file: Optional[IO[str]] = None

    def acquire(self) -> "WorkDirLock":
        if fcntl is None or self._file is not None:
            return self
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise WorkDirBusyError(
                f"work dir {self.path.parent} is in use by another run ({holder}); wait for it to finish, "
                f"or give this run another --work-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None
