"""One plugin through the pipeline: each step is check -> run -> record.

`advance` reads the plugin's state from the log and performs the one step that state calls
for, recording its result before moving on. Because the state is the resume point, a crash
at any instant is repaired by calling `advance` again:
- planning / generating (request recorded, no answer): the request is sent again; a recorded
  answer is never requested again, because its state has moved past it;
- generated: the recorded draft (a blob) is validated again, without Gemini;
- writing (intent recorded, no completion): the targets are hashed; if they match the intent
  the write is settled, otherwise it is applied again (temp files are cleaned first).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shlex
import stat
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import msgspec

from events import EventStoreError
from events.store import format_at

from statemachine import catalog as c
from statemachine import gates, skillmd, snapshots, writes
from statemachine.analysis import hash_tree, reaches, walk
from statemachine.budget import Hold, Spending
from statemachine.discovery import legacy_skill_dir
from statemachine.gateway import (
    AccessDenied,
    Gateway,
    GatewayError,
    RateLimited,
    Refused,
    Unusable,
)
from statemachine.journal import Journal
from statemachine.lifecycle import FINAL, PluginCursor, State, reusable_plan
from statemachine.prompts import (
    Standards,
    estimate_tokens,
    least_skill_prompt,
    plan_prompt,
    plugin_data,
    replaced_skill,
    skill_license,
    skill_prompt,
    system_instruction,
)
from statemachine.scheduler import DailyQuotaExhausted, Scheduler

_METRICS = {"GenerateRequestsPerMinute": "rpm", "GenerateRequestsPerDay": "rpd",
            "InputTokensPerModelPerMinute": "tpm", "InputTokensPerModelPerDay": "tpd"}


@dataclass(frozen=True)
class StepSettings:
    """The part of a run's configuration the steps need (recorded in RunStarted.config)."""

    model: str
    gates: gates.GateConfig
    gate_attempts: int = 3
    max_attempts: int = 5
    backoff_s: float = 2.0
    dry_run: bool = False
    force: bool = False


class RunStopped(Exception):
    """The whole run must stop (the key or model is wrong); the message says why."""


@dataclass(frozen=True)
class Finished:
    """A plugin brought to a final state, and the run's counters at that moment."""

    plugin_id: str
    state: str
    reason: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    rate_limited: int


@dataclass
class Stats:
    """Live counters for the progress display (updated by workers, read by the display)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    rate_limited: int = 0
    phases: dict[str, str] = field(default_factory=dict)  # plugin id -> the step it is at
    # plugins this execution brought to a final state, in order, not yet shown
    finished: list["Finished"] = field(default_factory=list)
    # plugin id -> (unix time it may send, the limit it waits for): waits for a minute window
    waits: dict[str, tuple[float, str]] = field(default_factory=dict)

    def add(self, usage: c.Usage | None = None, *, request: bool = False, limited: bool = False) -> None:
        with self.lock:
            self.requests += int(request)
            self.rate_limited += int(limited)
            if usage is not None:
                self.input_tokens += usage.input_tokens
                self.output_tokens += usage.output_tokens + usage.thoughts_tokens

    def phase(self, plugin_id: str, phase: str | None) -> None:
        with self.lock:
            if phase is None:
                self.phases.pop(plugin_id, None)
            else:
                self.phases[plugin_id] = phase

    def finish(self, plugin_id: str, state: str, reason: str | None) -> None:
        with self.lock:
            self.finished.append(Finished(plugin_id, state, reason, self.requests, self.input_tokens,
                                          self.output_tokens, self.rate_limited))

    def waiting(self, plugin_id: str, until: float | None, why: str = "") -> None:
        with self.lock:
            if until is None:
                self.waits.pop(plugin_id, None)
            else:
                self.waits[plugin_id] = (until, why)


@dataclass
class Context:
    run_id: str
    root: Path
    journal: Journal
    gateway: Gateway
    scheduler: Scheduler
    settings: StepSettings
    standards: Standards
    clock: Callable[[], float]
    stopping: threading.Event
    stats: Stats
    halt: threading.Event = field(default_factory=threading.Event)
    # Set when the run pauses for the quota or reaches a budget: no new request goes, but
    # plugins go on through the steps that need none (gates, snapshot, write).
    closed: threading.Event = field(default_factory=threading.Event)
    spending: Spending | None = None
    rng: random.Random = field(default_factory=random.Random)
    sleep: Callable[[float], object] = field(default=lambda s: threading.Event().wait(s))
    # A quota pause the user lifted on resume by changing limits: a retry wait that ends by
    # then was waiting for that pause, and is over.
    lifted_until: float = 0.0
    # files no part of any plugin: the manifest, overnight's own (workspace.not_plugin_files)
    leave_out: frozenset[str] = frozenset()

    def should_stop(self) -> bool:
        """A signal stops the run; a fatal error halts this batch."""
        return self.stopping.is_set() or self.halt.is_set()


_ROW = ("state", "step", "reason", "name", "skill_name", "path", "category", "content_hash", "done_hash",
        "not_before", "plan_attempts", "skill_attempts", "gate_failures", "failures", "snapshot")


def _row(ctx: Context, plugin_id: str) -> dict:
    found = ctx.journal.query(f"SELECT {', '.join(_ROW)} FROM plugins WHERE plugin_id = ?", (plugin_id,))
    return dict(zip(_ROW, found[0]))


def _details(ctx: Context, plugin_id: str, *columns: str) -> dict:
    """Those columns of the plugin's `plugin_details` (each one is read from its events)."""
    found = ctx.journal.query(f"SELECT {', '.join(columns)} FROM plugin_details WHERE plugin_id = ?",
                              (plugin_id,))
    return dict(zip(columns, found[0]))


