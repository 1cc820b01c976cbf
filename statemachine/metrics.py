"""`overnight metrics` and `overnight estimate`: queries over the projections, nothing else.

Metrics read the quota ledger (one row per request, with times, tokens and outcome), the
plugins table and the runs table. The estimate builds the real prompts of the plugins a run
would process and prices them under the configured limits; once runs have happened, their
measured averages (output tokens, retries) replace the defaults.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import msgspec

from events import EventStore
from statemachine import catalog as c
from statemachine.gates import GateConfig
from statemachine.journal import Journal
from statemachine.lifecycle import FINAL, reusable_plan
from statemachine.projections import OUTPUT_TOKENS, epoch
from statemachine.prompts import (
    estimate_tokens,
    least_skill_prompt,
    load_standards,
    plan_prompt,
    plugin_data,
    replaced_skill,
    system_instruction,
)
from statemachine.scheduler import MINUTE, Limits, day_start, next_day_start, run_limits
from events.lock import WriterLock
from statemachine.status import run_selection, runs

# Before any run has measured them: typical answer sizes in tokens (a plan; a 10 KB skill).
DEFAULT_PLAN_OUTPUT = 900
DEFAULT_SKILL_OUTPUT = 3600
PLAN_JSON_CHARS = 1500
DEFAULT_LATENCY_S = 10.0  # seconds an answer takes, before any was measured


@dataclass(frozen=True)
class Prices:
    """US dollars per million tokens (Gemini 2.5 Flash paid tier, late 2025; thinking tokens
    are billed as output)."""

    input_per_million: float = 0.30
    output_per_million: float = 2.50

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        return input_tokens / 1e6 * self.input_per_million + output_tokens / 1e6 * self.output_per_million


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def metrics(store: EventStore, *, now: float | None = None, prices: Prices = Prices()) -> dict[str, Any]:
    now = time.time() if now is None else now
    held = WriterLock(store.path).held()  # a process is writing this log (a run is going on)
    q = store.query
    requests, input_tokens, output_tokens, rate_limited, ok, lost, pending = q(
        f"SELECT count(*), coalesce(sum(input_tokens), 0), coalesce(sum({OUTPUT_TOKENS}), 0), "
        "coalesce(sum(outcome = 'rate_limited'), 0), coalesce(sum(outcome = 'ok'), 0), "
        "coalesce(sum(outcome = 'lost'), 0), coalesce(sum(outcome = 'pending'), 0) FROM quota_ledger")[0]
    # Requests sent again: after a failure (by its kind) or after their process stopped (lost).
    retries = dict(q("SELECT kind, count(*) FROM (SELECT json_extract(data, '$.kind') AS kind FROM events "
                     "WHERE type = 'RequestFailed' UNION ALL SELECT 'lost' FROM quota_ledger "
                     "WHERE outcome = 'lost') GROUP BY kind ORDER BY 2 DESC, 1"))
    # Requests whose answer never came (their process stopped: lost; or past --timeout), which
    # Gemini may have billed: counted at their estimate, as the budgets count them.
    expected = expected_output(store)
    unanswered = dict(zip(("requests", "input_tokens", "output_tokens"), q(
        "SELECT count(*), coalesce(sum(est_input_tokens), 0), "
        "coalesce(sum(CASE phase WHEN 'plan' THEN ? ELSE ? END), 0) FROM quota_ledger "
        "WHERE outcome IN ('lost', 'timeout') AND input_tokens IS NULL",
        (expected["plan"], expected["skill"]))[0]))
    input_tokens += unanswered["input_tokens"]
    output_tokens += unanswered["output_tokens"]
    # Gemini's success rate: over the requests it answered, not those whose process stopped.
    answered = requests - lost - pending
    # Drafts that failed a gate: those regenerated, and each rejected plugin's last one.
    gate_failures = q("SELECT count(*) FROM events WHERE type IN ('SkillGateFailed', 'SkillRejected')")[0][0]
    by_state = dict(q("SELECT state, count(*) FROM plugins GROUP BY state"))
    phases = {}
    for phase in ("plan", "skill"):
        durations = [d for (d,) in q("SELECT settled_at - sent_at FROM quota_ledger WHERE phase = ? "
                                     "AND outcome = 'ok' AND settled_at IS NOT NULL", (phase,))]
        phases[phase] = {"answers": len(durations),
                         "median_s": round(statistics.median(durations), 3) if durations else None,
                         "p95_s": round(_percentile(durations, 0.95), 3) if durations else None}
    windows = {}
    for model, minute, minute_tokens in q(
            "SELECT model, count(*), coalesce(sum(coalesce(input_tokens, est_input_tokens)), 0) "
            "FROM quota_ledger WHERE sent_at > ? GROUP BY model", (now - 60,)):
        windows[model] = {"last_minute_requests": minute, "last_minute_input_tokens": minute_tokens}
    for model, today in q("SELECT model, count(*) FROM quota_ledger WHERE sent_at >= ? GROUP BY model",
                          (day_start(now),)):
        windows.setdefault(model, {"last_minute_requests": 0, "last_minute_input_tokens": 0})
        windows[model]["today_requests"] = today
    learned = [{"model": m, "metric": k, "value": v} for m, k, v in
               q("SELECT model, metric, value FROM quota_limits ORDER BY model, metric")]
    result: dict[str, Any] = {
        "requests": requests, "input_tokens": input_tokens, "output_tokens": output_tokens,
        "estimated": unanswered, "rate_limited": rate_limited, "retries": retries, "gate_failures": gate_failures,
        "lost": lost, "pending": pending, "success_rate": round(ok / answered, 4) if answered else None,
        "cost_usd": round(prices.cost(input_tokens, output_tokens), 4),
        "plugins": sum(by_state.values()), "plugins_done": by_state.get("done", 0), "by_state": by_state,
        "phases": phases, "quota_windows": windows, "learned_limits": learned,
        "writer_active": held, "run": _last_run(store, now, held),
    }
    return result


def _last_run(store: EventStore, now: float, held: bool) -> dict[str, Any] | None:
    every_run = runs(store, held)
    if not every_run:
        return None
    run_id, status, started_at = (every_run[0][k] for k in ("run_id", "status", "started_at"))
    config = store.query("SELECT config FROM runs WHERE run_id = ?", (run_id,))[0][0]
    selection = run_selection(store, run_id)
    ended = dict(store.query(
        "SELECT state, count(*) FROM plugins WHERE run_id = ? GROUP BY state", (run_id,)))
    finished = sum(n for s, n in ended.items() if s in FINAL)
    requests = store.query("SELECT count(*), count(*) FILTER (WHERE outcome IS NOT 'rate_limited'), max(sent_at) "
                           "FROM quota_ledger WHERE run_id = ?", (run_id,))[0]
    until = None
    live = status == "running" or (held and status == "paused")  # held: a process waits out the pause
    if live and len(selection) > finished:
        remaining = len(selection) - finished
        options = msgspec.json.decode(config)
        model = options["gemini"]["model"]
        limits = run_limits(store, run_id, model, Limits(**options["limits"]), options.get("explicit_limits", ()))
        (today,) = store.query("SELECT count(*) FROM quota_ledger WHERE model = ? AND sent_at >= ?",
                               (model, day_start(now)))[0]
        recent = [at for (at,) in store.query("SELECT sent_at FROM quota_ledger WHERE model = ? AND sent_at > ?",
                                              (model, now - MINUTE))]
        until = round(eta(limits, remaining, finished, requests[1], tokens_each(store, run_id), today, now,
                          options["dry_run"], recent, answer_latency(store, run_id)))
    # wall time, pauses included (as the estimate counts them): until the run ended, until now
    # while a process runs it, else until its last event in any stream (a killed process
    # records no end; its last events are its plugins' and its requests')
    if live:
        end = now
    elif every_run[0]["ended_at"]:
        end = epoch(every_run[0]["ended_at"])
    else:
        last_at, plugins_at = store.query(
            "SELECT (SELECT e.at FROM runs r JOIN events e ON e.seq = r.last_seq WHERE r.run_id = ?1), "
            "(SELECT max(updated_at) FROM plugins WHERE run_id = ?1)", (run_id,))[0]
        end = max(epoch(last_at), epoch(plugins_at) if plugins_at else 0.0, requests[2] or 0.0)
    estimate = msgspec.json.decode(config).get("estimate")
    return {"run_id": run_id, "status": status, "started_at": started_at, "selected": len(selection),
            "finished": finished, "requests": requests[0], "eta_s": until, "estimate": estimate,
            "actual": {"requests": requests[0], "elapsed_s": round(max(0.0, end - epoch(started_at)))}}


@dataclass
class Estimate:
    plugins: int
    requests: int
    input_tokens: int
    output_tokens: int
    days: int
    seconds: float
    cost_usd: float
    basis: str
    used_today: int
    latency_s: float
    # (plugin id, tokens) of the plugins whose plan prompt, or skill prompt even without its
    # plan, is larger than the tokens per minute: a run fails them, so they count for nothing above
    unsendable: list[tuple[str, int]] = field(default_factory=list)
    # of `plugins`, those found with their files as overnight left them: done again, no request
    as_left: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"plugins": self.plugins, "as_left": self.as_left, "requests": self.requests,
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens, "seconds": round(self.seconds), "days": self.days,
                "cost_usd": round(self.cost_usd, 4), "basis": self.basis, "used_today": self.used_today,
                "latency_s": round(self.latency_s, 3),
                "unsendable": [{"plugin": plugin_id, "tokens": tokens} for plugin_id, tokens in self.unsendable]}


def expected_output(store: EventStore) -> dict[str, int]:
    """The output tokens (thinking included) a plan and a skill answer take: the average of
    this log's answers, or a default before there is any."""
    measured = {phase: avg for phase, avg, n in store.query(
        f"SELECT phase, avg({OUTPUT_TOKENS}), count(*) FROM quota_ledger WHERE outcome = 'ok' GROUP BY phase") if n}
    return {"plan": int(measured.get("plan") or DEFAULT_PLAN_OUTPUT),
            "skill": int(measured.get("skill") or DEFAULT_SKILL_OUTPUT)}


