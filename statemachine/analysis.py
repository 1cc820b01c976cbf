"""Plugin analysis: a content hash of the plugin tree and the structure facts Gemini is told.

Invariants:
- The content hash depends only on the tree's relative paths, entry kinds, sizes and bytes
  (symlinks by their target text): it is equal on two calls over an unchanged tree and changes
  when one byte of one file changes. Timestamps and permissions are not part of it.
- Walks never follow symlinks and never open FIFOs or devices; files are streamed through
  sha256 in chunks, so neither loops, special files nor huge files can hang or exhaust memory.
- Every file read for facts resolves inside the marketplace (discovery.read_inside).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from statemachine.catalog import PluginFacts, SkillFact
from statemachine.discovery import (
    MAX_PLUGIN_JSON, MANIFEST, PLUGIN_JSON, SKIP_DIRS, Candidate, Unreadable, is_inside,
    discover, holds_plugin, is_utf8, load_json, manifest_entries, one_line, read_inside, special_kind,
)

MAX_ENTRIES = 20_000
MAX_BYTES = 200 * 1024 * 1024
MAX_SKILL_MD = 1024 * 1024
MAX_MARKDOWN = 8 * 1024 * 1024
_CHUNK = 1024 * 1024
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


@dataclass(frozen=True)
class Tree:
    content_hash: str
    files: int
    bytes: int
    warnings: list[str]
    problem: str | None  # why the plugin cannot be processed, or None


# ------------------------------------------------------------------ the tree


def walk(start: str, problems: list[str],
         leave_out: frozenset[str] = frozenset()) -> Iterator[tuple[str, os.stat_result]]:
    """(relative posix path, lstat) of every entry below `start` (a real path), directories included.

    Symlinks are reported, not followed; SKIP_DIRS, plugins nested inside
    (discovery.holds_plugin) and the real paths in `leave_out` (files of no plugin:
    workspace.not_plugin_files) are left out; a directory reached twice
    (bind mounts) is not entered again; an entry that cannot be read is added to `problems`.
    """
    seen: set[tuple[int, int]] = set()
    stack = [""]
    while stack:
        prefix = stack.pop()
        directory = os.path.join(start, prefix) if prefix else start
        try:
            with os.scandir(directory) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problems.append(f"cannot read directory {one_line(prefix or '.')}: {e.strerror}")
            continue
        for entry in items:
            if entry.name in SKIP_DIRS or entry.path in leave_out:
                continue
            rel = f"{prefix}/{entry.name}" if prefix else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:
                problems.append(f"cannot read {one_line(rel)}: {e.strerror}")
                continue
            if stat.S_ISDIR(st.st_mode) and holds_plugin(entry.path):
                continue  # a plugin inside this one is its own plugin
            yield rel, st
            if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                stack.append(rel)


def reaches(plugin_dir: str, real: str) -> bool:
    """Whether `walk` of the real directory `plugin_dir` reaches the real path `real`: it is below,
    and neither it nor a directory on the way is skipped (SKIP_DIRS) or a plugin of its own."""
    if real == plugin_dir or not is_inside(real, plugin_dir):
        return False
    parts = os.path.relpath(real, plugin_dir).split(os.sep)
    here = plugin_dir
    for part in parts[:-1]:
        here = os.path.join(here, part)
        if part in SKIP_DIRS or holds_plugin(here):
            return False
    return parts[-1] not in SKIP_DIRS


def holder(root: Path, path: str) -> str | None:
    """The plugin (its id) whose tree holds the file at `path` (analysis reads it, snapshots take
    it, a restore replaces it), or None."""
    real = os.path.realpath(path)
    return next((c.plugin_id for c in discover(root).candidates
                 if c.problem is None and reaches(os.path.realpath(root / c.path), real)), None)


def hash_tree(root: Path, plugin_dir: Path, leave_out: frozenset[str] = frozenset()) -> Tree:
    """Walk plugin_dir with os.scandir (never following symlinks, never opening FIFOs/devices),
    stream each regular file through sha256 in chunks. Symlinks are hashed by their target
    text, not followed. Survives loops and unreadable files (hashed as 'unreadable'). Leaves out
    `leave_out` (files of no plugin, see `walk`).

    `problem` says why the plugin cannot be processed: over the limits (more than MAX_ENTRIES
    entries or MAX_BYTES bytes: the walk stops, no file is read, and the hash covers only the
    listing seen so far), or an entry a snapshot could not capture (a file, directory or
    symlink that cannot be read, a name or symlink target that is not UTF-8): overnight
    snapshots every plugin completely before changing it, so such a plugin is refused before
    any request is spent on it. Skipped special files and symlinks that dangle or leave the
    marketplace are only warnings.
    """
    root_real = os.path.realpath(root)
    start = os.path.realpath(plugin_dir)
    warnings: list[str] = []
    problems: list[str] = []
    if not is_inside(start, root_real) or not os.path.isdir(start):
        return Tree(content_hash=hashlib.sha256(b"").hexdigest(), files=0, bytes=0, warnings=[],
                    problem="the plugin directory is not a directory inside the marketplace")
    entries: list[tuple[str, str, int, str]] = []  # (path, kind, size, digest)
    files = total = 0
    too_large = None
    for rel, st in walk(start, problems, leave_out):
        mode = st.st_mode
        if not is_utf8(rel):
            problems.append(f"the name {one_line(rel)} is not UTF-8")
        if stat.S_ISDIR(mode):
            entries.append((rel, "dir", 0, ""))
        elif stat.S_ISLNK(mode):
            entries.append(_symlink_entry(root_real, start, rel, warnings, problems))
        elif stat.S_ISREG(mode):
            files += 1
            total += st.st_size
            entries.append((rel, "file", st.st_size, ""))
        else:
            warnings.append(f"skipped {special_kind(mode)} {one_line(rel)}")
            entries.append((rel, "special", 0, ""))
        if len(entries) > MAX_ENTRIES:
            too_large = f"the plugin has more than {MAX_ENTRIES} files and directories"
            break
        if total > MAX_BYTES:
            too_large = f"the plugin holds more than {MAX_BYTES // (1024 * 1024)} MiB"
            break
    if too_large is None:
        entries = [
            (rel, kind, size, _file_digest(start, rel, problems) if kind == "file" else digest)
            for rel, kind, size, digest in entries
        ]
    digest = hashlib.sha256()
    for rel, kind, size, entry_digest in sorted(entries):
        digest.update(b"\0".join((os.fsencode(rel), kind.encode(), str(size).encode(),
                                  entry_digest.encode())) + b"\0\0")
    return Tree(content_hash=digest.hexdigest(), files=files, bytes=total,
                warnings=warnings, problem=too_large or _unsnapshotable(problems))


def _unsnapshotable(problems: list[str]) -> str | None:
    """One deterministic line for the entries a snapshot could not capture, or None."""
    if not problems:
        return None
    first = sorted(problems)[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{first}{more}; overnight reads every file to snapshot a plugin before changing it"


def _symlink_entry(root_real: str, start: str, rel: str, warnings: list[str],
                   problems: list[str]) -> tuple[str, str, int, str]:
    path = os.path.join(start, rel)
    try:
        target = os.readlink(path)
    except OSError as e:
        problems.append(f"cannot read symlink {one_line(rel)}: {e.strerror}")
        return rel, "symlink", 0, "unreadable"
    if not is_utf8(target):
        problems.append(f"the target of symlink {one_line(rel)} is not UTF-8")
    shown = f"{one_line(rel)} -> {one_line(target)}"
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            reason = "a loop"
        elif isinstance(e, FileNotFoundError):
            reason = "dangling"
        else:
            reason = e.strerror
        warnings.append(f"symlink {shown} not followed ({reason})")
    else:
        if not is_inside(os.path.realpath(path), root_real):
            warnings.append(f"symlink {shown} not followed (outside the marketplace)")
    encoded = os.fsencode(target)
    return rel, "symlink", len(encoded), hashlib.sha256(encoded).hexdigest()


def _file_digest(start: str, rel: str, problems: list[str]) -> str:
    try:
        fd = os.open(os.path.join(start, rel), os.O_RDONLY | os.O_NONBLOCK | _O_NOFOLLOW)
    except OSError as e:
        problems.append(f"cannot read {one_line(rel)}: {e.strerror}")
        return "unreadable"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            problems.append(f"cannot read {one_line(rel)}: it changed while being read")
            return "unreadable"
        sha = hashlib.sha256()
        while chunk := os.read(fd, _CHUNK):
            sha.update(chunk)
        return sha.hexdigest()
    except OSError as e:
        problems.append(f"cannot read {one_line(rel)}: {e.strerror}")
        return "unreadable"
    finally:
        os.close(fd)


# ------------------------------------------------------------------ facts


# What analyze() reads, as a number: bumped when it reads more (2: licenses). A plugin waiting for
# its first request with facts of an older analysis is analyzed again by the scan, and --force
# or --retry analyzes a finished plugin again, so no request is made on facts missing something.
ANALYZER = 2


def analyze(root: Path, candidate: Candidate, tree: Tree) -> PluginFacts:
    """Structure facts of one plugin that discovery found processable.

    version/description/keywords/license come from plugin.json, the manifest entry as fallback.
    Markdown that is not UTF-8 (README, commands, agents) is a warning; a skill's SKILL.md
    is checked with the reference validator's own functions on content read safely here.
    """
    root = Path(root)
    root_real = os.path.realpath(root)
    plugin = root / candidate.path
    warnings = list(tree.warnings)
    meta = _plugin_json(root_real, plugin)
    entry = _manifest_entry(root, candidate.plugin_id) if candidate.listed else {}

    for source, fields in ((PLUGIN_JSON, meta), (f"its entry in {MANIFEST}", entry)):
        warnings += _unused_fields(source, fields)

    def pick(key: str) -> Any:
        return meta[key] if isinstance(meta.get(key), str) else (
            entry[key] if isinstance(entry.get(key), str) else None)

    keywords = next((k for k in (meta.get("keywords"), entry.get("keywords"))
                     if isinstance(k, list)), [])
    readme = _markdown(root_real, plugin, "README.md", warnings)
    return PluginFacts(
        version=pick("version"),
        description=pick("description"),
        keywords=[k for k in keywords if isinstance(k, str)],
        license=pick("license"),
        readme_bytes=readme,
        commands=_markdown_stems(root_real, plugin, "commands", warnings),
        agents=_markdown_stems(root_real, plugin, "agents", warnings),
        skills=_skills(root_real, plugin),
        hooks=_is_dir(plugin / "hooks") or "hooks" in meta,
        mcp=(_is_file(plugin / ".mcp.json") or _is_dir(plugin / "mcp")
             or "mcpServers" in meta),
        scripts=_scripts(plugin),
        files=tree.files,
        bytes=tree.bytes,
        warnings=warnings,
        analyzer=ANALYZER,
    )


_JSON_KINDS = {dict: "an object", list: "a list", bool: "true or false", int: "a number", float: "a number"}


def _unused_fields(source: str, fields: dict[str, Any]) -> list[str]:
    """Warnings for the fields analyze() reads that hold a value of the wrong type, which it leaves
    out (a license given npm's way, {"type": "MIT"}, would otherwise vanish from the SKILL.md)."""
    found = []
    for key in ("version", "description", "license"):
        value = fields.get(key)
        if value is not None and not isinstance(value, str):
            found.append(f'{source}: "{key}" is {_JSON_KINDS[type(value)]}, not a string; not used')
    keywords = fields.get("keywords")
    if keywords is not None and not isinstance(keywords, list):
        found.append(f'{source}: "keywords" is {_JSON_KINDS.get(type(keywords), "a string")}, not a list; not used')
    elif keywords and not all(isinstance(k, str) for k in keywords):
        found.append(f'{source}: "keywords" holds values that are not strings; those are not used')
    return found


def _plugin_json(root_real: str, plugin: Path) -> dict[str, Any]:
    try:
        data = load_json(root_real, plugin / PLUGIN_JSON, MAX_PLUGIN_JSON, PLUGIN_JSON)
    except Unreadable:
        return {}
    return data if isinstance(data, dict) else {}


def _manifest_entry(root: Path, plugin_id: str) -> dict[str, Any]:
    try:
        st = os.stat(root / MANIFEST)
    except OSError:
        return {}
    key = (os.path.realpath(root), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    entry = _cached_entries(key).get(plugin_id)
    return entry if isinstance(entry, dict) else {}


@functools.lru_cache(maxsize=4)
def _cached_entries(key: tuple[Any, ...]) -> dict[str, dict[str, Any]]:
    # Keyed on the manifest's identity and mtime so analysing many plugins parses it once.
    return manifest_entries(Path(key[0]))[0]


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _markdown(root_real: str, plugin: Path, rel: str, warnings: list[str]) -> int | None:
    """Size of a Markdown file of the plugin, or None when absent or unusable.

    Symlinks that resolve badly are left to the tree's warnings; other failures and
    non-UTF-8 content are warned here.
    """
    path = plugin / rel
    try:
        is_link = stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return None
    try:
        data = read_inside(root_real, path, MAX_MARKDOWN)
    except Unreadable as e:
        if not is_link:
            warnings.append(f"{one_line(rel)} {e}")
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        warnings.append(f"{one_line(rel)} is not UTF-8")
    return len(data)


def _markdown_stems(root_real: str, plugin: Path, sub: str, warnings: list[str]) -> list[str]:
    if not _is_dir(plugin / sub):
        return []
    stems = []
    for name in _names(plugin / sub):
        if name.endswith(".md") and not _is_dir(plugin / sub / name):
            if _markdown(root_real, plugin, f"{sub}/{name}", warnings) is not None:
                stems.append(name[: -len(".md")])
    return sorted(stems)


def _names(directory: Path) -> list[str]:
    try:
        with os.scandir(directory) as it:
            return sorted(entry.name for entry in it)
    except OSError:
        return []


def _skills(root_real: str, plugin: Path) -> list[SkillFact]:
    skills_dir = plugin / "skills"
    if not _is_dir(skills_dir):
        return []
    return [_skill(root_real, skills_dir / name) for name in _names(skills_dir)
            if _is_dir(skills_dir / name)]


def _skill(root_real: str, skill_dir: Path) -> SkillFact:
    """One skill directory, judged exactly as skills_ref.validator.validate would, but safely."""
    # Imported here: the YAML parser behind it costs a quarter second, and a warm scan (or any
    # command that analyzes nothing) never needs it.
    from skills_ref.errors import ParseError
    from skills_ref.parser import parse_frontmatter
    from skills_ref.validator import validate_metadata

    # The reference validator accepts a lowercase skill.md when SKILL.md is absent.
    found = next((n for n in ("SKILL.md", "skill.md") if os.path.lexists(skill_dir / n)), None)
    if found is None:
        return SkillFact(dir=skill_dir.name, errors=["Missing required file: SKILL.md"])
    try:
        data = read_inside(root_real, skill_dir / found, MAX_SKILL_MD)
    except Unreadable as e:
        return SkillFact(dir=skill_dir.name, errors=[f"{found} {e}"])
    try:
        # Text mode, as the validator's read_text does: universal newlines.
        content = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError:
        return SkillFact(dir=skill_dir.name, bytes=len(data), errors=[f"{found} is not UTF-8"])
    try:
        metadata, _ = parse_frontmatter(content)
        errors = validate_metadata(metadata, skill_dir)
    except ParseError as e:
        return SkillFact(dir=skill_dir.name, bytes=len(data), errors=[" ".join(str(e).split())])
    except Exception as e:  # noqa: BLE001 - strictyaml raises AttributeError on some control chars
        return SkillFact(dir=skill_dir.name, bytes=len(data),
                         errors=[f"{found} frontmatter cannot be parsed ({type(e).__name__})"])
    license = metadata.get("license")
    return SkillFact(dir=skill_dir.name, bytes=len(data), valid=not errors, errors=errors,
                     license=license if isinstance(license, str) and license.strip() else None)


def _scripts(plugin: Path) -> int:
    """Regular files below any directory named scripts/ in the plugin."""
    return sum(
        1 for rel, st in walk(str(plugin), [])
        if stat.S_ISREG(st.st_mode) and "scripts" in rel.split("/")[:-1]
    )