def advance(ctx: Context, plugin_id: str) -> float | None:
    """Drive one plugin as far as it can go now.

    Returns None when the plugin needs nothing more from this run, or the unix time before
    which it must not continue (a retry wait). Raises DailyQuotaExhausted (the run pauses),
    BudgetReached, RequestsClosed (its next step is a request, and the run paused or reached a
    budget), PluginChanged (its files changed since the scan, found before a request or before
    its snapshot), RunStopped, or Interrupted (a signal or a fatal error stops the run).
    """
    cursor = ctx.journal.cursor(plugin_id)
    moved = False  # a plugin an earlier dry run left planned is not reported as finished by this one
    try:
        while True:
            row = _row(ctx, plugin_id)
            state = row["state"]
            if state in FINAL or (state == State.PLANNED and ctx.settings.dry_run):
                if moved:  # also when the run stops right after the step that ended it: the progress names it
                    ctx.stats.finish(plugin_id, state, row["reason"])
                return None
            if ctx.should_stop():
                raise Interrupted()  # the run stops: this plugin is not finished
            ctx.stats.phase(plugin_id, _STEP_OF.get(state, state))
            if state == State.RETRYING:
                wait_until = _ts(row["not_before"])
                if wait_until > ctx.clock() and wait_until > ctx.lifted_until:
                    if wait_until - ctx.clock() > MAX_BACKOFF_S:  # no backoff is that long: a 429's
                        # RetryInfo asked for it (a daily quota); the run pauses rather than sleep
                        # unrecorded (past --no-wait, past new limits a resume states)
                        raise DailyQuotaExhausted(wait_until, f"{plugin_id} may retry only then, as Gemini's 429 "
                                                              "asked")
                    return wait_until
            moved = True
            try:
                _STEPS[state](ctx, cursor, row)
            except (OSError, snapshots.SnapshotError, writes.WriteError) as e:
                if _machine_fault(e):
                    raise  # the disk, not this plugin: the run stops, and `resume` continues
                _file_failure(ctx, cursor, row, e)
            except RunStopped:
                ended = _row(ctx, plugin_id)
                if ended["state"] in FINAL:  # its own failure stopped the run (refused alike): named too
                    ctx.stats.finish(plugin_id, ended["state"], ended["reason"])
                raise
    finally:
        ctx.stats.phase(plugin_id, None)
        ctx.journal.release(cursor)


# The longest wait before a retry that a failure itself sets (longer ones come from a 429's RetryInfo).
MAX_BACKOFF_S = 600.0
# How long every request waits when the run's last requests all went unanswered (an outage).
OUTAGE_WAIT_S = 300.0
# OS errors of the machine rather than of one plugin's files: they stop the run.
_MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.ENOMEM})
# The step a state performs, as PluginFailed names it.
_STEP_OF = {State.ANALYZED: "plan", State.PLANNING: "plan", State.PLANNED: "skill",
            State.GENERATING: "skill", State.GENERATED: "gates", State.VALIDATED: "snapshot",
            State.SNAPSHOTTED: "write", State.WRITING: "write", State.WRITTEN: "finish"}


