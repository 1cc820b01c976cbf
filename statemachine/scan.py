"""`overnight scan`: discover and analyze every plugin, recording only what changed.

Invariant: scanning an unchanged marketplace appends no event. A plugin is (re)discovered
when it is new, when its identity (name, category, path, listing, skill name) changed, when
its content hash changed, when it was invalid and is not any more, or when it waits for its
first request (analyzed) with facts of an older analysis (ANALYZER: an older overnight read
less of it); a plugin that left the marketplace vanishes. A plugin in the middle of a write
(writing, or written and not yet done) is left alone: resume settles it and records its new
content hash.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from events import EventStore
from statemachine import catalog as c
from statemachine import writes
from statemachine.analysis import ANALYZER, analyze, hash_tree
from statemachine.binding import bind
from statemachine.discovery import LEGACY_SKILL_DIR, Candidate, discover, holds_plugin, legacy_skill_dir, one_line
from statemachine.gates import BUNDLE_DIRS, fold
from statemachine.lifecycle import STREAM_PREFIX, Lifecycle, State
from statemachine.workspace import not_plugin_files

# States in which the plugin's files are being changed by overnight itself.
_MID_WRITE = frozenset({State.WRITING, State.WRITTEN})
# A name no file has, to check the directories a skill's bundled files would be written in.
_PROBE = ".overnight-probe"
# The columns of a plugin's row the scan compares with what it finds.
_ROW = ("plugin_id", "name", "category", "path", "listed", "skill_name", "state", "content_hash", "reason")
# Plugins per transaction: a scan is repeatable, so it trades per-plugin durability for speed.
BATCH = 256


@dataclass
class ScanReport:
    plugins: int = 0
    new: int = 0
    added: list[str] = field(default_factory=list)  # the ids of the `new` ones
    changed: int = 0
    reanalyzed: int = 0  # unchanged, analyzed again: their facts were an older analysis's
    unchanged: int = 0
    invalid: int = 0
    vanished: int = 0
    events: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (plugin id, reason)
    newly_invalid: set[str] = field(default_factory=set)  # of `problems`, those not invalid so before
    warnings: list[str] = field(default_factory=list)
    # plugin id -> its warning in `warnings`: changed by a write of overnight's cut short, left
    # for `resume` to settle (which a run's summary then need not repeat)
    mid_write: dict[str, str] = field(default_factory=dict)


Progress = Callable[[int, int, str], None]


def scan(store: EventStore, root: Path, progress: Progress | None = None, place: str = "", *,
         rebind: bool = False) -> ScanReport:
    """Discover and analyze the marketplace at `root` into the log (`place`: what a hint puts
    after `overnight resume`, the CLI's PATH and --db; `rebind`: see `bind`)."""
    report = ScanReport()
    first_seq = store.last_seq
    moved = bind(store, root, rebind=rebind)
    if moved:
        report.warnings.append(moved)
    known = {row[0]: dict(zip(_ROW, row)) for row in store.query(f"SELECT {', '.join(_ROW)} FROM plugins")}
    outdated = _outdated(store)
    found = discover(root, holders={plugin_id: row["skill_name"] or row["name"] for plugin_id, row in known.items()
                                    if row["state"] not in (State.INVALID, State.GONE)})
    report.warnings.extend(found.warnings)
    lifecycle = Lifecycle(store)
    leave_out = not_plugin_files(store, root)
    candidates = found.candidates
    report.plugins = len(candidates)
    for start in range(0, len(candidates), BATCH):
        with store.batch():
            for i, candidate in enumerate(candidates[start:start + BATCH], start=start):
                if progress:
                    progress(i, len(candidates), candidate.plugin_id)
                _scan_one(store, lifecycle, root, candidate, known.pop(candidate.plugin_id, None),
                          candidate.plugin_id in outdated, report, place, leave_out)
    with store.batch():
        for plugin_id, row in sorted(known.items()):
            if row["state"] == State.GONE or row["state"] in _MID_WRITE:
                continue
            cursor = lifecycle.cursor(plugin_id)
            lifecycle.record(cursor, c.PluginVanished(reason="no longer found in the marketplace"))
            lifecycle.release(cursor)
            report.vanished += 1
    report.events = store.last_seq - first_seq
    return report


def analyze_again(store: EventStore, root: Path, plugin_ids: list[str], progress: Progress | None = None) -> None:
    """--force and --retry: these finished plugins scanned as if their analysis were outdated:
    discovered and analyzed again from their files (never their facts copied: an older
    overnight's lack what this one reads), which puts them back at the start of the pipeline.
    One transaction: what `progress` raises (a signal) leaves every plugin as it was."""
    lifecycle = Lifecycle(store)
    leave_out = not_plugin_files(store, root)
    with store.batch():
        for i, plugin_id in enumerate(plugin_ids):
            if progress is not None:
                progress(i, len(plugin_ids), plugin_id)
            row = dict(zip(_ROW, store.query(f"SELECT {', '.join(_ROW)} FROM plugins WHERE plugin_id = ?",
                                             (plugin_id,))[0]))
            candidate = Candidate(plugin_id, row["name"], row["category"], row["path"], bool(row["listed"]),
                                  row["skill_name"], None)
            _scan_one(store, lifecycle, root, candidate, row, True, ScanReport(), "", leave_out)


def _target_problem(root: Path, plugin_dir: Path, skill: str | None, clear: bool = False) -> str | None:
    """Why the SKILL.md or its bundled files could never be written (a symlink or a file on
    their way, a directory in the SKILL.md's place), found before any request is spent; the
    write step checks again. `clear`: the way was clear at the last scan, and the plugin's
    tree is unchanged since (nested plugins, left out of its tree, are looked for again)."""
    if skill is None:
        return None
    for held in (f"skills/{skill}", f"skills/{LEGACY_SKILL_DIR}"):
        nested = _nested_plugin(plugin_dir, held)
        if nested:
            return (f"{nested} is another plugin, inside the skill directory overnight would write "
                    f"(or move to skills/{skill}); move one of the two plugins")
    if clear:
        return None
    twin = _case_twin(plugin_dir / "skills", skill)
    if twin is not None:
        return (f"skills/{one_line(twin)}/ differs from skills/{skill}/, the skill directory overnight writes, only in "
                f"letter case or Unicode form (one directory on macOS and Windows): rename it to skills/{skill}/")
    legacy = legacy_skill_dir(plugin_dir, skill)
    held = f"skills/{legacy.name}" if legacy else f"skills/{skill}"  # where the files go: moved with it
    probes = {f"{held}/{bundle}/{_PROBE}": bundle for bundle in BUNDLE_DIRS}
    try:
        with writes.opened(root, plugin_dir) as at:
            writes.plan_targets(at, held, {f"{held}/SKILL.md": b""} | dict.fromkeys(probes, b""))
    except writes.WriteError as e:
        for probe, bundle in probes.items():  # the targets are checked in order: SKILL.md's path first
            if str(e).startswith(f"{probe}: "):
                return (f"the files its skill bundles in {held}/{bundle}/ cannot be written: "
                        f"{str(e).removeprefix(f'{probe}: ')}")
        return f"its SKILL.md cannot be written: {e}"
    return None


def _case_twin(skills: Path, skill: str) -> str | None:
    """An entry of skills/ other than `skill` that some file system takes for it."""
    try:
        names = sorted(os.listdir(skills))
    except OSError:
        return None
    return next((n for n in names if n != skill and fold(n) == fold(skill)), None)


def _nested_plugin(plugin_dir: Path, rel: str) -> str | None:
    """The first plugin directory at or below plugin_dir/rel (symlinks not followed), as a
    path relative to plugin_dir; None when there is none."""
    stack = [rel]
    while stack:
        here = stack.pop()
        path = plugin_dir / here
        if path.is_symlink() or not path.is_dir():
            continue
        if holds_plugin(path):
            return here
        try:
            stack += sorted((f"{here}/{p.name}" for p in path.iterdir()), reverse=True)
        except OSError:
            continue
    return None


def _outdated(store: EventStore) -> set[str]:
    """Plugins waiting for their first request (analyzed) whose facts an older analysis found. Read
    from the stored payload of their latest PluginAnalyzed, as plugin_details reads facts, but
    through the (stream, version) index alone: thirty times faster than that view per plugin."""
    return {plugin_id for (plugin_id,) in store.query(
        "SELECT plugin_id FROM plugins p WHERE state = ? AND coalesce((SELECT json_extract(e.data, '$.facts.analyzer') "
        "FROM events e WHERE e.stream = ? || p.plugin_id AND e.type = 'PluginAnalyzed' ORDER BY e.version DESC "
        "LIMIT 1), 1) < ?", (State.ANALYZED, STREAM_PREFIX, ANALYZER))}


def _scan_one(store: EventStore, lifecycle: Lifecycle, root: Path, candidate: Candidate,
              row: dict | None, outdated: bool, report: ScanReport, place: str,
              leave_out: frozenset[str]) -> None:
    """Record what changed about one plugin; `outdated`: analyze it again even when unchanged;
    `leave_out`: files no part of any plugin (workspace.not_plugin_files)."""
    discovered = c.PluginDiscovered(
        plugin_id=candidate.plugin_id, name=candidate.name or "", category=candidate.category,
        path=candidate.path, listed=candidate.listed, skill_name=candidate.skill_name,
    )
    problem = candidate.problem
    tree = None
    if problem is None:
        tree = hash_tree(root, root / candidate.path, leave_out)
        # Found without a problem before, and unchanged: its tree hash covers every file, directory
        # and symlink on the way to what a write touches, so that way is as clear as it was.
        clear = (row is not None and row["state"] not in (State.INVALID, State.GONE, State.DISCOVERED)
                 and row["content_hash"] == tree.content_hash and row["skill_name"] == candidate.skill_name)
        problem = tree.problem or _target_problem(root, root / candidate.path, candidate.skill_name, clear)
    if problem is not None:
        report.invalid += 1
        report.problems.append((candidate.plugin_id, problem))
        if row is None or row["state"] != State.INVALID or row["reason"] != problem:
            report.newly_invalid.add(candidate.plugin_id)
    if row is not None:
        same_identity = (row["name"], row["category"], row["path"], bool(row["listed"]),
                         row["skill_name"]) == (discovered.name, discovered.category,
                                                discovered.path, discovered.listed,
                                                discovered.skill_name)
        if row["state"] == State.INVALID:
            unchanged = same_identity and problem is not None and row["reason"] == problem
        else:
            # A plugin left `discovered` (a restore that put back the files it already had)
            # still needs its analysis.
            unchanged = (same_identity and problem is None and row["state"] not in (State.GONE, State.DISCOVERED)
                         and row["content_hash"] == tree.content_hash)
        if unchanged and not outdated:
            report.unchanged += 1
            return
        if row["state"] in _MID_WRITE:
            # overnight's own write changed it: `resume` settles the write and records the
            # new content hash as done; rediscovering it here would lose that.
            warning = (f"{candidate.plugin_id}: changed during a write by overnight; "
                       f"run `overnight resume{place}` to finish it first")
            report.warnings.append(warning)
            report.mid_write[candidate.plugin_id] = warning
            return
    if row is None:
        report.new += 1
        report.added.append(candidate.plugin_id)
    elif unchanged:
        report.reanalyzed += 1
    else:
        report.changed += 1
    cursor = lifecycle.cursor(candidate.plugin_id)
    try:
        lifecycle.record(cursor, discovered)
        if problem is not None:
            lifecycle.record(cursor, c.PluginInvalid(
                reason=problem, content_hash=tree.content_hash if tree else None))
        else:
            facts = analyze(root, candidate, tree)
            lifecycle.record(cursor, c.PluginAnalyzed(content_hash=tree.content_hash, facts=facts))
            report.warnings += [f"{candidate.plugin_id}: {warning}" for warning in facts.warnings]
    finally:
        lifecycle.release(cursor)
