"""The `overnight` command: parse options, call one service function, render the result."""

from __future__ import annotations

import click

from cli import audit, backup, metrics, restore_plugin, run, scan, status
from cli.options import OvernightGroup, debug_option


@click.group(cls=OvernightGroup, context_settings={"help_option_names": ["-h", "--help"]})
@debug_option
@click.version_option(package_name="overnight")
def main() -> None:
    """Enhance a Claude Code plugin marketplace with Gemini, unattended and crash-safe.

    Every step is an event in one SQLite log (default: <marketplace>/.overnight/overnight.db);
    status, audit and metrics are read from it.
    """


main.add_command(scan.scan)
main.add_command(status.status)
main.add_command(audit.audit)
main.add_command(run.run)
main.add_command(run.resume)
main.add_command(restore_plugin.restore_plugin)
main.add_command(metrics.metrics)
main.add_command(metrics.estimate)
main.add_command(backup.backup)
main.add_command(backup.restore)
