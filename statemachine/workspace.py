"""Where a marketplace's state lives, and opening its log with overnight's types and projections."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from events import EventStore
from events.lock import WriterLock
from events.remote import absolute_url, file_path
from events.store import Clock, utc_now
from statemachine.catalog import REGISTRY
from statemachine.discovery import MANIFEST, PLUGINS_DIR, is_inside
from statemachine.errors import NotAMarketplace, OvernightError
from statemachine.projections import PROJECTIONS, VIEWS

STATE_DIR = ".overnight"
DB_NAME = "overnight.db"


def marketplace_root(path: Path | str) -> Path:
    """The resolved marketplace directory at `path`. It must look like one (a `plugins/`
    directory, a `.claude-plugin/marketplace.json` or overnight's own state), so a forgotten or
    mistyped PATH never turns some other directory into a marketplace with a log of its own."""
    root = Path(path)
    if not root.is_dir():
        raise NotAMarketplace(f"{root} is not a directory")
    if not any(os.path.lexists(root / marker) for marker in (PLUGINS_DIR, MANIFEST, STATE_DIR)):
        raise NotAMarketplace(f"{root.resolve()} does not look like a marketplace (no {PLUGINS_DIR}/ directory "
                              f"and no {MANIFEST}); give the marketplace's path")
    return root.resolve()


# The files SQLite and overnight keep beside a database.
_COMPANIONS = ("", "-wal", "-shm", "-journal", ".lock")


def own_files(store: EventStore, root: Path, *backup_urls: str | None) -> frozenset[str]:
    """Real paths of the files overnight keeps wherever the user put them, which may be inside a
    plugin's directory: this log and every `file:` backup made from it (recorded, configured for a
    run, or given here), each with the files kept beside it. A backup kept inside a marketplace
    the log served before it moved (or was copied) is counted where it is now, in `root`."""
    urls = [url for (url,) in store.query(
        "SELECT json_extract(data, '$.target') FROM events WHERE stream = 'backup' AND type = 'BackupCompleted' "
        "UNION SELECT json_extract(config, '$.backup_to') FROM runs")]
    paths = [os.path.realpath(store.path)]
    for path in (os.path.realpath(path) for url in [*urls, *backup_urls] if url and (path := file_path(url))):
        paths += [path, *_moved(store, root, path)]
    return frozenset(os.path.realpath(path + suffix) for path in paths for suffix in _COMPANIONS)


def _moved(store: EventStore, root: Path, path: str) -> list[str]:
    """Where the real path `path` is now, when it was inside a marketplace the log served before
    and was moved or copied to `root`."""
    here = os.path.realpath(root)
    return [os.path.join(here, os.path.relpath(path, old)) for (old,) in store.query(
        "SELECT DISTINCT json_extract(data, '$.root') FROM events WHERE stream = 'marketplace'")
        if old != here and is_inside(path, old)]


def followed_backup(store: EventStore, root: Path, url: str | None) -> str | None:
    """A run's `file:` backup URL when the backup was kept inside the marketplace the log served
    before it moved (or was copied) to `root`: the URL of the same place in `root`, which the
    backup moved to with it; None when the URL needs no change."""
    path = file_path(url) if url else None
    moved = _moved(store, root, os.path.realpath(path)) if path else []
    return absolute_url(f"file:{moved[-1]}") if moved else None


def not_plugin_files(store: EventStore, root: Path, *backup_urls: str | None) -> frozenset[str]:
    """Real paths of the files that may lie in a plugin's directory (a plugin at the root holds
    most of the marketplace) but are no part of it: the marketplace's manifest, and overnight's
    own files (`own_files`), which change as it works. A plugin's content hash, snapshots and
    restores leave them out."""
    return own_files(store, root, *backup_urls) | {os.path.realpath(root / MANIFEST)}


def default_db(root: Path) -> Path:
    return root / STATE_DIR / DB_NAME


def read_log(path: Path | str, db: Path | None) -> EventStore:
    """The log for a command that only reads it: the file `db` when given (then PATH is not
    looked at: a copied or restored log is read anywhere), else the marketplace's at `path`."""
    return open_log(Path(path).resolve() if db else marketplace_root(path), db, writer=False)


