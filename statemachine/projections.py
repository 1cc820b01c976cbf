"""The projections of the log: plugin state, quota ledger, runs, learned limits, and views.

Every table here is derived: `overnight audit replay` rebuilds it from the events, and
`overnight audit verify` fails when a stored row differs from what the log says. Each fold
is a pure function of (previous row, recorded event).
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from events import Projection, ProjectionError, Recorded
from statemachine import catalog as c
from statemachine.lifecycle import PLUGIN_EVENT_TAGS, STREAM_PREFIX, State, next_state
from statemachine.scheduler import pacific_day

_json = msgspec.json.Encoder()


def _to_json(value: object) -> str:
    return _json.encode(value).decode("utf-8")


def epoch(at: str) -> float:
    """Seconds since the epoch of a stored `at` (ISO 8601, UTC, 'Z')."""
    return datetime.fromisoformat(at).timestamp()


def _tag(cls: type) -> str:
    return cls.__struct_config__.tag


# ---------------------------------------------------------------------- plugins

_PLUGIN_COLUMNS = (
    ("plugin_id", "TEXT"), ("name", "TEXT"), ("skill_name", "TEXT"), ("category", "TEXT"),
    ("path", "TEXT"), ("listed", "INTEGER"), ("state", "TEXT"), ("step", "TEXT"),
    ("reason", "TEXT"), ("content_hash", "TEXT"), ("done_hash", "TEXT"),
    ("not_before", "TEXT"), ("plan_attempts", "INTEGER"), ("skill_attempts", "INTEGER"),
    ("gate_failures", "INTEGER"), ("failures", "INTEGER"), ("run_id", "TEXT"), ("version", "INTEGER"),
    ("updated_seq", "INTEGER"), ("updated_at", "TEXT"), ("snapshot", "TEXT"),
)
_PLUGIN_TEMPLATE = {column: None for column, _ in _PLUGIN_COLUMNS}
_NEW = State.NEW.value


def _plugin_key(rec: Recorded) -> tuple | None:
    return (rec.stream[len(STREAM_PREFIX):],) if rec.stream.startswith(STREAM_PREFIX) else None


def _on_discovered(new: dict, ev: c.PluginDiscovered) -> None:
    new.update(name=ev.name, skill_name=ev.skill_name, category=ev.category, path=ev.path,
               listed=int(ev.listed), step=None, content_hash=None, plan_attempts=0,
               skill_attempts=0, gate_failures=0, failures=0, snapshot=None)


def _on_analyzed(new: dict, ev: c.PluginAnalyzed) -> None:
    new["content_hash"] = ev.content_hash


def _on_invalid(new: dict, ev: c.PluginInvalid) -> None:
    new.update(reason=ev.reason, content_hash=ev.content_hash)


def _on_reason(new: dict, ev: c.PluginVanished | c.PluginSkipped) -> None:
    new["reason"] = ev.reason


def _on_plan_requested(new: dict, ev: c.PlanRequested) -> None:
    new.update(step="plan", plan_attempts=new["plan_attempts"] + 1)


def _on_skill_requested(new: dict, ev: c.SkillRequested) -> None:
    new.update(step="skill", skill_attempts=new["skill_attempts"] + 1)


def _on_request_failed(new: dict, ev: c.RequestFailed) -> None:
    new.update(step=ev.step, reason=f"{ev.kind}: {ev.message}", not_before=ev.not_before)
    if not ev.kind.startswith("rate_limited"):
        new["failures"] += 1


def _on_received(new: dict, ev: c.PlanReceived | c.SkillReceived) -> None:
    new["failures"] = 0


def _on_gate_failed(new: dict, ev: c.SkillGateFailed) -> None:
    new.update(gate_failures=new["gate_failures"] + 1, reason="; ".join(ev.reasons))


def _on_rejected(new: dict, ev: c.SkillRejected) -> None:
    new["reason"] = "; ".join(ev.reasons)


def _on_validated(new: dict, ev: c.SkillValidated) -> None:
    new["skill_name"] = ev.skill_name


def _on_snapshotted(new: dict, ev: c.PluginSnapshotted) -> None:
    new["snapshot"] = ev.tree_sha256


def _on_done(new: dict, ev: c.PluginDone) -> None:
    new.update(done_hash=ev.content_hash, content_hash=ev.content_hash, step=None)


def _on_failed(new: dict, ev: c.PluginFailed) -> None:
    new.update(step=ev.step, reason=ev.reason)


def _on_restored(new: dict, ev: c.PluginRestored) -> None:
    new.update(snapshot=ev.tree_sha256, done_hash=None)


def _nothing(new: dict, ev: object) -> None:
    pass


_PLUGIN_HANDLERS = {
    _tag(c.PluginDiscovered): _on_discovered, _tag(c.PluginAnalyzed): _on_analyzed,
    _tag(c.PluginInvalid): _on_invalid, _tag(c.PluginVanished): _on_reason,
    _tag(c.PluginSkipped): _on_reason, _tag(c.PlanRequested): _on_plan_requested,
    _tag(c.PlanReceived): _on_received, _tag(c.PlanReused): _nothing, _tag(c.SkillRequested): _on_skill_requested,
    _tag(c.SkillReceived): _on_received, _tag(c.RequestFailed): _on_request_failed,
    _tag(c.SkillGateFailed): _on_gate_failed, _tag(c.SkillRejected): _on_rejected,
    _tag(c.SkillValidated): _on_validated, _tag(c.PluginSnapshotted): _on_snapshotted,
    _tag(c.WriteIntended): _nothing, _tag(c.WriteCompleted): _nothing,
    _tag(c.PluginDone): _on_done, _tag(c.PluginFailed): _on_failed,
    _tag(c.PluginRestored): _on_restored,
}
assert set(_PLUGIN_HANDLERS) == PLUGIN_EVENT_TAGS


def _fold_plugin(row: dict | None, rec: Recorded) -> dict:
    dest = next_state(row["state"] if row else _NEW, rec.type)
    ev = rec.event
    if row is None:
        new = dict(_PLUGIN_TEMPLATE, plugin_id=rec.stream[len(STREAM_PREFIX):], plan_attempts=0,
                   skill_attempts=0, gate_failures=0, failures=0)
    else:
        new = row.copy()
    new["state"] = dest
    new["version"] = rec.version
    new["updated_seq"] = rec.seq
    new["updated_at"] = rec.at
    new["reason"] = None
    new["not_before"] = None
    run_id = getattr(ev, "run_id", None)
    if run_id is not None:
        new["run_id"] = run_id
    _PLUGIN_HANDLERS[rec.type](new, ev)
    return new


PLUGINS = Projection(
    name="plugins",
    columns=_PLUGIN_COLUMNS,
    key_len=1,
    handles=PLUGIN_EVENT_TAGS,
    key=_plugin_key,
    fold=_fold_plugin,
)

# ------------------------------------------------------------------ quota ledger

# A ledger row's output tokens: thinking tokens are billed as output.
OUTPUT_TOKENS = "coalesce(output_tokens, 0) + coalesce(thoughts_tokens, 0)"
_REQUEST_TAGS = {_tag(c.PlanRequested): "plan", _tag(c.SkillRequested): "skill"}
_SETTLE_TAGS = {_tag(t) for t in (c.PlanReceived, c.SkillReceived, c.RequestFailed, c.PluginFailed,
                                  c.RequestLost)}


def _ledger_key(rec: Recorded) -> tuple | None:
    request_id = getattr(rec.event, "request_id", None)
    return (rec.event.run_id, request_id) if request_id else None


def _fold_ledger(row: dict | None, rec: Recorded) -> dict | None:
    ev = rec.event
    phase = _REQUEST_TAGS.get(rec.type)
    if phase is not None:
        sent = epoch(rec.at)
        return {
            "run_id": ev.run_id, "request_id": ev.request_id, "plugin_id": rec.stream[len(STREAM_PREFIX):],
            "model": ev.model, "phase": phase, "attempt": ev.attempt,
            "sent_at": sent, "day": pacific_day(sent),
            "est_input_tokens": ev.est_input_tokens, "input_tokens": None, "cached_tokens": None,
            "output_tokens": None, "thoughts_tokens": None, "outcome": "pending",
            "status_code": None, "settled_at": None,
        }
    if row is None:
        return None  # a PluginFailed without a request, or an answer to no recorded request
    new = dict(row, settled_at=epoch(rec.at))
    usage = getattr(ev, "usage", None)
    if usage is not None:
        new.update(input_tokens=usage.input_tokens, cached_tokens=usage.cached_tokens,
                   output_tokens=usage.output_tokens, thoughts_tokens=usage.thoughts_tokens)
    if isinstance(ev, (c.PlanReceived, c.SkillReceived)):
        new["outcome"] = "ok"
    elif isinstance(ev, c.RequestLost):
        new["outcome"] = "lost"
    else:  # RequestFailed, or a last attempt's PluginFailed (one recorded without a kind, by an
        # older overnight: a 4xx but a 429 was a refusal, anything else an error)
        kind = ev.kind or ("refused" if ev.status_code and 400 <= ev.status_code < 500 and ev.status_code != 429
                           else "error")
        new.update(outcome="rate_limited" if kind.startswith("rate_limited") else kind, status_code=ev.status_code)
    return new


QUOTA_LEDGER = Projection(
    name="quota_ledger",
    version=4,
    columns=(
        ("run_id", "TEXT"), ("request_id", "TEXT"), ("plugin_id", "TEXT"), ("model", "TEXT"),
        ("phase", "TEXT"), ("attempt", "INTEGER"), ("sent_at", "REAL"), ("day", "TEXT"),
        ("est_input_tokens", "INTEGER"),
        ("input_tokens", "INTEGER"), ("cached_tokens", "INTEGER"), ("output_tokens", "INTEGER"),
        ("thoughts_tokens", "INTEGER"), ("outcome", "TEXT"), ("status_code", "INTEGER"),
        ("settled_at", "REAL"),
    ),
    key_len=2,
    handles=frozenset(_REQUEST_TAGS) | _SETTLE_TAGS,
    key=_ledger_key,
    fold=_fold_ledger,
    fresh=frozenset(_REQUEST_TAGS),
)

# -------------------------------------------------------------------------- runs
# One row per run: what it was asked to do and where it stands. Its counters (requests,
# tokens, plugins done...) are not folded here but read from the ledger and the plugins
# table by the `run_summary` view, so plugin events never touch this table.

_RUN_TAGS = frozenset(_tag(t) for t in (
    c.RunStarted, c.LimitsChanged, c.BackupTargetChanged, c.RunPaused, c.RunResumed, c.RunInterrupted,
    c.BudgetExhausted, c.RunFinished,
))


def _fold_run(row: dict | None, rec: Recorded) -> dict | None:
    ev = rec.event
    if isinstance(ev, c.RunStarted):
        return {"run_id": ev.run_id, "command": ev.command, "started_at": rec.at, "ended_at": None,
                "status": "running", "paused_until": None, "config": _to_json(ev.config),
                "plugins": ev.plugins, "counts": None, "last_seq": rec.seq}
    if row is None:
        raise ProjectionError(f"{rec.type} for run {ev.run_id}, which never started")
    new = dict(row, last_seq=rec.seq)
    if isinstance(ev, c.LimitsChanged):
        config = msgspec.json.decode(row["config"])
        config["limits"] = ev.limits
        if ev.budgets:
            config["budgets"] = ev.budgets
        if ev.explicit:
            config["explicit_limits"] = ev.explicit
        new["config"] = _to_json(config)
    elif isinstance(ev, c.BackupTargetChanged):
        new["config"] = _to_json(msgspec.json.decode(row["config"]) | {"backup_to": ev.backup_to})
    elif isinstance(ev, c.RunPaused):
        new.update(status="paused", paused_until=ev.until)
    elif isinstance(ev, c.RunResumed):
        new.update(status="running", paused_until=None, ended_at=None)
    elif isinstance(ev, c.RunInterrupted):
        new.update(status="interrupted", ended_at=rec.at)
    elif isinstance(ev, c.BudgetExhausted):
        new.update(status="budget_exhausted", ended_at=rec.at)
    elif isinstance(ev, c.RunFinished):
        new.update(status=ev.outcome, ended_at=rec.at, counts=_to_json(ev.counts), paused_until=None)
    return new


RUNS = Projection(
    name="runs",
    version=4,
    columns=(
        ("run_id", "TEXT"), ("command", "TEXT"), ("started_at", "TEXT"), ("ended_at", "TEXT"),
        ("status", "TEXT"), ("paused_until", "TEXT"), ("config", "TEXT"), ("plugins", "INTEGER"),
        ("counts", "TEXT"),  # plugins per final state, as the run finished (RunFinished)
        ("last_seq", "INTEGER"),
    ),
    key_len=1,
    handles=_RUN_TAGS,
    key=lambda rec: (rec.event.run_id,),
    fold=_fold_run,
)

# ------------------------------------------------------------------ quota limits


def _fold_limit(row: dict | None, rec: Recorded) -> dict:
    ev = rec.event
    return {"model": ev.model, "metric": ev.metric, "value": ev.value, "quota_id": ev.quota_id,
            "learned_at": rec.at}


QUOTA_LIMITS = Projection(
    name="quota_limits",
    columns=(("model", "TEXT"), ("metric", "TEXT"), ("value", "INTEGER"), ("quota_id", "TEXT"),
             ("learned_at", "TEXT")),
    key_len=2,
    handles=frozenset({_tag(c.LimitLearned)}),
    key=lambda rec: (rec.event.model, rec.event.metric),
    fold=_fold_limit,
)

PROJECTIONS = (PLUGINS, QUOTA_LEDGER, RUNS, QUOTA_LIMITS)

# ---------------------------------------------------------------- plugin details
# What the pipeline reads back from earlier steps (facts, plan, draft, gate feedback, the
# validated files, the write intent) is not copied into a table: each is the payload of the
# latest event of its type in the plugin's stream since the plugin was (re)discovered, read
# through the (stream, version) index. Keeping it out of the append path saves a table
# write on half of all plugin events. The view reads stored payloads, not upcast events: an
# event type read here that gets a new schema version needs this view changed with it (a
# test in tests/test_lifecycle.py fails until then).


def _since(tags: tuple[type, ...]) -> str:
    names = ", ".join(f"'{_tag(t)}'" for t in tags)
    return (f"coalesce((SELECT max(s.version) FROM events s WHERE s.stream = '{STREAM_PREFIX}' || p.plugin_id "
            f"AND s.type IN ({names})), 0)")


def _latest(expr: str, tag: type, after: tuple[type, ...] = (c.PluginDiscovered,)) -> str:
    return (f"(SELECT {expr} FROM events e WHERE e.stream = '{STREAM_PREFIX}' || p.plugin_id "
            f"AND e.type = '{_tag(tag)}' AND e.version > {_since(after)} ORDER BY e.version DESC LIMIT 1)")


_PLUGIN_DETAILS = ", ".join((
    "SELECT p.plugin_id",
    _latest("json_extract(e.data, '$.facts')", c.PluginAnalyzed) + " AS facts",
    # the plan this pass received, or the one of an earlier pass it uses again (PlanReused)
    "coalesce(" + _latest("json_extract(e.data, '$.plan')", c.PlanReceived) + ", "
    f"(SELECT json_extract(r.data, '$.plan') FROM events r WHERE r.stream = '{STREAM_PREFIX}' || p.plugin_id "
    f"AND r.type = '{_tag(c.PlanReceived)}' AND json_extract(r.data, '$.request_id') = "
    + _latest("json_extract(e.data, '$.request_id')", c.PlanReused) + ")) AS plan",
    _latest("json_extract(e.data, '$.draft_sha256')", c.SkillReceived) + " AS draft",
    _latest("json_extract(e.data, '$.reasons')", c.SkillGateFailed, after=(c.PluginDiscovered, c.PlanReceived))
    + " AS feedback",
    _latest("json_extract(e.data, '$.files')", c.SkillValidated) + " AS validated",
    _latest("json_object('writes', json_extract(e.data, '$.writes'), 'moves', json_extract(e.data, '$.moves'))",
            c.WriteIntended) + " AS intent",
    # the content hash of the files as overnight last left them done: a restore clears the row's
    # done_hash (and discovers the plugin again), but undoing that restore brings them back
    f"coalesce(p.done_hash, (SELECT json_extract(e.data, '$.content_hash') FROM events e WHERE e.stream = "
    f"'{STREAM_PREFIX}' || p.plugin_id AND e.type = '{_tag(c.PluginDone)}' ORDER BY e.version DESC LIMIT 1)) "
    "AS left_hash",
)) + " FROM plugins p"

_FINAL_STATES = ("done", "skipped", "rejected", "failed", "planned")


def _final_count(state: str) -> str:
    """A finished run's count of plugins in `state`, as its RunFinished recorded it (later runs
    do not rewrite history); an unfinished run's, from its plugins now (`live`, below)."""
    return (f"CASE WHEN r.counts IS NULL THEN coalesce(live.{state}, 0) "
            f"ELSE coalesce(json_extract(r.counts, '$.{state}'), 0) END AS {state}")