def _machine_fault(e: BaseException) -> bool:
    """True when `e` (or the OSError behind it) is a full, failing or read-only disk."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__  # type: ignore[assignment]
    return isinstance(e, OSError) and e.errno in _MACHINE_ERRNOS


def _file_failure(ctx: Context, cursor: PluginCursor, row: dict, e: BaseException) -> None:
    """A problem with this plugin's own files (a symlink where a directory must be, a file it
    cannot read, a directory it cannot write, a plugin that vanished): it fails with the
    reason, and the batch goes on."""
    reason = str(e) if not isinstance(e, OSError) else f"{e.filename or row['path']}: {e.strerror or e}"
    if row["state"] == State.WRITING and not isinstance(e, writes.ChangedMeanwhile):
        if writes.begun(ctx.root / row["path"], *_intent(ctx, cursor.plugin_id)):
            reason += (f"; the files written before it stay: `overnight restore-plugin {shlex.quote(row['name'])}` "
                       "puts the plugin back as it was before overnight")
    step = row["step"] if row["state"] == State.RETRYING else _STEP_OF.get(row["state"], row["state"])
    ctx.journal.record(cursor, c.PluginFailed(run_id=ctx.run_id, step=step or "plan", reason=reason))


def _ts(at: str | None) -> float:
    return datetime.fromisoformat(at).timestamp() if at else 0.0


# ------------------------------------------------------------------------ steps


def _analyzed(ctx: Context, cursor: PluginCursor, row: dict) -> None:
    if not ctx.settings.force:
        if _as_left(ctx, cursor.plugin_id, row) and _skill_passes(ctx, row):
            # found again with its files as overnight left them (its listing changed, its
            # plugin.json was broken and mended, a --force run stopped before its requests)
            ctx.journal.record(cursor, c.PluginDone(run_id=ctx.run_id, content_hash=row["content_hash"]))
            return
        reason = _already_good(ctx, cursor, row)
        if reason:
            ctx.journal.record(cursor, c.PluginSkipped(run_id=ctx.run_id, reason=reason))
            return
    plan = reusable_plan(ctx.journal.query, cursor.plugin_id, ctx.settings.model, ctx.standards.sha256)
    if plan is not None:
        ctx.journal.record(cursor, c.PlanReused(run_id=ctx.run_id, request_id=plan))
        return
    _request(ctx, cursor, row, "plan")


def _as_left(ctx: Context, plugin_id: str, row: dict) -> bool:
    """Whether the plugin's files are as overnight left them when it was last done (also once a
    restore of them was undone): its content hash is the one recorded then; or, recorded by an
    overnight that counted the marketplace's manifest (and its own files) as part of a plugin
    at the root, the hash of its whole tree."""
    done = _details(ctx, plugin_id, "left_hash")["left_hash"]
    if done is None or done == row["content_hash"]:
        return done is not None
    # the whole tree is hashed again only for a plugin whose walk reaches such a file
    plugin = os.path.realpath(ctx.root / row["path"])
    return (any(reaches(plugin, path) for path in ctx.leave_out)
            and done == hash_tree(ctx.root, ctx.root / row["path"]).content_hash)


def _already_good(ctx: Context, cursor: PluginCursor, row: dict) -> str | None:
    """The reason to leave alone a plugin that changed since overnight finished it, or that
    overnight never processed; or None.

    A plugin that changed since it was done is processed again, unless the change is a
    person's edit of a file overnight wrote: that edit is kept (--force writes over it,
    keeping it in the snapshot), also when `restore-plugin` brought it back. A maintainer's
    own skill that meets the bar is left alone."""
    if row["done_hash"] != row["content_hash"]:  # changed since it was done, or restored, or never done
        edited = _edited_by_hand(ctx, cursor, row)  # none when overnight never wrote it
        if edited:
            return _kept(edited)
        if row["done_hash"] is not None:
            return None
    if row["done_hash"] is None and _skill_passes(ctx, row):
        return f"skills/{row['skill_name']}/SKILL.md already passes every gate"
    return None


def _skill_passes(ctx: Context, row: dict) -> bool:
    """The plugin's skills/<name>/SKILL.md (a file, not a symlink) passes every gate."""
    skill_dir = ctx.root / row["path"] / "skills" / row["skill_name"]
    target = skill_dir / "SKILL.md"
    if not target.is_file() or target.is_symlink():
        return False
    try:
        text = target.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return not gates.check(row["skill_name"], text, [], _on_disk(skill_dir)[0], ctx.settings.gates)


def _kept(edited: list[str]) -> str:
    """The reason a plugin is skipped: files overnight wrote that a person has edited since."""
    return (f"{c.KEPT_EDIT} {'it' if len(edited) == 1 else 'them'}: "
            f"{', '.join(edited)}; left as {'it is' if len(edited) == 1 else 'they are'} "
            "(--force generates the skill again, and restore-plugin can bring the edit back)")


