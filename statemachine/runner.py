"""`overnight run` and `overnight resume`: a batch of plugins through the pipeline.

A run records its effective configuration (never a secret) in RunStarted, with the list of
plugins it selected, so `resume` continues exactly that batch with exactly that
configuration. Workers (threads: the work is waiting on Gemini, and blocking code keeps each
step a plain check -> run -> record) take plugins in order; a plugin that must wait (a retry
after a fault or a 429) goes back in the queue with its not-before time, so the others go
on. Every worker asks the scheduler before each request.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable

import msgspec

from events import EventStore, EventStoreError
from statemachine import catalog as c
from events.remote import display_url
from events.store import format_at
from statemachine.budget import BudgetReached, Budgets, Spending
from statemachine.discovery import one_line
from statemachine.errors import OvernightError, StoppedBySignal
from statemachine.metrics import Prices, answer_latency, estimate, eta, expected_output, tokens_each
from statemachine.gates import GateConfig
from statemachine.gateway import Backend, Gateway, GeminiSettings
from statemachine.journal import Journal, JournalClosed
from statemachine.lifecycle import FINAL, RETRYABLE, State
from statemachine.pipeline import (Context, Finished, Interrupted, PluginChanged, RequestsClosed, RunStopped, Stats,
                                  StepSettings, advance)
from statemachine.projections import OUTPUT_TOKENS
from statemachine.prompts import Standards, load_standards
from statemachine.scan import analyze_again, scan
from statemachine.scheduler import (DailyQuotaExhausted, Limits, Scheduler, day_start, effective_limits, iso,
                                    run_limits)
from statemachine.status import UNFINISHED, resumable_run, run_selection, run_to_resume
from statemachine.workspace import followed_backup, not_plugin_files

# The states a complete run leaves its plugins in: a plugin that turned invalid or left the
# marketplace while the run went on is one it had no more to do with, as if its scan had
# found it so (a run selects no invalid plugin); the summary lists the invalid ones.
OK_END = frozenset({State.DONE, State.SKIPPED, State.REJECTED, State.INVALID, State.GONE})
# Network jitter between our admission and Gemini's count (measured up to ~0.15 s on a busy
# machine by tests/bench/quota.py): keep a request in the minute window this much longer.
WINDOW_MARGIN = 0.5
# Scans an execution makes again for plugins whose files changed under it, at the most: a
# plugin that changes every time is left for the next run.
MAX_RESCANS = 3
# The states a run's summary lists, with their reasons (others only when they have one).
_LOOK = (State.FAILED, State.REJECTED, State.RETRYING, State.WRITING)


class _BackupStopped(BaseException):
    """Raised by the signal handler into a run's backup: it stops there (safe at any point)."""


@dataclass(frozen=True)
class RunOptions:
    gemini: GeminiSettings = field(default_factory=GeminiSettings)
    limits: Limits = field(default_factory=Limits)
    gates: GateConfig = field(default_factory=GateConfig)
    gate_attempts: int = 3
    max_attempts: int = 5
    backoff_s: float = 2.0
    plugins: tuple[str, ...] = ()
    category: str | None = None
    limit: int | None = None
    force: bool = False
    retry: tuple[str, ...] = ()  # final states (RETRYABLE) whose plugins are processed again
    dry_run: bool = False
    standards: Path | None = None
    wait: bool = True
    budgets: Budgets = field(default_factory=Budgets)
    prices: Prices = field(default_factory=Prices)
    backup_to: str | None = None  # libSQL URL; the token comes from TURSO_AUTH_TOKEN only
    # Limits the user stated (a flag or the config file): they override limits learned before.
    explicit_limits: tuple[str, ...] = ()

    def config(self, standards: Standards, backend: Backend) -> dict[str, Any]:
        """The recorded configuration: everything `resume` needs, and no secret."""
        return {
            "gemini": self.gemini.public(), "backend": backend.describe(),
            "limits": self.limits.as_dict(), "explicit_limits": sorted(self.explicit_limits),
            "gates": dataclasses.asdict(self.gates),
            "gate_attempts": self.gate_attempts, "max_attempts": self.max_attempts,
            "backoff_s": self.backoff_s, "plugins": list(self.plugins), "category": self.category,
            "limit": self.limit, "force": self.force, "retry": list(self.retry), "dry_run": self.dry_run,
            "standards_sha256": standards.sha256,
            "wait": self.wait, "budgets": self.budgets.as_dict(),
            "prices": dataclasses.asdict(self.prices),
            "backup_to": display_url(self.backup_to) if self.backup_to else None,
        }


def options_from_config(config: dict[str, Any]) -> RunOptions:
    g = config["gemini"]
    gates = dict(config["gates"])
    gates["sections"] = tuple(gates["sections"])
    return RunOptions(
        gemini=GeminiSettings(model=g["model"], base_url=g["base_url"], timeout_s=g["timeout_s"],
                              max_output_tokens=g["max_output_tokens"], temperature=g["temperature"]),
        limits=Limits(**config["limits"]), gates=GateConfig(**gates),
        gate_attempts=config["gate_attempts"], max_attempts=config["max_attempts"],
        backoff_s=config["backoff_s"], plugins=tuple(config["plugins"]), category=config["category"],
        limit=config["limit"], force=config["force"], retry=tuple(config.get("retry", ())),
        dry_run=config["dry_run"], wait=config["wait"],
        budgets=Budgets(**config["budgets"]), prices=Prices(**config["prices"]),
        explicit_limits=tuple(config.get("explicit_limits", ())),
        backup_to=config.get("backup_to"),  # recorded without credentials: the token is TURSO_AUTH_TOKEN
    )


