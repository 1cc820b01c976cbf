"""Numbered, append-only schema migrations of the core tables (events, blobs).

Each migration runs in its own transaction and bumps `PRAGMA user_version`. Never edit or
reorder a released migration: add a new one. Projection tables are not migrated: they are
derived, so a changed projection is rebuilt from the log (see store.EventStore). Only a writer
migrates: a reader reads a log of any older schema version as it is, so a migration must leave
what a reader needs where it was.

A log migrated past what a version of the program knows is refused by that version (its
`user_version` is higher): an older overnight never writes into a newer one's log.
"""

from __future__ import annotations

from typing import Callable

import apsw


def _1_core(conn: apsw.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE events (
            seq            INTEGER PRIMARY KEY,
            stream         TEXT    NOT NULL,
            version        INTEGER NOT NULL,
            type           TEXT    NOT NULL,
            schema_version INTEGER NOT NULL,
            at             TEXT    NOT NULL,
            data           TEXT    NOT NULL CHECK (json_valid(data)),
            prev_hash      TEXT    NOT NULL,
            hash           TEXT    NOT NULL,
            UNIQUE (stream, version)
        );
        CREATE TRIGGER events_no_update BEFORE UPDATE ON events
            BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
        CREATE TRIGGER events_no_delete BEFORE DELETE ON events
            BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END;
        CREATE TABLE blobs (
            hash TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            data BLOB NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE projection_versions (
            name    TEXT PRIMARY KEY,
            version INTEGER NOT NULL
        );
        CREATE VIEW audit_trail AS
            SELECT seq, at, stream, type, data FROM events ORDER BY seq;
        """
    )


def _2_event_types(conn: apsw.Connection) -> None:
    """Every event type the log holds, kept by a trigger on each insert (an append, a restore):
    a program that meets a type it does not know refuses the log, written by a newer version,
    rather than read it wrong or write into it."""
    conn.execute(
        """
        CREATE TABLE event_types (type TEXT PRIMARY KEY) WITHOUT ROWID;
        INSERT INTO event_types (type) SELECT DISTINCT type FROM events;
        CREATE TRIGGER events_record_type AFTER INSERT ON events
            BEGIN INSERT OR IGNORE INTO event_types (type) VALUES (new.type); END;
        """
    )


MIGRATIONS: list[Callable[[apsw.Connection], None]] = [_1_core, _2_event_types]
EVENT_TYPES_SINCE = 2  # the schema version from which a log keeps `event_types`
LATEST = len(MIGRATIONS)


def migrate(conn: apsw.Connection, fresh: Callable[[apsw.Connection], None] | None = None) -> None:
    """Apply the migrations the log lacks, each in a transaction of its own; a new log gets
    them all in one, with `fresh` (it creates the derived tables): a log is never found half
    made, or migrated but without them, as a process killed between two transactions left it."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    numbers = list(range(current + 1, LATEST + 1))
    if not numbers:
        return
    for group in [numbers] if current == 0 else [[n] for n in numbers]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for number in group:
                MIGRATIONS[number - 1](conn)
            if fresh is not None and current == 0:
                fresh(conn)
            conn.execute(f"PRAGMA user_version = {group[-1]}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
