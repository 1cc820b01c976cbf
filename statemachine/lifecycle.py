"""The plugin lifecycle: one transition table, the single source of truth.

The `transitions` Machine that drives plugins, the projection that replays their state,
`overnight status`, and the diagram in docs/architecture.md are all built from TRANSITIONS.
Every plugin event type belongs to exactly one row, so a recorded event names its
transition and replay can check it with a dict lookup.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, Iterable

from transitions import Machine

from events import Event, EventStore, ProjectionError
from statemachine import catalog as c


class State(StrEnum):
    NEW = "new"
    DISCOVERED = "discovered"
    ANALYZED = "analyzed"
    INVALID = "invalid"
    GONE = "gone"
    SKIPPED = "skipped"
    PLANNING = "planning"
    PLANNED = "planned"
    GENERATING = "generating"
    GENERATED = "generated"
    VALIDATED = "validated"
    REJECTED = "rejected"
    SNAPSHOTTED = "snapshotted"
    WRITING = "writing"
    WRITTEN = "written"
    DONE = "done"
    RETRYING = "retrying"
    FAILED = "failed"


S = State
ALL = frozenset(State) - {S.NEW}
# States a run leaves a plugin in for good (until its content changes).
FINAL = frozenset({S.INVALID, S.GONE, S.SKIPPED, S.REJECTED, S.DONE, S.FAILED})
# Final states whose plugins `run --retry STATE` processes again (without --force's done ones).
RETRYABLE = frozenset({S.FAILED, S.REJECTED})
# States with work under way; `fail` may come from any of them.
ACTIVE = frozenset({S.ANALYZED, S.PLANNING, S.PLANNED, S.GENERATING, S.GENERATED, S.RETRYING,
                    S.VALIDATED, S.SNAPSHOTTED, S.WRITING, S.WRITTEN})


@dataclass(frozen=True)
class Transition:
    trigger: str
    sources: frozenset[State]
    dest: State
    event: type[Event]
    doc: str

    @property
    def tag(self) -> str:
        return self.event.__struct_config__.tag  # type: ignore[return-value]


def _t(trigger: str, sources: Iterable[State], dest: State, event: type[Event], doc: str) -> Transition:
    return Transition(trigger, frozenset(sources), dest, event, doc)


TRANSITIONS: tuple[Transition, ...] = (
    _t("discover", (ALL | {S.NEW}) - {S.WRITING}, S.DISCOVERED, c.PluginDiscovered,
       "found by a scan, or found again because its content changed"),
    _t("analyze", {S.DISCOVERED}, S.ANALYZED, c.PluginAnalyzed,
       "structure facts and content hash recorded"),
    _t("invalidate", {S.DISCOVERED}, S.INVALID, c.PluginInvalid,
       "bad input (manifest, name, path); waits for the plugin to change"),
    _t("vanish", ALL - {S.GONE, S.WRITING}, S.GONE, c.PluginVanished,
       "no longer in the marketplace"),
    _t("skip", {S.ANALYZED, S.VALIDATED}, S.SKIPPED, c.PluginSkipped,
       "a SKILL.md of its own already passes every gate, or a person edited what overnight "
       "wrote (found at analysis, or just before the snapshot when edited while the plugin was under way)"),
    _t("request_plan", {S.ANALYZED, S.PLANNING, S.RETRYING}, S.PLANNING, c.PlanRequested,
       "plan request recorded, then sent"),
    _t("receive_plan", {S.PLANNING}, S.PLANNED, c.PlanReceived,
       "structured plan decoded and recorded"),
    _t("reuse_plan", {S.ANALYZED}, S.PLANNED, c.PlanReused,
       "taken up again by --retry after its skill step failed: the plan its last pass received, from "
       "the very same prompt, is used again (no request)"),
    _t("request_skill", {S.PLANNED, S.GENERATING, S.RETRYING}, S.GENERATING, c.SkillRequested,
       "skill request recorded, then sent"),
    _t("receive_skill", {S.GENERATING}, S.GENERATED, c.SkillReceived,
       "skill content recorded"),
    _t("defer", {S.PLANNING, S.GENERATING}, S.RETRYING, c.RequestFailed,
       "transient failure or unusable answer; retried after not_before"),
    _t("fail_gates", {S.GENERATED}, S.PLANNED, c.SkillGateFailed,
       "content failed a gate; regenerate with the reasons as feedback"),
    _t("reject", {S.GENERATED}, S.REJECTED, c.SkillRejected,
       "content failed the gates after the allowed attempts"),
    _t("pass_gates", {S.GENERATED}, S.VALIDATED, c.SkillValidated,
       "SKILL.md composed and every gate passed"),
    _t("snapshot", {S.VALIDATED}, S.SNAPSHOTTED, c.PluginSnapshotted,
       "plugin tree stored in the blob store before any change"),
    _t("begin_write", {S.SNAPSHOTTED}, S.WRITING, c.WriteIntended,
       "targets and content hashes recorded before the first rename"),
    _t("finish_write", {S.WRITING}, S.WRITTEN, c.WriteCompleted,
       "every file renamed into place and fsynced"),
    _t("complete", {S.WRITTEN, S.ANALYZED}, S.DONE, c.PluginDone,
       "finished; content hash after the write recorded (from analyzed: found again with its files as "
       "overnight left them, and its SKILL.md passes every gate)"),
    _t("fail", ACTIVE, S.FAILED, c.PluginFailed,
       "permanent error for this plugin, with the reason"),
    _t("restore", ALL - {S.WRITING}, S.DISCOVERED, c.PluginRestored,
       "plugin put back to a snapshot; analyzed again"),
)

BY_TAG: dict[str, Transition] = {t.tag: t for t in TRANSITIONS}
PLUGIN_EVENT_TAGS = frozenset(BY_TAG)
STREAM_PREFIX = "plugin:"


def plugin_stream(plugin_id: str) -> str:
    return STREAM_PREFIX + plugin_id


# tag -> (allowed source state names, destination state name): replay's hot path.
_MOVES: dict[str, tuple[frozenset[str], str]] = {
    t.tag: (frozenset(s.value for s in t.sources), t.dest.value) for t in TRANSITIONS
}


def next_state(current: str, tag: str) -> str:
    """The state after event `tag` in state `current`; ProjectionError if the table forbids it."""
    move = _MOVES.get(tag)
    if move is None:
        raise ProjectionError(f"{tag} is not a plugin lifecycle event")
    if current not in move[0]:
        raise ProjectionError(f"illegal transition: {tag} ({BY_TAG[tag].trigger}) in state {current}")
    return move[1]


_IDENTITY = ("name", "category", "path", "listed", "skill_name")


def reusable_plan(query: Callable[[str, tuple], list[tuple]], plugin_id: str, model: str,
                  standards_sha256: str) -> str | None:
    """The request id of the plan that `--retry` may use again for a plugin: its last pass
    failed at the skill step, after a plan asked for with the very prompt a new request would
    send (the same files and facts, name and place, model and standards); else None. The plugin
    is failed still (a retry would take it up), or was just analyzed again by the retry."""
    stream = plugin_stream(plugin_id)
    rows = query("SELECT type, data FROM events WHERE stream = ? ORDER BY version DESC", (stream,))
    passes: list[dict[str, dict]] = [{}, {}]  # the retry's pass, the last pass: the latest event of each type
    current = 0
    for number, (tag, data) in enumerate(rows):
        if number == 0 and tag == "PluginFailed":
            current = 1  # not taken up again yet: a scan found its files as that pass analyzed them
        event = json.loads(data)
        if (current == 1 and not passes[1] and (tag != "PluginFailed" or event.get("step") != "skill")
                or tag == "PluginRestored"):
            return None  # the last pass did not end failing at its skill step, or a restore came between
        passes[current].setdefault(tag, event)
        if tag == "PluginDiscovered":
            current += 1
            if current == 2:
                break
    last = passes[1]
    now = passes[0] or last
    plan = last.get("PlanReceived")
    if plan is None and "PlanReused" in last:  # that pass used an earlier plan again: so may this one
        found = query("SELECT data FROM events WHERE stream = ? AND type = 'PlanReceived' "
                      "AND json_extract(data, '$.request_id') = ?", (stream, last["PlanReused"]["request_id"]))
        plan = json.loads(found[0][0]) if found else None
    if current < 2 or plan is None or "PluginAnalyzed" not in now or "PluginAnalyzed" not in last:
        return None
    same_files = all(now["PluginAnalyzed"].get(k) == last["PluginAnalyzed"].get(k) for k in ("content_hash", "facts"))
    same_place = all(now["PluginDiscovered"].get(k) == last["PluginDiscovered"].get(k) for k in _IDENTITY)
    found = query("SELECT json_extract(config, '$.gemini.model'), json_extract(config, '$.standards_sha256') "
                  "FROM runs WHERE run_id = ?", (plan["run_id"],))
    same_run = bool(found) and found[0] == (model, standards_sha256)
    return plan["request_id"] if same_files and same_place and same_run else None


def build_machine() -> Machine:
    """One Machine for all plugins; models are added while they are in flight."""
    return Machine(
        model=None,
        states=[s.value for s in State],
        initial=S.NEW.value,
        transitions=[
            {"trigger": t.trigger, "source": sorted(s.value for s in t.sources), "dest": t.dest.value}
            for t in TRANSITIONS
        ],
        auto_transitions=False,
        send_event=True,
        before_state_change="_record",
    )


class PluginCursor:
    """One plugin being driven through the lifecycle by the transitions Machine.

    A trigger appends its event inside `before_state_change`, so the in-memory state moves
    only after the event is durably in the log; a failed append leaves the state unchanged.
    """

    def __init__(self, store: EventStore, plugin_id: str, state: str, version: int) -> None:
        self.store = store
        self.plugin_id = plugin_id
        self.stream = plugin_stream(plugin_id)
        self.state = state
        self.version = version

    def _record(self, event_data) -> None:  # called by the Machine
        event: Event = event_data.kwargs["event"]
        blobs = event_data.kwargs.get("blobs", ())
        self.store.append(self.stream, event, expected_version=self.version, blobs=blobs)
        self.version += 1


class Lifecycle:
    """Fires recorded transitions on plugins through one shared Machine."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.machine = build_machine()

    def cursor(self, plugin_id: str) -> PluginCursor:
        row = self.store.query("SELECT state, version FROM plugins WHERE plugin_id = ?", (plugin_id,))
        state, version = row[0] if row else (S.NEW.value, 0)
        cursor = PluginCursor(self.store, plugin_id, state, version)
        self.machine.add_model(cursor, initial=state)
        return cursor

    def release(self, cursor: PluginCursor) -> None:
        self.machine.remove_model(cursor)

    def record(self, cursor: PluginCursor, event: Event, blobs: Iterable[bytes] = ()) -> None:
        """Fire the transition `event` belongs to; raises MachineError if it is illegal now."""
        t = BY_TAG[type(event).__struct_config__.tag]  # type: ignore[index]
        cursor.trigger(t.trigger, event=event, blobs=tuple(blobs))
