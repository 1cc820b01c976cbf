"""overnight restore-plugin"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from cli.options import common, marketplace_argument, where
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
    from contextlib import nullcontext

    from statemachine.workspace import marketplace_lock, marketplace_root, open_log

    root = marketplace_root(path)
    with nullcontext() if list_only else marketplace_lock(root), \
            open_log(root, db, writer=not list_only, create=False) as store:
        if list_only:
            plugin_id = restore.resolve_plugin(store, name)
            shots = restore.snapshots_of(store, plugin_id)
            broken = {s.id: restore.blob_problem(store, s.id) for s in shots}
            if as_json:  # the plugin's id, as restore-plugin's own --json (and status --json) name it
                emit_json({"plugin_id": plugin_id, "snapshots": [s._asdict() | {"blob_problem": broken[s.id]}
                                                                 for s in shots]})
            elif not shots:
                click.echo(f"{shown(name)} has no snapshot: overnight never changed it")
            else:
                default = next((s for s in shots if s.taken == restore.BEFORE_WRITE), None)
                for s in shots:  # newest first
                    notes = (["the files a restore replaced: restoring this undoes that restore"]
                             * (s.taken == restore.BEFORE_RESTORE)
                             + ["the default: before overnight's latest write"] * (s is default)
                             + ["before overnight's first change"] * (s is shots[-1])
                             + [f"{broken[s.id]}; `overnight audit verify` names what is missing"]
                             * bool(broken[s.id]))
                    click.echo(f"{s.id}  seq {s.seq}  {s.at}" + (f"  run {s.run_id}" if s.run_id else "")
                               + (f"  ({'; '.join(notes)})" if notes else ""))
            return
        done = restore.restore_plugin(store, root, name, snapshot_id, place=where(root, db))
    if as_json:
        emit_json(done._asdict())
    else:
        click.echo(f"restored {shown(done.plugin_id)} to snapshot {done.snapshot} ({done.files} files)")
        if done.removed:
            click.echo(f"warning: removed {shown(', '.join(done.removed))}, which no snapshot holds: the snapshot "
                       "has another file or directory of that name", err=True)
        if done.replaced:
            undo = f"overnight restore-plugin {shlex.quote(name)}{where(root, db)} --snapshot {done.replaced[:12]}"
            click.echo(f"the files it replaced are kept as snapshot {done.replaced}: `{shown(undo)}` puts them back")
