"""`overnight restore-plugin`: put a plugin back to a recorded snapshot, and record that."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import msgspec

from events import EventStore, EventStoreError
from statemachine import catalog as c
from statemachine import snapshots, writes
from statemachine.analysis import reaches
from statemachine.audit import resolve_plugin
from statemachine.discovery import is_inside, one_line
from statemachine.binding import bind
from statemachine.errors import OvernightError
from statemachine.lifecycle import Lifecycle, State, plugin_stream
from statemachine.scan import scan
from statemachine.workspace import not_plugin_files


BEFORE_WRITE = "before a write"  # a snapshot overnight took before writing the plugin
BEFORE_RESTORE = "before a restore"  # the files a restore replaced: restoring them undoes it


class SnapshotInfo(NamedTuple):
    id: str
    seq: int
    at: str
    run_id: str | None  # None for the files a restore replaced: no run took them
    taken: str = BEFORE_WRITE  # or BEFORE_RESTORE


class Restored(NamedTuple):
    plugin_id: str
    snapshot: str
    files: int
    replaced: str | None  # the snapshot of the files it replaced: restoring it undoes this restore
    removed: list[str]  # what no snapshot holds, removed because the snapshot has another entry there


def snapshots_of(store: EventStore, plugin_id: str) -> list[SnapshotInfo]:
    """The snapshots of plugin `plugin_id` (see `resolve_plugin`), newest first."""
    rows = store.query(
        "SELECT seq, at, type, data FROM events WHERE stream = ? AND type IN ('PluginSnapshotted', 'PluginRestored') "
        "ORDER BY seq DESC", (plugin_stream(plugin_id),))
    found = []
    for seq, at, tag, data in rows:
        event = msgspec.json.decode(data)
        if tag == "PluginSnapshotted":
            found.append(SnapshotInfo(event["tree_sha256"], seq, at, event["run_id"]))
        elif event.get("replaced_sha256"):
            found.append(SnapshotInfo(event["replaced_sha256"], seq, at, None, BEFORE_RESTORE))
    return found


def blob_problem(store: EventStore, snapshot_id: str) -> str | None:
    """What this log lacks of the snapshot (as after a restore from a backup that had lost a
    blob), or None: its manifest (it cannot be restored), or the content of some of its files
    (put back only while those files are as they were)."""
    try:
        files = snapshots.manifest_files(store.get_blob(snapshot_id))
    except (EventStoreError, snapshots.SnapshotError) as e:
        return f"cannot be restored: its manifest cannot be read: {e}"
    missing = sum(1 for digest in {digest for _, digest in files} if not store.has_blob(digest))
    return (f"the log lacks the content of {missing} of its files: it can be restored only while they are as "
            "they were" if missing else None)


def restore_plugin(store: EventStore, root: Path, plugin: str, snapshot_id: str | None,
                   place: str = "") -> Restored:
    bind(store, root)  # before anything changes: a --db of another marketplace names its plugins, not these
    plugin_id = resolve_plugin(store, plugin)
    shots = snapshots_of(store, plugin_id)
    if not shots:
        raise OvernightError(f"{plugin_id} has no snapshot: overnight never changed it")
    if snapshot_id is None:
        chosen = next(s for s in shots if s.taken == BEFORE_WRITE)
    else:
        matches = [s for s in shots if s.id.startswith(snapshot_id)]
        if len({s.id for s in matches}) != 1:  # the same content snapshotted twice is one snapshot
            listing = ", ".join(dict.fromkeys(s.id[:12] for s in shots))
            raise OvernightError(f"snapshot {snapshot_id!r} matches {len(matches)} snapshots of {plugin_id} "
                                 f"(its snapshots: {listing})")
        chosen = matches[0]
    state = store.query("SELECT state, path FROM plugins WHERE plugin_id = ?", (plugin_id,))[0]
    if state[0] == State.WRITING:
        raise OvernightError(f"{plugin_id} is in the middle of a write; run `overnight resume{place}` first")
    plugin_dir = root / state[1]
    in_place = os.path.realpath(plugin_dir) == os.path.realpath(root)
    others = not_plugin_files(store, root)  # the manifest, overnight's own files
    if not in_place:
        inside = sorted(real for real in others
                        if os.path.lexists(real) and reaches(os.path.realpath(plugin_dir), real))
        if inside:
            # A restore replaces the directory whole: these would go with the files it replaces
            # (what no snapshot holds, such as .overnight/ or a nested plugin, is carried over).
            raise OvernightError(f"{plugin_id}: its directory holds {one_line(inside[0])}, which overnight keeps "
                                 "(the log or a backup) and a restore would take away with the plugin's files; "
                                 "move it out of the plugin (--db, or another backup target), then restore "
                                 "again (nothing was changed)")
    replaced = None
    if os.path.lexists(plugin_dir):  # a deleted plugin directory is made again: there is nothing to keep
        writes.cleanup_temp(root, plugin_dir)  # a restore or write cut short earlier is finished first
        try:
            current = snapshots.take(root, plugin_dir, others)
        except snapshots.SnapshotError as e:
            raise OvernightError(f"{plugin_id}: a restore first keeps a copy of the files it replaces, and "
                                 f"{e}; nothing was changed") from e
        replaced = current.tree_sha256 if current.tree_sha256 != chosen.id else None
    if replaced:
        with store.batch():
            for blob in current.blobs:
                store.put_blob(blob)
    restored = c.PluginRestored(tree_sha256=chosen.id, replaced_sha256=replaced)
    if in_place:
        # Not one atomic step (see snapshots._restore_root): recorded once its checks passed and
        # before it changes anything, so the files it replaces stay listed even when it is cut
        # short, and running it again finishes it.
        removed = snapshots.restore(store.get_blob, root, plugin_dir, chosen.id, keep=_not_the_plugins(root, others),
                                    begin=lambda: _record(store, plugin_id, restored))
    else:
        removed = snapshots.restore(store.get_blob, root, plugin_dir, chosen.id)
        _record(store, plugin_id, restored)
    scan(store, root)
    manifest = msgspec.json.decode(store.get_blob(chosen.id))
    files = sum(1 for e in _entries(manifest) if e.get("kind") == "file")
    return Restored(plugin_id, chosen.id, files, replaced, removed)


def _record(store: EventStore, plugin_id: str, event: c.PluginRestored) -> None:
    lifecycle = Lifecycle(store)
    cursor = lifecycle.cursor(plugin_id)
    lifecycle.record(cursor, event)
    lifecycle.release(cursor)


def _not_the_plugins(root: Path, others: frozenset[str]) -> set[str]:
    """Of the files of no plugin (`others`: the manifest, overnight's own), those below `root`
    that the plugin at the root holds in its tree, as paths relative to `root`."""
    root_real = os.path.realpath(root)
    return {os.path.relpath(real, root_real).replace(os.sep, "/")
            for real in others if is_inside(real, root_real) and real != root_real}


def _entries(manifest: object) -> list[dict]:
    if isinstance(manifest, dict):
        return list(manifest.get("entries", []))
    return list(manifest) if isinstance(manifest, list) else []
