"""Run the overnight CLI on a disk that starts failing fsync, as a dying disk does.

    python -m tests.torture.failing_disk SYNCS [MODE] -- <overnight arguments>

Every SQLite file of the process goes through an apsw VFS that inherits the operating system's
and lets the first SYNCS syncs through; after that `persistent` fails every sync with EIO
(SQLITE_IOERR_FSYNC) and `once` fails only the next one. This is where SQLite's own test
suite injects I/O errors: below SQLite, above the kernel. The marketplace files overnight
writes (SKILL.md) use the OS directly and are not affected.
"""

from __future__ import annotations

import sys
import threading

import apsw


class FailingDisk(apsw.VFS):
    def __init__(self, syncs: int, persistent: bool) -> None:
        self.syncs_left = syncs
        self.persistent = persistent
        self.failed = 0
        self._lock = threading.Lock()
        self.base = apsw.vfs_names()[0]  # the operating system's, before this one becomes the default
        super().__init__("failing-disk", base=self.base, makedefault=True)

    def xOpen(self, name: str | apsw.URIFilename | None, flags: list[int]) -> apsw.VFSFile:
        return _File(self, name, flags)

    def sync_fails(self) -> bool:
        with self._lock:
            if self.syncs_left > 0:
                self.syncs_left -= 1
                return False
            if self.persistent or not self.failed:
                self.failed += 1
                return True
            return False


class _File(apsw.VFSFile):
    def __init__(self, disk: FailingDisk, name: str | apsw.URIFilename | None, flags: list[int]) -> None:
        self.disk = disk
        super().__init__(disk.base, name, flags)

    def xSync(self, flags: int) -> None:
        if self.disk.sync_fails():
            error = apsw.exception_for(apsw.SQLITE_IOERR_FSYNC)
            error.args = ("disk I/O error",)  # SQLite's own message for it
            raise error
        super().xSync(flags)


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--")
    syncs, mode = int(args[0]), (args[1] if split > 1 else "persistent")
    disk = FailingDisk(syncs, persistent=mode == "persistent")
    from cli.main import main as overnight

    sys.argv = ["overnight", *args[split + 1:]]
    try:
        overnight()
    finally:
        print(f"failing disk: {disk.failed} sync(s) failed", file=sys.stderr)


if __name__ == "__main__":
    main()
