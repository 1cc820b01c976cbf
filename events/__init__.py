"""An append-only, hash-chained event log on SQLite (apsw).

This package knows nothing about plugins or Gemini: the layer above registers its event
types (a `Registry`) and its projections (`Projection`), and this package stores, chains,
projects, verifies and replays them.
"""

from events.errors import (
    EventStoreError,
    ProjectionError,
    StoreLocked,
    StreamConflict,
    UndecodableEvent,
)
from events.projection import Projection
from events.registry import Event, Registry
from events.store import EventStore, Recorded, ReplayReport

__all__ = [
    "Event",
    "EventStore",
    "EventStoreError",
    "Projection",
    "ProjectionError",
    "Recorded",
    "Registry",
    "ReplayReport",
    "StoreLocked",
    "StreamConflict",
    "UndecodableEvent",
]
