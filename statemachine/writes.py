"""Atomic, contained writes into a plugin directory, and the recovery of interrupted ones.

What must always hold:
- Nothing is written outside the plugin directory: every path is a relative posix path without
  '..', '.', empty segments, backslashes or NUL, and every directory on the way is opened with
  O_NOFOLLOW | O_DIRECTORY relative to its parent's descriptor, so no symlink is ever followed.
- A target file holds either its old bytes or its complete new bytes, never a mix: data goes to
  `.<name>.overnight-tmp-<hex>` in the same directory, is fsynced, renamed over the target, and the
  directory is fsynced. A crash leaves at most a temp file, which `cleanup_temp` removes.
- `apply` and `move_dir` are idempotent, so re-running them after a crash at any point finishes
  the job; `settled` tells, by hashing, whether a recorded write intent already took effect.
- A directory swap (`swap_dir`, used by snapshot restore) is recoverable: after a crash between
  its two renames `cleanup_temp` puts the old tree back, after it `cleanup_temp` finishes it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from statemachine.discovery import SKIP_DIRS, holds_plugin, one_line, special_kind
from statemachine.errors import OvernightError

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_NOFOLLOW | _O_CLOEXEC
_CHUNK = 1024 * 1024
# Leftovers of this module and of snapshot restore: `.<name>.<kind>-<16 hex>`.
# "overnight" in the name: a person's own `.notes.tmp-0123456789abcdef` is never taken for one.
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.overnight-(?P<kind>tmp|restore|old)-[0-9a-f]{16}")


class WriteError(OvernightError):
    pass


class ChangedMeanwhile(WriteError):
    """A target someone else changed since the plugin's snapshot: left as it is."""


# ------------------------------------------------------------------ paths and descriptors


def rel_parts(rel: str, *, backslash: bool = False) -> list[str]:
    """The segments of a safe relative posix path; ValueError saying why when it is not one.
    A backslash is refused unless `backslash`: in a path Gemini wrote it means a Windows
    separator, while in a name read from disk (a snapshot's) it is an ordinary character."""
    if not isinstance(rel, str) or not rel:
        raise ValueError("is empty")
    if "\x00" in rel:
        raise ValueError("contains NUL")
    if "\\" in rel and not backslash:
        raise ValueError("contains a backslash")
    if rel.startswith("/"):
        raise ValueError("is absolute")
    parts = rel.split("/")
    for part in parts:
        if part == "":
            raise ValueError("has an empty segment")
        if part in (".", ".."):
            raise ValueError(f"has a {part!r} segment")
    return parts


def temp_name(name: str, kind: str) -> str:
    """`.<name>.overnight-<kind>-<16 hex>`: the only names `cleanup_temp` removes."""
    return f".{name}.overnight-{kind}-{secrets.token_hex(8)}"