# States past the SKILL.md answer (gates, snapshot, write): no request left to make.
_PAST_SKILL = frozenset({"generated", "validated", "snapshotted", "writing", "written"})


def estimate(store: EventStore, root: Path, plugin_ids: list[str], limits: Limits, *, model: str, now: float,
             gates: GateConfig | None = None, prices: Prices | None = None,
             standards_path: Path | None = None, plan_only: bool = False, force: bool = False) -> Estimate:
    """Requests, tokens, time and cost to process `plugin_ids` from where each one stands,
    starting at `now` with the requests `model` already sent this Pacific day (`plan_only`:
    up to the plan, as a dry run; `force`: as `run --force`, which asks again for a plugin
    found with its files as overnight left them)."""
    gates = gates or GateConfig()
    prices = prices or Prices()
    standards = load_standards(standards_path)
    system = system_instruction(standards)
    output = expected_output(store)
    plan_out, skill_out = output["plan"], output["skill"]
    # Requests Gemini answered (well or not) per useful answer: retries included; left out, as
    # they say nothing of Gemini's answers: requests whose process stopped before the answer
    # (lost, pending), 429s (the quota's, which the limits pace; one plugin's 429s made
    # every future request count several times), failed connections (the network's), and
    # refused requests (a 4xx other than 429 fails its plugin at once: no retry follows).
    settled, answers, latency = store.query(
        "SELECT count(*) FILTER (WHERE outcome NOT IN ('pending', 'lost', 'rate_limited', 'connection', 'refused')), "
        "coalesce(sum(outcome = 'ok'), 0), "
        "avg(settled_at - sent_at) FILTER (WHERE outcome = 'ok') FROM quota_ledger")[0]
    latency = latency if answers else DEFAULT_LATENCY_S
    overhead = settled / answers if answers else 1.0
    requests = input_tokens = output_tokens = 0.0
    unsendable: list[tuple[str, int]] = []
    as_left = 0
    for plugin_id in plugin_ids:
        row = store.query(
            "SELECT p.state, p.step, p.path, p.name, p.category, p.skill_name, d.facts, "
            "p.content_hash = d.left_hash FROM plugins p JOIN plugin_details d USING (plugin_id) WHERE plugin_id = ?",
            (plugin_id,))
        if not row or row[0][6] is None:
            continue
        state, step, path, name, category, skill_name, facts, left = row[0]
        if state in _PAST_SKILL:
            continue  # its SKILL.md came: what is left needs no request
        if state == "analyzed" and left and not force:
            as_left += 1  # found again as overnight left it (a branch checked out again): done, no request
            continue
        facts = msgspec.json.decode(facts, type=c.PluginFacts)
        replaces = replaced_skill(facts, skill_name)
        data = plugin_data(root, path, name, category, facts, replaces)
        needs_plan = ((state in ("analyzed", "planning", "new", "discovered") or state in FINAL
                       or (state == "retrying" and step == "plan"))
                      and not (state in ("analyzed", "failed")  # --retry failed uses its plan again
                               and reusable_plan(store.query, plugin_id, model, standards.sha256)))
        plan_in = estimate_tokens(system, plan_prompt(data, skill_name, replaces)) if needs_plan else 0
        skill_least = 0 if plan_only else estimate_tokens(
            system, least_skill_prompt(data, skill_name, replaces, gates))
        if limits.tpm and max(plan_in, skill_least) > limits.tpm:
            unsendable.append((plugin_id, max(plan_in, skill_least)))
            continue
        if needs_plan:
            requests += overhead
            input_tokens += overhead * plan_in
            output_tokens += plan_out
        if plan_only:
            continue
        skill_in = skill_least + PLAN_JSON_CHARS // 4
        requests += overhead
        input_tokens += overhead * skill_in
        output_tokens += skill_out
    n = math.ceil(requests)
    # Sustainable requests per minute: the quota, the concurrency at the measured latency,
    # and the token window, whichever is lowest.
    rate = float(limits.rpm)
    if latency > 0:
        rate = min(rate, limits.concurrency * 60 / latency)
    if input_tokens and limits.tpm:
        rate = min(rate, per_minute_by_tokens(limits.tpm, input_tokens / max(1, n)))
    used_today = store.query("SELECT count(*) FROM quota_ledger WHERE model = ? AND sent_at >= ?",
                             (model, day_start(now)))[0][0]
    seconds, resets = time_to_send(n, rate, limits.rpd, used_today, now)
    basis = (f"measured averages from {answers} answer{'s' * (answers != 1)} ({latency:.1f} s each)" if answers
             else f"defaults (no run measured yet; {DEFAULT_LATENCY_S:.0f} s an answer)")
    return Estimate(plugins=len(plugin_ids) - len(unsendable), requests=n, input_tokens=int(input_tokens),
                    output_tokens=int(output_tokens), days=resets, seconds=seconds,
                    cost_usd=prices.cost(input_tokens, output_tokens), basis=basis, used_today=used_today,
                    latency_s=latency, unsendable=unsendable, as_left=as_left)


