"""overnight metrics | estimate"""

from __future__ import annotations

from pathlib import Path

import click

from cli.config import config_option
from cli.options import (Number, common, marketplace_argument, model_option, retry_option, retry_states,
                         standards_option, stated_limits, where)
from cli.render import duration, emit_json, moment, plural, shown

price_options = [
    click.option("--price-input", type=Number(min=0), default=0.30, show_default=True,
                 help="US dollars per million input tokens."),
    click.option("--price-output", type=Number(min=0), default=2.50, show_default=True,
                 help="US dollars per million output (and thinking) tokens."),
]


quota_options = [
    click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute (default 10)."),
    click.option("--rpd", type=click.IntRange(min=1), help="Requests per day, Pacific day (default 20)."),
    click.option("--tpm", type=click.IntRange(min=1), help="Input tokens per minute (default 250,000)."),
    click.option("--concurrency", type=click.IntRange(min=1, max=64), help="Plugins in flight at once (default 2)."),
]


def _apply(options, fn):
    for option in reversed(options):
        fn = option(fn)
    return fn


def prices(fn):
    return _apply(price_options, fn)


def quota_limits(fn):
    """--rpm, --rpd, --tpm and --concurrency, shared by run, resume and estimate."""
    return _apply(quota_options, fn)


@click.command()
@marketplace_argument
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@prices
@config_option
@common
def metrics(path: Path, db: Path | None, as_json: bool, price_input: float, price_output: float) -> None:
    """Requests, tokens, 429s, retries, quota use, durations and cost, read from the log."""
    from statemachine.metrics import Prices, metrics as compute
    from statemachine.workspace import read_log

    with read_log(path, db) as store:
        m = compute(store, prices=Prices(price_input, price_output))
    if as_json:
        emit_json(m)
        return
    click.echo(f"requests {m['requests']} ({m['rate_limited']} rate-limited, success rate "
               f"{_pct(m['success_rate'])}); tokens {m['input_tokens']:,} in / {m['output_tokens']:,} out; "
               f"cost ${m['cost_usd']:.4f}"
               + _estimated(m["estimated"]["requests"]))
    click.echo(f"plugins {m['plugins']}: "
               + (", ".join(f"{s} {n}" for s, n in sorted(m["by_state"].items())) or "none in the log"))
    if m["pending"]:
        click.echo(f"{plural(m['pending'], 'request')} in flight" if m["writer_active"] else
                   f"{plural(m['pending'], 'request')} without an answer: the process that sent them stopped; "
                   "the next run or resume records them as lost and sends them again")
    if m["retries"]:
        click.echo("retries by kind: " + ", ".join(f"{k} {n}" for k, n in m["retries"].items()))
    if m["gate_failures"]:
        click.echo(f"gate failures {m['gate_failures']} (drafts regenerated, or rejected at the last attempt)")
    for phase, d in m["phases"].items():
        if d["answers"]:
            click.echo(f"{phase}: {plural(d['answers'], 'answer')}, median {d['median_s']} s, p95 {d['p95_s']} s")
    for model, w in m["quota_windows"].items():
        click.echo(f"{model}: {plural(w['last_minute_requests'], 'request')} in the last minute, "
                   f"{w.get('today_requests', 0)} today (Pacific day)")
    for limit in m["learned_limits"]:
        click.echo(f"learned limit: {limit['model']} {limit['metric']} = {limit['value']}")
    run = m["run"]
    if run:
        line = (f"last run {run['run_id']}: {run['status']}, {run['finished']}/{run['selected']} finished, "
                f"{plural(run['requests'], 'request')}")
        line += f", wall time {duration(run['actual']['elapsed_s'])}"
        if run["eta_s"] is not None:
            line += f", ETA {duration(run['eta_s'])}"
        if run["estimate"]:
            line += (f" (estimated {plural(run['estimate']['requests'], 'request')}, "
                     f"{duration(run['estimate']['seconds'])})")
        click.echo(line)


def _unfinished_run(store) -> dict | None:
    """The latest run `resume` would continue, with the limits it recorded (or None)."""
    import msgspec

    from statemachine.status import resumable_run

    found = resumable_run(store)
    if found is None:
        return None
    run_id, config, status, paused_until = found
    return {"run_id": run_id, "status": "stopped" if status == "running" else status, "paused_until": paused_until,
            "limits": msgspec.json.decode(config)["limits"]}