def open_dir(base: Path | int, parts: Sequence[str], *, create: bool = False) -> int:
    """A descriptor of base/parts[0]/parts[1]/...; each step refuses a symlink or non-directory.

    `base` is a path (itself opened without following a final symlink) or a descriptor (not
    consumed). With `create`, missing directories are made (0o755) and their parents fsynced.
    Raises WriteError naming the offending component.
    """
    if isinstance(base, int):
        fd = os.dup(base)
        shown = ""
    else:
        shown = str(base)
        try:
            fd = os.open(base, _O_DIR)
        except OSError as e:
            raise WriteError(_why(shown, e)) from e
    try:
        for part in parts:
            shown = f"{shown}/{part}" if shown else part
            created = False
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    created = True
                except FileExistsError:
                    pass
                except OSError as e:
                    raise WriteError(_why(shown, e)) from e
            try:
                child = os.open(part, _O_DIR, dir_fd=fd)
            except OSError as e:
                # O_NOFOLLOW | O_DIRECTORY on a symlink fails with ENOTDIR: say what it is.
                link = e.errno == errno.ENOTDIR and _is_link(fd, part)
                raise WriteError(f"{one_line(shown)} is a symlink; refusing to follow it" if link
                                 else _why(shown, e)) from e
            if created:
                os.fsync(fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _why(shown: str, e: OSError) -> str:
    what = one_line(shown)
    if e.errno in (errno.ELOOP, errno.EMLINK):
        return f"{what} is a symlink; refusing to follow it"
    if e.errno == errno.ENOTDIR:
        return f"{what} is not a directory"
    if e.errno == errno.ENOENT:
        return f"{what} does not exist"
    return f"{what}: {e.strerror}"


def _is_link(dir_fd: int, name: str) -> bool:
    st = _lstat(dir_fd, name)
    return st is not None and stat.S_ISLNK(st.st_mode)


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _checked(rel: str) -> list[str]:
    try:
        return rel_parts(rel)
    except ValueError as e:
        raise WriteError(f"path {one_line(repr(rel))} {e}") from e


# ------------------------------------------------------------------ writes


@contextmanager
def opened(root: Path, plugin_dir: Path) -> Iterator[int]:
    """A descriptor of `plugin_dir`, opened from `root` one directory at a time without
    following a symlink: a category directory swapped for a symlink must not lead a write out
    of the marketplace. The functions below take it (or, in tests, a path) as `plugin_dir`."""
    fd = open_dir(root, below(root, plugin_dir))
    try:
        yield fd
    finally:
        os.close(fd)


def below(root: Path, plugin_dir: Path) -> list[str]:
    """plugin_dir's segments below root, compared lexically, then resolved (a plugin at the
    root has none); WriteError when it is not inside root."""
    for base, path in ((os.path.abspath(root), os.path.abspath(plugin_dir)),
                       (os.path.realpath(root), os.path.realpath(plugin_dir))):
        rel = os.path.relpath(path, base)
        if rel == ".":
            return []
        if rel != ".." and not rel.startswith(".." + os.sep):
            return rel.split(os.sep)
    raise WriteError(f"{one_line(str(plugin_dir))} is not inside the marketplace")


def plan_targets(plugin_dir: Path | int, skill_dir_rel: str, files: dict[str, bytes]) -> None:
    """Validate every target before anything is written; raise WriteError naming a bad path.

    Each key must lie strictly under `skill_dir_rel`; no existing component on the way may be a
    symlink or a non-directory, and the target itself must not be a directory, a FIFO, a socket
    or a device (an existing symlink there is fine: it is replaced, not followed). No key may be another key's directory.
    """
    skill = _checked(skill_dir_rel)
    paths = {rel: _checked(rel) for rel in files}
    for rel, parts in paths.items():
        if len(parts) <= len(skill) or parts[: len(skill)] != skill:
            raise WriteError(f"{one_line(rel)} is not inside {one_line(skill_dir_rel)}")
    dirs = {"/".join(parts[:i]) for parts in paths.values() for i in range(1, len(parts))}
    for rel in paths:
        if rel in dirs:
            raise WriteError(f"{one_line(rel)} is both a file and a directory of another file")
    try:
        base = open_dir(plugin_dir, [])
    except WriteError as e:
        raise WriteError(f"plugin directory {e}") from e
    try:
        for rel, parts in sorted(paths.items()):
            _check_existing(base, rel, parts)
    finally:
        os.close(base)


def _check_existing(base: int, rel: str, parts: list[str]) -> None:
    fd = os.dup(base)
    try:
        for i, part in enumerate(parts):
            st = _lstat(fd, part)
            if st is None:
                return
            last = i == len(parts) - 1
            if last:
                if stat.S_ISDIR(st.st_mode):
                    raise WriteError(f"{one_line(rel)} is an existing directory")
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):  # no snapshot could hold it
                    raise WriteError(f"{one_line(rel)} is {special_kind(st.st_mode)}; overnight writes over files only")
                return
            shown = one_line("/".join(parts[: i + 1]))
            if stat.S_ISLNK(st.st_mode):
                raise WriteError(f"{one_line(rel)}: {shown} is a symlink; refusing to follow it")
            if not stat.S_ISDIR(st.st_mode):
                raise WriteError(f"{one_line(rel)}: {shown} is not a directory")
            child = os.open(part, _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def _mode(replaced: os.stat_result | None, data: bytes) -> int:
    mode = stat.S_IMODE(replaced.st_mode) & 0o777 if replaced and stat.S_ISREG(replaced.st_mode) else 0o644
    return mode | (mode & 0o444) >> 2 if data.startswith(b"#!") else mode


def write_atomic(plugin_dir: Path | int, rel: str, data: bytes, expect: str | None) -> None:
    """Write `data` to plugin_dir/rel so a crash leaves the old or the new bytes. A file that
    replaces one keeps its permissions (0o600 stays private); a new one gets 0o644. A script (its
    bytes start with `#!`) is made executable by whoever may read it.

    Parents are created as needed; a symlink anywhere on the way is refused, a symlink at the
    target is replaced by the file (its own target is never touched). `expect`: what `found`
    must say is at the target right before the rename; anything else there is left as it is
    (ChangedMeanwhile).
    """
    parts = _checked(rel)
    fd = open_dir(plugin_dir, parts[:-1], create=True)
    name = parts[-1]
    try:
        st = _lstat(fd, name)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise WriteError(f"{one_line(rel)} is an existing directory")
        tmp = temp_name(name, "tmp")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                      0o600, dir_fd=fd)
        try:
            try:
                os.fchmod(out, _mode(st, data))  # whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view[:_CHUNK]):]
                os.fsync(out)
            finally:
                os.close(out)
            if _found(fd, name) != expect:
                raise ChangedMeanwhile(_edited(rel))
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=fd)
            except OSError:
                pass
            raise
        os.fsync(fd)
    except OSError as e:
        raise WriteError(f"cannot write {one_line(rel)}: {e.strerror}") from e
    finally:
        os.close(fd)