def _edited_by_hand(ctx: Context, cursor: PluginCursor, row: dict) -> list[str]:
    """The files overnight wrote when it last finished this plugin whose content someone has
    changed since: content overnight never wrote there, and not what the file held before
    overnight first wrote it. A file put back as it was at first, by a restore or by hand, is
    overnight's to write again, and so is one removed since: writing it takes nothing from
    anybody. An edit a person made between two of overnight's writes, which `restore-plugin`
    then brought back, stays an edit."""
    found = ctx.journal.query(
        "SELECT type, schema_version, data FROM events WHERE stream = ? AND type IN ('PluginSnapshotted', "
        "'WriteIntended') AND version < (SELECT max(version) FROM events WHERE stream = ? AND type = 'PluginDone') "
        "ORDER BY version", (cursor.stream, cursor.stream))
    events = [c.REGISTRY.decode(*found_row) for found_row in found]
    if not events or not isinstance(events[-1], c.WriteIntended):
        return []
    wrote: dict[str, set[str]] = {}
    for intent in events:
        if isinstance(intent, c.WriteIntended):
            for write in intent.writes:
                wrote.setdefault(write.path, set()).add(write.sha256)
    first: dict[str, str] = {}
    if isinstance(events[0], c.PluginSnapshotted):  # taken before overnight's first write
        try:
            first = dict(snapshots.manifest_files(ctx.journal.blob(events[0].tree_sha256)))
        except (EventStoreError, snapshots.SnapshotError):
            pass  # without it, a file put back as it was counts as edited: kept, the safe side
    edited = []
    for write in events[-1].writes:
        target = ctx.root / row["path"] / write.path
        if target.is_symlink():  # a person put it there: overnight never writes one
            edited.append(write.path)
            continue
        try:
            content = hashlib.sha256(target.read_bytes()).hexdigest()
        except OSError:
            continue  # removed (or unreadable: the write step says so)
        if content not in wrote[write.path] and content != first.get(write.path):
            edited.append(write.path)
    return edited


def _changed(ctx: Context, row: dict) -> bool:
    """Whether the plugin's files are not those its scan analyzed (edited, removed, unreadable)."""
    return hash_tree(ctx.root, ctx.root / row["path"], ctx.leave_out).content_hash != row["content_hash"]


def _retry_step(ctx: Context, cursor: PluginCursor, row: dict) -> None:
    _request(ctx, cursor, row, row["step"] or "plan")