# Each run's plugins per final state now, counted in one pass over the plugins table.
_LIVE_COUNTS = ("(SELECT run_id, " + ", ".join(f"sum(state = '{s}') AS {s}" for s in _FINAL_STATES)
                + " FROM plugins GROUP BY run_id) live")


# Views for people at the sqlite3 shell and for the services (documented in README.md).
# Recreated whenever their definition changes.
VIEWS = {
    "plugin_details": _PLUGIN_DETAILS,
    "state_counts": "SELECT state, count(*) AS plugins FROM plugins GROUP BY state ORDER BY plugins DESC",
    "plugin_history":
        "SELECT seq, at, substr(stream, 8) AS plugin_id, type, data FROM events "
        "WHERE stream >= 'plugin:' AND stream < 'plugin;' ORDER BY seq",
    "run_summary":
        "SELECT r.run_id, r.command, r.status, r.started_at, r.ended_at, r.paused_until, r.plugins, "
        "(SELECT count(*) FROM quota_ledger q WHERE q.run_id = r.run_id) AS requests, "
        "(SELECT count(*) FROM quota_ledger q WHERE q.run_id = r.run_id AND q.attempt > 1) AS retries, "
        "(SELECT count(*) FROM quota_ledger q WHERE q.run_id = r.run_id AND q.outcome = 'rate_limited') AS rate_limited, "
        "(SELECT coalesce(sum(input_tokens), 0) FROM quota_ledger q WHERE q.run_id = r.run_id) AS input_tokens, "
        f"(SELECT coalesce(sum({OUTPUT_TOKENS}), 0) FROM quota_ledger q "
        "WHERE q.run_id = r.run_id) AS output_tokens, "
        + ", ".join(_final_count(state) for state in _FINAL_STATES)
        + f" FROM runs r LEFT JOIN {_LIVE_COUNTS} ON live.run_id = r.run_id",
    "requests_per_minute":
        "SELECT model, strftime('%Y-%m-%d %H:%M', sent_at, 'unixepoch') AS minute, count(*) AS requests, "
        "sum(coalesce(input_tokens, est_input_tokens)) AS input_tokens "
        "FROM quota_ledger GROUP BY model, minute ORDER BY minute",
    "requests_per_day":
        "SELECT model, day AS day_pacific, count(*) AS requests, "
        "sum(coalesce(input_tokens, est_input_tokens)) AS input_tokens, "
        f"sum({OUTPUT_TOKENS}) AS output_tokens "
        "FROM quota_ledger GROUP BY model, day ORDER BY day",
}
