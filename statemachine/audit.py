"""`overnight audit`: verify the log, replay its projections, and read its history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import msgspec

from events import EventStore, ReplayReport
from statemachine.errors import UnknownPlugin
from statemachine.lifecycle import plugin_stream


@dataclass
class VerifyResult:
    events: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict:
        return {"ok": self.ok, "events": self.events, "problems": self.problems}


def verify(store: EventStore) -> VerifyResult:
    events = store.query("SELECT count(*) FROM events")[0][0]
    return VerifyResult(events=events, problems=store.verify())


def replay(store: EventStore, *, apply: bool) -> ReplayReport:
    return store.replay(apply=apply)


def resolve_plugin(store: EventStore, plugin: str) -> str:
    rows = store.query("SELECT plugin_id FROM plugins WHERE plugin_id = ? OR name = ? ORDER BY plugin_id",
                       (plugin, plugin))
    if not rows:
        raise UnknownPlugin(f"no plugin named or with id {plugin!r} in this log")
    if len(rows) > 1:
        raise UnknownPlugin(f"{plugin!r} names several plugins ({', '.join(r[0] for r in rows)}); use its id")
    return rows[0][0]


def log(store: EventStore, *, plugin: str | None = None, after: int = 0) -> Iterator[dict]:
    """History entries {seq, at, stream, type, data} in log order; raw payloads, as stored."""
    sql = "SELECT seq, at, stream, type, data FROM events WHERE seq > ?"
    params: list = [after]
    if plugin is not None:
        sql += " AND stream = ?"
        params.append(plugin_stream(resolve_plugin(store, plugin)))
    for seq, at, stream, type_, data in store.conn.execute(sql + " ORDER BY seq", params):
        yield {"seq": seq, "at": at, "stream": stream, "type": type_, "data": msgspec.json.decode(data)}
