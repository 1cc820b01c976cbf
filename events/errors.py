"""The error tree of the event store. apsw errors are translated into it in store.py only."""


class EventStoreError(Exception):
    """Root of every error this package raises."""


class StoreLocked(EventStoreError):
    """Another process holds the single-writer lock of this log."""


class StreamConflict(EventStoreError):
    """An append expected a stream version that is no longer current."""


class UndecodableEvent(EventStoreError):
    """A stored payload cannot be decoded into its registered type."""


class ProjectionError(EventStoreError):
    """A projection refuses an event (for example an illegal state transition)."""
