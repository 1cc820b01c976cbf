"""Numbered, append-only schema migrations of the core tables (events, blobs).

Each migration runs in its own transaction and bumps `PRAGMA user_version`. Never edit or
reorder a released migration: add a new one. Projection tables are not migrated: they are
derived, so a changed projection is rebuilt from the log (see store.EventStore).
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


MIGRATIONS: list[Callable[[apsw.Connection], None]] = [_1_core]
LATEST = len(MIGRATIONS)


def migrate(conn: apsw.Connection, fresh: Callable[[apsw.Connection], None] | None = None) -> None:
    """Apply the migrations the log lacks, each in a transaction of its own. `fresh` runs in the
    last one when the log is new (it creates the derived tables): a log is never found
    migrated but without them, as a process killed between the two transactions left it."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    for number in range(current + 1, LATEST + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[number - 1](conn)
            if fresh is not None and current == 0 and number == LATEST:
                fresh(conn)
            conn.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