def _request(ctx: Context, cursor: PluginCursor, row: dict, step: str) -> None:
    """Record the request, then send it; record the answer or the classified failure."""
    if ctx.closed.is_set():
        raise RequestsClosed()
    if _changed(ctx, row):
        raise PluginChanged()  # a prompt from files the analysis never saw, or a plugin gone: quota for nothing
    details = _details(ctx, cursor.plugin_id, "facts", "plan", "feedback")
    facts = msgspec.json.decode(details["facts"], type=c.PluginFacts)
    replaces = replaced_skill(facts, row["skill_name"])
    data = plugin_data(ctx.root, row["path"], row["name"], row["category"], facts, replaces)
    system = system_instruction(ctx.standards)
    feedback: list[str] = []
    if step == "plan":
        prompt, schema = plan_prompt(data, row["skill_name"], replaces), c.Plan
    else:
        plan = msgspec.json.decode(details["plan"], type=c.Plan)
        feedback = msgspec.json.decode(details["feedback"]) if details["feedback"] else []
        prompt = skill_prompt(data, row["skill_name"], replaces, plan, ctx.settings.gates, feedback)
        schema = c.SkillDraft
    unstatable = gates.license_problem(skill_license(facts, row["skill_name"]))
    unwritable = _unwritable(ctx.root / row["path"], row["skill_name"])
    if unstatable or unwritable:  # no SKILL.md could pass, or go where it must: no request is spent on it
        ctx.journal.record(cursor, c.PluginFailed(run_id=ctx.run_id, step=step, reason=unstatable or unwritable))
        return
    est = estimate_tokens(system, prompt)
    tpm = ctx.scheduler.limits.tpm
    # Gemini would answer every attempt with a 429, a request a minute, for ever; the skill prompt
    # holds the plan's: a plan is not asked for when the skill prompt is too large even without it
    least = (estimate_tokens(system, least_skill_prompt(data, row["skill_name"], replaces, ctx.settings.gates))
             if tpm and step == "plan" and not ctx.settings.dry_run else 0)
    if tpm and max(est, least) > tpm:
        which, tokens = (step, est) if est > tpm else ("skill", least)
        ctx.journal.record(cursor, c.PluginFailed(run_id=ctx.run_id, step=which, reason=(
            f"its {which} prompt is about {tokens:,} tokens"
            + (" even before the plan is added to it" if which != step else "")
            + f", more than the {tpm:,} tokens per minute allowed: it can never be sent (if your quota "
            "allows more, state it with --tpm)")))
        return
    hold = _hold(ctx, cursor.plugin_id, step, est)
    try:
        slot = _admit(ctx, cursor.plugin_id, est)
    except BaseException:
        if ctx.spending is not None and hold is not None:
            ctx.spending.release(hold)  # never sent: the budget must not count it
        raise
    request_id = uuid.uuid4().hex
    attempt = (row["plan_attempts"] if step == "plan" else row["skill_attempts"]) + 1
    if step == "plan":
        requested: c.Event = c.PlanRequested(run_id=ctx.run_id, request_id=request_id,
                                             model=ctx.settings.model, attempt=attempt,
                                             est_input_tokens=est)
    else:
        requested = c.SkillRequested(run_id=ctx.run_id, request_id=request_id, model=ctx.settings.model,
                                     attempt=attempt, est_input_tokens=est, feedback=feedback)
    ctx.journal.record(cursor, requested)
    ctx.stats.add(request=True)
    try:
        answer = ctx.gateway.generate(system, prompt, schema)
    except GatewayError as e:
        if ctx.spending is not None and hold is not None:
            ctx.spending.settle(hold, e.usage, billed=e.kind == "timeout")
        _failed(ctx, cursor, row, step, request_id, e)
        ctx.scheduler.settle(slot, e.usage.input_tokens if e.usage else None)
        return
    ctx.scheduler.succeeded()
    if ctx.spending is not None and hold is not None:
        ctx.spending.settle(hold, answer.usage)
    ctx.scheduler.settle(slot, answer.usage.input_tokens)
    ctx.stats.add(answer.usage)
    if step == "plan":
        ctx.journal.record(cursor, c.PlanReceived(run_id=ctx.run_id, request_id=request_id,
                                                  plan=answer.value, usage=answer.usage))
    else:
        draft = msgspec.json.encode(answer.value)
        ctx.journal.record(cursor, c.SkillReceived(run_id=ctx.run_id, request_id=request_id,
                                                   draft_sha256=_sha(draft), usage=answer.usage),
                           blobs=[draft])


def _hold(ctx: Context, plugin_id: str, step: str, est: int) -> Hold | None:
    """The budgets' hold for this request (None without a budget to hold against), once it
    fits beside the requests under way; BudgetReached when it cannot fit at all."""
    if ctx.spending is None:
        return None
    try:
        while (hold := ctx.spending.before_request(step, est)) is None:
            if ctx.should_stop():
                raise Interrupted()
            if ctx.closed.is_set():
                raise RequestsClosed()
            ctx.stats.waiting(plugin_id, ctx.clock() + 1.0, "the budget: the answers under way tell what is left")
            ctx.spending.wait(1.0)
        return hold
    finally:
        ctx.stats.waiting(plugin_id, None)


def _admit(ctx: Context, plugin_id: str, est: int):
    """Wait for the scheduler's permission (or raise DailyQuotaExhausted); returns the reserved
    slot. While it waits, the progress display shows for which limit and how long."""
    try:
        while True:
            if ctx.should_stop():  # first: a run stopping waits for the answers under way, and sends no more
                raise Interrupted()
            wait, slot, why = ctx.scheduler.try_admit(est)
            if slot is not None:
                return slot
            if ctx.closed.is_set():
                raise RequestsClosed()
            ctx.stats.waiting(plugin_id, ctx.clock() + wait, why)
            ctx.sleep(min(wait, 1.0))
    finally:
        ctx.stats.waiting(plugin_id, None)


class Interrupted(Exception):
    """The run is stopping (a signal, a fatal error) before this plugin could go on."""


class PluginChanged(Exception):
    """The plugin's files are not those its scan analyzed (edited, removed or made unreadable
    since): nothing is sent for it until a scan has looked at it again."""


class RequestsClosed(Exception):
    """The run paused for the quota or reached a budget: this plugin's next step is a request,
    so it waits for the next stretch of the run; nothing was sent."""


