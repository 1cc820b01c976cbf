"""Where a marketplace's state lives, and opening its log with overnight's types and projections."""

from __future__ import annotations

from pathlib import Path

from events import EventStore
from events.store import Clock, utc_now
from statemachine.catalog import REGISTRY
from statemachine.errors import NotAMarketplace
from statemachine.projections import PROJECTIONS, VIEWS

STATE_DIR = ".overnight"
DB_NAME = "overnight.db"


def marketplace_root(path: Path | str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise NotAMarketplace(f"{root} is not a directory")
    return root.resolve()


def default_db(root: Path) -> Path:
    return root / STATE_DIR / DB_NAME


def open_log(root: Path, db: Path | None = None, *, writer: bool = True, clock: Clock = utc_now,
             synchronous: str = "FULL") -> EventStore:
    """The event log of the marketplace at `root` (`db` overrides the default location)."""
    return EventStore.open(db or default_db(root), registry=REGISTRY, projections=PROJECTIONS,
                           views=VIEWS, writer=writer, clock=clock, synchronous=synchronous)
