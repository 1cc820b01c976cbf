"""`overnight status`: the plugin-state projection, counted and filtered."""

from __future__ import annotations

from dataclasses import dataclass, field

from events import EventStore
from events.lock import WriterLock
from statemachine.errors import UnknownPlugin
from statemachine.lifecycle import State

_ROW = ("plugin_id", "name", "category", "state", "step", "reason", "not_before", "updated_at")


@dataclass
class StatusReport:
    plugins: int
    by_state: dict[str, int]
    events: int
    last_run: dict | None
    items: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"plugins": self.plugins, "by_state": self.by_state, "events": self.events,
                "last_run": self.last_run, "items": self.items}


def live_status(store: EventStore, recorded: str) -> str:
    """A run's recorded status, except that a run recorded as running while no process holds
    the log is `stopped` (it crashed, or stopped on an error; `overnight resume` continues it)."""
    return "stopped" if recorded == "running" and not WriterLock(store.path).held() else recorded


def status(store: EventStore, *, plugin: str | None = None, state: str | None = None,
           attention_limit: int = 20) -> StatusReport:
    """Counts by state; `items` are the plugins matching the filters, or, with no filter,
    the plugins that need a person's attention (invalid, failed, rejected)."""
    if state is not None and state not in {s.value for s in State}:
        raise UnknownPlugin(f"unknown state {state!r}; states are: {', '.join(s.value for s in State)}")
    by_state = dict(store.query("SELECT state, count(*) FROM plugins GROUP BY state ORDER BY state"))
    run = store.query(
        "SELECT run_id, command, status, started_at, ended_at, paused_until, plugins, requests, "
        "done, skipped, rejected, failed FROM run_summary ORDER BY started_at DESC LIMIT 1"
    )
    last_run = dict(zip(("run_id", "command", "status", "started_at", "ended_at", "paused_until",
                         "plugins", "requests", "done", "skipped", "rejected", "failed"), run[0])) if run else None
    if last_run:
        last_run["status"] = live_status(store, last_run["status"])
    sql = f"SELECT {', '.join(_ROW)} FROM plugins"
    where, params = [], []
    if plugin is not None:
        where.append("(plugin_id = ? OR name = ?)")
        params += [plugin, plugin]
    if state is not None:
        where.append("state = ?")
        params.append(state)
    limit = ""
    if not where:
        where.append("state IN ('invalid', 'failed', 'rejected')")
        limit = f" LIMIT {int(attention_limit)}"
    rows = store.query(f"{sql} WHERE {' AND '.join(where)} ORDER BY plugin_id{limit}", params)
    if plugin is not None and not rows and state is None:
        raise UnknownPlugin(f"no plugin named or with id {plugin!r} in this log")
    return StatusReport(
        plugins=sum(by_state.values()), by_state=by_state, events=store.last_seq, last_run=last_run,
        items=[dict(zip(_ROW, r)) for r in rows],
    )
