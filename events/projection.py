"""Projections: tables derived from the log by folding events, one row per key.

A projection is defined once, as data plus a pure `fold`, and used two ways:
- live: inside the append transaction, the current row is read, folded, and written back;
- replay: rows are folded in memory from the first event and bulk-written into fresh tables.
Because both paths call the same `fold`, a difference between them can only come from the
log and the stored tables disagreeing, which is exactly what `verify()` reports.

`fold` must be deterministic: it may look only at the previous row, the envelope
(`Recorded`) and the event. It returns a new dict and never mutates the row it is given
(the writer caches rows). It raises `ProjectionError` for an event it cannot accept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from events.store import Recorded

Row = dict[str, Any]


@dataclass(frozen=True)
class Projection:
    """A derived table.

    name:     table name (also the key of `projection_versions`).
    columns:  ordered (name, SQL type) pairs; the first `key_len` form the primary key.
    handles:  event tags this projection reacts to; others never reach `fold`.
    key:      maps an envelope to the row key (a tuple), or None to ignore the event.
    fold:     (previous row or None, envelope) -> new row, or None to leave the row as it is.
    version:  bump when the fold changes. A stored table of another version, or with other
              columns, is rebuilt from the log when the store opens for writing.
    fresh:    tags whose fold starts a new row without reading the previous one (the writer
              then skips the lookup).
    A row is a dict holding every column.
    """

    name: str
    columns: tuple[tuple[str, str], ...]
    key_len: int
    handles: frozenset[str]
    key: Callable[["Recorded"], tuple | None]
    fold: Callable[[Row | None, "Recorded"], Row | None]
    version: int = 1
    fresh: frozenset[str] = frozenset()
    column_names: tuple[str, ...] = field(init=False)
    as_tuple: Callable[[Row], tuple] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.columns) < 2:
            raise ValueError(f"projection {self.name} needs at least two columns")
        object.__setattr__(self, "column_names", tuple(c for c, _ in self.columns))
        object.__setattr__(self, "as_tuple", itemgetter(*self.column_names))

    def create_sql(self, schema: str | None = None) -> str:
        """The CREATE TABLE statement (without a schema: exactly what sqlite_schema stores)."""
        cols = ", ".join(f"{c} {t}" for c, t in self.columns)
        pk = ", ".join(self.column_names[: self.key_len])
        table = f"{schema}.{self.name}" if schema else self.name
        return f"CREATE TABLE {table} ({cols}, PRIMARY KEY ({pk})) WITHOUT ROWID"

    def select_sql(self, schema: str) -> str:
        where = " AND ".join(f"{c} = ?" for c in self.column_names[: self.key_len])
        return f"SELECT {', '.join(self.column_names)} FROM {schema}.{self.name} WHERE {where}"

    def upsert_sql(self, schema: str) -> str:
        marks = ", ".join("?" for _ in self.column_names)
        return f"INSERT OR REPLACE INTO {schema}.{self.name} ({', '.join(self.column_names)}) VALUES ({marks})"
