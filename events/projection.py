"""Projections: tables derived from the log by folding events, one row per key.

A projection is defined once, as data plus a pure `fold`, and used two ways:
- live: inside the append transaction, the current row is read, folded, and written back;
- replay: rows are folded in memory from the first event and bulk-written into fresh tables.
Because both paths call the same `fold`, a difference between them can only come from the
log and the stored tables disagreeing, which is exactly what `verify()` reports.

`fold` must be deterministic: it may look only at the previous row, the envelope
(`Recorded`) and the event. It raises `ProjectionError` for an event it cannot accept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    version:  bump when columns or fold change; a stored projection of another version is
              rebuilt from the log when the store opens for writing.
    indexes:  extra index column lists.
    """

    name: str
    columns: tuple[tuple[str, str], ...]
    key_len: int
    handles: frozenset[str]
    key: Callable[["Recorded"], tuple | None]
    fold: Callable[[Row | None, "Recorded"], Row | None]
    version: int = 1
    indexes: tuple[tuple[str, ...], ...] = ()
    column_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "column_names", tuple(c for c, _ in self.columns))

    def ddl(self, schema: str) -> list[str]:
        cols = ", ".join(f"{c} {t}" for c, t in self.columns)
        pk = ", ".join(self.column_names[: self.key_len])
        statements = [f"CREATE TABLE {schema}.{self.name} ({cols}, PRIMARY KEY ({pk})) WITHOUT ROWID"]
        for i, index_cols in enumerate(self.indexes):
            statements.append(
                f"CREATE INDEX {schema}.{self.name}_ix{i} ON {self.name} ({', '.join(index_cols)})"
            )
        return statements

    def select_sql(self, schema: str) -> str:
        where = " AND ".join(f"{c} = ?" for c in self.column_names[: self.key_len])
        return f"SELECT {', '.join(self.column_names)} FROM {schema}.{self.name} WHERE {where}"

    def upsert_sql(self, schema: str) -> str:
        marks = ", ".join("?" for _ in self.column_names)
        return f"INSERT OR REPLACE INTO {schema}.{self.name} ({', '.join(self.column_names)}) VALUES ({marks})"

    def as_tuple(self, row: Row) -> tuple:
        return tuple(row.get(c) for c in self.column_names)
