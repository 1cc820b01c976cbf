"""`overnight audit`: verify the log, replay its projections, and read its history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import msgspec

from events import EventStore, Registry, ReplayReport
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
    """Also while a run appends: the counts, the head and the blobs named are read at one
    instant (an event appended between two reads had its blobs reported missing), and the
    replay is its own instant, no earlier."""
    with store.snapshot():
        events = store.query("SELECT count(*) FROM events")[0][0]
        newest = store.query("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
        head = {"seq": newest[0][0], "hash": newest[0][1]} if newest else {"seq": 0, "hash": ""}
        missing = [problem for _digest, problem in missing_blobs(store)]
    return VerifyResult(events=events, problems=store.verify() + missing, head=head)


NAMES_BLOBS = tuple(t.__struct_config__.tag for t in (
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


Present = Callable[[set[str]], set[str]]
Manifests = Callable[[list[str]], Iterable[tuple[str, "bytes | None", "str | None"]]]


def absent_named_blobs(rows: Iterable[tuple[int, str, int, str]], registry: Registry, present: Present,
                       manifests: Manifests, where: str,
                       naming: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(sha256, problem) of each blob that the events in `rows` (seq, type, schema_version,
    data: those of a type in `NAMES_BLOBS`, in seq order) name and that is not in `where`: a
    draft, a file's content, a plugin snapshot, or a file inside a snapshot. `present(hashes)`
    gives those of `hashes` that are there; `manifests(trees)` gives (hash, bytes, None) or
    (hash, None, problem) for snapshots that are there. Undecodable events are left to verify's
    replay. `naming`, when given, is filled with who first names each blob that is there (a
    problem found with such a blob later can say which event needs it)."""
    named: list[tuple[str, int, str, str]] = []
    trees: dict[str, int] = {}
    for seq, tag, sv, data in rows:
        try:
            event = registry.decode(tag, sv, data)
        except UndecodableEvent:
            continue
        for digest, what in _named_blobs(event):
            named.append((digest, seq, tag, what))
            if isinstance(event, (c.PluginSnapshotted, c.PluginRestored)):
                trees.setdefault(digest, seq)
    there = present({digest for digest, *_ in named})
    problems = [(digest, f"seq {seq} ({tag}): blob {digest} ({what}) is missing from {where}")
                for digest, seq, tag, what in named if digest not in there]
    if naming is not None:
        for digest, seq, tag, what in reversed(named):
            naming[digest] = f"seq {seq} ({tag}): {what}"
    inside: list[tuple[str, str, str]] = []
    for tree, manifest, problem in manifests([tree for tree in trees if tree in there]):
        try:
            if manifest is None:
                raise SnapshotError(problem or "unreadable")
            inside += [(tree, path, digest) for path, digest in snapshots.manifest_files(manifest)]
        except SnapshotError as e:
            problems.append((tree, f"seq {trees[tree]}: plugin snapshot {tree}: {e}"))
    there = present({digest for _tree, _path, digest in inside})
    problems += [(digest, f"seq {trees[tree]}: plugin snapshot {tree} names {path}, whose blob {digest} "
                          f"is missing from {where}") for tree, path, digest in inside if digest not in there]
    if naming is not None:
        for tree, path, digest in reversed(inside):
            naming.setdefault(digest, f"seq {trees[tree]}: plugin snapshot {tree} names {path}")
    return problems


def missing_blobs(store: EventStore) -> list[tuple[str, str]]:
    """(sha256, problem) of each blob the log names but the store lacks (see
    `absent_named_blobs`). Whether a present blob matches its hash is `store.verify`'s, which
    has already read every blob: here the hashes are looked up once, in memory."""
    stored = {digest for (digest,) in store.conn.execute("SELECT hash FROM blobs")}
    marks = ", ".join("?" * len(NAMES_BLOBS))
    rows = store.conn.execute(
        f"SELECT seq, type, schema_version, data FROM events WHERE type IN ({marks}) ORDER BY seq", NAMES_BLOBS)
    return absent_named_blobs(
        rows, store.registry, lambda hashes: hashes & stored,
        lambda trees: ((tree, bytes(store.query("SELECT data FROM blobs WHERE hash = ?", (tree,))[0][0]), None)
                       for tree in trees),
        "the store")


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