def _failed(ctx: Context, cursor: PluginCursor, row: dict, step: str, request_id: str,
            e: GatewayError) -> None:
    message = str(e)  # the gateway redacted every credential from it
    now = ctx.clock()
    if isinstance(e, RateLimited):
        ctx.stats.add(e.usage, limited=True)
        if e.quota_id and e.quota_value:
            metric = next((m for marker, m in _METRICS.items() if marker in e.quota_id), None)
            if metric and ctx.scheduler.learn(metric, e.quota_value):
                ctx.journal.append(f"quota:{ctx.settings.model}", c.LimitLearned(
                    model=ctx.settings.model, metric=metric, value=e.quota_value, quota_id=e.quota_id))
        not_before = ctx.scheduler.rate_limited(e.scope, e.retry_after)
        ctx.journal.record(cursor, c.RequestFailed(
            run_id=ctx.run_id, request_id=request_id, step=step, kind=e.kind, message=message,
            status_code=429, not_before=_iso_us(not_before), usage=e.usage))
        if e.quota_value == 0:  # no request of this model will ever be admitted: retrying spends the day
            raise RunStopped(f"Gemini says this project's quota for {ctx.settings.model} is 0 ({e.quota_id}): it may "
                             "not use that model (a free tier without it?); choose another with --model, or raise the "
                             "quota, then `overnight run` again")
        if e.scope in ("day", "tokens_day"):
            raise DailyQuotaExhausted(not_before, f"daily quota exhausted ({e.quota_id or 'HTTP 429'})")
        return
    ctx.stats.add(e.usage)
    if isinstance(e, AccessDenied):
        # Not the plugin's fault: leave it retryable and stop the run.
        ctx.journal.record(cursor, c.RequestFailed(
            run_id=ctx.run_id, request_id=request_id, step=step, kind="access_denied", message=message,
            status_code=e.status_code, not_before=_iso_us(now), usage=e.usage))
        raise RunStopped(message)
    refused_alike = (0, 0)
    if isinstance(e, Refused):
        refused_alike = ctx.scheduler.refused(cursor.plugin_id, message)
    elif isinstance(e, Unusable):
        ctx.scheduler.succeeded()  # an answer, if not a usable one: Gemini is there
    elif _in_a_row(ctx.scheduler.unanswered(cursor.plugin_id), ctx.settings.max_attempts) and (
            row["failures"] + 1 >= ctx.settings.max_attempts):
        # The run's last requests all went unanswered, and not this plugin's alone: Gemini (or the
        # way to it) is down. Failing the plugins would fail the whole batch in minutes: the run
        # holds every request back, and this plugin tries again after that.
        not_before = ctx.scheduler.hold(OUTAGE_WAIT_S)
        ctx.journal.record(cursor, c.RequestFailed(
            run_id=ctx.run_id, request_id=request_id, step=step, kind=e.kind,
            message=f"{message} (the last {ctx.settings.max_attempts} requests of the run had no answer: "
                    f"every request waits {OUTAGE_WAIT_S:.0f} s)",
            status_code=e.status_code, not_before=_iso_us(not_before), usage=e.usage))
        return
    # a prompt blocked twice in a row would be blocked again: the same prompt goes each time
    blocked_again = e.kind == "blocked" and (row["reason"] or "").startswith("blocked: ")
    if isinstance(e, Refused) or blocked_again or row["failures"] + 1 >= ctx.settings.max_attempts:
        reason = f"{step} request refused: {message}" if isinstance(e, Refused) else (
            f"{step} prompt blocked by Gemini twice in a row, and the same prompt would go again: {message}"
            if blocked_again else f"{step} failed {row['failures'] + 1} times; last: {e.kind}: {message}")
        ctx.journal.record(cursor, c.PluginFailed(run_id=ctx.run_id, step=step, reason=reason,
                                                  request_id=request_id, status_code=e.status_code,
                                                  kind=e.kind, usage=e.usage))
        if _in_a_row(refused_alike, ctx.settings.max_attempts):
            # not these plugins: the request itself (the model, the settings, the key's project)
            raise RunStopped(f"Gemini refused the last {refused_alike[0]} requests, of {refused_alike[1]} plugins, "
                             f"the same way ({message}); the run stops rather than fail every plugin: "
                             "fix the cause, then `overnight run --retry failed`")
        return
    delay = min(MAX_BACKOFF_S, ctx.settings.backoff_s * 2 ** row["failures"])
    delay = delay / 2 + ctx.rng.uniform(0, delay / 2)
    ctx.journal.record(cursor, c.RequestFailed(
        run_id=ctx.run_id, request_id=request_id, step=step, kind=e.kind, message=message,
        status_code=e.status_code, not_before=_iso_us(now + delay), usage=e.usage))


