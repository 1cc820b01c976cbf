"""`overnight status`: the plugin-state projection, counted and filtered."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import msgspec

from events import EventStore
from events.lock import WriterLock
from statemachine.errors import OvernightError, UnknownPlugin
from statemachine.lifecycle import FINAL, State
from statemachine.catalog import KEPT_EDIT

_ROW = ("plugin_id", "name", "category", "state", "step", "reason", "not_before", "updated_at")
# Plugins that wait for a person: for their content to change, or to be looked at.
_ATTENTION = (State.INVALID, State.FAILED, State.REJECTED)
# Plugins a report for people lists (status, a run's summary); the others are counted.
ATTENTION_LIMIT = 20
# ... and plugins skipped because a person edited what overnight wrote: kept until --force.
_KEPT = f"(state = '{State.SKIPPED.value}' AND reason LIKE '{KEPT_EDIT}%')"
# A plugin in `writing` while no process holds the log: its write was cut short, and its files
# may be half new; scan and restore-plugin leave it alone until `resume` settles it.
_CUT_SHORT = "its write was cut short: `overnight resume{}` finishes it"
_RETRY = {State.FAILED: "`overnight run{} --retry failed --plugin {}` tries it again",
          State.REJECTED: "`overnight run{} --retry rejected --plugin {}` generates it again"}


@dataclass
class StatusReport:
    plugins: int
    by_state: dict[str, int]
    events: int
    last_run: dict | None
    items: list[dict] = field(default_factory=list)
    items_total: int = 0  # more than len(items) when the attention list was cut at its limit
    unfinished_runs: list[dict] = field(default_factory=list)  # besides last_run, newest first
    # a process holds the log and runs no recorded run: a scan, a backup, a restore-plugin, or
    # a run scanning before it starts (a --force run puts every finished plugin back to analyzed first)
    busy: bool = False

    def as_json(self) -> dict:
        return {"plugins": self.plugins, "by_state": self.by_state, "events": self.events,
                "last_run": self.last_run, "unfinished_runs": self.unfinished_runs, "items": self.items,
                "items_total": self.items_total, "busy": self.busy}


# Runs `overnight resume` can continue (the newest of them first); `stopped` is a run recorded
# as running that no process runs any more (it crashed, or stopped on an error).
UNFINISHED = ("running", "paused", "interrupted", "budget_exhausted")


def run_selection(store: EventStore, run_id: str) -> list[str]:
    """The plugins run `run_id` selected as it started (its RunStarted; none in a log from before
    runs recorded them)."""
    (data,), = store.query("SELECT data FROM events WHERE stream = ? AND type = 'RunStarted'", (f"run:{run_id}",))
    return msgspec.json.decode(data).get("selection", [])


def resumable_run(store: EventStore) -> tuple[str, str, str, str | None] | None:
    """The run `overnight resume` continues, the latest unfinished one: (run_id, config JSON,
    status, paused_until), or None."""
    found = store.query("SELECT run_id, config, status, paused_until FROM runs WHERE status IN (?, ?, ?, ?) "
                        "ORDER BY started_at DESC LIMIT 1", UNFINISHED)
    return found[0] if found else None


def run_to_resume(store: EventStore) -> tuple[str, str, str, str | None]:
    """`resumable_run`, or the error `overnight resume` gives when there is none."""
    found = resumable_run(store)
    if found is None:
        raise OvernightError("no unfinished run to resume; start one with `overnight run`")
    return found


_RUN = ("run_id", "command", "status", "started_at", "ended_at", "paused_until", "plugins", "requests",
        "done", "skipped", "rejected", "failed", "planned")


def runs(store: EventStore, held: bool) -> list[dict]:
    """The newest run and every unfinished one, with their live status: the current one first
    (the run a process is running, else the newest), then the others newest first. Of the runs
    recorded as running, only the most recently active one is running, and only while a process
    holds the log (`held`: `WriterLock(path).held()`); the others are `stopped`. A paused run is
    `waiting` when a process holding the log sleeps out its pause. Finished older
    runs are left out: `run_summary` counts each run's plugins, and a log gathers many runs."""
    marks = ", ".join("?" * len(UNFINISHED))
    rows = store.query(f"SELECT {', '.join('s.' + c for c in _RUN)}, "
                       "coalesce(json_extract(r.config, '$.dry_run'), 0), r.last_seq FROM run_summary s "
                       "JOIN runs r USING (run_id) WHERE r.status IN (" + marks + ") OR r.run_id = "
                       "(SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1) "
                       "ORDER BY s.started_at DESC, r.last_seq DESC", UNFINISHED)
    found = [dict(zip(_RUN + ("dry_run", "last_seq"), row)) for row in rows]
    recorded_running = [r for r in found if r["status"] == "running"]
    active = max(recorded_running, key=lambda r: r["last_seq"]) if held and recorded_running else None
    paused = [r for r in found if r["status"] == "paused"]
    waited = paused[0] if held and active is None and paused else None  # the newest paused one
    finals = sorted(FINAL)
    for r in found:
        if r["status"] == "running" and r is not active:
            r["status"] = "stopped"
        # its plugins in a final state, whichever run finished them (the counts credit each to one)
        r["finished"] = store.query(
            "SELECT count(*) FROM events e, json_each(e.data, '$.selection') j JOIN plugins p ON p.plugin_id = j.value "
            f"WHERE e.stream = ? AND e.type = 'RunStarted' AND p.state IN ({', '.join('?' * len(finals))})",
            (f"run:{r['run_id']}", *finals))[0][0]
        r["waiting"] = r is waited  # a process sleeps out its quota pause (else: none will wake up)
        del r["last_seq"]
        r["dry_run"] = bool(r["dry_run"])
    return [active] + [r for r in found if r is not active] if active else found