def answer_latency(store: EventStore | Journal, run_id: str) -> float:
    """Seconds Gemini takes to answer, for a run's ETA: the run's own answers so far; before the
    first, those of every earlier run; before any, DEFAULT_LATENCY_S (as `estimate` says). A
    running run asks its journal, whose lock keeps the query off the workers' writes."""
    query = "SELECT avg(settled_at - sent_at) FROM quota_ledger WHERE outcome = 'ok'"
    latency = store.query(f"{query} AND run_id = ?", (run_id,))[0][0]
    if latency is None:
        latency = store.query(query)[0][0]
    return DEFAULT_LATENCY_S if latency is None else latency


def tokens_each(store: EventStore | Journal, run_id: str) -> float:
    """Input tokens one of the run's requests holds in the scheduler's minute: the average so
    far of Gemini's counts, or of the estimates of those not answered (the scheduler reserves a
    request's estimate and settles it at Gemini's count: the estimates alone, some 15% higher,
    kept the ETA at a minute while the last requests went); before its first request, the
    average of the estimate made when it began (0 when there is none)."""
    sent, tokens, planned, planned_tokens = store.query(
        "SELECT (SELECT count(*) FROM quota_ledger WHERE run_id = ?1 AND outcome IS NOT 'rate_limited'), "
        "(SELECT coalesce(sum(coalesce(input_tokens, est_input_tokens)), 0) FROM quota_ledger WHERE run_id = ?1 "
        "AND outcome IS NOT 'rate_limited'), "
        "json_extract(config, '$.estimate.requests'), json_extract(config, '$.estimate.input_tokens') "
        "FROM runs WHERE run_id = ?1", (run_id,))[0]
    if sent:
        return tokens / sent
    return planned_tokens / planned if planned else 0.0


