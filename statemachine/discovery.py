"""Marketplace discovery: which plugins a marketplace holds, and which of them can be processed.

Invariants:
- `discover` never raises for anything found in the marketplace; bad content becomes a
  `Candidate.problem` (one line, deterministic, so an unchanged problem compares equal on the
  next scan) or a `Discovery.warnings` line.
- Nothing is read through a symlink that resolves outside the marketplace, directory walks never
  follow symlinks, and no FIFO or device is ever opened (reads use O_NONBLOCK and check the
  opened file is regular), so no content can hang or loop discovery.
- `plugin_id` is stable across runs: the normalized posix path of the plugin directory
  relative to the marketplace root.
- Among candidates, skill names are unique: a duplicate gets a problem and no skill name (the
  plugin that held the name before keeps it, else the first by plugin_id).
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from statemachine.names import InvalidName, skill_name

MANIFEST = ".claude-plugin/marketplace.json"
PLUGIN_JSON = ".claude-plugin/plugin.json"
PLUGINS_DIR = "plugins"
# Directories never descended into: version control, dependencies, our own workspace.
SKIP_DIRS = frozenset({".git", "node_modules", ".overnight"})
MAX_PLUGIN_JSON = 1024 * 1024
MAX_MANIFEST = 16 * 1024 * 1024
_CHUNK = 1024 * 1024
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class Candidate:
    plugin_id: str
    name: str | None
    category: str
    path: str
    listed: bool
    skill_name: str | None
    problem: str | None


@dataclass(frozen=True)
class Discovery:
    candidates: list[Candidate]
    warnings: list[str]


class Unreadable(Exception):
    """A file that cannot be read safely; the message completes "<file> ..." in one line."""


# ------------------------------------------------------------------ safe reading


def is_inside(real: str, root_real: str) -> bool:
    """True when the resolved path `real` is `root_real` or below it."""
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def read_inside(root_real: str, path: Path | str, limit: int, *, head: bool = False) -> bytes:
    """The bytes of a regular file that resolves inside the marketplace, at most `limit` bytes
    (`head`: the first `limit` bytes of a larger file).

    Raises Unreadable (message like "is a symlink loop") for a missing file, a dangling,
    looping or escaping symlink, a directory, FIFO or device, a file over `limit` (which is
    never read) unless `head`, or any OSError. A FIFO is never opened in blocking mode.
    """
    most = limit
    if head:
        limit = sys.maxsize
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise Unreadable("is missing") from None
    except OSError as e:
        raise Unreadable(f"cannot be read: {e.strerror}") from None
    link = None
    if stat.S_ISLNK(st.st_mode):
        link = _readlink(path)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise Unreadable(f"is a dangling symlink (-> {link})") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise Unreadable("is a symlink loop") from None
            raise Unreadable(f"cannot be read: {e.strerror}") from None
    real = _realpath(path)
    if real is None:
        raise Unreadable("is a symlink loop")
    if not is_inside(real, root_real):
        if link is not None:
            raise Unreadable(f"is a symlink pointing outside the marketplace (-> {link})")
        raise Unreadable("resolves outside the marketplace")
    _require_regular(st.st_mode, st.st_size, limit)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError as e:
        raise Unreadable(f"cannot be read: {e.strerror}") from None
    try:
        fst = os.fstat(fd)
        _require_regular(fst.st_mode, fst.st_size, limit)
        chunks, total = [], 0
        while total <= most:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > most and not head:
            raise Unreadable(f"is too large (more than {most} bytes)")
        return b"".join(chunks)[:most]
    except OSError as e:
        raise Unreadable(f"cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)


def _require_regular(mode: int, size: int, limit: int) -> None:
    if stat.S_ISDIR(mode):
        raise Unreadable("is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise Unreadable(f"is not a regular file ({special_kind(mode)})")
    if size > limit:
        raise Unreadable(f"is too large ({size} bytes; the limit is {limit})")


def special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _readlink(path: str) -> str:
    try:
        return one_line(os.readlink(path))
    except OSError:
        return "?"


def _realpath(path: str) -> str | None:
    try:
        return os.path.realpath(path)
    except (OSError, RuntimeError):
        return None


def one_line(text: str, limit: int = 120) -> str:
    """`text` with control characters escaped, cut to `limit` characters: safe in a problem."""
    shown = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _not_json(constant: str) -> Any:
    """NaN and Infinity, which Python's json module reads but JSON (and Claude Code) does not."""
    raise ValueError(f"{constant} is not JSON")


