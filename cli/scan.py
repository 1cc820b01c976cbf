"""overnight scan"""

from __future__ import annotations

from pathlib import Path

import click

from cli.options import common, marketplace_argument, where
from cli.render import emit_json, interactive, plural, shown, stderr_console
from statemachine.workspace import marketplace_root, open_log


@click.command()
@marketplace_argument
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--rebind", is_flag=True,
              help="Let a log kept outside the marketplace (--db) that served another marketplace serve this one.")
@common
def scan(path: Path, db: Path | None, as_json: bool, rebind: bool) -> None:
    """Discover and analyze every plugin of the marketplace at PATH (default: .).

    Only changes are recorded: scanning an unchanged marketplace appends nothing. Plugins
    that cannot be processed are recorded as invalid with the reason, and the scan goes on.
    A log serves one marketplace: a --db that served another one, which still exists, is
    refused unless --rebind.
    """
    from statemachine import scan as scan_service  # analysis pulls in the YAML parser: only here

    root = marketplace_root(path)
    with open_log(root, db) as store:
        if interactive() and not as_json:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            with Progress(TextColumn("scanning"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.description}", markup=False), console=stderr_console(),
                          transient=True) as bar:
                task = bar.add_task("", total=None)
                report = scan_service.scan(
                    store, root,
                    progress=lambda i, n, pid: bar.update(task, completed=i, total=n, description=shown(pid)),
                    place=where(root, db), rebind=rebind,
                )
        else:
            report = scan_service.scan(store, root, place=where(root, db), rebind=rebind)
    if as_json:
        emit_json({
            "plugins": report.plugins, "new": report.new, "changed": report.changed,
            "reanalyzed": report.reanalyzed, "unchanged": report.unchanged, "invalid": report.invalid,
            "vanished": report.vanished, "events": report.events,
            "problems": [{"plugin": p, "reason": r} for p, r in report.problems],
            "warnings": report.warnings,
        })
        return
    reanalyzed = f"{report.reanalyzed} analyzed again (by this newer overnight), " if report.reanalyzed else ""
    click.echo(f"{plural(report.plugins, 'plugin')}: {report.new} new, {report.changed} changed, "
               f"{reanalyzed}{report.unchanged} unchanged, {report.vanished} vanished; "
               f"{report.invalid} invalid; {plural(report.events, 'event')} recorded")
    for plugin_id, reason in report.problems:
        click.echo(f"  invalid  {shown(plugin_id)}: {shown(reason)}")
    for warning in report.warnings:
        click.echo(f"  warning  {warning}")
