"""The projections of the log: plugin state, quota ledger, runs, learned limits, and views.

Every table here is derived: `overnight audit replay` rebuilds it from the events, and
`overnight audit verify` fails when a stored row differs from what the log says. Each fold
is a pure function of (previous row, recorded event).
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from events import Projection, Recorded
from statemachine import catalog as c
from statemachine.lifecycle import PLUGIN_EVENT_TAGS, STREAM_PREFIX, State, next_state

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
    ("gate_failures", "INTEGER"), ("run_id", "TEXT"), ("version", "INTEGER"),
    ("updated_seq", "INTEGER"), ("updated_at", "TEXT"), ("facts", "TEXT"), ("plan", "TEXT"),
    ("snapshot", "TEXT"),
)


def _plugin_key(rec: Recorded) -> tuple | None:
    return (rec.stream[len(STREAM_PREFIX):],) if rec.stream.startswith(STREAM_PREFIX) else None


def _fold_plugin(row: dict | None, rec: Recorded) -> dict:
    state = row["state"] if row else State.NEW.value
    dest = next_state(state, rec.type)
    ev = rec.event
    new = dict(row) if row else {"plugin_id": rec.stream[len(STREAM_PREFIX):], "plan_attempts": 0,
                                 "skill_attempts": 0, "gate_failures": 0}
    new.update(state=dest.value, version=rec.version, updated_seq=rec.seq, updated_at=rec.at,
               reason=None, not_before=None)
    run_id = getattr(ev, "run_id", None)
    if run_id is not None:
        new["run_id"] = run_id
    if isinstance(ev, c.PluginDiscovered):
        new.update(name=ev.name, skill_name=ev.skill_name, category=ev.category, path=ev.path,
                   listed=int(ev.listed), step=None, content_hash=None, facts=None, plan=None,
                   plan_attempts=0, skill_attempts=0, gate_failures=0, snapshot=None)
    elif isinstance(ev, c.PluginAnalyzed):
        new.update(content_hash=ev.content_hash, facts=_to_json(ev.facts))
    elif isinstance(ev, (c.PluginInvalid,)):
        new.update(reason=ev.reason, content_hash=ev.content_hash)
    elif isinstance(ev, (c.PluginVanished, c.PluginSkipped)):
        new["reason"] = ev.reason
    elif isinstance(ev, c.PlanRequested):
        new.update(step="plan", plan_attempts=new["plan_attempts"] + 1)
    elif isinstance(ev, c.PlanReceived):
        new.update(plan=_to_json(ev.plan))
    elif isinstance(ev, c.SkillRequested):
        new.update(step="skill", skill_attempts=new["skill_attempts"] + 1)
    elif isinstance(ev, c.RequestFailed):
        new.update(step=ev.step, reason=f"{ev.kind}: {ev.message}", not_before=ev.not_before)
    elif isinstance(ev, c.SkillGateFailed):
        new.update(gate_failures=new["gate_failures"] + 1, reason="; ".join(ev.reasons))
    elif isinstance(ev, c.SkillRejected):
        new["reason"] = "; ".join(ev.reasons)
    elif isinstance(ev, c.SkillValidated):
        new["skill_name"] = ev.skill_name
    elif isinstance(ev, c.PluginSnapshotted):
        new["snapshot"] = ev.tree_sha256
    elif isinstance(ev, c.PluginDone):
        new.update(done_hash=ev.content_hash, content_hash=ev.content_hash, step=None)
    elif isinstance(ev, c.PluginFailed):
        new.update(step=ev.step, reason=ev.reason)
    elif isinstance(ev, c.PluginRestored):
        new.update(snapshot=ev.tree_sha256, done_hash=None)
    for column, _ in _PLUGIN_COLUMNS:
        new.setdefault(column, None)
    return new


PLUGINS = Projection(
    name="plugins",
    columns=_PLUGIN_COLUMNS,
    key_len=1,
    handles=PLUGIN_EVENT_TAGS,
    key=_plugin_key,
    fold=_fold_plugin,
    indexes=(("state",), ("name",)),
)

# ------------------------------------------------------------------ quota ledger

_REQUEST_TAGS = {_tag(c.PlanRequested): "plan", _tag(c.SkillRequested): "skill"}
_SETTLE_TAGS = {_tag(t) for t in (c.PlanReceived, c.SkillReceived, c.RequestFailed, c.PluginFailed)}


def _ledger_key(rec: Recorded) -> tuple | None:
    request_id = getattr(rec.event, "request_id", None)
    return (request_id,) if request_id else None


def _fold_ledger(row: dict | None, rec: Recorded) -> dict | None:
    ev = rec.event
    phase = _REQUEST_TAGS.get(rec.type)
    if phase is not None:
        return {
            "request_id": ev.request_id, "plugin_id": rec.stream[len(STREAM_PREFIX):],
            "run_id": ev.run_id, "model": ev.model, "phase": phase, "sent_at": epoch(rec.at),
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
    elif isinstance(ev, c.RequestFailed):
        new.update(outcome="rate_limited" if ev.kind.startswith("rate_limited") else ev.kind,
                   status_code=ev.status_code)
    else:
        new.update(outcome="error", status_code=ev.status_code)
    return new


QUOTA_LEDGER = Projection(
    name="quota_ledger",
    columns=(
        ("request_id", "TEXT"), ("plugin_id", "TEXT"), ("run_id", "TEXT"), ("model", "TEXT"),
        ("phase", "TEXT"), ("sent_at", "REAL"), ("est_input_tokens", "INTEGER"),
        ("input_tokens", "INTEGER"), ("cached_tokens", "INTEGER"), ("output_tokens", "INTEGER"),
        ("thoughts_tokens", "INTEGER"), ("outcome", "TEXT"), ("status_code", "INTEGER"),
        ("settled_at", "REAL"),
    ),
    key_len=1,
    handles=frozenset(_REQUEST_TAGS) | _SETTLE_TAGS,
    key=_ledger_key,
    fold=_fold_ledger,
    indexes=(("model", "sent_at"),),
)

# -------------------------------------------------------------------------- runs

_RUN_COUNTERS = ("requests", "input_tokens", "output_tokens", "rate_limited", "retries",
                 "done", "skipped", "rejected", "failed")
_RUN_TAGS = frozenset(_tag(t) for t in (
    c.RunStarted, c.LimitsChanged, c.RunPaused, c.RunResumed, c.RunInterrupted,
    c.BudgetExhausted, c.RunFinished, c.PlanRequested, c.SkillRequested, c.PlanReceived,
    c.SkillReceived, c.RequestFailed, c.PluginDone, c.PluginSkipped, c.SkillRejected,
    c.PluginFailed,
))


def _run_key(rec: Recorded) -> tuple | None:
    run_id = getattr(rec.event, "run_id", None)
    return (run_id,) if run_id else None


def _fold_run(row: dict | None, rec: Recorded) -> dict | None:
    ev = rec.event
    if isinstance(ev, c.RunStarted):
        new = {"run_id": ev.run_id, "command": ev.command, "started_at": rec.at, "ended_at": None,
               "status": "running", "paused_until": None, "config": _to_json(ev.config),
               "plugins": ev.plugins, **{k: 0 for k in _RUN_COUNTERS}}
        return new
    if row is None:
        return None  # plugin events of a run that recorded no RunStarted (not a run)
    new = dict(row, last_seq=rec.seq)
    if isinstance(ev, c.LimitsChanged):
        new["config"] = _to_json({**msgspec.json.decode(row["config"]), "limits": ev.limits})
    elif isinstance(ev, c.RunPaused):
        new.update(status="paused", paused_until=ev.until)
    elif isinstance(ev, c.RunResumed):
        new.update(status="running", paused_until=None, ended_at=None)
    elif isinstance(ev, c.RunInterrupted):
        new.update(status="interrupted", ended_at=rec.at)
    elif isinstance(ev, c.BudgetExhausted):
        new.update(status="budget_exhausted", ended_at=rec.at)
    elif isinstance(ev, c.RunFinished):
        new.update(status=ev.outcome, ended_at=rec.at)
    elif isinstance(ev, (c.PlanRequested, c.SkillRequested)):
        new["requests"] += 1
        if ev.attempt > 1:
            new["retries"] += 1
    elif isinstance(ev, (c.PlanReceived, c.SkillReceived)):
        new["input_tokens"] += ev.usage.input_tokens
        new["output_tokens"] += ev.usage.output_tokens + ev.usage.thoughts_tokens
    elif isinstance(ev, c.RequestFailed):
        if ev.kind.startswith("rate_limited"):
            new["rate_limited"] += 1
        if ev.usage is not None:
            new["input_tokens"] += ev.usage.input_tokens
            new["output_tokens"] += ev.usage.output_tokens + ev.usage.thoughts_tokens
    elif isinstance(ev, c.PluginDone):
        new["done"] += 1
    elif isinstance(ev, c.PluginSkipped):
        new["skipped"] += 1
    elif isinstance(ev, c.SkillRejected):
        new["rejected"] += 1
    elif isinstance(ev, c.PluginFailed):
        new["failed"] += 1
    return new


RUNS = Projection(
    name="runs",
    columns=(
        ("run_id", "TEXT"), ("command", "TEXT"), ("started_at", "TEXT"), ("ended_at", "TEXT"),
        ("status", "TEXT"), ("paused_until", "TEXT"), ("config", "TEXT"), ("plugins", "INTEGER"),
        *((k, "INTEGER") for k in _RUN_COUNTERS), ("last_seq", "INTEGER"),
    ),
    key_len=1,
    handles=_RUN_TAGS,
    key=_run_key,
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

# Views for people at the sqlite3 shell (documented in README.md).
VIEWS = (
    "CREATE VIEW IF NOT EXISTS state_counts AS "
    "SELECT state, count(*) AS plugins FROM plugins GROUP BY state ORDER BY plugins DESC",
    "CREATE VIEW IF NOT EXISTS plugin_history AS "
    "SELECT seq, at, substr(stream, 8) AS plugin_id, type, data FROM events "
    "WHERE stream >= 'plugin:' AND stream < 'plugin;' ORDER BY seq",
    "CREATE VIEW IF NOT EXISTS requests_per_minute AS "
    "SELECT model, strftime('%Y-%m-%d %H:%M', sent_at, 'unixepoch') AS minute, count(*) AS requests, "
    "sum(coalesce(input_tokens, est_input_tokens)) AS input_tokens "
    "FROM quota_ledger GROUP BY model, minute ORDER BY minute",
    "CREATE VIEW IF NOT EXISTS requests_per_day AS "
    "SELECT model, date(sent_at, 'unixepoch') AS day_utc, count(*) AS requests, "
    "sum(coalesce(input_tokens, 0)) AS input_tokens, sum(coalesce(output_tokens, 0)) AS output_tokens "
    "FROM quota_ledger GROUP BY model, day_utc ORDER BY day_utc",
)