def eta(limits: Limits, remaining: int, finished: int, requests: int, tokens_each: float, used_today: int,
        now: float, dry_run: bool, recent: Iterable[float], latency: float) -> float:
    """Seconds until a run's `remaining` plugins are through: the requests they still owe,
    answered in `latency` seconds each, `limits.concurrency` at a time, and never sooner than
    the quota lets them go. Not the pace since the run began: that counts the waits for the
    quota the remaining requests may not need (a minute that has room again), and was half a
    minute late.

    Owed: at the requests per plugin measured so far (at most a plan and a skill a plugin),
    less those already sent; `requests` are the run's requests that no 429 refused, those of
    its `finished` plugins and those the others sent already. The tokens the scheduler reserves
    for a request (`tokens_each`, estimated, not Gemini's counts) may make the tokens per minute
    bind before the requests per minute, in whole requests a minute. The
    first plugins go out in a burst, before the per-minute limit binds: their pace alone
    promises far too early an end. Requests that fit today go as the scheduler admits them,
    in a sliding window that the last minute's requests (sent at the times `recent`) still
    hold; `used_today` of the day's are spent."""
    most = 1.0 if dry_run else 2.0
    per_plugin = min(most, requests / finished) if finished else most
    # each unfinished plugin owes at least its last request
    owed = max(math.ceil((finished + remaining) * per_plugin) - requests, math.ceil(remaining * (per_plugin - 1)))
    if owed <= 0:
        return 0.0
    rate = float(limits.rpm)
    if tokens_each and limits.tpm:
        rate = min(rate, per_minute_by_tokens(limits.tpm, tokens_each))
    if not limits.rpd or owed <= limits.rpd - used_today:  # today's room holds them (a midnight gives more)
        quota = _sliding_finish(owed, rate, recent, now)
    else:
        quota = time_to_send(owed, rate, limits.rpd, used_today, now)[0]
    return max(owed * latency / max(1, limits.concurrency), quota)


