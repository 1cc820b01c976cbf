"""Thread-safe access to the log for a run: every append, read and blob goes through one lock.

Workers drive different plugins at once, but SQLite has one writer connection and the
transitions Machine is shared, so appends are serialized here. An append takes well under a
millisecond next to a Gemini call of seconds, so the lock is never the bottleneck.
"""

from __future__ import annotations

import threading
from typing import IO, Any, Iterable

import msgspec

from events import Event, EventStore, Recorded
from statemachine.lifecycle import Lifecycle, PluginCursor


class JournalClosed(Exception):
    """The run stopped and closed the log; a worker finishing late records nothing."""


class Journal:
    def __init__(self, store: EventStore, json_log: IO[str] | None = None) -> None:
        self.closed = False
        self.store = store
        self.lifecycle = Lifecycle(store)
        self.lock = threading.RLock()
        self._json_log = json_log
        self._encoder = msgspec.json.Encoder()

    def close(self) -> None:
        """Close the store; later calls raise JournalClosed (call with the lock held or not)."""
        with self.lock:
            self.closed = True
            self.store.close()

    def _open(self) -> None:
        if self.closed:
            raise JournalClosed()

    def _writable(self) -> None:
        self._open()
        self.store.check_present()

    def cursor(self, plugin_id: str) -> PluginCursor:
        with self.lock:
            self._open()
            return self.lifecycle.cursor(plugin_id)

    def release(self, cursor: PluginCursor) -> None:
        with self.lock:
            if not self.closed:
                self.lifecycle.release(cursor)

    def record(self, cursor: PluginCursor, event: Event, blobs: Iterable[bytes] = ()) -> None:
        """Fire the plugin transition `event` belongs to (appended before the state moves)."""
        with self.lock:
            self._writable()
            before = self.store.last_seq
            self.lifecycle.record(cursor, event, blobs)
            self._log(before)

    def append(self, stream: str, event: Event, blobs: Iterable[bytes] = ()) -> None:
        with self.lock:
            self._writable()
            before = self.store.last_seq
            self.store.append(stream, event, blobs=blobs)
            self._log(before)

    def echo(self, after: int) -> None:
        """Write to the JSON log the events recorded past seq `after` without the journal (the
        run's own scan)."""
        with self.lock:
            self._open()
            self._log(after)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.lock:
            self._open()
            return self.store.query(sql, params)

    def blob(self, digest: str) -> bytes:
        with self.lock:
            self._open()
            return self.store.get_blob(digest)

    def _log(self, before: int) -> None:
        if self._json_log is None:
            return
        for rec in self.store.read(after=before):
            self._json_log.write(self._line(rec))
        self._json_log.flush()

    def _line(self, rec: Recorded) -> str:
        entry: dict[str, Any] = {"seq": rec.seq, "at": rec.at, "stream": rec.stream, "type": rec.type,
                                 "data": rec.event}
        return self._encoder.encode(entry).decode("utf-8") + "\n"