def select(store: EventStore, options: RunOptions) -> list[str]:
    """The plugins a run with these options processes, in order (a pure read of the log)."""
    rows = store.query("SELECT plugin_id, name, category, state, reason FROM plugins ORDER BY plugin_id")
    wanted = set(options.plugins)
    if wanted:
        known = {r[0] for r in rows} | {r[1] for r in rows}
        unknown = sorted(wanted - known)
        if unknown:
            raise OvernightError(f"no plugin named or with id {', '.join(map(repr, unknown))}")
        blocked = [f"{pid} is {state} ({reason})" for pid, name, _, state, reason in rows
                   if (pid in wanted or name in wanted) and state in (State.INVALID, State.GONE)]
        if blocked:
            raise OvernightError(f"cannot process what was asked for: {'; '.join(blocked)}")
        left = [(pid, state, reason) for pid, name, _, state, reason in rows
                if (pid in wanted or name in wanted) and _left_alone(state, options)]
        if left:  # asked for by name, left out in silence, it would look like a run that did it
            named = "; ".join(f"{pid} is {state}" + (f" ({reason})" if reason else "") for pid, state, reason in left)
            if options.retry:
                open_ = [pid for pid, state, _ in left if state not in FINAL]  # changed since it failed, say
                plain = (f" ({', '.join(open_)} not finished: a run without --retry takes "
                         f"{'it' if len(open_) == 1 else 'them'})") if open_ else ""
                raise OvernightError(f"not {' or '.join(options.retry)}: {named}; --retry takes only the plugins "
                                     f"in that state{plain}")
            found = {state for _, state, _ in left}
            flags = " ".join(f"--retry {s}" for s in sorted(found)) if found <= RETRYABLE else "--force"
            raise OvernightError(f"already finished: {named}; add {flags} to process "
                                 f"{'it' if len(left) == 1 else 'them'} again")
    categories = sorted({r[2] for r in rows})
    if options.category and options.category not in categories:
        raise OvernightError(f"no plugin in category {options.category!r} "
                             f"(categories: {', '.join(one_line(c, 60) for c in categories)})")
    if wanted and options.category:  # both filters hold: a plugin named outside the category is no run of nothing
        outside = [f"{pid} is in {one_line(repr(category), 60)}" for pid, name, category, _, _ in rows
                   if (pid in wanted or name in wanted) and category != options.category]
        if outside:
            raise OvernightError(f"not in category {options.category!r}: {'; '.join(outside)}")
    chosen = []
    for plugin_id, name, category, state, _reason in rows:
        if wanted and plugin_id not in wanted and name not in wanted:
            continue
        if options.category and category != options.category:
            continue
        if state in (State.INVALID, State.GONE):
            continue
        if _left_alone(state, options):
            continue
        chosen.append(plugin_id)
    if options.retry and not chosen:  # not a run of nothing that says complete
        raise OvernightError(f"no plugin is {' or '.join(options.retry)}"
                             + (f" in category {options.category!r}" if options.category else "")
                             + _taken_up(store, {r[0]: r[3] for r in rows}))
    return chosen[: options.limit] if options.limit is not None else chosen


def _taken_up(store: EventStore, states: dict[str, str]) -> str:
    """Where the plugins a --retry looks for may be: an unfinished run took them up (its start
    analyzed them again) and left some of them unfinished, for `resume`."""
    found = resumable_run(store)
    if found is None:
        return ""
    run_id, _, status, _ = found
    left = [pid for pid in run_selection(store, run_id) if states.get(pid) not in FINAL]
    if not left:
        return ""
    return (f"; run {run_id} ({status}) took up {len(left)} plugin{'s' if len(left) != 1 else ''} and did "
            f"not finish {'it' if len(left) == 1 else 'them'}: `overnight resume` continues it")


def _left_alone(state: str, options: RunOptions) -> bool:
    """A plugin these options do not process: with --retry, each one in another state;
    otherwise a finished one, unless --force."""
    if options.retry:
        return state not in options.retry
    return state in FINAL and not options.force


@dataclass
class Progress:
    total: int
    finished: int
    phases: dict[str, str]
    requests: int  # counters of the whole run, across resumes
    input_tokens: int
    output_tokens: int
    rate_limited: int
    eta: float | None = None  # seconds: the requests still owed, at the measured answer time and the quota
    paused_until: float | None = None
    waiting: dict[str, tuple[float, str]] = field(default_factory=dict)  # plugin -> (seconds, limit)
    retrying: int = 0  # plugins waiting to retry after a fault or a 429
    next_retry: float | None = None  # seconds until the first of them goes again
    just_finished: list[Finished] = field(default_factory=list)  # since the last report, in order
    stopping: str | None = None  # the signal the run stops on, while it waits for the answers under way