def _in_a_row(alike: tuple[int, int], attempts: int) -> bool:
    """Whether requests in a row that failed alike (how many, of how many plugins) tell of the
    run's trouble, not a plugin's (an outage, a request Gemini refuses whatever the plugin): as
    many as a plugin may try, of more than one plugin."""
    requests, plugins = alike
    return requests >= attempts and plugins > 1


def _unwritable(plugin_dir: Path, skill_name: str) -> str | None:
    """Why the skill could not be written (the directory it goes in, or the nearest one on the way
    that exists, is not writable by this user), or None: found before any request is spent."""
    refused = writes.not_writable(plugin_dir, f"skills/{skill_name}/SKILL.md")
    if refused is None:
        return None
    return (f"cannot write in {refused[0]}: this user may not (its permissions, or a read-only disk); nothing "
            "was asked of Gemini: make it writable, then `--retry failed`")


def _iso_us(ts: float) -> str:
    return format_at(datetime.fromtimestamp(ts, timezone.utc))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _generated(ctx: Context, cursor: PluginCursor, row: dict) -> None:
    details = _details(ctx, cursor.plugin_id, "draft", "facts")
    draft = msgspec.json.decode(ctx.journal.blob(details["draft"]), type=c.SkillDraft)
    facts = msgspec.json.decode(details["facts"], type=c.PluginFacts)
    name = row["skill_name"]
    plugin_dir = ctx.root / row["path"]
    legacy = legacy_skill_dir(plugin_dir, name)
    skill_md = skillmd.compose(name, draft, license=skill_license(facts, name))
    files, directories = _on_disk(plugin_dir / "skills" / name)
    if legacy:
        legacy_files, legacy_directories = _on_disk(legacy)
        files, directories = files | legacy_files, directories | legacy_directories
    reasons = gates.check(name, skill_md, draft.files, files, ctx.settings.gates, directories)
    if reasons:
        attempt = row["gate_failures"] + 1
        if attempt >= ctx.settings.gate_attempts:
            ctx.journal.record(cursor, c.SkillRejected(run_id=ctx.run_id, reasons=reasons))
        else:
            ctx.journal.record(cursor, c.SkillGateFailed(run_id=ctx.run_id, attempt=attempt, reasons=reasons))
        return
    contents = {f"skills/{name}/SKILL.md": skill_md.encode("utf-8")}
    contents.update({f"skills/{name}/{f.path}": skillmd.tidy(f.content).encode("utf-8") for f in draft.files})
    files = [c.FileWrite(path=path, sha256=_sha(data)) for path, data in contents.items()]
    ctx.journal.record(cursor, c.SkillValidated(run_id=ctx.run_id, skill_name=name, files=files),
                       blobs=list(contents.values()))


def _on_disk(skill_dir: Path) -> tuple[set[str], set[str]]:
    """The files and the directories already in a skill directory, relative to it (never
    following symlinks)."""
    if not skill_dir.is_dir() or skill_dir.is_symlink():
        return set(), set()
    entries = list(walk(str(skill_dir), []))
    return ({rel for rel, st in entries if stat.S_ISREG(st.st_mode)},
            {rel for rel, st in entries if stat.S_ISDIR(st.st_mode)})


def _former_dir(ctx: Context, cursor: PluginCursor, plugin_dir: Path, name: str) -> Path | None:
    """The skill directory overnight wrote for this plugin under its former name (the
    marketplace renamed it), which must become skills/<name>/ rather than stay beside it."""
    skills = plugin_dir / "skills"
    found = ctx.journal.query("SELECT schema_version, data FROM events WHERE stream = ? AND type = 'WriteIntended' "
                              "ORDER BY version DESC LIMIT 1", (cursor.stream,))
    if not found or (skills / name).exists():
        return None
    intent = c.REGISTRY.decode("WriteIntended", *found[0])
    former = {w.path.split("/")[1] for w in intent.writes if w.path.startswith("skills/") and w.path.count("/") > 1}
    for old in sorted(former - {name}):
        path = skills / old
        if path.is_dir() and not path.is_symlink():
            return path
    return None


