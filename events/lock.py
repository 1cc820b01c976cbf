"""The single-writer lock.

One process writes a log at a time. The lock is an advisory `flock` on `<db>.lock`, so the
kernel releases it when the holder dies, even by SIGKILL: a crash never leaves a stale lock.
The holder's pid is written into the file only to make the refusal message useful.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from pathlib import Path

from events.errors import EventStoreError, StoreLocked

_ATTEMPTS = 5
# The lock file may sit in a directory anybody's checkout fills (`.overnight/` of a cloned
# marketplace): never follow a symlink there (truncating its target), never block on a FIFO.
_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class WriterLock:
    """The lock of the log at `db_path` (`<db>.lock`); or, with `lock_file`, a lock on whatever
    `subject` names (what the refusal says is in use)."""

    def __init__(self, db_path: Path, *, lock_file: Path | None = None, subject: str | None = None) -> None:
        self.path = lock_file or Path(str(db_path) + ".lock")
        self.subject = subject or str(db_path)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise StoreLocked. A few short retries ride out a `held()` probe."""
        fd = self._open(os.O_RDWR | os.O_CREAT)
        for attempt in range(_ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt < _ATTEMPTS - 1:
                    time.sleep(0.02)
        else:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreLocked(
                f"{self.subject} is in use by another overnight process (pid {holder}); "
                "wait for it to finish or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def held(self) -> bool:
        """Whether a live process holds this lock (a reader's question: is a run going on?).
        Probed with a shared lock that is dropped at once; `acquire` retries past it."""
        try:
            fd = self._open(os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _open(self, flags: int) -> int:
        """The lock file's descriptor; EventStoreError when it is anything but a regular file."""
        try:
            fd = os.open(self.path, flags | _FLAGS, 0o644)
        except OSError as e:
            if os.path.islink(self.path):
                raise EventStoreError(f"{self.path} is a symlink; overnight never follows one: remove it") from e
            if isinstance(e, IsADirectoryError):
                raise EventStoreError(f"{self.path} is not a regular file: remove it (overnight makes its lock "
                                      "file)") from e
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise EventStoreError(f"{self.path} is not a regular file: remove it (overnight makes its lock file)")
        return fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
