"""Shipping the log to a remote libSQL database, reading it back, and checking what is there.

Remote tables (created if missing, after checking that those already there are ours):
- `events`: the local rows as they are (same columns, seq the primary key);
- `blob_chunks(hash, idx, data)`: content-addressed bytes in chunks of at most `CHUNK`;
- `blobs(hash, size, chunks)`: the index row of a blob, written after all its chunks;
- `log_blobs(hash)`: which blobs belong to the log (others are, for example, tree files),
  written after the blob's index row.

What must always hold on the remote, even after a crash at any instant:
- nothing is created or written in a database one of whose tables named like ours
  (`SCHEMA`, and the layer above's extra tables) has other columns than ours: it is not a
  backup (another SQLite file, or a live event log), and it is refused as it is;
- a `blobs` row implies all its chunks are present; a `log_blobs` row implies its `blobs` row;
- remote events are a prefix of the local log (seq 1..M, same hashes) whose hash chain holds:
  the remote head is checked against the local log before anything is shipped (another log,
  a diverged one, or a local log that lost its newest events is refused), and no event is
  shipped past the first one that breaks the chain continuing from the remote head;
- every write is `INSERT OR IGNORE` of content-addressed or seq-keyed rows, so a retried or
  repeated shipment changes nothing, and an interrupted one continues where it stopped. The
  one exception is repairing a damaged blob (`Writer.put_blob(..., repair=True)`): its index
  row is deleted first, then its chunks, then both are written again, so every prefix of
  the repair keeps the rule above and a retried repair ends in the same state.

This module knows nothing of plugins; snapshots of trees are the layer above's business.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import apsw

from events.chain import EVENT_COLUMNS, GENESIS, ChainCheck
from events.errors import EventStoreError
from events.remote import Remote, RemoteError, Statement
from events.store import EventStore

CHUNK = 512 * 1024
# A write batch carries at most this many raw bytes (base64 in JSON makes it ~4/3 larger) and
# at most BATCH_STATEMENTS statements, so each request stays under about 4 MB.
BATCH_BYTES = 2_500_000
BATCH_STATEMENTS = 500
# Reads: rows per page and raw bytes per read batch (sqld caps a response at 10 MB).
PAGE = 1000
READ_BYTES = 4_000_000
IN_LIST = 200

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, stream TEXT NOT NULL, "
    "version INTEGER NOT NULL, type TEXT NOT NULL, schema_version INTEGER NOT NULL, "
    "at TEXT NOT NULL, data TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS blob_chunks (hash TEXT NOT NULL, idx INTEGER NOT NULL, "
    "data BLOB NOT NULL, PRIMARY KEY (hash, idx)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS blobs (hash TEXT PRIMARY KEY, size INTEGER NOT NULL, "
    "chunks INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS log_blobs (hash TEXT PRIMARY KEY) WITHOUT ROWID",
)


def _name(remote: Remote) -> str:
    return getattr(remote, "url", "the remote")


def _columns(conn: Any, tables: Sequence[str]) -> dict[str, list[str]]:
    """Table -> its column names in order, for each of `tables` that `conn` has (a `Remote`, or
    an apsw connection: both have `execute`); one query, so one round trip to a remote."""
    found: dict[str, list[str]] = {}
    for table, column in conn.execute(
            "SELECT lower(m.name), p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p "
            f"WHERE m.type = 'table' AND lower(m.name) IN ({', '.join('?' * len(tables))}) "
            "ORDER BY m.name, p.cid", tuple(tables)):
        found.setdefault(table, []).append(column)
    return found


def ensure_schema(remote: Remote, extra: Sequence[str] = ()) -> None:
    """Create our tables on `remote`; first refuse it, writing nothing, if it is not an
    overnight backup (see `check_schema`)."""
    check_schema(remote, extra)
    remote.batch([(sql, ()) for sql in (*SCHEMA, *extra)])


def check_schema(remote: Remote, extra: Sequence[str] = ()) -> None:
    """Refuse `remote` if a table of ours is there with other columns: the database is not an
    overnight backup (a live event log, say). Reading commands say so too, rather than that
    no backup was made yet.

    Our columns are read back from the same statements run in an in-memory SQLite, so they
    cannot drift from `SCHEMA` and `extra`.
    """
    statements = (*SCHEMA, *extra)
    ours = apsw.Connection(":memory:")
    try:
        for sql in statements:
            ours.execute(sql)
        tables = [row[0] for row in ours.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                                 "ORDER BY rowid")]
        expected = _columns(ours, tables)
    finally:
        ours.close()
    theirs = _columns(remote, tables)
    for table in tables:
        if table in theirs and theirs[table] != expected[table]:
            raise RemoteError(f"{_name(remote)} is not an overnight backup (its table {table} has columns "
                              f"{', '.join(theirs[table])})")


@dataclass
class Shipment:
    """Counters of one shipment: what was written and how much."""

    events: int = 0
    blobs: int = 0
    bytes: int = 0
    rows: int = 0
    batches: int = 0


class Writer:
    """Groups write statements into batches under the size limits, in the order given.

    Order is kept across batches, so a statement added after another is committed no earlier
    than it: that is how chunks precede their index row and a snapshot comes last.
    """

    def __init__(self, remote: Remote, shipment: Shipment | None = None) -> None:
        self.remote = remote
        self.shipment = shipment or Shipment()
        self._pending: list[Statement] = []
        self._size = 0

    def add(self, sql: str, params: Sequence[Any]) -> None:
        size = len(sql) + sum(len(p) if isinstance(p, (bytes, str)) else 8 for p in params)
        if self._pending and (self._size + size > BATCH_BYTES or len(self._pending) >= BATCH_STATEMENTS):
            self.flush()
        self._pending.append((sql, tuple(params)))
        self._size += size
        self.shipment.bytes += size
        self.shipment.rows += 1

    def flush(self) -> None:
        if self._pending:
            self.remote.batch(self._pending)
            self.shipment.batches += 1
            self._pending, self._size = [], 0

    def put_blob(self, digest: str, data: bytes, *, repair: bool = False) -> None:
        """Chunks first, then the index row; the chunks of a big blob already stored whole are
        not sent again. `repair` (a damaged blob): first delete its index row, then every chunk
        stored under its hash, so only the chunks written here remain."""
        count = max(1, -(-len(data) // CHUNK))
        stored: set[int] = set()
        if count > 1 and not repair:
            # a backup cut short may have shipped some chunks of a big file: those are not sent again
            sizes = dict(self.remote.execute("SELECT idx, length(data) FROM blob_chunks WHERE hash = ?", (digest,)))
            stored = {idx for idx, size in sizes.items() if size == len(data[idx * CHUNK:(idx + 1) * CHUNK])}
            repair = len(stored) != len(sizes)  # a chunk of another size: all of them again
        if repair:
            stored = set()
            self.add("DELETE FROM blobs WHERE hash = ?", (digest,))
            self.add("DELETE FROM blob_chunks WHERE hash = ?", (digest,))
        for idx in range(count):
            if idx in stored:
                continue
            self.add("INSERT OR IGNORE INTO blob_chunks (hash, idx, data) VALUES (?, ?, ?)",
                     (digest, idx, data[idx * CHUNK:(idx + 1) * CHUNK]))
        self.add("INSERT OR IGNORE INTO blobs (hash, size, chunks) VALUES (?, ?, ?)",
                 (digest, len(data), count))
        self.shipment.blobs += 1


def _in_lists(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), IN_LIST):
        yield items[start:start + IN_LIST]


def present(remote: Remote, table: str, hashes: Iterable[str]) -> set[str]:
    """The subset of `hashes` that has a row in `table` (`blobs` or `log_blobs`)."""
    wanted = sorted(set(hashes))
    statements = [(f"SELECT hash FROM {table} WHERE hash IN ({', '.join('?' * len(part))})", part)
                  for part in _in_lists(wanted)]
    found: set[str] = set()
    for start in range(0, len(statements), 50):
        for rows in remote.batch(statements[start:start + 50]):
            found.update(r[0] for r in rows)
    return found


def remote_head(remote: Remote) -> tuple[int, str | None]:
    rows = remote.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
    return (rows[0][0], rows[0][1]) if rows else (0, None)


def ship_blobs(store: EventStore, writer: Writer, skip: set[str]) -> None:
    """Every local blob the remote log does not have yet (content shared with trees is reused),
    but those in `skip` (damaged here: never shipped, nor marked shipped)."""
    local = [r[0] for r in store.query("SELECT hash FROM blobs ORDER BY hash") if r[0] not in skip]
    shipped = present(writer.remote, "log_blobs", local)
    todo = [h for h in local if h not in shipped]
    stored = present(writer.remote, "blobs", todo)
    for digest in todo:
        if digest not in stored:
            writer.put_blob(digest, store.get_blob(digest))
        writer.add("INSERT OR IGNORE INTO log_blobs (hash) VALUES (?)", (digest,))
    writer.flush()


def check_head(store: EventStore, remote: Remote, upto: int) -> tuple[int, str]:
    """The remote head (seq, hash; (0, GENESIS) when empty), once it is known to be this log's
    event at that seq and not past `upto`: call it before shipping anything."""
    seq, digest = remote_head(remote)
    if seq > upto:
        raise RemoteError(f"{_name(remote)} holds {seq} events but this log only {upto}: this log has lost "
                          f"its newest events, or it was restored from an older snapshot there (back it up to "
                          "another URL), or the remote belongs to another log")
    if seq:
        local = store.query("SELECT hash FROM events WHERE seq = ?", (seq,))
        if not local or local[0][0] != digest:
            raise RemoteError(f"{_name(remote)}: its event {seq} differs from this log's: the remote belongs to "
                              "another log, or this log was restored from an older snapshot there and went on "
                              "(back it up to another URL)")
    return seq, digest or GENESIS


def refill_events(store: EventStore, writer: Writer, upto: int) -> int:
    """Ship again, from this log, the events up to seq `upto` (the remote head) that the remote
    lacks (deleted there: its seqs have gaps); how many. Each is checked against this log's
    hash chain first."""
    (count,) = writer.remote.execute("SELECT count(*) FROM events WHERE seq <= ?", (upto,))[0]
    if count == upto:
        return 0
    gaps = writer.remote.execute(
        "SELECT seq + 1, next - 1 FROM (SELECT seq, lead(seq, 1, ?) OVER (ORDER BY seq) AS next FROM "
        "(SELECT 0 AS seq UNION ALL SELECT seq FROM events WHERE seq <= ?)) WHERE next > seq + 1",
        (upto + 1, upto))
    sent = 0
    for first, last in gaps:
        before = store.query("SELECT hash FROM events WHERE seq = ?", (first - 1,))
        sent += _ship_range(store, writer, (first - 1, before[0][0] if before else GENESIS), last,
                            "the remote lacks that event and it cannot be shipped again")
    return sent


def ship_events(store: EventStore, writer: Writer, head: tuple[int, str], upto: int) -> None:
    """Events after `head` (from `check_head`) up to `upto`, checking their hash chain from
    `head` on: at the first broken event, ship those before it and fail."""
    writer.shipment.events += _ship_range(store, writer, head, upto, "nothing after seq {seq} was shipped")


def _ship_range(store: EventStore, writer: Writer, after: tuple[int, str], upto: int, lost: str) -> int:
    """Ship this log's events after `after` (seq, hash) up to seq `upto`, checking their hash
    chain from `after` on; how many. At the first broken event, ship those before it and fail,
    saying `lost` (where `{seq}` is the last event shipped)."""
    shipped = after[0]
    check = ChainCheck()
    check.expected_seq, check.last_hash = shipped + 1, after[1]
    for row in store.conn.execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? AND seq <= ? "
                                  "ORDER BY seq", (shipped, upto)):
        check.feed(*row)
        if check.problems:
            writer.flush()
            raise EventStoreError(f"this log fails its hash chain at {check.problems[0]}; "
                                  f"{lost.format(seq=shipped)} (run `overnight audit verify`)")
        shipped = row[0]
        # Only onto its own previous event: another copy of this log backing up here at the same
        # time may have put its own events below, and the remote's chain must never break.
        writer.add(f"INSERT OR IGNORE INTO events ({EVENT_COLUMNS}) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? "
                   "WHERE ? = 1 OR EXISTS (SELECT 1 FROM events WHERE seq = ? AND hash = ?)",
                   (*row, row[0], row[0] - 1, row[7]))
    writer.flush()
    return shipped - after[0]


def read_events(remote: Remote, upto: int | None = None) -> Iterator[tuple]:
    """Remote event rows in seq order (pages of `PAGE`), up to seq `upto` if given."""
    after = 0
    limit = upto if upto is not None else 2**62
    while True:
        rows = remote.execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > ? AND seq <= ? "
                              f"ORDER BY seq LIMIT {PAGE}", (after, limit))
        yield from rows
        if len(rows) < PAGE:
            return
        after = rows[-1][0]


def fetch_blobs(remote: Remote, hashes: Iterable[str]) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(hash, bytes, problem) for each hash: bytes None with a problem when missing or corrupt.

    One chunk per statement, read in batches of at most `READ_BYTES`; every blob is re-hashed.
    """
    wanted = sorted(set(hashes))
    index: dict[str, tuple[int, int]] = {}
    for part in _in_lists(wanted):
        for digest, size, chunks in remote.execute(
                f"SELECT hash, size, chunks FROM blobs WHERE hash IN ({', '.join('?' * len(part))})", part):
            index[digest] = (size, chunks)
    for digest in wanted:
        if digest not in index:
            yield digest, None, f"blob {digest} is missing from the remote"
    keys = [(d, i) for d in wanted if d in index for i in range(index[d][1])]
    parts: dict[str, list[bytes | None]] = {}
    start = 0
    while start < len(keys):
        end, budget = start, 0
        while end < len(keys) and end - start < BATCH_STATEMENTS:
            digest, idx = keys[end]
            size = min(CHUNK, index[digest][0] - idx * CHUNK)
            if end > start and budget + size > READ_BYTES:
                break
            budget += size
            end += 1
        batch = keys[start:end]
        results = remote.batch([("SELECT data FROM blob_chunks WHERE hash = ? AND idx = ?", key)
                                for key in batch])
        for (digest, idx), rows in zip(batch, results):
            chunks = parts.setdefault(digest, [])
            chunks.append(bytes(rows[0][0]) if rows else None)
            if len(chunks) == index[digest][1]:
                yield _assemble(digest, index[digest][0], parts.pop(digest))
        start = end


