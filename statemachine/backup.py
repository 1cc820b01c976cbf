"""Off-site backup of a marketplace and its log to libSQL: snapshot, verify, list, restore.

A snapshot is a Merkle tree of the marketplace: a directory node is the canonical JSON of its
entries sorted by name (name, kind file/dir/symlink, mode without setuid/setgid/sticky, size,
hash of the file's blob or of the subtree's node, symlink target), stored content-addressed
in the remote blob table like any blob. `.overnight/` and `.git/` are never part of it.
`overnight backup` needs an existing event log: it never creates one.

What must always hold:
- On the remote, a tree node is stored only after everything it references, and the
  snapshot row only after its tree, its log blobs and its events up to `last_seq`; so a
  snapshot row proves a complete backup and an interrupted backup leaves nothing dangling.
  A stored node proves its whole subtree is stored: an unchanged directory costs one lookup
  of its parent, no writes.
- Every backup looks for structurally damaged blobs on the remote (`replication.damaged_blobs`,
  the check `backup verify` makes) and re-ships each one this log or this marketplace still
  has; those nobody here has are warnings of its report.
- So does every blob of this log: one the log names but lacks, or whose bytes no longer match
  its hash, is put back into the log from a marketplace file with that content or from the
  remote; the others are warnings of every backup's report, and a damaged one is never shipped.
  A restore warns of each log blob it cannot give back (the log lacked it, or the remote lost
  it); `backup verify` reports each as a problem. Files and events are all or nothing.
- Events deleted from the remote below its head are shipped again, and the loss of the
  snapshot this log's last backup to the same URL made is a warning.
- A restore of the newest snapshot also restores the events a backup cut short shipped past
  it, as far as their hash chain holds (a warning): the restored log goes on backing up there.
- A snapshot holds no symlink restore would refuse: `snapshot_tree` skips, with a warning,
  each one `symlink_refusal` refuses, the same rule restore applies.
- The auth token is passed to the transport only; it is in no event, row or message.
- Restore writes only inside an empty destination: every name is one path component
  (no `..`, `.`, separators or NUL), no symlink is created before every file and directory
  is in place (so nothing is ever written through one), a symlink resolving outside the
  destination is removed, setuid/setgid bits are never restored, and each file's sha256 is
  checked on disk before it is renamed into place. Any mismatch is a problem: the caller
  exits non-zero.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import secrets
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from events import EventStore, EventStoreError, replication
from events.chain import EVENT_COLUMNS, GENESIS, ChainCheck
from events.remote import Remote, display_url, open_remote
from events.store import blob_hash, format_at
from statemachine import audit
from statemachine.binding import bind
from statemachine.catalog import REGISTRY, BackupCompleted
from statemachine.errors import OvernightError
from statemachine.workspace import STATE_DIR, open_log, own_files
from statemachine.writes import WriteError, remove_tree

EXCLUDED = frozenset({STATE_DIR, ".git"})
KINDS = ("file", "dir", "symlink")
NODE_VERSION = 1
SNAPSHOT_COLUMNS = "id, created_at, root, last_seq, last_hash, files, bytes, plugins, bytes_sent"
SNAPSHOT_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS snapshots (id TEXT PRIMARY KEY, created_at TEXT NOT NULL, "
    "root TEXT NOT NULL, last_seq INTEGER NOT NULL, last_hash TEXT NOT NULL, files INTEGER NOT NULL, "
    "bytes INTEGER NOT NULL, plugins INTEGER NOT NULL, bytes_sent INTEGER NOT NULL)"
)


class BackupError(OvernightError):
    pass


@dataclass
class Snapshot:
    id: str
    created_at: str
    root: str
    last_seq: int
    last_hash: str
    files: int
    bytes: int
    plugins: int
    bytes_sent: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BackupReport:
    target: str
    snapshot: Snapshot
    events_sent: int
    blobs_sent: int
    bytes_sent: int
    rows_written: int
    batches: int
    seconds: float
    blobs_repaired: int = 0  # damaged blobs on the remote shipped again (counted in blobs_sent too)
    events_repaired: int = 0  # events deleted from the remote, shipped again (not in events_sent)
    warnings: list[str] = field(default_factory=list)  # skipped symlinks, damaged blobs left as they are

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "snapshot": self.snapshot.as_json()}


class _Checked:
    """A report whose `problems` decide `ok` (empty: healthy)."""

    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass
class VerifyReport(_Checked):
    target: str
    snapshots: int = 0
    events: int = 0
    trees: int = 0
    blobs_read: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class RestoreReport(_Checked):
    snapshot: str
    files: int = 0
    bytes: int = 0
    dirs: int = 0
    symlinks: int = 0
    events: int = 0
    blobs: int = 0
    seconds: float = 0.0
    path: str = ""  # where the result is: the destination, or `<dest>.incomplete` after problems
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # log blobs it could not give back


# ------------------------------------------------------------------ tree snapshot


@dataclass
class Tree:
    """A marketplace's snapshot before shipping: nodes by hash, and where file bytes are."""

    root: str = ""
    nodes: dict[str, bytes] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    file_count: int = 0
    byte_count: int = 0
    plugins: int = 0
    warnings: list[str] = field(default_factory=list)


