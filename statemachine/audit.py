"""`overnight audit`: verify the log, replay its projections, and read its history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import msgspec

from events import EventStore, ReplayReport
from events.errors import UndecodableEvent
from statemachine import catalog as c
from statemachine import snapshots
from statemachine.errors import UnknownPlugin
from statemachine.snapshots import SnapshotError
from statemachine.lifecycle import plugin_stream


@dataclass
class VerifyResult:
    events: int
    problems: list[str]
    head: dict  # {"seq", "hash"} of the newest event: keep it elsewhere to detect a cut-off tail

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict:
        return {"ok": self.ok, "events": self.events, "problems": self.problems, "head": self.head}


def verify(store: EventStore) -> VerifyResult:
    events = store.query("SELECT count(*) FROM events")[0][0]
    newest = store.query("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
    head = {"seq": newest[0][0], "hash": newest[0][1]} if newest else {"seq": 0, "hash": ""}
    missing = [problem for _digest, problem in missing_blobs(store)]
    return VerifyResult(events=events, problems=store.verify() + missing, head=head)


_NAMES_BLOBS = tuple(t.__struct_config__.tag for t in (
    c.SkillReceived, c.SkillValidated, c.WriteIntended, c.PluginSnapshotted, c.PluginRestored))


def _named_blobs(event: c.Event) -> list[tuple[str, str]]:
    """(sha256, what it is) of every blob `event` names."""
    if isinstance(event, c.SkillReceived):
        return [(event.draft_sha256, "its draft")]
    if isinstance(event, (c.SkillValidated, c.WriteIntended)):
        files = event.files if isinstance(event, c.SkillValidated) else event.writes
        return [(f.sha256, f"the content of {f.path}") for f in files]
    if isinstance(event, c.PluginRestored) and event.replaced_sha256:
        return [(event.tree_sha256, "its plugin snapshot"), (event.replaced_sha256, "the snapshot of what it replaced")]
    if isinstance(event, (c.PluginSnapshotted, c.PluginRestored)):
        return [(event.tree_sha256, "its plugin snapshot")]
    return []


def missing_blobs(store: EventStore) -> list[tuple[str, str]]:
    """(sha256, problem) of each blob the log names but the store lacks:
    a draft, a file's content, a plugin snapshot, or a file inside a snapshot. (Whether a
    present blob matches its hash is `store.verify`'s, which has already read every blob:
    here the hashes are looked up once, in memory.)"""
    problems: list[tuple[str, str]] = []
    stored = {digest for (digest,) in store.conn.execute("SELECT hash FROM blobs")}
    trees: dict[str, int] = {}
    marks = ", ".join("?" * len(_NAMES_BLOBS))
    for seq, tag, sv, data in store.conn.execute(
            f"SELECT seq, type, schema_version, data FROM events WHERE type IN ({marks}) ORDER BY seq",
            _NAMES_BLOBS):
        try:
            event = store.registry.decode(tag, sv, data)
        except UndecodableEvent:
            continue  # reported by verify's replay
        for digest, what in _named_blobs(event):
            if digest not in stored:
                problems.append((digest, f"seq {seq} ({tag}): blob {digest} ({what}) is missing from the store"))
            elif isinstance(event, (c.PluginSnapshotted, c.PluginRestored)):
                trees.setdefault(digest, seq)
    for tree, seq in trees.items():
        (manifest,) = store.query("SELECT data FROM blobs WHERE hash = ?", (tree,))[0]
        try:
            files = snapshots.manifest_files(bytes(manifest))
        except SnapshotError as e:
            problems.append((tree, f"seq {seq}: plugin snapshot {tree}: {e}"))
            continue
        for path, digest in files:
            if digest not in stored:
                problems.append((digest, f"seq {seq}: plugin snapshot {tree} names {path}, whose blob {digest} "
                                         "is missing from the store"))
    return problems


def replay(store: EventStore, *, apply: bool) -> ReplayReport:
    return store.replay(apply=apply)


def matching_plugins(store: EventStore, plugin: str) -> list[str]:
    """The ids of the plugins `plugin` is the id or the name of (several when plugins share a name)."""
    rows = store.query("SELECT plugin_id FROM plugins WHERE plugin_id = ? OR name = ? ORDER BY plugin_id",
                       (plugin, plugin))
    if not rows:
        raise UnknownPlugin(f"no plugin named or with id {plugin!r} in this log")
    return [plugin_id for (plugin_id,) in rows]


def resolve_plugin(store: EventStore, plugin: str) -> str:
    """The id of the one plugin `plugin` is the id or the name of."""
    ids = matching_plugins(store, plugin)
    if len(ids) > 1:
        raise UnknownPlugin(f"{plugin!r} names several plugins ({', '.join(ids)}); use its id")
    return ids[0]


def log(store: EventStore, *, plugin: str | None = None, after: int = 0) -> Iterator[dict]:
    """History entries {seq, at, stream, type, data} in log order; raw payloads, as stored.
    `plugin` (a name or an id) keeps the events of every plugin it matches."""
    sql = "SELECT seq, at, stream, type, data FROM events WHERE seq > ?"
    params: list = [after]
    if plugin is not None:
        streams = [plugin_stream(plugin_id) for plugin_id in matching_plugins(store, plugin)]
        sql += f" AND stream IN ({', '.join('?' * len(streams))})"
        params += streams
    for seq, at, stream, type_, data in store.conn.execute(sql + " ORDER BY seq", params):
        yield {"seq": seq, "at": at, "stream": stream, "type": type_, "data": msgspec.json.decode(data)}