def _validated(ctx: Context, cursor: PluginCursor, row: dict) -> None:
    if not ctx.settings.force and row["done_hash"] is not None:
        edited = _edited_by_hand(ctx, cursor, row)  # again: a person may have edited while it was under way
        if edited:
            ctx.journal.record(cursor, c.PluginSkipped(run_id=ctx.run_id, reason=_kept(edited)))
            return
    if _changed(ctx, row):
        raise PluginChanged()  # its SKILL.md was made from files it no longer has
    snap = snapshots.take(ctx.root, ctx.root / row["path"], ctx.leave_out)
    ctx.journal.record(cursor, c.PluginSnapshotted(run_id=ctx.run_id, tree_sha256=snap.tree_sha256),
                       blobs=snap.blobs)


def _snapshotted(ctx: Context, cursor: PluginCursor, row: dict) -> None:
    details = _details(ctx, cursor.plugin_id, "validated")
    files = msgspec.json.decode(details["validated"], type=list[c.FileWrite])
    plugin_dir = ctx.root / row["path"]
    legacy = _former_dir(ctx, cursor, plugin_dir, row["skill_name"]) or legacy_skill_dir(plugin_dir, row["skill_name"])
    skill_dir = f"skills/{row['skill_name']}"
    moves = [c.Move(src=f"skills/{legacy.name}", dst=skill_dir)] if legacy else []
    # The files go where the move puts them: checked in the directory moved (a symlink there
    # would be moved along), before anything is written.
    held = f"skills/{legacy.name}" if legacy else skill_dir
    with writes.opened(ctx.root, plugin_dir) as at:
        writes.plan_targets(at, held, {held + f.path[len(skill_dir):]: b"" for f in files})
    ctx.journal.record(cursor, c.WriteIntended(run_id=ctx.run_id, writes=files, moves=moves))


def _intent(ctx: Context, plugin_id: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The plugin's write intent: the files (path -> sha256) and the moves (src, dst)."""
    intent = msgspec.json.decode(_details(ctx, plugin_id, "intent")["intent"])
    return {w["path"]: w["sha256"] for w in intent["writes"]}, [(m["src"], m["dst"]) for m in intent["moves"]]


def _writing(ctx: Context, cursor: PluginCursor, row: dict) -> None:
    files, moves = _intent(ctx, cursor.plugin_id)
    plugin_dir = ctx.root / row["path"]
    with writes.opened(ctx.root, plugin_dir) as at:
        if writes.settled(at, files, moves):
            ctx.journal.record(cursor, c.WriteCompleted(run_id=ctx.run_id, settled_by="hash-check"))
            return
        writes.cleanup_temp(ctx.root, plugin_dir)
        contents = {path: ctx.journal.blob(digest) for path, digest in files.items()}
        writes.apply(at, contents, moves, _before(ctx, row, files, moves))
    ctx.journal.record(cursor, c.WriteCompleted(run_id=ctx.run_id, settled_by="rename"))


def _before(ctx: Context, row: dict, paths: Iterable[str], moves: list[tuple[str, str]]) -> dict[str, str | None]:
    """What each target held in the snapshot taken before the write: a file of a directory moved
    is where the move puts it. Anything else there now is someone else's change (see writes.apply)."""
    held = snapshots.held(ctx.journal.blob(row["snapshot"]))

    def source(rel: str) -> str:
        return next((src + rel[len(dst):] for src, dst in moves if rel.startswith(dst + "/")), rel)

    return {rel: held.get(source(rel)) for rel in paths}


def _written(ctx: Context, cursor: PluginCursor, row: dict) -> None:
    tree = hash_tree(ctx.root, ctx.root / row["path"], ctx.leave_out)
    ctx.journal.record(cursor, c.PluginDone(run_id=ctx.run_id, content_hash=tree.content_hash))


def _planned(ctx: Context, cursor: PluginCursor, row: dict) -> None:
    _request(ctx, cursor, row, "skill")


def _planning(ctx: Context, cursor: PluginCursor, row: dict) -> None:
    _request(ctx, cursor, row, "plan")


def _generating(ctx: Context, cursor: PluginCursor, row: dict) -> None:
    _request(ctx, cursor, row, "skill")


def _not_ready(ctx: Context, cursor: PluginCursor, row: dict) -> None:
    raise RunStopped(f"{cursor.plugin_id} is in state {row['state']}; run `overnight scan` first")


_STEPS: dict[str, Callable[[Context, PluginCursor, dict], None]] = {
    State.NEW: _not_ready, State.DISCOVERED: _not_ready,
    State.ANALYZED: _analyzed, State.PLANNING: _planning, State.PLANNED: _planned,
    State.GENERATING: _generating, State.GENERATED: _generated, State.RETRYING: _retry_step,
    State.VALIDATED: _validated, State.SNAPSHOTTED: _snapshotted, State.WRITING: _writing,
    State.WRITTEN: _written,
}
