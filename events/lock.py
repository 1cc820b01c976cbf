"""The single-writer lock.

One process writes a log at a time. The lock is an advisory `flock` on `<db>.lock`, so the
kernel releases it when the holder dies, even by SIGKILL: a crash never leaves a stale lock.
The holder's pid is written into the file only to make the refusal message useful.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from events.errors import StoreLocked


class WriterLock:
    def __init__(self, db_path: Path) -> None:
        self.path = Path(str(db_path) + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreLocked(
                f"{self.path.with_suffix('')} is in use by another overnight process (pid {holder}); "
                "wait for it to finish or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
