"""overnight backup [PATH] | backup verify | backup list, and overnight restore

The URL comes from --to/--from, OVERNIGHT_BACKUP_URL or TURSO_DATABASE_URL; the token only
from TURSO_AUTH_TOKEN, so it is never on a command line, in a log, an event or the backup.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from cli.options import (
    EXIT_PROBLEMS,
    EXIT_USAGE,
    Number,
    backup_url,
    common,
    debug_option,
    marketplace_argument,
)
from cli.render import emit_json, plural, report_check
from events.remote import display_url
from statemachine import backup as backup_service
from statemachine.workspace import marketplace_root, open_log

URL_ENV = ["OVERNIGHT_BACKUP_URL", "TURSO_DATABASE_URL"]
TOKEN_ENV = "TURSO_AUTH_TOKEN"
NOW = "now"


def _token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def _url(url: str | None) -> str:
    if not url:
        click.echo(f"error: no backup URL: pass one, or set {' or '.join(URL_ENV)}", err=True)
        raise click.exceptions.Exit(EXIT_USAGE)
    return backup_url(url)


def url_option(name: str, help: str) -> Any:
    return click.option(name, "url", envvar=URL_ENV, show_envvar=True, metavar="URL", help=help)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


class _BackupGroup(click.Group):
    """`overnight backup [PATH]` backs up; `overnight backup verify|list` are subcommands."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        first = next((arg for arg in args if arg != "--debug"), None)  # --debug may come first: the group's
        if not (first in self.commands or first in ctx.help_option_names):
            args = [NOW, *args]
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return ["[PATH] [OPTIONS]", "|", "COMMAND [ARGS]..."]

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The options of the backup itself (a hidden subcommand), then the subcommands."""
        records = [record for param in self.commands[NOW].get_params(ctx)
                   if isinstance(param, click.Option) and (record := param.get_help_record(ctx)) is not None]
        with formatter.section("Options"):
            formatter.write_dl(records)
        self.format_commands(ctx, formatter)


@click.group(cls=_BackupGroup)
@debug_option
def backup() -> None:
    """Back up the log and the marketplace to libSQL (Turso): `overnight backup [PATH] [--to URL]`.

    Incremental and idempotent: only new events, blobs and changed directories are sent, and
    an interrupted backup continues where it stopped. The token is read from TURSO_AUTH_TOKEN.
    """


@backup.command(NOW, hidden=True)
@marketplace_argument
@url_option("--to", "libSQL URL: file:, http(s)://, ws(s)://, libsql://.")
@json_option
@common
def backup_now(path: Path, db: Path | None, url: str | None, as_json: bool) -> None:
    """Back up the marketplace at PATH and its log (which must exist: a backup never creates one)."""
    url = _url(url)
    root = marketplace_root(path)
    with open_log(root, db, create=False) as store:
        report = backup_service.backup(store, root, url, _token())
    if as_json:
        emit_json(report.as_json())
        return
    s = report.snapshot
    click.echo(
        f"snapshot {s.id} at {report.target}: {s.files:,} files, {s.bytes:,} bytes, {plural(s.plugins, 'plugin')}, "
        f"log up to seq {s.last_seq}\nsent {report.events_sent:,} events, {report.blobs_sent:,} blobs, "
        f"{report.bytes_sent:,} bytes in {report.rows_written:,} rows ({report.batches} batches) "
        f"in {report.seconds:.2f} s")
    if report.blobs_repaired:
        click.echo(f"repaired {plural(report.blobs_repaired, 'damaged blob')} on the remote")
    if report.events_repaired:
        click.echo(f"shipped again {plural(report.events_repaired, 'event')} missing from the remote")
    for warning in report.warnings:
        click.echo(f"warning: {warning}")


@backup.command()
@url_option("--from", "The backup's libSQL URL.")
@click.option("--read-data", "read_data", type=Number(0, 100), default=0.0, metavar="PERCENT",
              help="Also read and re-hash this percentage of the stored blobs (default 0).")
@json_option
@debug_option
def verify(url: str | None, read_data: float, as_json: bool) -> None:
    """Check the backup: every referenced tree and blob is there, the shipped hash chain holds,
    and (with --read-data) a share of the blobs still matches its hash. Exit 1 on any problem."""
    report = backup_service.verify(_url(url), _token(), read_data / 100)
    report_check(as_json, report.as_json(),
                 f"ok: {report.snapshots} snapshots, {report.trees:,} trees, {report.events:,} events "
                 f"with an intact hash chain, {report.blobs_read:,} blobs re-hashed", report.problems)


@backup.command("list")
@url_option("--from", "The backup's libSQL URL.")
@json_option
@debug_option
def list_(url: str | None, as_json: bool) -> None:
    """Snapshots, oldest first: time, plugins, files, sizes."""
    url = _url(url)
    snapshots = backup_service.list_snapshots(url, _token())
    if as_json:
        emit_json({"target": display_url(url), "snapshots": [s.as_json() for s in snapshots]})
        return
    if not snapshots:
        click.echo(f"no snapshot at {display_url(url)} yet")
    for s in snapshots:
        click.echo(f"{s.id}  {s.created_at}  {s.plugins:>4} plugins  {s.files:>6} files  "
                   f"{s.bytes:>12,} bytes  sent {s.bytes_sent:>12,}  seq {s.last_seq}")


@click.command()
@url_option("--from", "The backup's libSQL URL.")
@click.option("--to", "dest", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="An empty (or new) directory to rebuild the marketplace and its log in.")
@click.option("--snapshot", "snapshot_id", help="Snapshot id (or unique prefix). Default: the latest.")
@json_option
@debug_option
def restore(url: str | None, dest: Path, snapshot_id: str | None, as_json: bool) -> None:
    """Rebuild a marketplace and its event log from a backup into an empty directory.

    All or nothing: the restore is built beside the destination, every file's sha256 and the
    log are checked, and only then is it renamed into place. Unsafe names and escaping
    symlinks are refused. When the backup is damaged, exit 1 and the destination stays as it
    was; what could be verified is kept in DIR.incomplete (DIR/.incomplete when DIR is an
    existing empty directory in a parent you cannot write). Reports the recovery time.
    """
    report = backup_service.restore(_url(url), _token(), dest, snapshot_id)
    if as_json:
        emit_json(report.as_json())
    else:
        counts = (f"{report.files:,} files ({report.bytes:,} bytes), {report.dirs:,} directories, "
                  f"{report.symlinks} symlinks, {report.events:,} events, {report.blobs:,} log blobs "
                  f"in {report.seconds:.2f} s")
        if report.ok:
            click.echo(f"restored snapshot {report.snapshot} into {report.path}: {counts}")
        else:
            click.echo(f"snapshot {report.snapshot} is damaged ({plural(len(report.problems), 'problem')} below): nothing "
                       f"was put in {dest}; what could be restored and verified is in {report.path}: {counts}")
        for warning in report.warnings:
            click.echo(f"warning: {warning}")
        for problem in report.problems:
            click.echo(f"problem: {problem}")
    if not report.ok:
        raise click.exceptions.Exit(EXIT_PROBLEMS)
