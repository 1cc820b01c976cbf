"""overnight audit verify | replay | log"""

from __future__ import annotations

from pathlib import Path

import click

from cli.options import EXIT_PROBLEMS, common, debug_option, marketplace_argument
from cli.render import emit_json, report_check, shown
from statemachine import audit as audit_service
from statemachine.workspace import marketplace_root, open_log, read_log


@click.group()
@debug_option
def audit() -> None:
    """Prove what happened: verify the log, rebuild its projections, read its history."""


@audit.command()
@marketplace_argument
@click.option("--json", "as_json", is_flag=True,
              help='Print {"ok": bool, "events": N, "problems": [...]}.')
@common
def verify(path: Path, db: Path | None, as_json: bool) -> None:
    """Check the hash chain, the sequence, every payload, every transition and every projection.

    Exit 0 when healthy, 1 with the list of problems otherwise.
    """
    with read_log(path, db) as store:
        result = audit_service.verify(store)
    head = f"seq {result.head['seq']} {result.head['hash']}" if result.head["seq"] else "no events yet"
    report_check(as_json, result.as_json(),
                 f"ok: {result.events} events, hash chain intact, projections match the log; head: {head}",
                 result.problems, f"{result.events} events; head: {head}")


@audit.command()
@marketplace_argument
@click.option("--apply", is_flag=True, help="Replace the live projections with the rebuilt ones.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@common
def replay(path: Path, db: Path | None, apply: bool, as_json: bool) -> None:
    """Rebuild every projection from the log into fresh tables and compare with the live ones.

    Exit 0 when they are equal (or --apply replaced them and the log itself is sound), 1 otherwise.
    """
    with open_log(marketplace_root(path), db, writer=apply, create=False) as store:
        report = audit_service.replay(store, apply=apply)
    if as_json:
        emit_json({"ok": report.ok, "events": report.events, "rows": report.rows,
                   "differences": report.differences, "applied": report.applied,
                   "problems": report.problems})
    else:
        rows = ", ".join(f"{name} {n}" for name, n in report.rows.items())
        click.echo(f"replayed {report.events} events into fresh tables ({rows})")
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        if report.ok:
            click.echo("live projections equal the replay")
        elif report.applied:
            click.echo("live projections replaced by the replay"
                       + ("" if report.log_ok else "; the log's own problems above are not repaired by a replay"))
    if not report.ok and not (report.applied and report.log_ok):
        raise click.exceptions.Exit(EXIT_PROBLEMS)


@audit.command()
@marketplace_argument
@click.option("--plugin", help="Only the history of this plugin (name or id; a name several plugins "
                              "share: all of them).")
@click.option("--after", type=int, default=0, help="Only events after this seq.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: seq, at, stream, type, data.")
@common
def log(path: Path, db: Path | None, plugin: str | None, after: int, as_json: bool) -> None:
    """The history of the log, oldest first."""
    with read_log(path, db) as store:
        if as_json:
            for entry in audit_service.log(store, plugin=plugin, after=after):
                emit_json(entry)
            return
        for entry in audit_service.log(store, plugin=plugin, after=after):
            data = entry["data"]
            detail = shown(" ".join(f"{k}={v}" for k, v in data.items() if k != "type" and v not in (None, [], {})))
            if len(detail) > 160:
                detail = detail[:157] + "..."
            click.echo(f"{entry['seq']:>7}  {entry['at']}  {shown(entry['stream'])}  {shown(entry['type'])}  {detail}")
