"""`overnight restore-plugin`: put a plugin back to a recorded snapshot, and record that."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import msgspec

from events import EventStore
from statemachine import catalog as c
from statemachine import snapshots, writes
from statemachine.audit import resolve_plugin
from statemachine.errors import OvernightError
from statemachine.lifecycle import Lifecycle, State, plugin_stream
from statemachine.scan import scan


class SnapshotInfo(NamedTuple):
    id: str
    seq: int
    at: str
    run_id: str


class Restored(NamedTuple):
    plugin_id: str
    snapshot: str
    files: int


def snapshots_of(store: EventStore, plugin: str) -> list[SnapshotInfo]:
    plugin_id = resolve_plugin(store, plugin)
    rows = store.query(
        "SELECT seq, at, data FROM events WHERE stream = ? AND type = 'PluginSnapshotted' ORDER BY seq DESC",
        (plugin_stream(plugin_id),))
    found = []
    for seq, at, data in rows:
        event = msgspec.json.decode(data)
        found.append(SnapshotInfo(event["tree_sha256"], seq, at, event["run_id"]))
    return found


def restore_plugin(store: EventStore, root: Path, plugin: str, snapshot_id: str | None) -> Restored:
    plugin_id = resolve_plugin(store, plugin)
    shots = snapshots_of(store, plugin_id)
    if not shots:
        raise OvernightError(f"{plugin_id} has no snapshot: overnight never changed it")
    if snapshot_id is None:
        chosen = shots[0]
    else:
        matches = [s for s in shots if s.id.startswith(snapshot_id)]
        if len({s.id for s in matches}) != 1:  # the same content snapshotted twice is one snapshot
            listing = ", ".join(dict.fromkeys(s.id[:12] for s in shots))
            raise OvernightError(f"snapshot {snapshot_id!r} matches {len(matches)} snapshots of {plugin_id} "
                                 f"(its snapshots: {listing})")
        chosen = matches[0]
    state = store.query("SELECT state, path FROM plugins WHERE plugin_id = ?", (plugin_id,))[0]
    if state[0] == State.WRITING:
        raise OvernightError(f"{plugin_id} is in the middle of a write; run `overnight resume` first")
    writes.cleanup_temp(root / state[1])  # a restore or write cut short earlier is finished first
    snapshots.restore(store.get_blob, root, root / state[1], chosen.id)
    lifecycle = Lifecycle(store)
    cursor = lifecycle.cursor(plugin_id)
    lifecycle.record(cursor, c.PluginRestored(tree_sha256=chosen.id))
    lifecycle.release(cursor)
    scan(store, root)
    manifest = msgspec.json.decode(store.get_blob(chosen.id))
    files = sum(1 for e in _entries(manifest) if e.get("kind") == "file")
    return Restored(plugin_id, chosen.id, files)


def _entries(manifest: object) -> list[dict]:
    if isinstance(manifest, dict):
        return list(manifest.get("entries", []))
    return list(manifest) if isinstance(manifest, list) else []