def move_dir(plugin_dir: Path | int, src_rel: str, dst_rel: str) -> None:
    """Rename directory src_rel to dst_rel inside plugin_dir (parents of dst are created).

    src must be a real directory and dst must not exist. Idempotent: when src is gone and dst
    is a directory the move already happened, and nothing is done.
    """
    src, dst = _checked(src_rel), _checked(dst_rel)
    if dst[: len(src)] == src or src[: len(dst)] == dst:
        raise WriteError(f"cannot move {one_line(src_rel)} to {one_line(dst_rel)}: one contains the other")
    src_fd = dst_fd = -1
    try:
        src_fd = _open_parent(plugin_dir, src)
        src_st = _lstat(src_fd, src[-1]) if src_fd >= 0 else None
        if src_st is None:
            dst_fd = _open_parent(plugin_dir, dst)
            dst_st = _lstat(dst_fd, dst[-1]) if dst_fd >= 0 else None
            if dst_st is not None and stat.S_ISDIR(dst_st.st_mode):
                return
            raise WriteError(f"cannot move {one_line(src_rel)}: it does not exist")
        if stat.S_ISLNK(src_st.st_mode):
            raise WriteError(f"cannot move {one_line(src_rel)}: it is a symlink")
        if not stat.S_ISDIR(src_st.st_mode):
            raise WriteError(f"cannot move {one_line(src_rel)}: it is not a directory")
        dst_fd = open_dir(plugin_dir, dst[:-1], create=True)
        if _lstat(dst_fd, dst[-1]) is not None:
            raise WriteError(f"cannot move {one_line(src_rel)}: {one_line(dst_rel)} already exists")
        os.rename(src[-1], dst[-1], src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        os.fsync(dst_fd)
        if src[:-1] != dst[:-1]:
            os.fsync(src_fd)
    except OSError as e:
        raise WriteError(f"cannot move {one_line(src_rel)} to {one_line(dst_rel)}: {e.strerror}") from e
    finally:
        for fd in (src_fd, dst_fd):
            if fd >= 0:
                os.close(fd)


def _open_parent(plugin_dir: Path | int, parts: list[str]) -> int:
    """The parent directory's descriptor, or -1 when some directory on the way is missing."""
    try:
        return open_dir(plugin_dir, parts[:-1])
    except WriteError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return -1
        raise


def apply(plugin_dir: Path | int, files: dict[str, bytes], moves: list[tuple[str, str]],
          before: dict[str, str | None]) -> None:
    """Moves first, then every file through write_atomic; re-running after a crash finishes it.

    `before`: what each target held when the plugin was snapshotted (see `found`). A target
    that holds its new bytes already is left alone; one that holds neither those nor what it
    held then was changed by someone else since, and is never written over: WriteError, before
    any file is written (and, for a change made while the files are written, right before that
    file's rename).
    """
    for src, dst in moves:
        move_dir(plugin_dir, src, dst)
    pending = []
    for rel in sorted(files):
        now = found(plugin_dir, rel)
        if now == hashlib.sha256(files[rel]).hexdigest():
            continue
        if now != before.get(rel):
            raise ChangedMeanwhile(_edited(rel))
        pending.append(rel)
    for rel in pending:
        # a read-only disk is no permission of this plugin's: the write meets it (EROFS), and the run stops
        if (refused := not_writable(plugin_dir, rel)) is not None and not refused[1]:
            raise WriteError(f"cannot write {one_line(rel)}: this user may not write in {one_line(refused[0])} (its "
                             "permissions); no file was written: make it writable, then `--retry failed`")
    for rel in pending:
        write_atomic(plugin_dir, rel, files[rel], expect=before.get(rel))


def not_writable(plugin_dir: Path | int, rel: str) -> tuple[str, bool] | None:
    """The directory on rel's way that a write would create it in (its parent, or the nearest
    one there is), when this user may not, and whether its disk is read-only; or None. Never
    follows a symlink (WriteError when one is on the way)."""
    parts = _checked(rel)
    for cut in range(len(parts) - 1, -1, -1):
        fd = _open_parent(plugin_dir, parts[:cut + 1])  # the directory parts[:cut]
        if fd < 0:
            continue
        try:
            if os.access(".", os.W_OK | os.X_OK, dir_fd=fd):
                return None
            return "/".join(parts[:cut]) or "the plugin directory", bool(os.statvfs(fd).f_flag & os.ST_RDONLY)
        finally:
            os.close(fd)
    return None


def _edited(rel: str) -> str:
    return (f"{one_line(rel)} changed since overnight took the plugin's snapshot, by someone else: "
            "it is left as it is, and overnight writes nothing over it (`--retry failed` processes the "
            "plugin again as it is now)")


def found(plugin_dir: Path | int, rel: str) -> str | None:
    """What is at plugin_dir/rel now, never following a symlink (WriteError when one is on the
    way): its sha256 for a file, "symlink <text>", "directory", "a FIFO" (a socket, a device), or
    None when nothing is there. `snapshots.held` says the same of a snapshot's entries."""
    parts = _checked(rel)
    fd = _open_parent(plugin_dir, parts)
    if fd < 0:
        return None
    try:
        return _found(fd, parts[-1])
    finally:
        os.close(fd)


def _found(dir_fd: int, name: str) -> str | None:
    st = _lstat(dir_fd, name)
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "symlink " + os.readlink(name, dir_fd=dir_fd)
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if not stat.S_ISREG(st.st_mode):
        return special_kind(st.st_mode)
    f = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dir_fd)
    try:
        mode = os.fstat(f).st_mode  # what was opened: it may have been replaced since the lstat
        if not stat.S_ISREG(mode):
            return special_kind(mode)
        sha = hashlib.sha256()
        while chunk := os.read(f, _CHUNK):
            sha.update(chunk)
        return sha.hexdigest()
    finally:
        os.close(f)