def load_json(root_real: str, path: Path, limit: int, label: str) -> Any:
    """Parsed JSON of a file inside the marketplace. Raises Unreadable with a full message."""
    try:
        data = read_inside(root_real, path, limit)
    except Unreadable as e:
        raise Unreadable(f"{label} {e}") from None
    if not data.strip():
        raise Unreadable(f"{label} is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Unreadable(f"{label} is not UTF-8 (invalid byte at offset {e.start})") from None
    try:
        parsed = json.loads(text, parse_constant=_not_json)
        json.dumps(parsed, ensure_ascii=False).encode("utf-8")
    except json.JSONDecodeError as e:
        raise Unreadable(
            f"{label}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except RecursionError:
        raise Unreadable(f"{label}: invalid JSON: nested too deeply") from None
    except UnicodeEncodeError:
        raise Unreadable(f"{label}: a string holds a lone surrogate escape (like \\udfff), "
                         "which is not Unicode text") from None
    except ValueError as e:  # an integer of more than sys.get_int_max_str_digits() digits
        raise Unreadable(f"{label}: invalid JSON: {str(e).split(';')[0]}") from None
    return parsed


# ------------------------------------------------------------------ the manifest


def manifest_entries(root: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Entries of the marketplace manifest by plugin id, and warnings about the manifest.

    A missing manifest is normal (directory discovery alone); an unusable one is a warning.
    Entries whose source cannot be a plugin directory are keyed by their source as given.
    """
    root_real = os.path.realpath(root)
    path = Path(root) / MANIFEST
    if not os.path.lexists(path):
        return {}, []
    try:
        manifest = load_json(root_real, path, MAX_MANIFEST, MANIFEST)
    except Unreadable as e:
        return {}, [f"{e}; plugins are discovered from directories only"]
    fallback = "plugins are discovered from directories only"
    if not isinstance(manifest, dict):
        return {}, [f"{MANIFEST} is not a JSON object; {fallback}"]
    plugins = manifest.get("plugins", [])
    if not isinstance(plugins, list):
        return {}, [f"{MANIFEST}: 'plugins' is not a list; {fallback}"]
    entries: dict[str, dict[str, Any]] = {}
    first_index: dict[str, int] = {}
    warnings = []
    for index, entry in enumerate(plugins):
        if not isinstance(entry, dict):
            warnings.append(f"{MANIFEST}: plugins[{index}] is not an object; skipped")
            continue
        if "source" not in entry:
            warnings.append(f"{MANIFEST}: plugins[{index}] has no 'source'; skipped")
            continue
        plugin_id = _manifest_id(entry["source"])
        if plugin_id in entries:
            warnings.append(
                f"{MANIFEST}: source {one_line(str(entry['source']))!r} is listed twice "
                f"(plugins[{first_index[plugin_id]}] and plugins[{index}]); the first is used"
            )
            continue
        entries[plugin_id] = entry
        first_index[plugin_id] = index
    return entries, warnings


def _manifest_id(source: Any) -> str:
    if not isinstance(source, str) or not source.strip():  # a blank source is shown quoted, never as ""
        return json.dumps(source, sort_keys=True, ensure_ascii=False)
    normalized = _normalize(source)
    return normalized if normalized is not None else source


def _normalize(source: str) -> str | None:
    """The posix path of a relative source inside the root, or None when it cannot be one."""
    if "\x00" in source or not source.strip():
        return None
    if posixpath.isabs(source) or _is_url(source):
        return None
    normalized = posixpath.normpath(source)
    if normalized == ".." or normalized.startswith("../"):
        return None
    return normalized


def _is_url(source: str) -> bool:
    """https://host/repo.git, git@host:repo.git, github:owner/repo and the like: another
    repository's plugin (a scheme of one letter is a Windows drive: C:\\plugins)."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]+:|[\w.-]+@[\w.-]+:", source) is not None


def _source_problem(root: Path, root_real: str, source: Any) -> str | None:
    if not isinstance(source, str):
        kind = source.get("source") if isinstance(source, dict) else None
        described = f"a remote {kind!s} source" if isinstance(kind, str) else "not a path"
        return f"source is {one_line(described)}; only plugins inside the repository are processed"
    shown = one_line(source)
    normalized = _normalize(source)
    if normalized is None:
        if not source.strip():
            return "source is empty"
        if posixpath.isabs(source):
            return (f"source '{shown}' is an absolute path; a source is relative to the marketplace "
                    "root, like ./plugins/<name>")
        if _is_url(source):
            return f"source '{shown}' is a URL; only plugins inside the repository are processed"
        if "\x00" in source:
            return f"source '{shown}' holds a NUL character, which no path can"
        return f"source '{shown}' points outside the repository"
    skipped = next((part for part in normalized.split("/") if part in SKIP_DIRS), None)
    if skipped:
        return f"source '{shown}' is inside {skipped}, which is never a plugin"
    path = root / normalized
    if not os.path.lexists(path):
        return f"source '{shown}' does not exist"
    real = _realpath(str(path))
    if real is None or not is_inside(real, root_real):
        return f"source '{shown}' points outside the repository"
    if not os.path.isdir(real):
        return f"source '{shown}' is not a directory"
    return None


# ------------------------------------------------------------------ directories


# The skill directory older marketplace tooling made: a write moves it to skills/<name>/.
LEGACY_SKILL_DIR = "skill-adapter"


def legacy_skill_dir(plugin_dir: Path, name: str) -> Path | None:
    """The legacy skill directory that a write moves to skills/<name>/, if any."""
    skills = plugin_dir / "skills"
    if (skills / name).exists() or not skills.is_dir():
        return None
    legacy = skills / LEGACY_SKILL_DIR
    if legacy.is_dir() and not legacy.is_symlink():
        return legacy
    return None


def holds_plugin(path: str | Path, dir_fd: int | None = None) -> bool:
    """Whether the directory `path` (relative to `dir_fd` if given) is a plugin: it holds
    .claude-plugin/plugin.json. A plugin inside another one is its own plugin, never part of
    the outer one's tree, snapshots or content hash."""
    try:
        os.stat(os.path.join(path, PLUGIN_JSON), dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def plugin_dirs(root: Path) -> tuple[list[str], list[str]]:
    """Plugin ids of every directory under plugins/ holding .claude-plugin/plugin.json, and
    warnings about what could not be searched.

    Symlinks are never followed; `.git`, `node_modules` and `.overnight` are skipped. A
    directory that cannot be read, or whose name is not UTF-8 (it cannot be a plugin id), and
    a symlink to a plugin are warnings, so a plugin is never lost without a word.
    """
    found: list[str] = []
    warnings: list[str] = []
    start = Path(root) / PLUGINS_DIR
    try:
        mode = os.lstat(start).st_mode
    except FileNotFoundError:
        return [], []
    except OSError as e:
        return [], [f"cannot read {PLUGINS_DIR}/: {e.strerror}; no plugin directory was searched"]
    if not stat.S_ISDIR(mode):
        what = "a symlink (never followed)" if stat.S_ISLNK(mode) else "not a directory"
        return [], [f"{PLUGINS_DIR} is {what}; no plugin directory was searched"]
    stack = [PLUGINS_DIR]
    while stack:
        rel = stack.pop()
        directory = Path(root) / rel
        try:
            has_manifest = holds_plugin(directory)
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as e:
            warnings.append(f"cannot read directory {one_line(rel)}: {e.strerror}; "
                            "plugins in it cannot be found")
            continue
        if has_manifest:
            found.append(rel)
        for entry in entries:
            if entry.name in SKIP_DIRS:
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError as e:
                warnings.append(f"cannot read {one_line(rel + '/' + entry.name)}: {e.strerror}")
                continue
            child = f"{rel}/{entry.name}"
            if not is_dir:
                if entry.is_symlink() and holds_plugin(Path(root) / child):  # through the link
                    warnings.append(f"skipped {one_line(child)}: a symlink to a plugin (never followed); "
                                    "move the plugin there, or list its real directory in marketplace.json")
                continue
            if not is_utf8(entry.name):
                warnings.append(f"skipped directory {one_line(child)}: its name is not UTF-8")
                continue
            stack.append(child)
    return found, warnings


def is_utf8(text: str) -> bool:
    """False for a str holding lone surrogates (undecodable bytes of a file name)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _category_from_path(plugin_id: str) -> str:
    parts = plugin_id.split("/")
    if len(parts) >= 3 and parts[0] == PLUGINS_DIR:
        return parts[1]
    return "uncategorized"


# ------------------------------------------------------------------ discovery


def discover(root: Path, holders: Mapping[str, str] | None = None) -> Discovery:
    """Every plugin of the marketplace at root, sorted by plugin_id. Never raises for bad content.

    Candidates are the manifest's entries united with every plugin directory under plugins/;
    the manifest wins for name and category. Of plugins sharing a name, the one that held it
    before keeps it (`holders`: plugin_id -> its name, from the log), else the first by
    plugin_id: a plugin added with a name already taken is the duplicate.
    """
    root = Path(root)
    root_real = os.path.realpath(root)
    entries, warnings = manifest_entries(root)
    dirs, dir_warnings = plugin_dirs(root)
    warnings += dir_warnings
    ids = set(entries) | set(dirs)
    candidates = [_candidate(root, root_real, plugin_id, entries.get(plugin_id))
                  for plugin_id in sorted(ids)]
    return Discovery(candidates=_mark_duplicates(_mark_aliases(root, candidates), holders or {}),
                     warnings=warnings)


def _mark_aliases(root: Path, candidates: list[Candidate]) -> list[Candidate]:
    """One directory reached under two ids (a manifest source through a symlinked directory)
    is one plugin: the id reached without a symlink keeps it (else the first), the others get a
    problem."""
    root_real = os.path.realpath(root)
    real = {c.plugin_id: _realpath(str(root / c.path)) for c in candidates if c.problem is None}
    owners: dict[str, str] = {}
    for plugin_id in sorted(real, key=lambda pid: (real[pid] != os.path.join(root_real, pid), pid)):
        if real[plugin_id] is not None:
            owners.setdefault(real[plugin_id], plugin_id)  # type: ignore[arg-type]
    result = []
    for cand in candidates:
        owner = owners.get(real.get(cand.plugin_id) or "", cand.plugin_id)
        if owner != cand.plugin_id:
            cand = Candidate(plugin_id=cand.plugin_id, name=cand.name, category=cand.category, path=cand.path,
                             listed=cand.listed, skill_name=None,
                             problem=f"is the same directory as {owner} (reached through a symlink)")
        result.append(cand)
    return result


# A plugin directory's own name, in bytes: a restore builds the plugin beside it and swaps the
# two, as `.<name>.overnight-restore-<16 hex>` and `.<name>.overnight-old-<16 hex>` (writes.temp_name).
MAX_DIRECTORY_BYTES = 255 - len(".overnight-restore-") - 16 - 1


def _candidate(root: Path, root_real: str, plugin_id: str,
               entry: dict[str, Any] | None) -> Candidate:
    listed = entry is not None
    name: str | None = None
    category = _category_from_path(plugin_id)
    problem: str | None = None
    if entry is not None:
        if isinstance(entry.get("category"), str) and entry["category"].strip():
            category = entry["category"]
        if "name" in entry:
            if isinstance(entry["name"], str):
                name = entry["name"]
            else:
                problem = f"{MANIFEST}: the entry's 'name' is not a string"
        source_problem = _source_problem(root, root_real, entry["source"])
        if source_problem and problem is None:
            named = f" {one_line(name)!r}" if name is not None else ""
            problem = f"{MANIFEST} entry{named}: {source_problem}"
    if problem is None:
        manifest_name, problem = _read_plugin_json(root, root_real, plugin_id, name is not None)
        name = name if name is not None else manifest_name
    directory = plugin_id.rsplit("/", 1)[-1]
    if problem is None and len(os.fsencode(directory)) > MAX_DIRECTORY_BYTES:
        problem = (f"its directory's name is {len(os.fsencode(directory))} bytes long: `restore-plugin` could not "
                   f"put it back (the temporary names beside it need {255 - MAX_DIRECTORY_BYTES} bytes more, within "
                   f"the file system's 255); rename it to at most {MAX_DIRECTORY_BYTES} bytes")
    skill = None
    if name is not None:
        try:
            skill = skill_name(name)
        except InvalidName as e:
            problem = problem or f"plugin name '{one_line(name)}' cannot become a skill name: {e}"
    return Candidate(plugin_id=plugin_id, name=name, category=category, path=plugin_id,
                     listed=listed, skill_name=skill, problem=problem)


def _read_plugin_json(root: Path, root_real: str, plugin_id: str,
                      named: bool) -> tuple[str | None, str | None]:
    """(name from plugin.json, problem) for one plugin directory."""
    path = root / plugin_id / PLUGIN_JSON
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        message = f"missing {PLUGIN_JSON}"
        if os.path.lexists(root / plugin_id / "plugin.json"):
            message += (" (found plugin.json at the plugin root; Claude Code reads "
                        f"{PLUGIN_JSON})")
        return None, message
    except OSError as e:  # an unreadable directory on the way: not "missing"
        return None, f"cannot read {PLUGIN_JSON}: {e.strerror}"
    try:
        data = load_json(root_real, path, MAX_PLUGIN_JSON, PLUGIN_JSON)
    except Unreadable as e:
        return None, str(e)
    if not isinstance(data, dict):
        return None, f"{PLUGIN_JSON} is not a JSON object"
    name = data.get("name")
    if name is None:
        return None, None if named else f"{PLUGIN_JSON} has no 'name'"
    if not isinstance(name, str):
        return None, None if named else f"{PLUGIN_JSON}: 'name' is not a string"
    return name, None


def _mark_duplicates(candidates: list[Candidate], holders: Mapping[str, str]) -> list[Candidate]:
    """Of the candidates sharing a name, one keeps it: one that can be processed before one that
    cannot (a manifest entry whose directory is gone holds no name), then the one `holders`
    says held that name, else the first by plugin_id. The others get a problem and no skill name."""
    owners: dict[str, Candidate] = {}

    def rank(cand: Candidate, key: str) -> tuple[bool, bool]:
        return cand.problem is None, holders.get(cand.plugin_id) == key

    for cand in candidates:  # (sorted by plugin_id)
        key = cand.skill_name or cand.name
        if key is None:
            continue
        owner = owners.get(key)
        if owner is None or rank(cand, key) > rank(owner, key):
            owners[key] = cand
    result = []
    for cand in candidates:
        key = cand.skill_name or cand.name
        if key is None:
            result.append(cand)
            continue
        owner = owners[key].plugin_id
        if owner == cand.plugin_id:
            result.append(cand)
            continue
        named = one_line(owners[key].name or key)
        problem = cand.problem or (
            f"duplicate plugin name '{one_line(cand.name or key)}' (also used by {owner})"
            if (cand.name or key) == (owners[key].name or key) else
            f"its name '{one_line(cand.name or key)}' makes the skill name '{key}', which {owner} "
            f"(named '{named}') has"
        )
        result.append(Candidate(plugin_id=cand.plugin_id, name=cand.name,
                                category=cand.category, path=cand.path, listed=cand.listed,
                                skill_name=None, problem=problem))
    return result