def per_minute_by_tokens(tpm: int, tokens_each: float) -> int:
    """Requests of `tokens_each` estimated input tokens that go in a minute under `tpm`: the
    scheduler admits one only while the minute's tokens leave room for its whole estimate, so
    a whole number (at 7,000 a minute, requests of 6,300 go one a minute, not 1.1)."""
    return max(1, int(tpm // max(1.0, tokens_each)))


def time_to_send(n: int, per_minute: float, rpd: int, used_today: int, now: float) -> tuple[float, int]:
    """Seconds from `now` until `n` requests are sent at `per_minute` under `rpd` a Pacific
    day, `used_today` of today's being spent already; and the daily resets waited for (a
    midnight the requests only go on through is none)."""
    if not rpd:
        return n / per_minute * 60, 0
    t, left, resets = now, float(n), 0
    room = max(0, rpd - used_today)
    while left > 0:
        midnight = next_day_start(t)
        in_time = (midnight - t) * per_minute / 60
        today = min(room, in_time)
        if left <= today:
            return t + left / per_minute * 60 - now, resets
        left -= today
        t, room, resets = midnight, rpd, resets + (room < in_time)
    return 0.0, 0


def _sliding_finish(n: int, per_minute: float, recent: Iterable[float], now: float) -> float:
    """Seconds from `now` until the last of `n` requests may go when at most `per_minute` go in
    any minute: a window of `limit` requests that repeats every `window` seconds (the rate is
    `per_minute` also when it is not a whole number), `recent` holding its first places."""
    limit = max(1, math.floor(per_minute))
    window = MINUTE * limit / per_minute
    held = sorted(t for t in recent if t > now - window)[-limit:]
    cycles, place = divmod(n - 1, limit)  # the n-th request takes `place` in its window
    free = limit - len(held)
    first = now if place < free else held[place - free] + window
    return max(first, now) + cycles * window - now