def open_log(root: Path, db: Path | None = None, *, writer: bool = True, create: bool = True,
             clock: Clock = utc_now, synchronous: str = "FULL") -> EventStore:
    """The event log of the marketplace at `root` (`db` overrides the default location). Only a
    writer with `create` makes a new one: a command that repairs or copies a log (audit replay
    --apply, restore-plugin, backup) refuses to start from none.

    At the default location nothing is followed out of the marketplace: a `.overnight` (or its
    log) that is a symlink, or that is not a directory, is refused with a pointer to --db.
    """
    path = db or default_db(root)
    elsewhere = "pass --db FILE (or set OVERNIGHT_DB) to keep the log elsewhere"
    if db is None:
        # SQLite's own files beside the log too: through a symlinked -wal it failed to open, unclear,
        # and left an empty log behind
        for candidate, kind in ((root / STATE_DIR, "directory"), (path, "file"), (Path(f"{path}-wal"), "file"),
                                (Path(f"{path}-shm"), "file")):
            if candidate.is_symlink():
                raise OvernightError(f"{candidate} is a symlink; overnight never follows one out of the "
                                     f"marketplace: {elsewhere}")
            if candidate.exists() and not (candidate.is_dir() if kind == "directory" else candidate.is_file()):
                raise OvernightError(f"{candidate} is not a {kind}; {elsewhere}")
    if db is not None and path.exists() and not path.is_file():  # a FIFO read as a log said the disk failed
        raise OvernightError(f"{path} is not a regular file; --db (or OVERNIGHT_DB) names the log file")
    if not (writer and create) and not path.exists():
        if WriterLock(path).held():  # a first scan or run is making it at this very moment
            raise OvernightError(f"no event log at {path} yet: an overnight process is creating it now; try "
                                 "again in a moment")
        first = "run `overnight scan` first" + (", or pass --db" if db is None else " with the same --db")
        raise OvernightError(f"no event log at {path} ({first})")
    try:
        if db is None and writer and create:
            make_state_dir(root / STATE_DIR)
        return EventStore.open(path, registry=REGISTRY, projections=PROJECTIONS,
                               views=VIEWS, writer=writer, clock=clock, synchronous=synchronous)
    except OSError as e:
        hint = f"; {elsewhere}" if db is None else ""
        raise OvernightError(f"cannot open the event log {path}: {e.strerror or e}{hint}") from e


def make_state_dir(directory: Path) -> None:
    """The marketplace's .overnight/, with a .gitignore that keeps the log out of its git history;
    one that exists already (this or another process made it) is left as it is."""
    try:
        directory.mkdir()
    except FileExistsError:
        return
    (directory / ".gitignore").write_text("# overnight's event log and its lock: never committed\n*\n",
                                         encoding="utf-8")


@contextmanager
def marketplace_lock(root: Path) -> Iterator[None]:
    """Held by the commands that change the marketplace's files or spend quota on it (run, resume,
    restore-plugin), whichever log they write: the log's own lock refuses a second process on
    that log only, and a second one with its log elsewhere (--db, OVERNIGHT_DB) would process
    the same plugins again beside the first, each counting only its own requests against the
    quota. A second one is refused (StoreLocked, exit 3). The lock file is in this user's
    directory under the system's temporary directory, so nothing is added to the marketplace,
    and named by the marketplace directory's device and inode, the same by any path to it (a
    symlink, a bind mount)."""
    directory = Path(tempfile.gettempdir()) / f"overnight-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(directory)
    except OSError as e:
        raise OvernightError(f"cannot make the lock directory {directory}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o022:
        raise OvernightError(f"{directory} is not a directory of this user's that only this user can write; "
                             "remove it (overnight makes it)")
    try:
        st = os.stat(root)
    except OSError as e:
        raise OvernightError(f"{root}: {e.strerror}") from e
    name = hashlib.sha256(f"{st.st_dev}:{st.st_ino}".encode()).hexdigest()[:32]
    lock = WriterLock(root, lock_file=directory / f"{name}.lock", subject=f"the marketplace {root}")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