@dataclass
class RunResult:
    run_id: str | None  # None: nothing to do, and no run recorded
    outcome: str  # complete | incomplete | paused | interrupted | stopped
    counts: dict[str, int]  # states of the plugins this run finished or left unfinished
    selected: int
    by_other_runs: dict[str, int] = field(default_factory=dict)  # of its plugins other runs finished
    invalid: list[tuple[str, str]] = field(default_factory=list)
    new_invalid: set[str] = field(default_factory=set)  # of `invalid`, those this run's scan found so
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (plugin, state, reason)
    message: str | None = None
    budget: str | None = None  # the budget that stopped the run: requests, tokens or cost
    paused_until: str | None = None
    backups: list[str] = field(default_factory=list)  # one line per backup made or failed
    backup_errors: list[str] = field(default_factory=list)  # of `backups`, those that failed or were stopped
    warnings: list[str] = field(default_factory=list)  # the scan's: what it could not read or use
    left_alone: dict[str, int] = field(default_factory=dict)  # none selected: the finished ones, by state

    @property
    def backup_failed(self) -> bool:
        return bool(self.backup_errors)

    @property
    def ok(self) -> bool:
        """Finished, or stopped on purpose (daily quota with --no-wait, a budget): exit 0."""
        return self.outcome in ("complete", "paused", "budget_exhausted")


