"""Content-addressed snapshots of a plugin directory, and restoring one exactly.

What must always hold:
- A snapshot is a canonical JSON manifest (entries sorted by path) whose sha256 names it; every
  file's bytes are a blob named by their sha256. Equal trees give byte-equal manifests.
- Taking a snapshot never follows a symlink, never opens a FIFO or device, never leaves the
  marketplace root; symlinks are recorded by their link text. `.git`, `node_modules` and
  `.overnight` are not part of a snapshot; FIFOs, sockets and devices are left out.
- Restoring validates the whole manifest before writing anything, builds the tree in a
  sibling temp directory, verifies every blob's sha256, and only then swaps it in: a missing
  or corrupt blob or a bad path leaves the plugin directory untouched. The swap is
  recoverable by `writes.cleanup_temp` after a crash at any point.
- Restored files and directories never carry setuid/setgid bits. A symlink comes back with
  exactly the text it had, wherever it points (the plugin had it before overnight changed
  anything); nothing is ever written through one, because every directory on the way is
  opened with O_NOFOLLOW. The plugin's `.git`, `node_modules` and `.overnight`, the plugins
  nested in it and its FIFOs, sockets and devices (never part of its snapshot) are carried
  over from the replaced tree.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Annotated, Callable, Collection, Literal, NamedTuple

import msgspec

from events import EventStoreError
from statemachine.analysis import MAX_BYTES, MAX_ENTRIES, walk
from statemachine.discovery import SKIP_DIRS, holds_plugin, is_inside, one_line
from statemachine.errors import OvernightError
from statemachine.writes import (
    WriteError, below, open_dir, rel_parts, remove_tree, swap_dir, temp_name,
)

FORMAT = 1
_STRIP = stat.S_ISUID | stat.S_ISGID
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_CHUNK = 1024 * 1024

Mode = Annotated[int, msgspec.Meta(ge=0, le=0o7777)]
Hex = Annotated[str, msgspec.Meta(pattern="^([0-9a-f]{64})?$")]


class SnapshotError(OvernightError):
    pass


class Entry(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    path: str
    kind: Literal["file", "dir", "symlink"]
    mode: Mode
    size: Annotated[int, msgspec.Meta(ge=0)] = 0
    sha256: Hex = ""
    target: str = ""


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: int
    mode: Mode  # of the plugin directory itself
    entries: list[Entry]


class Snapshot(NamedTuple):
    tree_sha256: str
    manifest: bytes
    blobs: list[bytes]  # every distinct file content, then the manifest itself


_decoder = msgspec.json.Decoder(Manifest)


# ------------------------------------------------------------------ taking


def take(root: Path, plugin_dir: Path, leave_out: frozenset[str] = frozenset()) -> Snapshot:
    """Snapshot plugin_dir (which must resolve to a directory inside root), without `leave_out`
    (files of no plugin, see analysis.walk).

    Raises SnapshotError when the tree cannot be captured completely (an unreadable file or
    directory, a name that is not UTF-8, more than analysis.MAX_ENTRIES entries or
    MAX_BYTES bytes): a partial snapshot would delete files on restore.
    """
    root_real = os.path.realpath(root)
    start = os.path.realpath(plugin_dir)
    if not os.path.lexists(plugin_dir):
        raise SnapshotError(f"{one_line(str(plugin_dir))} does not exist any more (deleted or moved meanwhile)")
    if not is_inside(start, root_real) or not os.path.isdir(start):
        raise SnapshotError(f"{one_line(str(plugin_dir))} is not a directory inside the marketplace")
    problems: list[str] = []
    entries: list[Entry] = []
    blobs: dict[str, bytes] = {}
    total = 0
    for rel, st in walk(start, problems, leave_out):
        _require_utf8(rel, "name")
        mode = stat.S_IMODE(st.st_mode) & ~_STRIP
        if stat.S_ISDIR(st.st_mode):
            entries.append(Entry(path=rel, kind="dir", mode=mode))
        elif stat.S_ISLNK(st.st_mode):
            target = _readlink(start, rel)
            _require_utf8(target, f"target of symlink {one_line(rel)}")
            entries.append(Entry(path=rel, kind="symlink", mode=mode,
                                 size=len(os.fsencode(target)), target=target))
        elif stat.S_ISREG(st.st_mode):
            data = _read(start, rel)
            total += len(data)
            if total > MAX_BYTES:
                raise SnapshotError(f"the plugin holds more than {MAX_BYTES // (1024 * 1024)} MiB")
            digest = hashlib.sha256(data).hexdigest()
            blobs.setdefault(digest, data)
            entries.append(Entry(path=rel, kind="file", mode=mode, size=len(data), sha256=digest))
        # FIFOs, sockets and devices carry no content a plugin can use: left out.
        if len(entries) > MAX_ENTRIES:
            raise SnapshotError(f"the plugin has more than {MAX_ENTRIES} files and directories")
    if problems:
        raise SnapshotError(f"cannot snapshot {one_line(str(plugin_dir))}: {problems[0]}")
    entries.sort(key=lambda e: e.path.split("/"))
    manifest = msgspec.json.encode(Manifest(
        format=FORMAT, mode=stat.S_IMODE(os.stat(start).st_mode) & ~_STRIP, entries=entries))
    return Snapshot(tree_sha256=hashlib.sha256(manifest).hexdigest(), manifest=manifest,
                    blobs=[*blobs.values(), manifest])


def _require_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SnapshotError(f"cannot snapshot {what} {one_line(text)!r}: it is not UTF-8") from e


def _readlink(start: str, rel: str) -> str:
    try:
        return os.readlink(os.path.join(start, rel))
    except OSError as e:
        raise SnapshotError(f"cannot read symlink {one_line(rel)}: {e.strerror}") from e


def _read(start: str, rel: str) -> bytes:
    try:
        fd = os.open(os.path.join(start, rel),
                     os.O_RDONLY | os.O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError as e:
        raise SnapshotError(f"cannot read {one_line(rel)}: {e.strerror}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotError(f"cannot read {one_line(rel)}: it changed while being read")
        chunks = []
        while chunk := os.read(fd, _CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise SnapshotError(f"cannot read {one_line(rel)}: {e.strerror}") from e
    finally:
        os.close(fd)


# ------------------------------------------------------------------ restoring


def restore(get_blob: Callable[[str], bytes], root: Path, plugin_dir: Path,
            tree_sha256: str, keep: Collection[str] = (), begin: Callable[[], None] | None = None) -> list[str]:
    """Make plugin_dir exactly the snapshot `tree_sha256` (created when missing), keeping what
    no snapshot holds (see `writes.swap_dir`); returns the paths of those that had to go,
    because the snapshot has something else of that name.

    Refuses, with SnapshotError and before changing anything: a missing or corrupt blob, a
    malformed manifest, an entry path with '..', '.', an absolute path, an empty or NUL
    segment, a plugin_dir not inside root, or reached through a symlink.
    A plugin at the marketplace root cannot be swapped whole: see `_restore_root` (`keep`, and
    `begin`, called once every check passed, before the first change).
    """
    manifest = _load(get_blob, tree_sha256)
    entries = _validated(manifest)
    parts = _plugin_parts(root, plugin_dir)
    if not parts:
        return _restore_root(get_blob, Path(root), manifest, entries, keep, begin)
    try:
        parent_fd = open_dir(Path(root), parts[:-1], create=True)
    except WriteError as e:
        raise SnapshotError(f"cannot restore {one_line(str(plugin_dir))}: {e}") from e
    name = parts[-1]
    try:
        existing = _lstat(parent_fd, name)
        if existing is not None and not stat.S_ISDIR(existing.st_mode):
            what = "a symlink" if stat.S_ISLNK(existing.st_mode) else "not a directory"
            raise SnapshotError(f"cannot restore {one_line(str(plugin_dir))}: it is {what}")
        built = temp_name(name, "restore")
        os.mkdir(built, 0o700, dir_fd=parent_fd)
        try:
            _build(get_blob, parent_fd, built, manifest, entries)
            return swap_dir(parent_fd, name, built)
        except BaseException:
            try:
                remove_tree(parent_fd, built)
            except WriteError:
                pass  # cleanup_temp removes it later
            raise
    except (OSError, WriteError) as e:
        raise SnapshotError(f"cannot restore {one_line(str(plugin_dir))}: {_reason(e)}") from e
    finally:
        os.close(parent_fd)


def _reason(e: OSError | WriteError) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _load(get_blob: Callable[[str], bytes], tree_sha256: str) -> Manifest:
    data = _blob(get_blob, tree_sha256, "the manifest")
    try:
        return _decoder.decode(data)
    except msgspec.MsgspecError as e:
        raise SnapshotError(f"snapshot {tree_sha256} has a malformed manifest: {e}") from e


def _entries(data: bytes) -> list[Entry]:
    """The entries of the manifest `data`; SnapshotError if it is malformed."""
    try:
        return _decoder.decode(data).entries
    except msgspec.MsgspecError as e:
        raise SnapshotError(f"malformed manifest: {e}") from e


def manifest_files(data: bytes) -> list[tuple[str, str]]:
    """(path, sha256) of every file a manifest names."""
    return [(e.path, e.sha256) for e in _entries(data) if e.kind == "file"]


def held(data: bytes) -> dict[str, str]:
    """What `writes.found` said of each path of the manifest `data` when it was taken."""
    return {e.path: e.sha256 if e.kind == "file" else "directory" if e.kind == "dir" else "symlink " + e.target
            for e in _entries(data)}


def _blob(get_blob: Callable[[str], bytes], digest: str, what: str) -> bytes:
    try:
        data = get_blob(digest)
    except EventStoreError as e:
        raise SnapshotError(f"cannot restore {what}: {e}") from e
    if hashlib.sha256(data).hexdigest() != digest:
        raise SnapshotError(f"cannot restore {what}: blob {digest} is corrupt")
    return data


def _validated(manifest: Manifest) -> list[tuple[Entry, list[str]]]:
    """Entries with their path segments, parents first; SnapshotError naming a bad entry."""
    if manifest.format != FORMAT:
        raise SnapshotError(f"snapshot format {manifest.format} is not supported")
    kinds: dict[tuple[str, ...], str] = {}
    checked = []
    for entry in manifest.entries:
        shown = one_line(repr(entry.path))
        try:
            parts = rel_parts(entry.path, backslash=True)  # names read from disk
        except ValueError as e:
            raise SnapshotError(f"snapshot entry {shown} {e}; refusing to restore") from e
        if any(part in SKIP_DIRS for part in parts):
            raise SnapshotError(f"snapshot entry {shown} is inside a directory never snapshotted")
        if tuple(parts) in kinds:
            raise SnapshotError(f"snapshot entry {shown} appears twice")
        if entry.kind == "file" and not entry.sha256:
            raise SnapshotError(f"snapshot entry {shown} is a file without a sha256")
        if entry.kind == "symlink" and (not entry.target or "\x00" in entry.target):
            raise SnapshotError(f"snapshot entry {shown} is a symlink without a valid target")
        kinds[tuple(parts)] = entry.kind
        checked.append((entry, parts))
    for entry, parts in checked:
        if len(parts) > 1 and kinds.get(tuple(parts[:-1])) != "dir":
            raise SnapshotError(f"snapshot entry {one_line(repr(entry.path))} has no directory "
                                f"entry for its parent")
    checked.sort(key=lambda item: item[1])
    return checked


def _plugin_parts(root: Path, plugin_dir: Path) -> list[str]:
    """plugin_dir's segments below root ([] for the root itself); SnapshotError for a path outside it."""
    try:
        return below(root, plugin_dir)
    except WriteError as e:
        raise SnapshotError(str(e)) from e


