"""The `overnight` command: parse options, call one service function, render the result."""

from __future__ import annotations

import click

from cli.options import OvernightGroup, debug_option

# Each command's module is imported when the command is used.
COMMANDS = {
    "scan": "cli.scan:scan",
    "status": "cli.status:status",
    "audit": "cli.audit:audit",
    "run": "cli.run:run",
    "resume": "cli.run:resume",
    "restore-plugin": "cli.restore_plugin:restore_plugin",
    "metrics": "cli.metrics:metrics",
    "estimate": "cli.metrics:estimate",
    "backup": "cli.backup:backup",
    "restore": "cli.backup:restore",
}


@click.group(cls=OvernightGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@debug_option
@click.version_option(package_name="overnight")
def main() -> None:
    """Enhance a Claude Code plugin marketplace with Gemini, unattended and crash-safe.

    Every step is an event in one SQLite log (default: <marketplace>/.overnight/overnight.db);
    status, audit and metrics are read from it.
    """