def settled(plugin_dir: Path | int, files: dict[str, str], moves: list[tuple[str, str]]) -> bool:
    """True when every move is done (src absent, dst a directory) and every file's sha256 is
    the expected hex; a symlink or a non-file at a target is not settled."""
    if not all(_moved(plugin_dir, src, dst) for src, dst in moves):
        return False
    for rel, expected in files.items():
        try:
            if found(plugin_dir, rel) != expected:
                return False
        except (WriteError, OSError):
            return False
    return True


def begun(plugin_dir: Path | int, files: dict[str, str], moves: list[tuple[str, str]]) -> bool:
    """True when some of the write is in place: a move done (src absent, dst a directory) or a
    file holding its expected sha256; or when that cannot be told (something refused on the way)."""
    try:
        return (any(_moved(plugin_dir, src, dst) for src, dst in moves)
                or any(found(plugin_dir, rel) == expected for rel, expected in files.items()))
    except (WriteError, OSError):
        return True


def _moved(plugin_dir: Path | int, src: str, dst: str) -> bool:
    """Whether the move of directory src to dst is done: src absent, dst a directory."""
    return _kind(plugin_dir, _checked(src)) is None and _kind(plugin_dir, _checked(dst)) == stat.S_IFDIR


def _parent_or_none(plugin_dir: Path | int, parts: list[str]) -> int | None:
    """The parent directory's descriptor, or None when it is missing or refused (for checks)."""
    try:
        fd = _open_parent(plugin_dir, parts)
    except WriteError:
        return None
    return fd if fd >= 0 else None