def _restore_root(get_blob: Callable[[str], bytes], root: Path, manifest: Manifest,
                  entries: list[tuple[Entry, list[str]]], keep: Collection[str],
                  begin: Callable[[], None] | None) -> list[str]:
    """Restore the plugin at the marketplace root (`"source": "./"`) in place: the root also
    holds the log and the other plugins, so it is not swapped whole. `keep`: files below the
    root that are not the plugin's though its tree holds them (the marketplace's manifest, a
    log or a backup kept there), left as they are.

    Refused with SnapshotError before anything changes: a blob that is missing or damaged; an
    entry of the snapshot at or below what no snapshot holds now (another plugin, .git); a
    directory in a place where the snapshot has a file or a symlink, holding such a thing or a
    kept file. Then what the plugin holds now and the snapshot does not is removed, deepest
    first (a directory only once nothing is left in it); every entry of the snapshot is put
    in place (a file or symlink that differs through a temporary name and a rename, a file
    already right is left alone); the directories get their modes, deepest first, each fsynced.

    Not one atomic step, unlike a swap: a restore cut short leaves some entries restored, and
    running it again finishes it.
    """
    for entry, _parts in entries:
        if entry.kind == "file" and len(_blob(get_blob, entry.sha256, f"file {one_line(entry.path)}")) != entry.size:
            raise SnapshotError(f"cannot restore file {one_line(entry.path)}: its blob has the wrong size")
    root_real = os.path.realpath(root)
    problems: list[str] = []
    current = {rel: st for rel, st in walk(root_real, problems) if rel not in keep}
    if problems:
        raise SnapshotError(f"cannot restore {one_line(str(root))}: {problems[0]}")
    held = _held(root_real)
    wanted = {}
    for entry, parts in entries:
        rel = "/".join(parts)
        if rel in keep:
            continue
        inside = next((h for h in _ancestors(rel, itself=True) if h in held), None)
        if inside is not None:
            what = "it" if inside == rel else one_line(inside)
            raise SnapshotError(f"cannot restore {one_line(rel)}: {what} is another plugin now, or never snapshotted; "
                                "move it, then restore again (nothing was changed)")
        wanted[rel] = entry
    holding = {a for path in (*held, *keep) for a in _ancestors(path, itself=False)}
    for rel, st in current.items():
        entry = wanted.get(rel)
        if stat.S_ISDIR(st.st_mode) and entry is not None and entry.kind != "dir" and rel in holding:
            raise SnapshotError(
                f"cannot restore {one_line(rel)}: the snapshot has a {entry.kind} there, and the directory there "
                "now holds what no snapshot holds (another plugin, .git, the log); move it, then restore again "
                "(nothing was changed)")
    if begin is not None:
        begin()
    removed: list[str] = []
    try:
        root_fd = open_dir(root, [])
    except WriteError as e:
        raise SnapshotError(f"cannot restore {one_line(str(root))}: {e}") from e
    try:
        for rel in sorted(current, reverse=True):  # below a directory before the directory
            kind, entry = _kind(current[rel]), wanted.get(rel)
            if entry is not None and entry.kind == kind:
                continue
            if kind is None and entry is None:
                continue  # a FIFO, socket or device: no snapshot holds one
            parts = rel.split("/")
            fd = open_dir(root_fd, parts[:-1])
            try:
                if kind != "dir":
                    os.unlink(parts[-1], dir_fd=fd)
                    if kind is None:
                        removed.append(rel)
                    continue
                try:
                    os.rmdir(parts[-1], dir_fd=fd)
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise  # not left empty: it holds what no snapshot holds, which stays
            finally:
                os.close(fd)
        for entry, parts in entries:
            rel = "/".join(parts)
            if rel not in wanted:
                continue
            now = current.get(rel)
            fd = open_dir(root_fd, parts[:-1])
            try:
                _put(get_blob, fd, parts[-1], entry, now is not None and _kind(now) == entry.kind)
            finally:
                os.close(fd)
        _settle_dirs(root_fd, manifest, entries)
    except (OSError, WriteError) as e:
        raise SnapshotError(f"cannot restore {one_line(str(root))}: {_reason(e)}") from e
    finally:
        os.close(root_fd)
    return removed


