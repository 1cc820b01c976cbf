"""The event store: one SQLite file, one writer, an append-only hash-chained log.

What must always hold:
- `events.seq` runs 1, 2, 3, ... without gaps; `(stream, version)` is unique and each
  stream's versions run 1, 2, 3, ...; a conflicting append fails and changes nothing.
- `hash(n) = sha256(header(n) + data(n))` where header(n) carries `prev_hash` = hash(n-1)
  (64 zeros for seq 1) and every other envelope column, so changing, inserting or
  deleting any stored byte is visible to `verify()`.
- Projections are updated in the same transaction as the append that caused them; a
  failing projection rolls the append back. Replaying the log from seq 1 into empty tables
  yields exactly the stored projections.
- Blobs are content-addressed (sha256 of their bytes) and written before, or in the same
  transaction as, the event that references them; putting a blob again replaces a stored
  copy whose bytes no longer match its hash.
- Only the process holding the writer lock appends; readers never block on it (WAL).
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import apsw
import msgspec

from events.chain import EVENT_COLUMNS, GENESIS, ChainCheck, chain_hash, check_file
from events.errors import (
    EventStoreError,
    ProjectionError,
    StreamConflict,
    UndecodableEvent,
)
from events.lock import WriterLock
from events.migrations import EVENT_TYPES_SINCE, LATEST, migrate
from events.projection import Projection, Row
from events.registry import Event, Registry

_MISSING: Any = object()
_ROW_CACHE_SIZE = 50_000
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def format_at(moment: datetime) -> str:
    """ISO 8601 in UTC with microseconds and a 'Z' (what `isoformat` gives, but faster)."""
    if moment.tzinfo is not timezone.utc:
        moment = moment.astimezone(timezone.utc)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ" % (
        moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second, moment.microsecond)


def blob_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Recorded(msgspec.Struct, frozen=True):
    """An event as stored: its position in the log plus the decoded event."""

    seq: int
    stream: str
    version: int
    type: str
    schema_version: int
    at: str
    event: Event
    hash: str


@dataclass
class ReplayReport:
    events: int = 0
    problems: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    differences: dict[str, int] = field(default_factory=dict)
    applied: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def log_ok(self) -> bool:
        """No problem but projections that differ (which `apply` repairs): the log itself is sound."""
        return len(self.problems) == len(self.differences)


_EVENT_COLUMNS = EVENT_COLUMNS
# Logs larger than this verify their hash chain in a second process, in parallel with the fold.
PARALLEL_CHAIN_CHECK = 200_000


def _translate(e: apsw.Error, path: Path) -> EventStoreError:
    if isinstance(e, apsw.FullError):
        return EventStoreError(f"{path}: the disk is full; nothing was recorded for this step")
    if isinstance(e, apsw.BusyError):
        return EventStoreError(f"{path}: the database is busy (another process holds a write lock)")
    if isinstance(e, apsw.IOError):
        return EventStoreError(f"{path}: {e or 'disk I/O error'} (the disk failed; check it, then run the "
                               "command again: `overnight resume` continues a run)")
    if isinstance(e, apsw.ReadOnlyError):
        return EventStoreError(f"{path}: cannot write it: its directory or disk is read-only here (the commands "
                               "that only read it, such as status, metrics and audit verify, can)")
    if isinstance(e, (apsw.CorruptError, apsw.NotADBError)):
        return EventStoreError(f"{path}: {e}")
    if isinstance(e, apsw.CantOpenError):
        return EventStoreError(f"{path}: cannot open the database file")
    return EventStoreError(f"{path}: {e}")


def _reader(path: Path) -> apsw.Connection:
    """A connection for a reader of the log at `path` (it writes only its own attached
    in-memory tables). On a read-only disk, or in a directory this user cannot write, SQLite
    cannot make the `-shm` file a reader of a WAL log needs; a log closed cleanly there (no
    `-wal` file) cannot change, so it is opened as immutable."""
    conn = None
    try:
        conn = apsw.Connection(str(path))
        conn.execute("PRAGMA user_version").fetchone()
        return conn
    except (apsw.ReadOnlyError, apsw.CantOpenError):
        if conn is not None:
            conn.close()
        if os.path.lexists(f"{path}-wal"):
            raise
    return apsw.Connection(f"file:{urllib.parse.quote(os.path.abspath(path))}?immutable=1",
                           flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI)


class _Transaction:
    """One SQLite write transaction (nested uses join the outer one).

    On any failure the transaction is rolled back and the writer's cached head, stream
    versions and rows are reset, so the next append starts from what is on disk.
    """

    __slots__ = ("store", "outer", "head")

    def __init__(self, store: "EventStore") -> None:
        self.store = store

    def __enter__(self) -> None:
        store = self.store
        self.outer = store._in_tx
        if self.outer:
            return
        if store._lock is None:
            raise EventStoreError(f"{store.path} was opened read-only")
        self.head = (store._seq, store._hash)
        try:
            store._cursor.execute("BEGIN IMMEDIATE")
        except apsw.Error as e:
            raise _translate(e, store.path) from e
        store._in_tx = True

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if self.outer:
            return
        store = self.store
        try:
            if exc is None:
                try:
                    store._cursor.execute("COMMIT")
                    return
                except apsw.Error as e:
                    exc = e
            store._seq, store._hash = self.head
            store._versions.clear()
            store._rows.clear()
            try:
                store.conn.execute("ROLLBACK")
            except apsw.Error:
                pass  # SQLite already rolled back (for example after SQLITE_FULL)
            if isinstance(exc, apsw.ConstraintError) and "events.stream" in str(exc):
                raise StreamConflict(f"concurrent append to a stream: {exc}") from exc
            if isinstance(exc, apsw.Error):
                raise _translate(exc, store.path) from exc
            if exc_type is None:
                raise exc
        finally:
            store._in_tx = False


def _define(conn: apsw.Connection, p: Projection) -> None:
    """The table of `p`, empty, and the version it was built by."""
    conn.execute(p.create_sql())
    conn.execute("INSERT OR REPLACE INTO projection_versions (name, version) VALUES (?, ?)", (p.name, p.version))


def _create_derived(conn: apsw.Connection, projections: Sequence[Projection], views: Mapping[str, str]) -> None:
    """The projection tables (empty) and views of a new log, inside its schema's transaction."""
    for p in projections:
        _define(conn, p)
    for name, select in views.items():
        conn.execute(f"CREATE VIEW {name} AS {select}")