class Runner:
    """Executes one run. `clock` returns unix seconds; `sleep` waits, by default until the
    run is told to stop (both injectable)."""

    def __init__(self, store: EventStore, root: Path, *, backend: Backend,
                 gateway_factory: Callable[[GeminiSettings, Backend], Gateway] = Gateway,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], object] | None = None,
                 json_log: IO[str] | None = None,
                 on_progress: Callable[[Progress], None] | None = None,
                 on_scan: Callable[[int, int, str, str], None] | None = None) -> None:
        """on_progress: the run's progress, as it goes; on_scan: the first scan's, plugin by plugin
        (done, total, plugin, what: "scanning", or "analyzing again" for --force and --retry)."""
        self.store = store
        self.root = root
        self.backend = backend
        self.gateway_factory = gateway_factory
        self.clock = clock
        self.journal = Journal(store, json_log)
        self.on_progress = on_progress
        self.on_scan = on_scan
        self.stopping = threading.Event()
        # Waiting on the stop event, a signal ends a wait (a quota pause of hours) at once.
        self.sleep = sleep or self.stopping.wait
        self.signal: str | None = None
        # A first SIGINT or SIGTERM lets the requests under way be answered and recorded (a
        # SKILL.md takes up to a minute, and `resume` would pay for it again); a second signal,
        # or a SIGHUP (the terminal is gone), stops at once.
        self.stop_now = threading.Event()
        self._backups: list[str] = []
        self._backup_errors: list[str] = []  # of `_backups`, the backups that failed or were stopped
        self._backing_up = False
        self._scan_warnings: list[str] = []
        self._new_invalid: set[str] = set()  # plugins this execution's scan found invalid, or with a new reason
        self._mid_write: dict[str, str] = {}  # see ScanReport.mid_write

    # ------------------------------------------------------------------ entry points

    def start(self, options: RunOptions) -> RunResult:
        standards = load_standards(options.standards)
        gateway = self.gateway_factory(options.gemini, self.backend)
        gateway.check_access()
        self._scan(stoppable=True)
        if self.stopping.is_set():  # a signal after the scan's last plugin: still no run
            raise StoppedBySignal(self.signal or "SIGINT")
        selection = self._select(options)
        if not selection:  # no run is recorded: `status` and `metrics` go on showing the last one that did something
            return self._finish(None, selection, options, None)
        run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
        config = options.config(standards, self.backend)
        limits = effective_limits(self.store, options.gemini.model, options.limits, options.explicit_limits,
                                  format_at(self.store.clock()))
        config["estimate"] = estimate(self.store, self.root, selection, limits, model=options.gemini.model,
                                      now=self.clock(), gates=options.gates, prices=options.prices,
                                      standards_path=options.standards, plan_only=options.dry_run,
                                      force=options.force).as_json()
        self.journal.append(f"run:{run_id}", c.RunStarted(
            run_id=run_id, command="run", config=config,
            plugins=len(selection), selection=selection), blobs=[standards.text.encode("utf-8")])
        return self._execute(run_id, options, standards, gateway, selection)

    def resume(self, overrides: Callable[[RunOptions], RunOptions] | None = None,
               reason: str = "") -> RunResult:
        run_id, config_json, status, paused_until = run_to_resume(self.store)
        config = msgspec.json.decode(config_json)
        options = options_from_config(config)
        followed = followed_backup(self.store, self.root, options.backup_to)
        if followed:  # the marketplace moved, with the backup kept inside it
            self.journal.append(f"run:{run_id}", c.BackupTargetChanged(
                run_id=run_id, backup_to=display_url(followed), reason="the marketplace moved, and its backup with it"))
            options = dataclasses.replace(options, backup_to=followed)
        blob = self._standards_blob(config["standards_sha256"])
        standards = Standards(blob.decode("utf-8"))
        limits_changed = False
        if overrides is not None:
            changed = overrides(options)
            stated = set(changed.explicit_limits) - set(options.explicit_limits)
            if (changed.limits, changed.budgets) != (options.limits, options.budgets) or stated or reason:
                # recorded even when a flag repeats the run's value: stated now, it wins over a
                # limit learned since it was first stated
                before = self._effective_limits(run_id, options)
                self.journal.append(f"run:{run_id}", c.LimitsChanged(
                    run_id=run_id, limits=changed.limits.as_dict(), budgets=changed.budgets.as_dict(),
                    reason=reason or "changed on resume", explicit=sorted(changed.explicit_limits)))
                limits_changed = self._effective_limits(run_id, changed) != before
            if changed.backup_to != options.backup_to:
                shown_to = display_url(changed.backup_to) if changed.backup_to else None
                self.journal.append(f"run:{run_id}", c.BackupTargetChanged(
                    run_id=run_id, backup_to=shown_to,
                    reason=f"resume with --backup-to {shown_to}" if shown_to else "resume with --no-backup"))
            options = changed
        gateway = self.gateway_factory(options.gemini, self.backend)
        gateway.check_access()
        selection = run_selection(self.store, run_id)
        # a pause still holds when the run was stopped by a signal while it waited it out
        until = datetime.fromisoformat(paused_until).timestamp() if paused_until else 0.0
        lifted = 0.0
        if until > self.clock() and limits_changed:
            # New limits lift the recorded pause (the daily quota): the scheduler decides again
            # from the ledger, and a plugin that waited for that pause goes now. If the day is
            # still spent, the scheduler or Gemini's next 429 pauses the run again.
            lifted = until
        elif until > self.clock():
            if not options.wait:
                if status != "paused":  # stopped by a signal while it waited: now paused again, as it says
                    (reason,), = self.store.query(
                        "SELECT json_extract(data, '$.reason') FROM events WHERE stream = ? AND type = 'RunPaused' "
                        "ORDER BY seq DESC LIMIT 1", (f"run:{run_id}",))
                    self.journal.append(f"run:{run_id}", c.RunResumed(run_id=run_id))
                    self.journal.append(f"run:{run_id}", c.RunPaused(run_id=run_id, reason=reason, until=paused_until))
                return self._finish(run_id, selection, options, "paused", paused_until=paused_until)
            self._wait_until(until, self._stats(run_id), selection)
            if self.stopping.is_set():
                return self._interrupted(run_id, selection)
        self.journal.append(f"run:{run_id}", c.RunResumed(run_id=run_id))
        self._scan()
        return self._execute(run_id, options, standards, gateway, selection, lifted=lifted)

    def _scan(self, again: bool = False, stoppable: bool = False) -> None:
        """Scan the marketplace; `again`: once more during the execution, for plugins whose
        files changed under it (what the first scan found still counts). `stoppable`: a signal
        stops it at the next plugin (`StoppedBySignal`; the plugins scanned so far stay recorded),
        before the run it is the start of exists."""
        before = self.store.last_seq
        try:
            report = scan(self.store, self.root, progress=None if again else self._progress_of("scanning", stoppable))
        finally:
            self.journal.echo(before)  # --json-log: what the scan recorded, also when a signal stopped it
        if again:
            self._scan_warnings += [w for w in report.warnings if w not in self._scan_warnings]
            self._scan_warnings += [f"{plugin_id}: new, found by the scan this run made again after it began: "
                                    "not part of this run (the next `overnight run` takes it)"
                                    for plugin_id in report.added]
            self._new_invalid |= report.newly_invalid
            self._mid_write |= report.mid_write
        else:
            self._scan_warnings = report.warnings
            self._new_invalid = report.newly_invalid
            self._mid_write = report.mid_write

    def _warnings(self) -> list[str]:
        """The scans' warnings, but for the writes cut short that this execution has settled since."""
        if not self._mid_write:
            return self._scan_warnings
        states = dict(self.journal.query(f"SELECT plugin_id, state FROM plugins WHERE plugin_id IN "
                                         f"({', '.join('?' * len(self._mid_write))})", tuple(self._mid_write)))
        settled = {warning for plugin_id, warning in self._mid_write.items()
                   if states.get(plugin_id) not in (State.WRITING, State.WRITTEN)}
        return [w for w in self._scan_warnings if w not in settled]

    def interrupt(self, signal_name: str) -> None:
        """Called from a signal handler: stop taking work; `_execute` records the interruption.
        The first SIGINT or SIGTERM waits for the answers to the requests under way, the next
        signal (or a SIGHUP) does not. A backup under way (the run has ended or paused) is
        stopped where it is: the next backup goes on from there."""
        if self.stopping.is_set() or signal_name == "SIGHUP":
            self.stop_now.set()
        self.signal = self.signal or signal_name
        self.stopping.set()
        if self._backing_up:
            raise _BackupStopped(signal_name)

    # -------------------------------------------------------------------- internals

    def _standards_blob(self, digest: str) -> bytes:
        return self.store.get_blob(digest)

    def _select(self, options: RunOptions) -> list[str]:
        chosen = select(self.store, options)
        if options.force or options.retry:
            before = self.store.last_seq
            analyze_again(self.store, self.root, [p for p in chosen if self._state(p) in FINAL],
                          progress=self._progress_of("analyzing again"))
            self.journal.echo(before)
        return chosen

    def _progress_of(self, what: str, stoppable: bool = True) -> Callable[[int, int, str], None]:
        """A scan's progress, plugin by plugin; `stoppable`: before the run exists, a signal stops it there."""
        def progress(done: int, total: int, plugin_id: str) -> None:
            if stoppable and self.stopping.is_set():
                raise StoppedBySignal(self.signal or "SIGINT")
            if self.on_scan is not None:
                self.on_scan(done, total, plugin_id, what)
        return progress

    def _state(self, plugin_id: str) -> str:
        return self.store.query("SELECT state FROM plugins WHERE plugin_id = ?", (plugin_id,))[0][0]

    def _history(self, model: str) -> list[tuple[float, int]]:
        since = day_start(self.clock())
        return [(at, tokens or 0) for at, tokens in self.store.query(
            "SELECT sent_at, coalesce(input_tokens, est_input_tokens) FROM quota_ledger "
            "WHERE model = ? AND sent_at >= ?", (model, min(since, self.clock() - 60)))]

    def _execute(self, run_id: str, options: RunOptions, standards: Standards, gateway: Gateway,
                 selection: list[str], lifted: float = 0.0) -> RunResult:
        self._settle_lost()
        scheduler = Scheduler(self._effective_limits(run_id, options), self.clock, self._history(options.gemini.model),
                              margin=WINDOW_MARGIN)
        stats = self._stats(run_id)
        expected = expected_output(self.store)
        # A request whose process stopped before its answer (lost), or whose answer did not come in
        # time, may well have been billed: the budgets count it at its estimate (the run's totals
        # for people count what is known).
        lost_in, lost_out = self.store.query(
            "SELECT coalesce(sum(est_input_tokens), 0), coalesce(sum(CASE phase WHEN 'plan' THEN ? ELSE ? END), 0) "
            "FROM quota_ledger WHERE run_id = ? AND outcome IN ('lost', 'timeout')",
            (expected["plan"], expected["skill"], run_id))[0]
        spending = Spending(options.budgets, options.prices, requests=stats.requests,
                            input_tokens=stats.input_tokens + lost_in, output_tokens=stats.output_tokens + lost_out,
                            expected_output=expected)
        ctx = Context(
            run_id=run_id, root=self.root, journal=self.journal, gateway=gateway, scheduler=scheduler,
            settings=StepSettings(model=options.gemini.model, gates=options.gates,
                                  gate_attempts=options.gate_attempts, max_attempts=options.max_attempts,
                                  backoff_s=options.backoff_s, dry_run=options.dry_run,
                                  # a plugin taken again by --retry is processed, as with --force,
                                  # even when the SKILL.md it has (from before it failed) passes
                                  force=options.force or bool(options.retry)),
            standards=standards, clock=self.clock, stopping=self.stopping, stats=stats,
            sleep=self.sleep,
            spending=spending, lifted_until=lifted,
            leave_out=not_plugin_files(self.store, self.root, options.backup_to),
        )
        changed: set[str] = set()
        rescans = 0
        while True:
            if changed:  # the scan records what became of them: analyzed again, invalid or gone
                rescans += 1
                self._scan(again=True)
                for plugin_id, state, reason in self.journal.query(
                        "SELECT plugin_id, state, reason FROM plugins WHERE plugin_id IN "
                        f"({', '.join('?' * len(changed))})", tuple(sorted(changed))):
                    if state in FINAL:  # the progress names it, as a plugin this run finished
                        stats.finish(plugin_id, state, reason)
            pending = self._unfinished(selection)
            already = len(selection) - len(pending)
            outcome = _Batch(ctx, pending, options.limits.concurrency, self.stop_now).run(
                lambda batch: self._report(stats, len(selection), batch, already, options.dry_run))
            if self.stopping.is_set() and self.signal:
                return self._interrupted(run_id, selection)
            if outcome.stopped is not None:
                return self._finish(run_id, selection, options, "stopped", message=outcome.stopped)
            if outcome.budget is not None:
                b = spending.reached(outcome.budget.budget, outcome.budget.limit)
                self.journal.append(f"run:{run_id}", c.BudgetExhausted(
                    run_id=run_id, budget=b.budget, limit=float(b.limit), used=float(b.used)))
                return self._finish(run_id, selection, options, "budget_exhausted", message=str(b), budget=b.budget)
            changed = outcome.changed if rescans < MAX_RESCANS else set()
            self._scan_warnings += [f"{plugin_id}: its files changed each time the run took it up again, "
                                    f"{MAX_RESCANS} times; left for the next run"
                                    for plugin_id in sorted(outcome.changed - changed)]
            if outcome.paused is None:
                if changed:
                    continue
                return self._finish(run_id, selection, options, None)
            until = float(math.ceil(outcome.paused))  # recorded in whole seconds: never before the wait asked for
            self.journal.append(f"run:{run_id}", c.RunPaused(run_id=run_id, reason=outcome.pause_reason,
                                                             until=iso(until)))
            self._backup(options, "paused for quota")
            if not options.wait:
                return self._finish(run_id, selection, options, "paused", paused_until=iso(until))
            self._wait_until(until, stats, selection)
            if self.stopping.is_set():
                return self._interrupted(run_id, selection)
            self.journal.append(f"run:{run_id}", c.RunResumed(run_id=run_id))
            scheduler = Scheduler(scheduler.limits, self.clock, self._history(options.gemini.model),
                                  margin=WINDOW_MARGIN)
            ctx.scheduler = scheduler

    def _settle_lost(self) -> None:
        """Record as lost every pending request: at the start of an execution, those a stopped
        process sent and never saw answered (this process holds the writer lock and has sent
        nothing yet); at an interruption, this process's own requests still in flight, whose
        answers the closed journal will refuse. Each stays in the ledger (it counts against
        the quota); its plugin, still planning or generating, sends it again. One
        transaction: one fsync for them all."""
        with self.store.batch():
            for run_id, request_id in self.store.query(
                    "SELECT run_id, request_id FROM quota_ledger WHERE outcome = 'pending' ORDER BY sent_at"):
                self.journal.append(f"run:{run_id}", c.RequestLost(run_id=run_id, request_id=request_id))

    def _effective_limits(self, run_id: str, options: RunOptions) -> Limits:
        """The run's limits, capped by learned ones; its explicit limits were stated when it
        started or when a resume last changed them."""
        return run_limits(self.store, run_id, options.gemini.model, options.limits, options.explicit_limits)

    def _wait_until(self, until: float, stats: Stats, selection: list[str]) -> None:
        """Sleep through a pause, telling the display when it begins and every 30 s."""
        finished = len(selection) - len(self._unfinished(selection))
        while not self.stopping.is_set() and self.clock() < until:
            if self.on_progress:
                self.on_progress(self._progress(stats, len(selection), finished, paused_until=until))
            self.sleep(min(30.0, max(0.0, until - self.clock())))

    def _stats(self, run_id: str) -> Stats:
        """The run's counters so far, from its ledger rows: a resumed run counts on from them."""
        requests, input_tokens, output_tokens, limited = self.store.query(
            f"SELECT count(*), coalesce(sum(input_tokens), 0), coalesce(sum({OUTPUT_TOKENS}), 0), "
            "count(*) FILTER (WHERE outcome = 'rate_limited') FROM quota_ledger WHERE run_id = ?", (run_id,))[0]
        return Stats(requests=requests, input_tokens=input_tokens, output_tokens=output_tokens,
                     rate_limited=limited)

    def _unfinished(self, selection: list[str]) -> list[str]:
        """The plugins of `selection` not in a final state, in its order."""
        states = dict(self.journal.query("SELECT plugin_id, state FROM plugins"))
        return [plugin_id for plugin_id in selection if states.get(plugin_id) not in FINAL]

    def _progress(self, stats: Stats, total: int, finished: int, *, eta: float | None = None,
                  paused_until: float | None = None, retrying: int = 0,
                  next_retry: float | None = None) -> Progress:
        now = self.clock()
        with stats.lock:
            just_finished, stats.finished = stats.finished, []
            return Progress(total=total, finished=finished, phases=dict(stats.phases), just_finished=just_finished,
                            requests=stats.requests, input_tokens=stats.input_tokens,
                            output_tokens=stats.output_tokens, rate_limited=stats.rate_limited,
                            eta=eta, paused_until=paused_until,
                            waiting={pid: (max(0.0, until - now), why) for pid, (until, why) in stats.waits.items()},
                            retrying=retrying, next_retry=None if next_retry is None else max(0.0, next_retry - now))

    def _report(self, stats: Stats, total: int, batch: "_Batch", already: int, dry_run: bool) -> None:
        """`already`: plugins that were finished when this stretch began (the batch has the
        others)."""
        if not self.on_progress:
            return
        finished = already + batch.finished
        retrying, next_retry = batch.retry_queue()
        until = None
        if finished < total:
            until = self._eta(batch.ctx, stats, total - finished, finished, dry_run)
        progress = self._progress(stats, total, finished, eta=until, retrying=retrying, next_retry=next_retry)
        if self.stopping.is_set() and not self.stop_now.is_set():
            progress.stopping = self.signal
        self.on_progress(progress)

    def _eta(self, ctx: Context, stats: Stats, remaining: int, finished: int, dry_run: bool) -> float:
        with stats.lock:
            requests = stats.requests - stats.rate_limited
        # Through the journal: this runs on the main thread while workers write the log (a query
        # on the store itself, beside a worker's long write, failed: "busy in another thread").
        scheduler = ctx.scheduler
        return eta(scheduler.limits, remaining, finished, requests, tokens_each(self.journal, ctx.run_id),
                   scheduler.used()["day_requests"], self.clock(), dry_run, scheduler.recent(),
                   answer_latency(self.journal, ctx.run_id))

    def _counts(self, run_id: str, selection: list[str]) -> tuple[
            dict[str, int], dict[str, int], list[tuple[str, str, str]]]:
        """The states of run `run_id`'s plugins: those it finished or left unfinished, those
        another run finished (a later run, or one that ran while this one was paused or
        stopped: each plugin is credited to the run that finished it, so sums over runs
        count it once), and the plugins that need a look: failed, rejected, waiting to retry, cut
        short in a write, or held for a reason (the plugins a pause or a budget left where they
        were, untouched or part way, are counted by state, not listed)."""
        chosen = set(selection)
        counts: dict[str, int] = {}
        others: dict[str, int] = {}
        problems = []
        for plugin_id, state, reason, last_run in self.journal.query(
                "SELECT plugin_id, state, reason, run_id FROM plugins"):
            if plugin_id not in chosen:
                continue
            credited = others if state in FINAL and last_run not in (None, run_id) else counts
            credited[state] = credited.get(state, 0) + 1
            if state in _LOOK or (reason and state not in (State.DONE, State.SKIPPED, State.INVALID)):
                problems.append((plugin_id, state, reason or ""))
        return counts, others, problems

    def _finish(self, run_id: str | None, selection: list[str], options: RunOptions, outcome: str | None,
                message: str | None = None, paused_until: str | None = None,
                budget: str | None = None) -> RunResult:
        """The result of run `run_id`, recorded as finished when `outcome` is None (it is then worked
        out); `run_id` None: a run of nothing, which is not recorded."""
        counts, others, problems = self._counts(run_id, selection)
        done_states = OK_END | ({State.PLANNED} if options.dry_run else set())
        if outcome is None:
            outcome = "complete" if all(s in done_states for s in [*counts, *others]) else "incomplete"
            if run_id is not None:
                self.journal.append(f"run:{run_id}", c.RunFinished(run_id=run_id, outcome=outcome, counts=counts,
                                                                   by_other_runs=others))
            self._finish_older_runs(run_id)
        if options.dry_run:
            problems = [p for p in problems if p[1] != State.PLANNED]
        invalid = self._invalid()
        left_alone: dict[str, int] = {}
        if not selection and not options.retry:  # a run of nothing: say why (they all finished before)
            states = dict(self.store.query("SELECT plugin_id, state FROM plugins"))
            for plugin_id in select(self.store, dataclasses.replace(options, force=True, limit=None)):
                left_alone[states[plugin_id]] = left_alone.get(states[plugin_id], 0) + 1
        if outcome != "paused":  # a pause was backed up when it began
            self._backup(options, "nothing to do" if run_id is None else f"run {outcome}")
        return RunResult(run_id=run_id, outcome=outcome, counts=counts, by_other_runs=others,
                         selected=len(selection), invalid=invalid, problems=problems, message=message,
                         budget=budget, paused_until=paused_until, backups=list(self._backups),
                         backup_errors=self._backup_errors, warnings=self._warnings(),
                         new_invalid=self._new_invalid, left_alone=left_alone)

    def _finish_older_runs(self, run_id: str | None) -> None:
        """An older unfinished run whose every plugin this run (or a run of nothing: None) found
        finished is finished too, so `status` stops listing it and `resume` does not come back to
        it for nothing."""
        for other, selection in self.journal.query(
                "SELECT r.run_id, json_extract(e.data, '$.selection') FROM runs r JOIN events e "
                "ON e.stream = 'run:' || r.run_id AND e.type = 'RunStarted' "
                f"WHERE r.run_id IS NOT ? AND r.status IN ({', '.join('?' * len(UNFINISHED))})", (run_id, *UNFINISHED)):
            counts, others, _ = self._counts(other, msgspec.json.decode(selection))
            states = [*counts, *others]
            if all(state in FINAL for state in states):
                outcome = "complete" if all(state in OK_END for state in states) else "incomplete"
                self.journal.append(f"run:{other}", c.RunFinished(run_id=other, outcome=outcome, counts=counts,
                                                                  by_other_runs=others))

    def _backup(self, options: RunOptions, why: str) -> None:
        """Off-site copy at the end of a run and when it pauses: an unattended night ends with one.
        A failed backup does not undo the run; it is reported (and makes the exit status 1)."""
        if not options.backup_to:
            return
        from statemachine.backup import backup

        self._backing_up = True
        before = self.store.last_seq
        try:
            with self.journal.lock:
                report = backup(self.store, self.root, options.backup_to, os.environ.get("TURSO_AUTH_TOKEN"))
        except _BackupStopped as e:
            self._backup_errors.append(f"backup to {display_url(options.backup_to)} ({why}) stopped by "
                                       f"{e.args[0]}; the next backup goes on from where it stopped")
            self._backups.append(self._backup_errors[-1])
            return
        except (OvernightError, EventStoreError) as e:
            self._backup_errors.append(f"backup to {display_url(options.backup_to)} ({why}) failed: {e}")
            self._backups.append(self._backup_errors[-1])
            return
        finally:
            self._backing_up = False
            if not self.journal.closed:
                self.journal.echo(before)  # --json-log: what the backup recorded (BackupCompleted)
        self._backups.append(f"backup to {report.target} ({why}): snapshot {report.snapshot.id[:12]}, "
                             f"{report.events_sent} events, {report.blobs_sent} blobs, "
                             f"{report.bytes_sent:,} bytes sent")
        if report.blobs_repaired:
            self._backups.append(f"  damaged blobs on the remote repaired: {report.blobs_repaired:,}")
        if report.events_repaired:
            self._backups.append(f"  events missing from the remote shipped again: {report.events_repaired:,}")
        self._backups += [f"  warning: {warning}" for warning in report.warnings]

    def _interrupted(self, run_id: str, selection: list[str]) -> RunResult:
        """Record the interruption, with the requests still in flight (a second signal did not
        wait for them) as lost, and close the log; workers still inside a Gemini call find the
        journal closed and end without recording (resume re-sends their requests)."""
        with self.journal.lock:
            with self.store.batch():
                self._settle_lost()
                self.journal.append(f"run:{run_id}", c.RunInterrupted(run_id=run_id, signal=self.signal or "stop"))
            counts, others, problems = self._counts(run_id, selection)
            invalid = self._invalid()
            # a signal during a quota pause: the pause still holds for `resume`
            (paused_until,), = self.journal.query("SELECT paused_until FROM runs WHERE run_id = ?", (run_id,))
            warnings = self._warnings()
            self.journal.close()
        return RunResult(run_id=run_id, outcome="interrupted", counts=counts, by_other_runs=others,
                         selected=len(selection), problems=problems, message=f"interrupted by {self.signal}",
                         warnings=warnings, invalid=invalid, new_invalid=self._new_invalid,
                         paused_until=paused_until)

    def _invalid(self) -> list[tuple[str, str]]:
        return [(pid, reason or "") for pid, reason in self.journal.query(
            "SELECT plugin_id, reason FROM plugins WHERE state = 'invalid' ORDER BY plugin_id")]