def encode_node(entries: list[dict[str, Any]]) -> bytes:
    """Canonical JSON of a directory's entries (sorted by name, sorted keys, ASCII)."""
    entries = sorted(entries, key=lambda e: e["name"])
    return json.dumps({"v": NODE_VERSION, "entries": entries}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode()


def snapshot_tree(root: Path, leave_out: frozenset[str]) -> Tree:
    """Hash the marketplace at `root` into a Merkle tree, never following a symlink. Left out:
    `.overnight/` and `.git/`, overnight's own files wherever they are (`leave_out`, real
    paths: the event log, shipped apart event by event, for a copy of an open database file is
    no backup; and the `file:` backups, which would hold themselves; see workspace.own_files),
    and, with a warning, a symlink restore would refuse and what is no file, directory or
    symlink (a fifo, a socket, a device)."""
    tree = Tree()
    top = Path(os.path.realpath(root))  # real paths on both sides: entries are compared as paths
    tree.root = _walk(tree, top, leave_out)
    return tree


@dataclass
class _Dir:
    """A directory being hashed: its items, how far through them, and its entries so far."""

    path: Path
    entry: dict[str, Any]  # its own entry in its parent (the top's is never used)
    items: list[os.DirEntry] = field(default_factory=list)
    done: int = 0
    entries: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0


def _walk(tree: Tree, top: Path, leave_out: frozenset[str]) -> str:
    """Hash every directory below `top` after its children, with a stack of the directories
    on the way down instead of recursion (a tree however deep); the root node's hash."""
    stack = [_dir(top, {})]
    while True:
        here = stack[-1]
        if here.done == len(here.items):
            stack.pop()
            digest = _node(tree, here)
            if not stack:
                return digest
            here.entry.update(kind="dir", size=here.total, hash=digest)
            stack[-1].entries.append(here.entry)
            stack[-1].total += here.total
            continue
        item = here.items[here.done]
        here.done += 1
        if item.name in EXCLUDED or item.path in leave_out:
            continue
        try:
            entry = _entry(tree, top, item)
            if entry is not None and entry["kind"] == "dir":
                stack.append(_dir(Path(item.path), entry))
                continue
        except OSError as e:
            tree.warnings.append(f"{os.path.relpath(item.path, top)}: cannot be read ({e.strerror or e}); "
                                 "skipped: the backup does not hold it")
            continue
        if entry is None:
            continue
        here.total += entry["size"]
        here.entries.append(entry)


def _entry(tree: Tree, top: Path, item: os.DirEntry) -> dict[str, Any] | None:
    """The entry of `item` (a directory's is completed once its own entries are known); None
    for what a snapshot leaves out, with a warning. OSError when it cannot be read."""
    st = item.stat(follow_symlinks=False)
    entry = {"name": item.name, "mode": stat.S_IMODE(st.st_mode) & 0o777, "size": 0, "hash": "", "target": ""}
    if stat.S_ISDIR(st.st_mode):
        entry.update(kind="dir")
    elif stat.S_ISLNK(st.st_mode):
        target = os.readlink(item.path)
        why = symlink_refusal(top, Path(item.path), target)
        if why:
            tree.warnings.append(f"{os.path.relpath(item.path, top)}: symlink to {target!r} {why}; "
                                 "skipped: restore would refuse it")
            return None
        entry.update(kind="symlink", mode=0, target=target)
    elif stat.S_ISREG(st.st_mode):
        with open(item.path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        entry.update(kind="file", size=st.st_size, hash=digest)
        tree.files.setdefault(digest, Path(item.path))
        tree.file_count += 1
        tree.byte_count += st.st_size
    else:
        kind = "a fifo" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        tree.warnings.append(f"{os.path.relpath(item.path, top)}: {kind}, not a file; skipped")
        return None
    return entry


def _dir(path: Path, entry: dict[str, Any]) -> _Dir:
    with os.scandir(path) as it:
        return _Dir(path, entry, sorted(it, key=lambda e: e.name))


def _node(tree: Tree, here: _Dir) -> str:
    """Record a directory whose entries are all known; its hash."""
    if os.path.isfile(here.path / ".claude-plugin" / "plugin.json"):
        tree.plugins += 1
    node = encode_node(here.entries)
    digest = hashlib.sha256(node).hexdigest()
    tree.nodes[digest] = node
    tree.children[digest] = [e["hash"] for e in here.entries if e["kind"] in ("file", "dir")]
    return digest


def _target_refusal(target: Any) -> str | None:
    """Why a symlink target is refused wherever the link is (not text, empty, NUL, absolute), or None."""
    if not isinstance(target, str) or not target or "\0" in target:
        return "is empty or not a path"
    return "is absolute" if os.path.isabs(target) else None


def symlink_refusal(root: Path, link: Path, target: Any) -> str | None:
    """Why the symlink `link` -> `target` in the tree at `root` is refused, or None.

    The one rule of both sides: `snapshot_tree` leaves such a link out, restore refuses or
    removes it. The target is judged as text (`_target_refusal`, or `..` climbing above `root`),
    then by where the link resolves (a link that does not exist yet resolves to itself).
    """
    why = _target_refusal(target)
    if why:
        return why
    relative = os.path.normpath(os.path.join(os.path.relpath(link.parent, root), target))
    if relative == ".." or relative.startswith("../"):
        return "escapes the tree"
    top, resolved = os.path.realpath(root), os.path.realpath(link)
    if resolved != top and not resolved.startswith(top + os.sep):
        return "resolves outside the tree"
    return None


# ------------------------------------------------------------------ backup


def backup(store: EventStore, root: Path, url: str, token: str | None) -> BackupReport:
    """Ship the log, its blobs and a snapshot of `root` to `url`; record `BackupCompleted`.

    Incremental and idempotent: only events after the remote head, blobs and tree nodes the
    remote lacks are sent. Safe to call again after a crash or an error at any point. Refuses,
    before writing, a database that is not a backup and a remote that is not this log's; first
    repairs the damaged blobs it has a copy of.
    """
    started = time.perf_counter()
    moved = bind(store, root)  # a --db of another marketplace would pair its log with these files
    target = display_url(url)
    remote = open_remote(url, token)
    try:
        replication.ensure_schema(remote, (SNAPSHOT_SCHEMA,))
        last_seq = store.last_seq
        last_hash = store.query("SELECT hash FROM events WHERE seq = ?", (last_seq,))
        head = replication.check_head(store, remote, last_seq)
        tree = snapshot_tree(root, own_files(store, root, url))
        writer = replication.Writer(remote)
        warnings = ([moved] if moved else []) + tree.warnings + _lost_snapshot(store, remote, target)
        damaged = _mend_log_blobs(store, tree, remote, target, warnings)
        repaired = _repair_blobs(store, tree, writer, damaged, warnings)
        replication.ship_blobs(store, writer, damaged)
        refilled = replication.refill_events(store, writer, head[0])
        replication.ship_events(store, writer, head, last_seq)
        _ship_tree(tree, writer)
        created_at = format_at(store.clock())
        snapshot_id = hashlib.sha256(f"{tree.root} {last_seq} {created_at}".encode()).hexdigest()[:12]
        snapshot = Snapshot(snapshot_id, created_at, tree.root, last_seq,
                            last_hash[0][0] if last_hash else "", tree.file_count, tree.byte_count,
                            tree.plugins, 0)
        shipment = writer.shipment
        snapshot.bytes_sent = shipment.bytes  # the events, blobs and tree shipped: the figure every report gives
        # Only onto this log's own head: another copy of this log (a restored one, the old machine
        # back) backing up here at the same time may have shipped its events first, and the rows
        # of ours are then ignored. A snapshot whose head differs could never be restored.
        writer.add(f"INSERT OR IGNORE INTO snapshots ({SNAPSHOT_COLUMNS}) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? "
                   "WHERE ? = 0 OR EXISTS (SELECT 1 FROM events WHERE seq = ? AND hash = ?)",
                   (*asdict(snapshot).values(), last_seq, last_seq, snapshot.last_hash))
        writer.flush()
        if not remote.execute("SELECT 1 FROM snapshots WHERE id = ?", (snapshot_id,)):
            theirs = remote.execute("SELECT hash FROM events WHERE seq = 1")
            if theirs and theirs[0][0] != store.query("SELECT hash FROM events WHERE seq = 1")[0][0]:
                raise BackupError(
                    f"{target}: another log backed up there at the same time, and the remote holds its events now: "
                    "this backup made no snapshot there (back this log up to another URL)")
            raise BackupError(
                f"{target}: its event {last_seq} is not this log's: another copy of this log backed up there at "
                "the same time, and its events are there now; this backup made no snapshot there (back this log up "
                "to another URL; `overnight backup verify` checks the one there)")
    finally:
        remote.close()
    store.append("backup", BackupCompleted(target=target, last_seq=last_seq, snapshot_id=snapshot_id,
                                           blobs_sent=shipment.blobs, bytes_sent=snapshot.bytes_sent))
    return BackupReport(target, snapshot, shipment.events, shipment.blobs, snapshot.bytes_sent,
                        shipment.rows, shipment.batches, time.perf_counter() - started,
                        blobs_repaired=repaired, events_repaired=refilled, warnings=warnings)


def _lost_snapshot(store: EventStore, remote: Remote, target: str) -> list[str]:
    """A warning when the snapshot this log's latest backup to `target` made is not there."""
    last = store.query("SELECT json_extract(data, '$.snapshot_id'), at FROM events WHERE stream = 'backup' "
                       "AND json_extract(data, '$.target') = ? ORDER BY version DESC LIMIT 1", (target,))
    if not last or remote.execute("SELECT 1 FROM snapshots WHERE id = ?", (last[0][0],)):
        return []
    return [f"snapshot {last[0][0]}, made by this log's last backup here ({last[0][1]}), is missing from the "
            "remote: deleted there? This backup makes a new one"]


def _tree_bytes(tree: Tree, digest: str) -> bytes:
    """A node of `tree`, or a file's bytes as read now (checked against the hash taken)."""
    if digest in tree.nodes:
        return tree.nodes[digest]
    data = tree.files[digest].read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise BackupError(f"{tree.files[digest]} changed during the backup; run it again")
    return data


def _mend_log_blobs(store: EventStore, tree: Tree, remote: Remote, target: str, warnings: list[str]) -> set[str]:
    """Put back into this log each blob it names but lacks, or holds with bytes that no longer
    match its hash, from a marketplace file with that content or else from the backup at
    `target`; a warning for each (every backup warns of those it cannot put back). Returns the
    damaged ones left as they are: they are not shipped."""
    problems = dict(store.damaged_blobs()) | _absent_blobs(store)
    if not problems:
        return set()
    intact = {}  # stored bytes that still match: only the recorded size is wrong
    for digest in problems:
        row = store.query("SELECT data FROM blobs WHERE hash = ?", (digest,))
        if row and blob_hash(bytes(row[0][0])) == digest:
            intact[digest] = bytes(row[0][0])
    fetched = {digest: data for digest, data, problem in replication.fetch_blobs(
        remote, [d for d in problems if d not in intact and d not in tree.files]) if not problem}
    left = set()
    for digest, problem in sorted(problems.items()):
        if digest in intact:
            data, source = intact[digest], "its own bytes (only its recorded size was wrong)"
        elif digest in tree.files:
            data, source = _tree_bytes(tree, digest), str(tree.files[digest])
        elif digest in fetched:
            data, source = fetched[digest], f"the backup at {target}"  # type: ignore[assignment]
        else:
            warnings.append(f"this log: {problem}, and neither this marketplace nor the backup at {target} has "
                            "its content: a restore of this log lacks it")
            left.add(digest)
            continue
        store.put_blob(data)  # (over the damaged copy)
        warnings.append(f"this log: {problem}: mended from {source}, which has that content")
    return {digest for digest in left if store.has_blob(digest)}


def _absent_blobs(store: EventStore) -> dict[str, str]:
    """The blobs the log names and lacks, each with the problem of the first event naming it."""
    absent: dict[str, str] = {}
    for digest, problem in audit.missing_blobs(store):
        if not store.has_blob(digest):  # (an unreadable snapshot manifest is there, but damaged)
            absent.setdefault(digest, problem)
    return absent


def _repair_blobs(store: EventStore, tree: Tree, writer: replication.Writer, damaged: set[str],
                  warnings: list[str]) -> int:
    """Ship again every damaged blob on the remote that this log (but its `damaged` blobs) or
    `tree` has; how many (a warning for each of the others)."""
    repaired = 0
    for digest, problem in replication.damaged_blobs(writer.remote):
        if store.has_blob(digest) and digest not in damaged:
            data = store.get_blob(digest)
        elif digest in tree.nodes or digest in tree.files:
            data = _tree_bytes(tree, digest)
        else:
            warnings.append(f"{problem}, and neither this log nor this marketplace has a copy to repair it "
                            "from: older snapshots that need it cannot be fully restored")
            continue
        writer.put_blob(digest, data, repair=True)
        repaired += 1
    writer.flush()
    return repaired


def _ship_tree(tree: Tree, writer: replication.Writer) -> None:
    """Send what the remote lacks: look up level by level from the root, descending only into
    missing nodes; then files, then missing nodes children-first."""
    missing: set[str] = set()
    frontier = [tree.root]
    while frontier:
        have = replication.present(writer.remote, "blobs", frontier)
        new = [h for h in frontier if h not in have and h not in missing]
        missing.update(new)
        frontier = sorted({c for h in new for c in tree.children.get(h, ())} - missing)
    for digest in sorted(missing - tree.nodes.keys()):
        writer.put_blob(digest, _tree_bytes(tree, digest))
    done: set[str] = set()
    stack = [(tree.root, False)] if tree.root in missing else []
    while stack:  # post-order without recursion: a tree however deep
        digest, children_sent = stack.pop()
        if digest in done:
            continue
        if children_sent:
            done.add(digest)
            writer.put_blob(digest, tree.nodes[digest])
            continue
        stack.append((digest, True))
        stack.extend((child, False) for child in reversed(tree.children[digest])
                     if child in tree.nodes and child in missing and child not in done)
    writer.flush()


# ------------------------------------------------------------------ reading snapshots


def _has_backup(remote: Remote) -> bool:
    return bool(remote.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'snapshots'"))


def _snapshots(remote: Remote) -> list[Snapshot]:
    replication.check_schema(remote, (SNAPSHOT_SCHEMA,))  # a live log is no backup, not an empty one
    if not _has_backup(remote):
        return []
    rows = remote.execute(f"SELECT {SNAPSHOT_COLUMNS} FROM snapshots ORDER BY created_at, id")
    return [Snapshot(*row) for row in rows]


def list_snapshots(url: str, token: str | None) -> list[Snapshot]:
    """Every snapshot at `url`, oldest first."""
    remote = open_remote(url, token, must_exist=True)
    try:
        return _snapshots(remote)
    finally:
        remote.close()


def _find_snapshot(remote: Remote, wanted: str | None) -> tuple[Snapshot, bool]:
    """The snapshot `wanted` (an id or its prefix; None: the newest), and whether it is the newest."""
    snapshots = _snapshots(remote)
    if not snapshots:
        raise BackupError("no snapshot at this URL (run `overnight backup` first)")
    if wanted is None:
        return snapshots[-1], True
    found = [s for s in snapshots if s.id.startswith(wanted)] if wanted.strip() else []
    if len(found) != 1:
        listing = ", ".join(s.id for s in reversed(snapshots[-5:]))
        raise BackupError(f"snapshot {wanted!r} " + (f"matches {len(found)} snapshots" if found else "not found")
                          + f" (the newest here: {listing}; `overnight backup list` lists them all)")
    return found[0], found[0] is snapshots[-1]


def _check_entry(entry: Any, seen: set[str]) -> str | None:
    """Why `entry` of a tree node cannot be restored, or None."""
    if not isinstance(entry, dict):
        return "an entry is not an object"
    name = entry.get("name")
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\0"):
        return f"entry name {name!r} is not a single path component"
    if name in seen:
        return f"entry name {name!r} appears twice"
    kind = entry.get("kind")
    if kind not in KINDS:
        return f"{name!r}: unknown kind {kind!r}"
    if not isinstance(entry.get("mode"), int) or not isinstance(entry.get("size"), int):
        return f"{name!r}: mode and size must be integers"
    digest = entry.get("hash")
    if kind != "symlink" and not (isinstance(digest, str) and len(digest) == 64
                                  and all(c in "0123456789abcdef" for c in digest)):
        return f"{name!r}: bad hash {digest!r}"
    target = entry.get("target")
    why = _target_refusal(target) if kind == "symlink" else None
    if why:
        return f"{name!r}: symlink target {target!r} {why}"
    return None


def _read_trees(remote: Remote, root: str) -> tuple[dict[str, list[dict]], list[str]]:
    """Every node under `root` (re-hashed as read), with the entries that are safe to restore."""
    nodes: dict[str, list[dict]] = {}
    problems: list[str] = []
    frontier = [root]
    while frontier:
        following: set[str] = set()
        for digest, data, problem in replication.fetch_blobs(remote, frontier):
            if problem:
                problems.append(problem.replace("blob", "tree", 1))
                continue
            try:
                raw = json.loads(data)  # type: ignore[arg-type]
                entries = raw["entries"] if isinstance(raw, dict) and raw.get("v") == NODE_VERSION else None
            except ValueError:
                entries = None
            if not isinstance(entries, list):
                problems.append(f"tree {digest} is not a tree node")
                continue
            good, seen = [], set()
            for entry in entries:
                why = _check_entry(entry, seen)
                if why:
                    problems.append(f"tree {digest}: {why}; refused")
                    continue
                seen.add(entry["name"])
                good.append(entry)
            nodes[digest] = good
            following.update(e["hash"] for e in good if e["kind"] == "dir")
        frontier = sorted(following - nodes.keys())
    return nodes, problems


def _file_paths(nodes: dict[str, list[dict]], root: str) -> Iterator[tuple[str, str]]:
    """(path, blob hash) of every file below `root` that `nodes` (from `_read_trees`) holds."""
    pending = [("", root)]
    while pending:
        prefix, digest = pending.pop()
        for entry in nodes.get(digest, ()):
            path = prefix + entry["name"]
            if entry["kind"] == "file":
                yield path, entry["hash"]
            elif entry["kind"] == "dir":
                pending.append((path + "/", entry["hash"]))


# ------------------------------------------------------------------ verify


def verify(url: str, token: str | None, read_share: float = 0.0,
           rng: random.Random | None = None) -> VerifyReport:
    """Structure (snapshots, trees, blobs, the shipped chain, the log blobs its events name) and
    the data of a share of blobs."""
    report = VerifyReport(display_url(url))
    remote = open_remote(url, token, must_exist=True)
    try:
        snapshots = _snapshots(remote)
        report.snapshots = len(snapshots)
        if not snapshots:
            report.problems.append("no snapshot at this URL")
            return report
        naming: dict[str, str] = {}
        chain, named = _check_shipped_log(remote, report, naming)
        report.problems += chain
        files: dict[str, str] = {}  # file blob -> where a snapshot has it
        trees: set[str] = set()
        for snapshot in snapshots:
            row = remote.execute("SELECT hash FROM events WHERE seq = ?", (snapshot.last_seq,))
            if snapshot.last_seq and (not row or row[0][0] != snapshot.last_hash):
                report.problems.append(f"snapshot {snapshot.id}: event {snapshot.last_seq} is missing "
                                       "or differs from the one it was taken at")
            nodes, problems = _read_trees(remote, snapshot.root)
            trees.update(nodes)
            report.problems += [f"snapshot {snapshot.id}: {p}" for p in problems]
            for path, digest in _file_paths(nodes, snapshot.root):
                files.setdefault(digest, f"snapshot {snapshot.id}: {path}")
        report.trees = len(trees)
        report.blobs_read, damaged = replication.verify_blobs(remote, read_share, rng)
        needed = {digest for digest, _problem in named}  # told with the event that needs it
        report.problems += [f"remote log: {naming[digest]}: {problem}" if digest in naming else
                            f"{files[digest]}: {problem}" if digest in files else problem
                            for digest, problem in damaged if digest not in needed]
        report.problems += [f"remote log: {problem}" for _digest, problem in named]
        stored = replication.present(remote, "blobs", files)
        report.problems += [f"{files[h]}: file blob {h} is missing from the remote"
                            for h in sorted(files.keys() - stored)]
    finally:
        remote.close()
    return report


def _check_shipped_log(remote: Remote, report: VerifyReport,
                       naming: dict[str, str]) -> tuple[list[str], list[tuple[str, str]]]:
    """In one read of the events on the remote (counted in `report`): the problems of their
    chain (gaps, broken links, altered rows), and (hash, problem) of each log blob they name
    (a draft, a file's content, a plugin snapshot and the files in it) that the remote lacks
    or cannot give back; `naming` gets who names each of those it has."""
    chain = ChainCheck()

    def naming_blobs() -> Iterator[tuple[int, str, int, str]]:
        for row in replication.read_events(remote):
            chain.feed(*row)
            report.events += 1
            if row[3] in audit.NAMES_BLOBS:
                yield row[0], row[3], row[4], row[6]

    absent = audit.absent_named_blobs(
        naming_blobs(), REGISTRY, lambda hashes: replication.present(remote, "blobs", hashes),
        lambda trees: replication.fetch_blobs(remote, trees), "the remote", naming)
    return [f"remote {problem}" for problem in chain.problems], absent


# ------------------------------------------------------------------ restore


def restore(url: str, token: str | None, dest: Path, snapshot_id: str | None = None) -> RestoreReport:
    """Rebuild the marketplace tree and its event log from a snapshot into `dest`, all or nothing.

    `dest` must be new or an empty directory. Everything is restored into a staging directory
    beside it and checked there; only a restore without problems is renamed onto `dest`, in one
    step. When the backup proves damaged, `dest` is left as it was and what could be verified is
    kept in `<dest>.incomplete` (the report's `path`). When the restore itself fails (the remote
    goes away, the disk fills, an interrupt), the staging directory is removed.

    When `dest` is an empty directory in a parent this user cannot write (made for them by an
    administrator), or a mount point (an empty disk), the staging directory is a hidden one
    inside `dest`: a good restore moves its entries up (renames within one directory), a
    damaged one stays in `<dest>/.incomplete`.
    """
    started = time.perf_counter()
    dest = Path(os.path.abspath(dest))
    if dest.is_symlink():
        raise BackupError(f"{dest} is a symlink; restore into the directory itself")
    leftovers = _killed_stages(dest)
    if dest.exists() and (not dest.is_dir() or any(p not in leftovers for p in dest.iterdir())):
        raise BackupError(f"{dest} is not an empty directory; restore only into an empty one")
    remote = open_remote(url, token, must_exist=True)
    try:
        snapshot, newest = _find_snapshot(remote, snapshot_id)
        report = RestoreReport(snapshot.id)
        for leftover in leftovers:
            _remove_stage(leftover)
            report.warnings.append(f"removed {leftover}, left behind by a restore that was killed")
        name = _stage_prefix(dest) + secrets.token_hex(4)
        stage, lock = None, None
        try:
            stage, lock = _make_stage(dest, name)
            dirs = _restore_tree(remote, snapshot, stage, report)
            _restore_log(remote, snapshot, newest, stage, report)
            top_modes = _settle_tree(stage, dirs)
        except BaseException as e:
            # by its name: a signal may come while the stage is being made, before it is returned
            for made in (dest.parent / name, dest / name):
                _remove_stage(made)
            if lock is not None:
                os.close(lock)
            if stage is None and isinstance(e, BackupError):
                raise  # the stage could not be made: said so already
            if isinstance(e, (OSError, EventStoreError, OvernightError)):
                reason = _os_reason(e) if isinstance(e, OSError) else str(e)
                raise BackupError(f"restore abandoned, nothing was put in {dest}: {reason}") from e
            raise
    finally:
        remote.close()
    try:
        placed = _put_in_place(stage, dest, report.ok)
        for name, mode in top_modes:
            os.chmod(placed / name, mode)
        report.path = str(placed)
    finally:
        os.close(lock)
    report.seconds = time.perf_counter() - started
    return report


def _os_reason(e: OSError) -> str:
    return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)


def _stage_prefix(dest: Path) -> str:
    return f".{dest.name}.restoring-"


def _killed_stages(dest: Path) -> list[Path]:
    """The staging directories of restores into `dest` that were killed (SIGKILL, a power
    cut: nothing could remove them), beside it or inside it: those whose lock no process holds."""
    found = []
    for parent in (dest.parent, dest):
        try:
            names = sorted(os.listdir(parent))
        except OSError:
            continue
        for name in names:
            if name.startswith(_stage_prefix(dest)):
                try:
                    fd = os.open(parent / name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    found.append(parent / name)
                except OSError:
                    pass  # a restore at work holds it
                finally:
                    os.close(fd)
    return found


def _make_stage(dest: Path, name: str) -> tuple[Path, int]:
    """An empty directory `name` beside `dest` (same file system, so a rename puts it in place),
    or inside `dest` when that is an existing directory whose parent this user cannot write, or
    a mount point (a fresh disk: beside it is another file system, where no rename reaches);
    with an open descriptor holding its lock (`_killed_stages`) until the caller closes it."""
    if os.path.lexists(dest.parent) and not dest.parent.is_dir():
        raise BackupError(f"cannot restore into {dest}: {dest.parent} is not a directory")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        inside = dest.is_dir() and os.path.ismount(dest)
        if not inside:
            try:
                os.mkdir(dest.parent / name)
            except PermissionError:
                if not dest.is_dir():
                    raise
                inside = True
        stage = dest / name if inside else dest.parent / name
        if inside:
            os.mkdir(stage)
        if dest.is_dir():
            os.chmod(stage, stat.S_IMODE(dest.stat().st_mode))
        lock = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError as e:
        raise BackupError(f"cannot restore into {dest}: {_os_reason(e)} (a restore is built in a new "
                          f"directory beside its destination, or inside it when it exists)") from e
    return stage, lock


def _remove_stage(stage: Path) -> None:
    """Remove a staging directory, read-only subdirectories included, however deep."""
    try:
        fd = os.open(stage.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        remove_tree(fd, stage.name)
    except WriteError:
        pass  # the next restore into the same place removes what is left
    finally:
        os.close(fd)


def _put_in_place(stage: Path, dest: Path, ok: bool) -> Path:
    """Rename the checked stage onto `dest` (replacing it if it is an empty directory), or keep
    a damaged restore at `<dest>.incomplete` (`-2`, `-3`... when taken); either way one rename,
    then fsync the parent.
    A stage inside `dest` has its entries moved up instead, or becomes `<dest>/.incomplete`."""
    inside = stage.parent == dest
    if inside and ok:
        try:
            for entry in sorted(os.listdir(stage)):
                os.rename(stage / entry, dest / entry)
            os.rmdir(stage)
        except OSError as e:
            raise BackupError(f"the restore is complete and checked in {stage}, but moving it into {dest} "
                              f"failed: {_os_reason(e)}; move the rest of it yourself") from e
        _fsync_dir(dest)
        return dest
    if ok:
        target = dest
    else:  # an earlier attempt's is left alone: this one is `-2`, `-3`, ...
        target = _unused(dest / ".incomplete" if inside else dest.with_name(dest.name + ".incomplete"))
    try:
        os.rename(stage, target)
    except OSError as e:
        if ok and e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            _remove_stage(stage)  # another restore (or something else) filled it meanwhile
            raise BackupError(f"{dest} is no longer empty: something else (another restore?) put files there "
                              "during this restore, which was removed and changed nothing there") from e
        raise BackupError(f"the restore is complete in {stage} but cannot be renamed to {target}: "
                          f"{_os_reason(e)}; move it yourself") from e
    _fsync_dir(target.parent)
    return target


def _unused(path: Path) -> Path:
    """`path`, or the first of `path-2`, `path-3`, ... that does not exist."""
    candidate, n = path, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _restore_tree(remote: Remote, snapshot: Snapshot, dest: Path,
                  report: RestoreReport) -> list[tuple[Path, int]]:
    nodes, problems = _read_trees(remote, snapshot.root)
    report.problems += problems
    dirs: list[tuple[Path, int]] = []
    files: dict[str, list[tuple[Path, int]]] = {}
    links: list[tuple[Path, str]] = []
    stack = [(snapshot.root, dest)]
    while stack:
        digest, here = stack.pop()
        for entry in nodes.get(digest, ()):
            path = here / entry["name"]
            if here == dest and entry["name"] == STATE_DIR:
                report.problems.append(f"{STATE_DIR}/ in a snapshot is refused (the log is restored apart)")
            elif entry["kind"] == "dir":
                os.mkdir(path, 0o700)
                dirs.append((path, entry["mode"]))
                stack.append((entry["hash"], path))
            elif entry["kind"] == "file":
                files.setdefault(entry["hash"], []).append((path, entry["mode"]))
            else:
                links.append((path, entry["target"]))
    for digest, data, problem in replication.fetch_blobs(remote, files):
        if problem:
            report.problems.append(f"{problem}; not restored: "
                                   + ", ".join(str(p.relative_to(dest)) for p, _ in files[digest]))
            continue
        for path, mode in files[digest]:
            if _place_file(path, data, digest, mode):  # type: ignore[arg-type]
                report.files += 1
                report.bytes += len(data)  # type: ignore[arg-type]
            else:
                report.problems.append(f"{path.relative_to(dest)}: sha256 on disk does not match; not restored")
    _restore_links(dest, links, report)
    report.dirs = len(dirs)
    return dirs


def _settle_tree(stage: Path, dirs: list[tuple[Path, int]]) -> list[tuple[str, int]]:
    """Each file was fsynced before its rename; fsync the directories, which hold the names
    (the log's included). Modes last, so a read-only directory still took its entries; those
    of the top directories are returned, for after the move into place (moving a directory to
    another parent needs it writable)."""
    for dirpath, _dirnames, _files in os.walk(stage / STATE_DIR):
        _fsync_dir(Path(dirpath))
    for path in [p for p, _ in reversed(dirs)] + [stage]:
        _fsync_dir(path)
    for path, mode in reversed(dirs):
        if path.parent != stage:
            os.chmod(path, mode & 0o777)
    return [(path.name, mode & 0o777) for path, mode in dirs if path.parent == stage]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _place_file(path: Path, data: bytes, digest: str, mode: int) -> bool:
    """Write beside `path` and fsync, check the sha256 of what is on disk, then rename into place."""
    temp = path.parent / f".restore-{secrets.token_hex(8)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    with open(temp, "rb") as f:
        ok = hashlib.file_digest(f, "sha256").hexdigest() == digest
    if not ok:
        os.unlink(temp)
        return False
    os.chmod(temp, mode & 0o777)
    os.rename(temp, path)
    return True


def _restore_links(dest: Path, links: list[tuple[Path, str]], report: RestoreReport) -> None:
    """Symlinks last, so nothing is written through one; `symlink_refusal` judges each before it
    is made (by its target) and once all are made (by where it resolves)."""
    created = []
    for path, target in links:
        why = symlink_refusal(dest, path, target)
        if why:
            report.problems.append(f"{path.relative_to(dest)}: symlink to {target!r} {why}; refused")
            continue
        os.symlink(target, path)
        created.append((path, target))
    for path, target in created:
        why = symlink_refusal(dest, path, target)
        if why:
            os.unlink(path)
            report.problems.append(f"{path.relative_to(dest)}: symlink to {target!r} {why}; removed")
        else:
            report.symlinks += 1


def _restore_log(remote: Remote, snapshot: Snapshot, newest: bool, dest: Path, report: RestoreReport) -> None:
    """Insert the shipped rows as they are, rebuild the projections, and check the result as
    `overnight audit verify` does; it must end at the event the snapshot was taken at.

    Past the newest snapshot, the remote may hold events a backup shipped before it was cut
    short: they are restored too (as far as their hash chain holds, with a warning), so the
    restored log goes on backing up there instead of being refused as one that lost its newest
    events. A log blob it cannot give back is a warning: the log backed up may have lacked it
    already, and nobody has it any more (`backup verify` tells remote damage)."""
    log_blobs = [r[0] for r in remote.execute("SELECT hash FROM log_blobs")]
    lost: dict[str, str] = {}
    tail = ChainCheck()  # the events past the snapshot, which no snapshot vouches for
    tail.expected_seq, tail.last_hash = snapshot.last_seq + 1, snapshot.last_hash or GENESIS
    extra = 0
    with open_log(dest) as store:
        with store.batch():
            for row in replication.read_events(remote, None if newest else snapshot.last_seq):
                if row[0] > snapshot.last_seq:
                    tail.feed(*row)
                    if tail.problems:
                        report.warnings.append(f"the remote's events past seq {snapshot.last_seq + extra} are not "
                                               f"restored: {tail.problems[0]}")
                        break
                    extra += 1
                store.conn.execute(f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
                report.events += 1
            for digest, data, problem in replication.fetch_blobs(remote, log_blobs):
                if problem:
                    lost[digest] = problem
                else:
                    store.put_blob(data)  # type: ignore[arg-type]
                    report.blobs += 1
    with open_log(dest) as store:
        missing = _absent_blobs(store)
        # a blob the events name that the index does not list: the remote may hold it all the same
        for digest, data, problem in replication.fetch_blobs(remote, [d for d in missing if d not in lost]):
            if not problem:
                store.put_blob(data)  # type: ignore[arg-type]
                report.blobs += 1
                del missing[digest]
        store.replay(apply=True)  # its report compares with the empty tables; verify is the check
        found = store.query("SELECT seq, hash FROM events WHERE seq <= ? ORDER BY seq DESC LIMIT 1",
                            (snapshot.last_seq,))
        seq, digest = found[0] if found else (0, "")
        if seq != snapshot.last_seq or (seq and digest != snapshot.last_hash):
            report.problems.append(
                f"restored log ends at seq {seq} (hash {digest[:12] or 'none'}), but the snapshot was "
                f"taken at seq {snapshot.last_seq} (hash {snapshot.last_hash[:12] or 'none'})")
        report.problems += [f"restored log: {p}" for p in store.verify()]
    if extra:
        first, last = snapshot.last_seq + 1, snapshot.last_seq + extra
        report.warnings.append(
            f"the remote holds {extra} events past this snapshot (seq {first}-{last}), shipped by a backup that "
            "did not finish: restored too, so this log goes on from there; the files are as of seq "
            f"{snapshot.last_seq}, and the next run does again the work those events record")
    for digest, problem in missing.items():
        report.warnings.append(f"restored log: {problem}: " + (lost[digest] if digest in lost else
                               "the backup does not have it (the log backed up lacked it, or it was deleted "
                               "from the backup)"))
    report.warnings += [f"log {problem}: not restored" for digest, problem in lost.items()
                        if digest not in missing]