def _held(start: str) -> set[str]:
    """What no snapshot holds below `start`, that a walk leaves out: the SKIP_DIRS directories and
    the directories holding a plugin (relative paths; symlinks never followed)."""
    held: set[str] = set()
    stack = [""]
    while stack:
        prefix = stack.pop()
        try:
            with os.scandir(os.path.join(start, prefix) if prefix else start) as it:
                entries = [(e.name, e.path) for e in it if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for name, path in entries:
            rel = f"{prefix}/{name}" if prefix else name
            if name in SKIP_DIRS or holds_plugin(path):
                held.add(rel)
            else:
                stack.append(rel)
    return held


def _ancestors(rel: str, *, itself: bool) -> list[str]:
    """The directories on the way to `rel` ("a", "a/b" for "a/b/c"), and `rel` itself if asked."""
    parts = rel.split("/")
    return ["/".join(parts[:n]) for n in range(1, len(parts) + (1 if itself else 0))]


def _kind(st: os.stat_result) -> str | None:
    """The snapshot kind of an lstat: file, dir or symlink; None for a FIFO, socket or device."""
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "file" if stat.S_ISREG(st.st_mode) else None


def _put(get_blob: Callable[[str], bytes], fd: int, name: str, entry: Entry, present: bool) -> None:
    """Put one snapshot entry at fd/name (`present`: an entry of its kind was there before the
    restore began, and may already be right)."""
    mode = entry.mode & ~_STRIP
    if entry.kind == "dir":
        if not present:
            os.mkdir(name, 0o700, dir_fd=fd)
        return
    if entry.kind == "symlink":
        if present and os.readlink(name, dir_fd=fd) == entry.target:
            return
        tmp = temp_name(name, "tmp")
        os.symlink(entry.target, tmp, dir_fd=fd)
    else:
        data = _blob(get_blob, entry.sha256, f"file {one_line(entry.path)}")
        if present and _already(fd, name, data, mode):
            return
        tmp = temp_name(name, "tmp")
        _write_new(fd, tmp, data, mode)
    try:
        os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
    except BaseException:
        os.unlink(tmp, dir_fd=fd)
        raise
    os.fsync(fd)


def _already(fd: int, name: str, data: bytes, mode: int) -> bool:
    """Whether fd/name is a regular file (never followed if a symlink) holding exactly `data`;
    if so it is given `mode`."""
    try:
        file_fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=fd)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(file_fd).st_mode):
            return False
        chunks = []
        while chunk := os.read(file_fd, _CHUNK):
            chunks.append(chunk)
        if b"".join(chunks) != data:
            return False
        os.fchmod(file_fd, mode)
        return True
    finally:
        os.close(file_fd)


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _build(get_blob: Callable[[str], bytes], parent_fd: int, built: str, manifest: Manifest,
           entries: list[tuple[Entry, list[str]]]) -> None:
    """Create every entry below parent_fd/built (entries come parents first), then settle the
    directories' modes."""
    top = open_dir(parent_fd, [built])
    try:
        for entry, parts in entries:
            fd = open_dir(top, parts[:-1])
            try:
                if entry.kind == "dir":
                    os.mkdir(parts[-1], 0o700, dir_fd=fd)
                elif entry.kind == "symlink":
                    os.symlink(entry.target, parts[-1], dir_fd=fd)
                else:
                    data = _blob(get_blob, entry.sha256, f"file {one_line(entry.path)}")
                    if len(data) != entry.size:
                        raise SnapshotError(f"cannot restore file {one_line(entry.path)}: "
                                            f"its blob has the wrong size")
                    _write_new(fd, parts[-1], data, entry.mode & ~_STRIP)
            finally:
                os.close(fd)
        _settle_dirs(top, manifest, entries)
    finally:
        os.close(top)


def _settle_dirs(top: int, manifest: Manifest, entries: list[tuple[Entry, list[str]]]) -> None:
    """Give the directories below `top`, then `top` itself, their modes, deepest first, fsyncing each."""
    for entry, parts in reversed(entries):
        if entry.kind == "dir":
            fd = open_dir(top, parts)
            try:
                os.fchmod(fd, entry.mode & ~_STRIP)
                os.fsync(fd)
            finally:
                os.close(fd)
    os.fchmod(top, manifest.mode & ~_STRIP)
    os.fsync(top)


def _write_new(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:_CHUNK]):]
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