@dataclass
class _Outcome:
    paused: float | None = None
    pause_reason: str = ""
    stopped: str | None = None
    budget: BudgetReached | None = None
    changed: set[str] = field(default_factory=set)  # plugins set aside: their files changed since the scan


class _Batch:
    """The work queue of one execution: plugins ordered by when they may continue."""

    def __init__(self, ctx: Context, selection: list[str], concurrency: int, stop_now: threading.Event) -> None:
        self.ctx = ctx
        self.stop_now = stop_now
        self.queue: list[tuple[float, int, str]] = [(0.0, i, pid) for i, pid in enumerate(selection)]
        heapq.heapify(self.queue)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.finished = 0
        self.concurrency = max(1, concurrency)
        self.outcome = _Outcome()
        self.halt = threading.Event()
        self.closed = threading.Event()
        self.error: BaseException | None = None

    def run(self, report: Callable[["_Batch"], None]) -> _Outcome:
        self.ctx.halt, self.ctx.closed = self.halt, self.closed
        threads = [threading.Thread(target=self._worker, name=f"overnight-worker-{i}", daemon=True)
                   for i in range(self.concurrency)]
        report(self)  # where the batch begins
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.25)
                report(self)
                if self.stop_now.is_set():
                    return self.outcome  # do not wait for the calls in flight
        report(self)
        if self.error is not None:
            raise self.error
        return self.outcome

    def retry_queue(self) -> tuple[int, float | None]:
        """How many queued plugins wait to retry, and the unix time the first of them may go."""
        now = self.ctx.clock()
        with self.lock:
            later = [ready for ready, _, _ in self.queue if ready > now]
        return len(later), min(later, default=None)

    def _take(self) -> tuple[str | None, float]:
        """The next plugin that may go now, or (None, seconds to wait); (None, -1) when empty.
        Once requests are closed, the plugins waiting to retry (a request) leave the queue."""
        with self.lock:
            if self.closed.is_set() and self.queue and self.queue[0][0] > self.ctx.clock():
                self.queue.clear()  # the earliest waits, so all do: none of them goes in this batch
            if not self.queue:
                return None, (-1.0 if self.in_flight == 0 else 0.2)
            ready, _, plugin_id = self.queue[0]
            wait = ready - self.ctx.clock()
            if wait > 0:
                return None, wait
            heapq.heappop(self.queue)
            self.in_flight += 1
            return plugin_id, 0.0

    def _worker(self) -> None:
        ctx = self.ctx
        order = 0
        while not ctx.should_stop():
            plugin_id, wait = self._take()
            if plugin_id is None:
                if wait < 0:
                    return
                ctx.sleep(min(wait, 1.0))
                continue
            try:
                again = advance(ctx, plugin_id)
            except DailyQuotaExhausted as e:
                self._stop(paused=e.until, reason=e.reason)
                continue
            except BudgetReached as e:
                self._stop(budget=e)
                continue
            except RequestsClosed:
                with self.lock:
                    self.in_flight -= 1
                continue
            except PluginChanged:
                with self.lock:
                    self.in_flight -= 1
                    self.outcome.changed.add(plugin_id)
                continue
            except RunStopped as e:
                self._stop(stopped=str(e))
                return
            except (JournalClosed, Interrupted):
                with self.lock:
                    self.in_flight -= 1
                return
            except BaseException as e:  # a bug: stop the run and show it
                self.error = e
                self._stop(stopped=f"internal error: {type(e).__name__}: {e}")
                return
            with self.lock:
                self.in_flight -= 1
                if again is None:
                    self.finished += 1
                else:
                    order += 1
                    heapq.heappush(self.queue, (again, len(self.queue) + order, plugin_id))

    def _stop(self, *, paused: float | None = None, reason: str = "",
              stopped: str | None = None, budget: BudgetReached | None = None) -> None:
        """A pause or a budget closes requests (the other plugins go on through the steps that
        need none); a fatal error halts the batch."""
        with self.lock:
            self.in_flight -= 1
            if paused is not None and self.outcome.stopped is None:
                self.outcome.paused = max(self.outcome.paused or 0.0, paused)
                self.outcome.pause_reason = reason
            if stopped is not None:
                self.outcome.stopped = self.outcome.stopped or stopped
            if budget is not None:
                self.outcome.budget = self.outcome.budget or budget
        (self.halt if stopped is not None else self.closed).set()
