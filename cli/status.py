"""overnight status"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import click

from cli.options import common, marketplace_argument, where
from cli.render import emit_json, moment, not_listed, plural, shown
from statemachine import status as status_service
from statemachine.binding import serves_another
from statemachine.lifecycle import State
from statemachine.errors import NotAMarketplace
from statemachine.workspace import marketplace_root, read_log


@click.command()
@marketplace_argument
@click.option("--plugin", help="Only this plugin (name or id).")
@click.option("--state", type=click.Choice([s.value for s in State if s is not State.NEW]),  # new: never recorded
              help="Only plugins in this state.")
@click.option("--json", "as_json", is_flag=True,
              help='Print one JSON object: {"plugins": N, "by_state": {...}, "items": [...]}.')
@common
def status(path: Path, db: Path | None, plugin: str | None, state: str | None, as_json: bool) -> None:
    """Where every plugin of the marketplace at PATH stands (read from the log)."""
    try:
        root: Path | None = marketplace_root(path)
    except NotAMarketplace:  # a log read with --db from elsewhere: which marketplace, it cannot tell
        root = None
    with read_log(path, db) as store:
        serves = serves_another(store, root) if root is not None else None
        if serves is not None:
            # another marketplace's log (a wrong --db, a leftover OVERNIGHT_DB): say so, and give
            # hints that name the marketplace it serves, which the commands would otherwise refuse
            click.echo(f"warning: {shown(str(store.path))} is the event log of the marketplace at {shown(serves)}, "
                       f"not of {shown(str(root.resolve()))}: what follows is that marketplace's", err=True)
            root = Path(serves)
        here = where(root, db)
        report = status_service.status(store, plugin=plugin, state=state, place=here)
    if as_json:
        emit_json(report.as_json())
        return
    counts = ", ".join(f"{s} {n}" for s, n in sorted(report.by_state.items(), key=lambda kv: -kv[1]))
    click.echo(f"{plural(report.plugins, 'plugin')} ({counts or 'none yet'}); {plural(report.events, 'event')} "
               "in the log")
    if report.busy:
        click.echo("an overnight process is writing to this log with no run under way: a scan, a backup, a "
                   "restore-plugin, or a run scanning before it starts (counts may move)")
    if report.last_run:
        r = report.last_run
        over = (r["status"] == "paused" and not r["waiting"] and r["paused_until"] is not None
                and datetime.fromisoformat(r["paused_until"]).timestamp() <= time.time())
        click.echo(f"last run {r['run_id']}: {r['status']}, {r['done']} done, {r['skipped']} skipped, "
                   f"{r['rejected']} rejected, {r['failed']} failed, "
                   + (f"{r['planned']} planned, " if r["planned"] else "") + plural(r['requests'], 'request')
                   + ("; a dry run" if r["dry_run"] else "")
                   + (f": `overnight run{here}` goes on from the plans" if r["dry_run"] and r["planned"] else "")
                   + (f"; paused until {moment(r['paused_until'])}" if r["paused_until"] else "")
                   + (f"; that time has come: `overnight resume{here}` goes on" if over else
                      f"; no overnight process is waiting for it: `overnight resume{here} --wait` sleeps until "
                      "then and goes on" if r["status"] == "paused" and not r["waiting"] else "")
                   + (f"; no overnight process is running it: `overnight resume{here}` continues it"
                      if r["status"] == "stopped" else "")
                   + (f"; `overnight resume{here}` with a larger --max-requests, --max-tokens or --max-cost "
                      "continues it" if r["status"] == "budget_exhausted" else ""))
    waiting = bool(report.last_run) and report.last_run["status"] in status_service.UNFINISHED + ("stopped",)
    for r in report.unfinished_runs:
        click.echo(f"{'older ' if r['started_at'] < report.last_run['started_at'] else ''}run {r['run_id']} "
                   f"is unfinished: {r['status']}, {r['finished']} of {plural(r['plugins'], 'plugin')} finished; "
                   f"`overnight resume{here}` continues it" + (" after the run above" if waiting else ""))
        waiting = True
    for item in report.items:
        detail = f" [{item['step']}]" if item["step"] else ""
        reason, hint = item["reason"], item["hint"]
        if reason and hint:
            reason = reason.removesuffix(".")  # "...later.; `overnight run ...`" reads badly
        note = "; ".join(n for n in (reason, hint) if n)
        click.echo(f"  {item['state']:<11} {shown(item['plugin_id'])}{detail}{shown(f': {note}' if note else '')}")
    hidden = report.items_total - len(report.items)
    if hidden:
        not_listed(hidden, here)
    failed = report.by_state.get(State.FAILED, 0)
    if failed and plugin is None and state is None:
        click.echo(f"`overnight run{here} --retry failed` tries the {plural(failed, 'failed plugin')} again")