def status(store: EventStore, *, plugin: str | None = None, state: str | None = None,
           attention_limit: int = ATTENTION_LIMIT, place: str = "") -> StatusReport:
    """Counts by state; `items` are the plugins matching the filters, or, with no filter,
    the first `attention_limit` plugins that need a person's attention (invalid, failed,
    rejected, skipped to keep a person's edit, and writing when no process holds the log).
    Each item has a `hint` (None, or the command that finishes a write cut short or retries a
    failed or rejected plugin, with `place` (` PATH --db LOG`) after the command's name)."""
    if state is not None and state not in {s.value for s in State}:
        raise UnknownPlugin(f"unknown state {state!r}; states are: {', '.join(s.value for s in State)}")
    by_state = dict(store.query("SELECT state, count(*) FROM plugins GROUP BY state ORDER BY state"))
    running = WriterLock(store.path).held()
    every_run = runs(store, running)
    last_run = every_run[0] if every_run else None
    other_unfinished = [r for r in every_run[1:] if r["status"] in UNFINISHED + ("stopped",)]
    sql = f"SELECT {', '.join(_ROW)} FROM plugins"
    where, params = [], []
    if plugin is not None:
        where.append("(plugin_id = ? OR name = ?)")
        params += [plugin, plugin]
    if state is not None:
        where.append("state = ?")
        params.append(state)
    limit = ""
    total = None
    if not where:
        attention = _ATTENTION + (() if running else (State.WRITING,))
        where.append(f"(state IN ({', '.join('?' * len(attention))}) OR {_KEPT})")
        params += attention
        limit = f" LIMIT {int(attention_limit)}"
        total = sum(by_state.get(s, 0) for s in attention) + store.query(
            f"SELECT count(*) FROM plugins WHERE {_KEPT}")[0][0]
    rows = store.query(f"{sql} WHERE {' AND '.join(where)} ORDER BY plugin_id{limit}", params)
    if plugin is not None and not rows and state is None:
        raise UnknownPlugin(f"no plugin named or with id {plugin!r} in this log")
    items = [dict(zip(_ROW, r)) for r in rows]
    for item in items:
        item["hint"] = (_CUT_SHORT.format(place) if item["state"] == State.WRITING and not running else
                        _RETRY[item["state"]].format(place, shlex.quote(item["plugin_id"]))
                        if item["state"] in _RETRY else None)
    return StatusReport(
        plugins=sum(by_state.values()), by_state=by_state, events=store.last_seq, last_run=last_run,
        items=items, items_total=len(items) if total is None else total, unfinished_runs=other_unfinished,
        busy=running and not any(r["status"] == "running" or r["waiting"] for r in every_run),
    )