def _kind(plugin_dir: Path | int, parts: list[str]) -> int | None:
    fd = _parent_or_none(plugin_dir, parts)
    if fd is None:
        return None
    try:
        st = _lstat(fd, parts[-1])
        return None if st is None else stat.S_IFMT(st.st_mode)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ directory swap and recovery


def swap_dir(parent_fd: int, name: str, built: str) -> list[str]:
    """Replace directory `name` by the complete directory `built`, both in parent_fd.

    `name` is renamed to `.<name>.overnight-old-<hex>`, `built` to `name`, the parent fsynced; then what
    no snapshot holds (.git, node_modules, .overnight, nested plugins, FIFOs, sockets, devices)
    is moved from the old tree into the new one, and the old tree is removed. Returns the paths
    (below `name`) that could not be moved because the new tree has something else there. When
    `name` does not exist, `built` is simply renamed to it.
    """
    st = _lstat(parent_fd, name)
    if st is None:
        os.rename(built, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        os.fsync(parent_fd)
        return []
    old = temp_name(name, "old")
    os.rename(name, old, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    try:
        os.rename(built, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    except OSError:
        os.rename(old, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        raise
    os.fsync(parent_fd)
    return _retire(parent_fd, old, name)


def _retire(parent_fd: int, old: str, name: str) -> list[str]:
    """Finish a swap: carry over what the old tree holds that no snapshot does, then remove the
    old tree; the paths that could not be carried over (and are removed with it)."""
    old_fd = os.open(old, _O_DIR, dir_fd=parent_fd)
    left: list[str] = []
    try:
        new_fd = os.open(name, _O_DIR, dir_fd=parent_fd)
    except OSError:
        new_fd = -1
    try:
        if new_fd >= 0:
            left = _carry_skipped(old_fd, new_fd)
    finally:
        os.close(old_fd)
        if new_fd >= 0:
            os.close(new_fd)
    remove_tree(parent_fd, old)
    os.fsync(parent_fd)
    return left


def _carry_skipped(old_fd: int, new_fd: int) -> list[str]:
    """Move what a snapshot never holds (SKIP_DIRS entries, nested plugins, FIFOs, sockets and
    devices) from the old tree to the same place in the new one, making the directories on the
    way that the new tree lacks. Returns the paths it could not move, because the new tree has
    something of that name there or no directory can be made on the way: they go with the old
    tree."""
    left: list[str] = []
    stack: list[tuple[str, ...]] = [()]
    while stack:
        parts = stack.pop()
        try:
            src = open_dir(old_fd, parts)
        except WriteError:
            continue
        try:
            with os.scandir(src) as it:
                entries = list(it)
            carried = []
            for entry in entries:
                is_dir = entry.is_dir(follow_symlinks=False)
                if (entry.name in SKIP_DIRS or (is_dir and holds_plugin(entry.name, dir_fd=src))
                        or not (is_dir or entry.is_file(follow_symlinks=False) or entry.is_symlink())):
                    carried.append(entry.name)
                elif is_dir:
                    stack.append((*parts, entry.name))
            if carried:
                left += _carry_into(src, carried, new_fd, parts)
        finally:
            os.close(src)
    return left


def _carry_into(src: int, names: list[str], new_fd: int, parts: tuple[str, ...]) -> list[str]:
    """Move src/name for each of `names` to new_fd/parts/name; the paths it could not move."""
    try:
        dst = open_dir(new_fd, parts, create=True)
    except WriteError:
        return ["/".join((*parts, name)) for name in names]
    left = []
    try:
        for name in names:
            if _lstat(dst, name) is None:
                _rename_into(src, name, dst)
            else:
                left.append("/".join((*parts, name)))
        os.fsync(dst)
    finally:
        os.close(dst)
    return left


def _rename_into(src: int, name: str, dst: int) -> None:
    """Rename src/name to dst/name, even when the restored dst is read-only for its owner."""
    try:
        os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
    except PermissionError:
        mode = stat.S_IMODE(os.fstat(dst).st_mode)
        os.fchmod(dst, mode | 0o700)
        try:
            os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
        finally:
            os.fchmod(dst, mode)


def remove_tree(parent_fd: int, name: str) -> None:
    """Remove parent_fd/name and everything below it without following symlinks, first making
    its directories writable by their owner (a restored read-only directory must still go).
    No recursion and one descriptor at a time: a tree however deep or wide."""
    try:
        st = _lstat(parent_fd, name)
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent_fd)
            return
        _grant_owner(parent_fd, name, st)
        emptied: list[tuple[str, ...]] = []  # directories, each before those below it
        stack: list[tuple[str, ...]] = [(name,)]
        while stack:
            parts = stack.pop()
            emptied.append(parts)
            fd = open_dir(parent_fd, parts)
            try:
                with os.scandir(fd) as it:
                    entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
                for entry, entry_st in entries:
                    if stat.S_ISDIR(entry_st.st_mode):
                        _grant_owner(fd, entry, entry_st)
                        stack.append((*parts, entry))
                    else:
                        os.unlink(entry, dir_fd=fd)
            finally:
                os.close(fd)
        for parts in reversed(emptied):  # the deepest first
            fd = open_dir(parent_fd, parts[:-1])
            try:
                os.rmdir(parts[-1], dir_fd=fd)
            finally:
                os.close(fd)
    except OSError as e:
        raise WriteError(f"cannot remove {one_line(name)}: {e.strerror}") from e


def _grant_owner(parent_fd: int, name: str, st: os.stat_result) -> None:
    """Give the owner rwx on directory parent_fd/name (st: its lstat) so it can be emptied."""
    if stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
        # chmod cannot refuse a symlink on Linux; st, taken without following, is a directory.
        os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=parent_fd)


def cleanup_temp(root: Path, plugin_dir: Path) -> int:
    """Remove crash leftovers of this module and of snapshot restore; return how many.

    In plugin_dir's parent only `.<plugin name>.…` leftovers are considered; below plugin_dir
    every one is (SKIP_DIRS and other plugins are not entered). An interrupted swap is recovered first: when
    `<name>` is missing, its newest `.<name>.overnight-old-*` tree is renamed back (the restore can then
    simply run again); otherwise old trees are finished (skipped directories carried over,
    then removed). `.overnight-restore-*` trees and `.overnight-tmp-*` files are removed. Symlinks are never followed.
    """
    try:
        parts = below(root, plugin_dir)
        parent_fd = open_dir(root, parts[:-1])  # the root itself for a plugin at the root
    except WriteError:
        return 0
    count = 0
    try:
        if parts:
            count += _clean_dir(parent_fd, only=parts[-1])
        stack: list[tuple[str, ...]] = [tuple(parts[-1:])]
        while stack:
            parts = stack.pop()
            try:
                fd = open_dir(parent_fd, parts)
            except WriteError:
                continue
            try:
                count += _clean_dir(fd, only=None)
                with os.scandir(fd) as it:
                    # another plugin's leftovers are its own: a plugin at the root holds all the others
                    stack.extend((*parts, e.name) for e in it
                                 if e.name not in SKIP_DIRS and e.is_dir(follow_symlinks=False)
                                 and not holds_plugin(e.name, dir_fd=fd))
            finally:
                os.close(fd)
    except OSError as e:
        raise WriteError(f"cannot clean up {one_line(str(plugin_dir))}: {e.strerror}") from e
    finally:
        os.close(parent_fd)
    return count


def _clean_dir(fd: int, only: str | None) -> int:
    """Recover and remove the leftovers directly in directory fd (those of `only` if given)."""
    olds: dict[str, list[tuple[float, str]]] = {}
    doomed: list[str] = []
    with os.scandir(fd) as it:
        entries = list(it)
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if match is None or (only is not None and match["name"] != only):
            continue
        is_dir = entry.is_dir(follow_symlinks=False)
        if match["kind"] == "tmp":
            if not is_dir:
                doomed.append(entry.name)
        elif not is_dir:
            continue
        elif match["kind"] == "restore":
            doomed.append(entry.name)
        else:
            olds.setdefault(match["name"], []).append(
                (entry.stat(follow_symlinks=False).st_ctime, entry.name))
    count = 0
    for name, trees in olds.items():
        trees.sort()
        if _lstat(fd, name) is None:
            _, newest = trees.pop()
            os.rename(newest, name, src_dir_fd=fd, dst_dir_fd=fd)
            os.fsync(fd)
            count += 1
        for _, old in trees:
            _retire(fd, old, name)
            count += 1
    for name in doomed:
        remove_tree(fd, name)
        count += 1
    if doomed:
        os.fsync(fd)
    return count
