"""Which marketplace a log serves: a log kept outside its marketplace (--db, OVERNIGHT_DB)
must not be used with another one, whose scan would make every plugin of the first vanish
from it. Every command that changes the log or the marketplace checks it first."""

from __future__ import annotations

import shlex
from pathlib import Path

from events import EventStore
from statemachine import catalog as c
from statemachine.errors import OvernightError

BINDING_STREAM = "marketplace"


class LogOfAnotherMarketplace(OvernightError):
    pass


def bind(store: EventStore, root: Path, *, rebind: bool = False) -> str | None:
    """Make sure the log serves the marketplace at `root`, recording it when the log is new to
    it. A log kept outside the marketplace (--db, OVERNIGHT_DB) that serves another one, which
    still exists, is refused unless `rebind`: its plugins would all vanish, their states lost.
    A log inside the marketplace moved with it (a restore, a move, a copy). Returns a warning
    when a log kept outside follows its marketplace to a new place."""
    here = str(root.resolve())
    bound = bound_root(store)
    if bound == here:
        return None
    theirs = _theirs(store, here, bound)
    if theirs and not rebind and Path(bound).is_dir():
        raise LogOfAnotherMarketplace(
            f"{store.path} is the event log of the marketplace at {bound}, not of {here}: give this "
            f"marketplace's own log with --db (or unset OVERNIGHT_DB); to make this log serve {here} from "
            f"now on, `overnight scan {shlex.quote(here)} --db {shlex.quote(str(store.path.absolute()))} --rebind`")
    store.append(BINDING_STREAM, c.MarketplaceBound(root=here))
    if not theirs:
        return None
    return f"the event log {store.path} served the marketplace at {bound}; it serves {here} from now on"


def serves_another(store: EventStore, root: Path) -> str | None:
    """The other marketplace, still there, that the log serves, which a scan of `root` would
    refuse (for a reader that must not record anything); or None."""
    here, bound = str(root.resolve()), bound_root(store)
    if bound is None or bound == here or not _theirs(store, here, bound) or not Path(bound).is_dir():
        return None
    return bound


def _theirs(store: EventStore, here: str, bound: str | None) -> bool:
    """Whether the log is the marketplace `bound`'s rather than `here`'s: a log outside `here`,
    or inside the marketplace it served (one nested in `here`). A log inside `here` only moved
    with it (a restore, a move, a copy)."""
    log = store.path.resolve()
    return bound is not None and (not log.is_relative_to(here) or log.is_relative_to(bound))


def bound_root(store: EventStore) -> str | None:
    """The marketplace the log serves (resolved), or None before its first scan."""
    found = store.query("SELECT json_extract(data, '$.root') FROM events WHERE stream = ? "
                        "ORDER BY version DESC LIMIT 1", (BINDING_STREAM,))
    return found[0][0] if found else None