def _estimated(n: int) -> str:
    return (f" (counting {plural(n, 'request')} never answered at {'its' if n == 1 else 'their'} estimate, "
            "as the budgets do)") if n else ""


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


@click.command()
@marketplace_argument
@click.option("--plugin", "plugins", multiple=True, help="Only this plugin (name or id); repeatable.")
@click.option("--category", help="Only plugins of this category.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many plugins.")
@click.option("--force", is_flag=True, help="Count finished plugins too.")
@retry_option
@quota_limits
@model_option
@standards_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@prices
@config_option
@common
def estimate(path: Path, db: Path | None, plugins: tuple[str, ...], category: str | None, limit: int | None,
             force: bool, retry: tuple[str, ...], rpm: int | None, rpd: int | None, tpm: int | None,
             concurrency: int | None, model: str, standards: Path | None, as_json: bool, price_input: float,
             price_output: float) -> None:
    """What a run would cost: plugins, requests, tokens, time (days when needed) and dollars.

    Scans first (recording only changes), then builds each plugin's real prompts.
    """
    from dataclasses import replace

    from statemachine.metrics import Prices, estimate as compute
    from statemachine.runner import RunOptions, select
    from statemachine.scan import scan
    from events.store import format_at
    from statemachine.scheduler import Limits, effective_limits
    from statemachine.workspace import marketplace_root, open_log

    retry = retry_states(force, retry)
    root = marketplace_root(path)
    given = replace(Limits(), **{k: v for k, v in (("rpm", rpm), ("rpd", rpd), ("tpm", tpm),
                                                    ("concurrency", concurrency)) if v is not None})
    with open_log(root, db) as store:
        scan(store, root)
        chosen = select(store, RunOptions(plugins=plugins, category=category, limit=limit, force=force,
                                               retry=retry))
        stated = stated_limits(rpm=rpm, rpd=rpd, tpm=tpm)
        limits = effective_limits(store, model, given, stated, format_at(store.clock()))
        result = compute(store, root, chosen, limits, model=model, now=store.clock().timestamp(),
                         prices=Prices(price_input, price_output), standards_path=standards, force=force)
        unfinished = _unfinished_run(store)
    learned = [k for k in ("rpm", "rpd", "tpm") if getattr(limits, k) != getattr(given, k)]
    if as_json:
        emit_json(result.as_json() | {  # learned_limits: each as `metrics --json` lists it
            "limits": limits.as_dict(), "unfinished_run": unfinished,
            "learned_limits": [{"model": model, "metric": k, "value": getattr(limits, k)} for k in learned]})
        return
    if learned:
        click.echo("limits learned from Gemini's 429 answers: "
                   f"{', '.join(f'{k} {getattr(limits, k)}' for k in learned)} "
                   "(state a limit with its flag to override it)")
    click.echo(f"{plural(result.plugins, 'plugin')} to process"
               + (f" ({result.as_left} found as overnight left them: done again with no request)"
                  if result.as_left else "")
               + f": {plural(result.requests, 'request')}, {result.input_tokens:,} input and "
               f"{result.output_tokens:,} output tokens, about ${result.cost_usd:.2f}")
    click.echo(f"time at {limits.rpm} requests/min, {limits.tpm:,} input tokens/min, {limits.rpd}/day, "
               f"concurrency {limits.concurrency}: "
               f"{duration(result.seconds)}" + (f" ({plural(result.days, 'daily reset')})" if result.days else "")
               + (f"; {result.used_today} of today's {limits.rpd} already used" if result.used_today else ""))
    click.echo(f"basis: {result.basis}")
    if unfinished:
        r, lim = unfinished, unfinished["limits"]
        click.echo(f"run {r['run_id']} is unfinished ({r['status']}"
                   + (f", paused until {moment(r['paused_until'])}" if r["paused_until"] else "")
                   + f"): `overnight resume{where(root, db)}` continues it at its own limits "
                   f"({lim['rpm']} requests/min, {lim['tpm']:,} input tokens/min, {lim['rpd']}/day); "
                   "the figures above are a new run's, with these flags")
    for plugin_id, tokens in result.unsendable:
        click.echo(f"  cannot be sent: {shown(plugin_id)}: a prompt of it is about {tokens:,} tokens, more than the "
                   f"{limits.tpm:,} tokens per minute allowed (if your quota allows more, state it with --tpm)")