class EventStore:
    """Open with `EventStore.open(...)`; close with `close()` or use as a context manager."""

    def __init__(self, path: Path, conn: apsw.Connection, registry: Registry,
                 projections: Sequence[Projection], clock: Clock, lock: WriterLock | None) -> None:
        self.path = path
        self.conn = conn
        self.registry = registry
        self.projections = tuple(projections)
        self.clock = clock
        self._lock = lock
        self._by_tag: dict[str, list[Projection]] = {}
        for p in self.projections:
            for tag in p.handles:
                self._by_tag.setdefault(tag, []).append(p)
        self._select_sql = {p.name: p.select_sql("main") for p in self.projections}
        self._upsert_sql = {p.name: p.upsert_sql("main") for p in self.projections}
        self._in_tx = False
        self._cursor = conn.cursor()
        # Writer-side cache of stream versions; the writer lock makes it authoritative, and a
        # rolled-back transaction clears it.
        self._versions: dict[str, int] = {}
        # Writer-side cache of projection rows, same rules; bounded by clearing it when full.
        self._rows: dict[tuple[str, tuple], Row | None] = {}
        # A reader's projections the log's stored tables are of another version of: rebuilt on
        # its connection only, as TEMP tables (see _shadow_projections).
        self.rebuilt_in_memory: list[str] = []
        self._seq, self._hash = self._load_head()
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: Path | str, *, registry: Registry, projections: Sequence[Projection] = (),
             views: Mapping[str, str] | None = None, writer: bool = True, clock: Clock = utc_now,
             synchronous: str = "FULL") -> "EventStore":
        """Open (and for a writer, create and migrate) the log at `path`.

        A writer takes the single-writer lock first, so a second writer fails with
        `StoreLocked` before touching the file. A reader needs an existing, current log; it
        leaves the journal mode alone (the writer made the log WAL), so a file that is no
        log, even an empty one, is refused unchanged. A log of a newer schema version than
        this program's (written by a newer overnight) is refused unchanged by both.
        """
        path = Path(path)
        lock: WriterLock | None = None
        if writer:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = WriterLock(path)
            lock.acquire()
        elif not path.exists():
            raise EventStoreError(f"no event log at {path}")

        def unready(reason: str) -> EventStoreError:
            """A refusal to read a log that is not (yet) readable, which the writer at work may
            be creating or upgrading at this very moment."""
            if not writer and WriterLock(path).held():
                reason += ("; an overnight process is writing it now: if it is creating or upgrading the log, "
                           "try again in a moment")
            return EventStoreError(reason)

        try:
            conn = apsw.Connection(str(path)) if writer else _reader(path)
            conn.setbusytimeout(5000)
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0] if version == 0 else 0
            if version == 0 and (tables or not writer):
                raise unready(
                    f"{path} is not an overnight event log " + (
                        "(its tables are not overnight's)" if tables else
                        f"(it is empty; a copy of a log in use needs its {path.name}-wal file copied beside it)"))
            if version > LATEST:  # refused before anything (even the journal mode) is written
                raise EventStoreError(
                    f"{path} was written by a newer version of overnight (schema version {version}, this "
                    f"version knows up to {LATEST}); upgrade overnight (`pip install -U overnight`) to open it"
                )
            if writer:
                conn.execute("PRAGMA journal_mode = WAL")
                migrate(conn, fresh=lambda c: _create_derived(c, projections, views or {}))
            if writer or version >= EVENT_TYPES_SINCE:  # (a reader reads an older schema as it is)
                unknown = sorted(t for (t,) in conn.execute("SELECT type FROM event_types") if t not in registry.types)
                if unknown:
                    raise EventStoreError(
                        f"{path} was written by a newer version of overnight: it holds events of types this version "
                        f"does not know ({', '.join(unknown)}); upgrade overnight (`pip install -U overnight`) to "
                        "open it")
            store = cls(path, conn, registry, projections, clock, lock)
            if writer:
                store._ensure_projections(views or {})
            else:
                store._shadow_projections()
                store._shadow_views(views or {})
            return store
        except apsw.Error as e:
            if lock:
                lock.release()
            raise _translate(e, path) from e
        except BaseException:
            if lock:
                lock.release()
            raise

    def close(self) -> None:
        """Close the connection (SQLite checkpoints the WAL), then release the writer lock
        even if closing failed."""
        try:
            self.conn.close()
        except apsw.Error as e:
            raise _translate(e, self.path) from e
        finally:
            if self._lock:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> "EventStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load_head(self) -> tuple[int, str]:
        row = self.conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], row[1]) if row else (0, GENESIS)

    def _stale_projections(self) -> list[Projection]:
        """Projections whose stored table was built from another definition (another
        `version`, or other columns) or is missing."""
        versions = dict(self.conn.execute("SELECT name, version FROM projection_versions"))
        tables = dict(self.conn.execute("SELECT name, sql FROM sqlite_schema WHERE type = 'table'"))
        return [p for p in self.projections
                if versions.get(p.name) != p.version or tables.get(p.name) != p.create_sql()]

    def _ensure_projections(self, views: Mapping[str, str]) -> None:
        """Bring the derived schema up to date: drop projections no longer defined, rebuild
        those whose definition changed, and recreate the views (`views`: name -> SELECT) whose
        definition changed. Other views are left alone (a person may have made them)."""
        defined = {p.name for p in self.projections}
        retired = [name for (name,) in self.conn.execute("SELECT name FROM projection_versions")
                   if name not in defined]
        stale = self._stale_projections()
        if stale or retired:
            self._rebuild(stale, retired)
        changed = self._changed_views(views)
        if changed:
            with self._transaction():
                for name, select in changed.items():
                    self.conn.execute(f"DROP VIEW IF EXISTS main.{name}")
                    self.conn.execute(f"CREATE VIEW {name} AS {select}")

    def _shadow_projections(self) -> None:
        """For a reader, which cannot rebuild the stored tables: the projections stored by another
        version of overnight (the log of the version used before an upgrade; a writer rebuilds
        them) are folded from the log into TEMP tables of this definition, on this connection
        only (SQLite looks up a name in `temp` before `main`): reading works, the stored tables
        stay as they are. It costs a replay of the log."""
        stale = self._stale_projections()
        if not stale:
            return
        with self.snapshot():
            tables, _report = self._fold_projections(stale, None)
            self._fill(stale, tables, "temp")
        self.rebuilt_in_memory = [p.name for p in stale]

    def _shadow_views(self, views: Mapping[str, str]) -> None:
        """For a reader, which cannot rewrite the stored views: those stored with another
        definition (by another version of overnight; a writer recreates them) are shadowed, on
        this connection only, by TEMP views of this definition (SQLite looks up a name in
        `temp` before `main`). With projections rebuilt in memory, every view is: a stored view
        reads the stored tables."""
        changed = views if self.rebuilt_in_memory else self._changed_views(views)
        for name, select in changed.items():
            self.conn.execute(f"CREATE TEMP VIEW {name} AS {select}")

    def _changed_views(self, views: Mapping[str, str]) -> dict[str, str]:
        """The views (name -> SELECT) stored with another definition, or not at all."""
        existing = dict(self.conn.execute("SELECT name, sql FROM sqlite_schema WHERE type = 'view'"))
        return {name: select for name, select in views.items()
                if existing.get(name) != f"CREATE VIEW {name} AS {select}"}

    def _rebuild(self, stale: Sequence[Projection], retired: Sequence[str]) -> None:
        """Build the `stale` projections from the log into fresh tables, then, in one
        transaction, put them in place of the stored ones and drop the `retired` tables: a
        reader sees the old tables or the new ones, whole, never an empty one."""
        self.conn.execute("ATTACH DATABASE ':memory:' AS replay")
        try:
            if self._seq:
                tables, _report = self._fold_projections(stale, None)
                self._fill(stale, tables)
            with self._transaction():
                for name in retired:
                    self.conn.execute(f"DROP TABLE IF EXISTS main.{name}")
                    self.conn.execute("DELETE FROM projection_versions WHERE name = ?", (name,))
                for p in stale:
                    self.conn.execute(f"DROP TABLE IF EXISTS main.{p.name}")
                    _define(self.conn, p)
                    if self._seq:
                        self.conn.execute(f"INSERT INTO main.{p.name} SELECT * FROM replay.{p.name}")
        finally:
            self.conn.execute("DETACH DATABASE replay")

    def check_present(self) -> None:
        """EventStoreError when the file at `path` is no longer this log: deleted (a `git clean
        -x`), moved, or replaced. SQLite would go on writing into the unlinked file, and lose all."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != self._identity:
            raise EventStoreError(
                f"{self.path}: the event log was {'deleted or moved' if st is None else 'replaced by another file'} "
                "while this process wrote it (a `git clean -x` in the marketplace deletes it); stopped, since "
                "nothing overnight does may go unrecorded")

    # ---------------------------------------------------------------- writing

    def _transaction(self) -> "_Transaction":
        return _Transaction(self)

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Every read inside sees the log at one instant: for a reader, one read transaction (a
        writer in another process goes on appending meanwhile); a writer holds the lock, so
        nothing moves under it."""
        if self._lock is not None or self.conn.in_transaction:
            yield
            return
        self._cursor.execute("BEGIN")
        try:
            yield
        finally:
            self._cursor.execute("COMMIT")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group several appends into one transaction (one fsync): all or nothing."""
        with self._transaction():
            yield

    def append(self, stream: str, events: Event | Iterable[Event], *,
               expected_version: int | None = None, blobs: Iterable[bytes] = ()) -> list[Recorded]:
        """Append events to a stream atomically, with their blobs and projection updates.

        `expected_version` (the stream's current version, 0 for a new stream) makes the
        append conditional: if another append got there first, `StreamConflict`.
        """
        batch = [events] if isinstance(events, Event) else list(events)
        with self._transaction():
            current = self._versions.get(stream)
            if current is None:
                current = self.stream_version(stream)
            if expected_version is not None and current != expected_version:
                raise StreamConflict(
                    f"stream {stream} is at version {current}, expected {expected_version}"
                )
            for data in blobs:
                self._put_blob(data)
            recorded = []
            at = format_at(self.clock())
            for offset, event in enumerate(batch, start=1):
                recorded.append(self._insert(stream, current + offset, event, at))
            self._versions[stream] = current + len(batch)
            return recorded

    def _insert(self, stream: str, version: int, event: Event, at: str) -> Recorded:
        tag = type(event).__struct_config__.tag
        data = self.registry.encode(event).decode("utf-8")
        seq = self._seq + 1
        schema_version = type(event).schema_version
        digest = chain_hash(self._hash, seq, stream, version, tag, schema_version, at, data)
        cur = self._cursor
        cur.execute(
            f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, stream, version, tag, schema_version, at, data, self._hash, digest),
        )
        rec = Recorded(seq, stream, version, tag, schema_version, at, event, digest)
        for p in self._by_tag.get(tag, ()):
            key = p.key(rec)
            if key is None:
                continue
            cache_key = (p.name, key)
            row = None if tag in p.fresh else self._rows.get(cache_key, _MISSING)
            if row is _MISSING:
                found = cur.execute(self._select_sql[p.name], key).fetchone()
                row = dict(zip(p.column_names, found)) if found else None
            new = p.fold(row, rec)  # type: ignore[arg-type]
            if new is not None:
                cur.execute(self._upsert_sql[p.name], p.as_tuple(new))
                if len(self._rows) >= _ROW_CACHE_SIZE:
                    self._rows.clear()
                self._rows[cache_key] = new
        self._seq, self._hash = seq, digest
        return rec

    def put_blob(self, data: bytes) -> str:
        with self._transaction():
            return self._put_blob(data)

    def _put_blob(self, data: bytes) -> str:
        """Store `data` under its hash. A stored copy of the same hash is checked, and one whose
        bytes no longer match is replaced: an event must never name damaged bytes while the
        good ones were at hand (a snapshot is taken so its files can be deleted)."""
        digest = blob_hash(data)
        cur = self._cursor
        cur.execute("INSERT OR IGNORE INTO blobs (hash, size, data) VALUES (?, ?, ?)", (digest, len(data), data))
        if not self.conn.changes():
            stored = cur.execute("SELECT size, data FROM blobs WHERE hash = ?", (digest,)).fetchone()
            if stored[0] != len(data) or blob_hash(bytes(stored[1])) != digest:
                cur.execute("UPDATE blobs SET size = ?, data = ? WHERE hash = ?", (len(data), data, digest))
        return digest

    # ---------------------------------------------------------------- reading

    @property
    def last_seq(self) -> int:
        return self._seq

    def stream_version(self, stream: str) -> int:
        row = self.conn.execute("SELECT max(version) FROM events WHERE stream = ?", (stream,)).fetchone()
        return row[0] or 0

    def get_blob(self, digest: str) -> bytes:
        row = self.conn.execute("SELECT data FROM blobs WHERE hash = ?", (digest,)).fetchone()
        if row is None:
            raise EventStoreError(f"blob {digest} is not in the store")
        data = bytes(row[0])
        if blob_hash(data) != digest:
            raise EventStoreError(f"blob {digest} is corrupt (its bytes no longer match its hash)")
        return data

    def has_blob(self, digest: str) -> bool:
        return self.conn.execute("SELECT 1 FROM blobs WHERE hash = ?", (digest,)).fetchone() is not None

    def read(self, *, stream: str | None = None, stream_prefix: str | None = None,
             after: int = 0) -> Iterator[Recorded]:
        """Decoded events in seq order, optionally of one stream or of streams with a prefix."""
        sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ?"
        params: list[Any] = [after]
        if stream is not None:
            sql += " AND stream = ?"
            params.append(stream)
        if stream_prefix is not None:
            sql += " AND stream >= ? AND stream < ?"
            params += [stream_prefix, stream_prefix + "\U0010ffff"]
        for seq, strm, version, tag, sv, at, data, _prev, digest in self.conn.execute(
            sql + " ORDER BY seq", params
        ):
            yield Recorded(seq, strm, version, tag, sv, at, self.registry.decode(tag, sv, data), digest)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Read-only SQL over the log and its projections (for services and reports)."""
        return list(self.conn.execute(sql, params))

    # ------------------------------------------------------- verify and replay

    def verify(self) -> list[str]:
        """Every problem found in the log, its blobs and its projections; empty when healthy."""
        report = self.replay(apply=False)
        return list(report.problems) + [problem for _digest, problem in self.damaged_blobs()]

    def damaged_blobs(self) -> list[tuple[str, str]]:
        """(hash, problem) of each stored blob whose bytes no longer match its hash (every blob read)."""
        return [(digest, f"blob {digest}: content does not match its hash")
                for digest, size, data in self.conn.execute("SELECT hash, size, data FROM blobs")
                if blob_hash(bytes(data)) != digest or size != len(data)]

    def replay(self, *, apply: bool = False, only: Sequence[str] | None = None,
               parallel_threshold: int = PARALLEL_CHAIN_CHECK) -> ReplayReport:
        """Rebuild projections from the log into fresh tables and compare them with the live ones.

        Checks on the way: contiguous seqs, the hash chain, decodable payloads, and every event
        accepted by its projections (an illegal transition is reported, not applied).
        With `apply=True` the rebuilt tables replace the live ones (the log is the truth).
        """
        targets = [p for p in self.projections if only is None or p.name in only]
        self.conn.execute("ATTACH DATABASE ':memory:' AS replay")
        try:
            # One instant for both reads: a concurrent writer cannot make the log and the live
            # tables disagree between them.
            with self.snapshot():
                last = self.query("SELECT max(seq) FROM events")[0][0] or 0
                if last > parallel_threshold and self.path.exists():
                    # The second core checks the chain while this process folds; the worker
                    # stops at `last`, the end of this transaction's snapshot. (Imported here: a
                    # command that only reads the log, such as status, starts faster without them.)
                    import multiprocessing
                    from concurrent.futures import ProcessPoolExecutor

                    context = multiprocessing.get_context("spawn")
                    with ProcessPoolExecutor(1, mp_context=context) as pool:
                        chain = pool.submit(check_file, str(self.path), last)
                        tables, report = self._fold_projections(targets, None)
                        report.problems[:0] = chain.result()
                else:
                    check = ChainCheck()
                    tables, report = self._fold_projections(targets, check)
                    report.problems[:0] = check.problems
                self._fill(targets, tables)
                self._compare(targets, tables, report)
            if apply:
                self._apply_replay(targets)
                report.applied = True
        finally:
            self.conn.execute("DETACH DATABASE replay")
        return report

    def _fold_projections(self, targets: Sequence[Projection],
                          chain: ChainCheck | None) -> tuple[dict[str, dict[tuple, Row]], ReplayReport]:
        """The rows of `targets` folded from the whole log in memory, and what was found on the
        way (fed to `chain` too, when given)."""
        by_tag: dict[str, list[Projection]] = {}
        for p in targets:
            for tag in p.handles:
                by_tag.setdefault(tag, []).append(p)
        tables: dict[str, dict[tuple, Row]] = {p.name: {} for p in targets}
        report = ReplayReport()
        problems = report.problems
        decode = self.registry.decode
        feed = chain.feed if chain is not None else None
        for row in self.conn.execute(f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY seq"):
            if feed is not None:
                feed(*row)
            seq, stream, version, tag, sv, at, data, _prev, digest = row
            report.events += 1
            try:
                event = decode(tag, sv, data)
            except UndecodableEvent as e:
                problems.append(f"seq {seq}: undecodable payload: {e}")
                continue
            interested = by_tag.get(tag)
            if not interested:
                continue
            rec = Recorded(seq, stream, version, tag, sv, at, event, digest)
            for p in interested:
                key = p.key(rec)
                if key is None:
                    continue
                rows = tables[p.name]
                try:
                    new = p.fold(rows.get(key), rec)
                except ProjectionError as e:
                    problems.append(f"seq {seq} ({stream}): {e}")
                    continue
                except Exception as e:  # a damaged log must be reported, never crash verify
                    problems.append(f"seq {seq} ({stream}): projection {p.name} cannot apply "
                                    f"{tag}: {type(e).__name__}: {e}")
                    continue
                if new is not None:
                    rows[key] = new
        return tables, report

    def _fill(self, targets: Sequence[Projection], tables: dict[str, dict[tuple, Row]], schema: str = "replay") -> None:
        """Write the folded rows into fresh tables of `schema` (the attached `replay` database, or
        a reader's `temp`)."""
        for p in targets:
            self.conn.execute(p.create_sql(schema))
            self.conn.executemany(p.upsert_sql(schema), (p.as_tuple(r) for r in tables[p.name].values()))

    def _compare(self, targets: Sequence[Projection], tables: dict[str, dict[tuple, Row]],
                 report: ReplayReport) -> None:
        for p in targets:
            report.rows[p.name] = len(tables[p.name])
            cols = ", ".join(p.column_names)
            live = "temp" if p.name in self.rebuilt_in_memory else "main"  # the live table this connection reads
            missing = self.conn.execute(
                f"SELECT count(*) FROM (SELECT {cols} FROM replay.{p.name} EXCEPT SELECT {cols} FROM {live}.{p.name})"
            ).fetchone()[0]
            extra = self.conn.execute(
                f"SELECT count(*) FROM (SELECT {cols} FROM {live}.{p.name} EXCEPT SELECT {cols} FROM replay.{p.name})"
            ).fetchone()[0]
            if missing or extra:
                keys = ", ".join(p.column_names[: p.key_len])
                sample = [
                    r[0] if len(r) == 1 else r
                    for a, b in ((live, "replay"), ("replay", live))
                    for r in self.conn.execute(
                        f"SELECT {keys} FROM (SELECT {cols} FROM {a}.{p.name} "
                        f"EXCEPT SELECT {cols} FROM {b}.{p.name}) LIMIT 3"
                    )
                ]
                report.differences[p.name] = max(missing, extra)
                report.problems.append(
                    f"projection {p.name} differs from the log: {missing} row(s) missing or stale, "
                    f"{extra} row(s) not explained by the log "
                    f"(keys: {', '.join(repr(k) for k in dict.fromkeys(sample))})"
                )

    def _apply_replay(self, targets: Sequence[Projection]) -> None:
        self._rows.clear()
        with self._transaction():
            for p in targets:
                self.conn.execute(f"DELETE FROM main.{p.name}")
                self.conn.execute(f"INSERT INTO main.{p.name} SELECT * FROM replay.{p.name}")
