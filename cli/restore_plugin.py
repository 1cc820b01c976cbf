"""overnight restore-plugin"""

from __future__ import annotations

from pathlib import Path

import click

from cli.options import common, marketplace_argument
from cli.render import emit_json, shown


@click.command(name="restore-plugin")
@click.argument("name")
@marketplace_argument
@click.option("--snapshot", "snapshot_id", help="Snapshot id (or a unique prefix); default: the latest.")
@click.option("--list", "list_only", is_flag=True, help="List the plugin's snapshots and change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@common
def restore_plugin(name: str, path: Path, db: Path | None, snapshot_id: str | None, list_only: bool,
                   as_json: bool) -> None:
    """Put plugin NAME back exactly as it was before overnight changed it.

    Every write is preceded by a snapshot of the plugin directory in the log; this restores
    one (verifying every file's hash) and records the restore, so the plugin is analyzed again.
    """
    from statemachine import restore
    from statemachine.workspace import marketplace_root, open_log

    root = marketplace_root(path)
    with open_log(root, db, writer=not list_only) as store:
        if list_only:
            shots = restore.snapshots_of(store, name)
            if as_json:
                emit_json({"plugin": name, "snapshots": [s._asdict() for s in shots]})
            else:
                for i, s in enumerate(shots):  # newest first; the default restores the first listed
                    notes = ["latest: the default"] * (i == 0) + ["before overnight's first change"] * (
                        i == len(shots) - 1)
                    click.echo(f"{s.id}  seq {s.seq}  {s.at}  run {s.run_id}"
                               + (f"  ({'; '.join(notes)})" if notes else ""))
            return
        done = restore.restore_plugin(store, root, name, snapshot_id)
    if as_json:
        emit_json(done._asdict())
    else:
        click.echo(f"restored {shown(done.plugin_id)} to snapshot {done.snapshot} ({done.files} files)")