def _assemble(digest: str, size: int, chunks: list[bytes | None]) -> tuple[str, bytes | None, str | None]:
    if any(c is None for c in chunks):
        return digest, None, f"blob {digest} is missing chunks on the remote"
    data = b"".join(chunks)  # type: ignore[arg-type]
    if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
        return digest, None, f"blob {digest} is corrupt on the remote (its bytes do not match its hash)"
    return digest, data, None


def damaged_blobs(remote: Remote) -> list[tuple[str, str]]:
    """(hash, problem) of each structurally damaged blob: an index row without all its chunks
    or with the wrong total size, or a `log_blobs` row without its index row."""
    damaged = [(h, f"blob {h} is incomplete on the remote ({n} of {c} chunks, {s} bytes of {size})")
               for h, size, c, n, s in remote.execute(
                   "SELECT b.hash, b.size, b.chunks, count(c.idx), coalesce(sum(length(c.data)), 0) "
                   "FROM blobs b LEFT JOIN blob_chunks c ON c.hash = b.hash GROUP BY b.hash "
                   "HAVING count(c.idx) != b.chunks OR coalesce(sum(length(c.data)), 0) != b.size")]
    damaged += [(h, f"log blob {h} is missing from the remote") for (h,) in remote.execute(
        "SELECT l.hash FROM log_blobs l LEFT JOIN blobs b ON b.hash = l.hash WHERE b.hash IS NULL")]
    return damaged


def verify_blobs(remote: Remote, read_share: float,
                 rng: random.Random | None = None) -> tuple[int, list[tuple[str, str]]]:
    """(blobs re-hashed, (hash, problem) pairs): structure of every blob (`damaged_blobs`),
    then the data of a share of them: `read_share` (0..1) of the blobs, read and re-hashed.
    """
    problems = damaged_blobs(remote)
    if read_share <= 0:
        return 0, problems
    hashes = [r[0] for r in remote.execute("SELECT hash FROM blobs")]
    rng = rng or random.Random()
    sample = hashes if read_share >= 1 else rng.sample(hashes, max(1, round(len(hashes) * read_share))
                                                       if hashes else 0)
    told = {digest for digest, _problem in problems}  # its structure said it: not once more
    for digest, _data, problem in fetch_blobs(remote, sample):
        if problem and digest not in told:
            problems.append((digest, problem))
    return len(sample), problems
