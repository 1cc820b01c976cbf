"""Output helpers: JSON for scripts; for people plain lines (click.echo: marketplace text is printed as
it is, never read as rich markup or `:emoji:` codes), and rich for live progress only."""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console


def shown(text: str) -> str:
    """Marketplace text (a plugin id, a reason) made safe for a terminal: control characters,
    such as escape sequences or newlines in a directory name, are printed escaped."""
    from statemachine.discovery import one_line

    return one_line(text, limit=100_000)


def not_listed(hidden: int, place: str) -> None:
    """The line after a list of plugins cut at its limit (`place`: PATH and --db, for the hint)."""
    click.echo(f"  ... and {hidden} more not listed: `{shown(f'overnight status{place}')} --state STATE` "
               "lists every plugin in a state")


def duration(seconds: float) -> str:
    """`45s`, `3m 5s`, `2h 10m`, `1d 4h` (seconds rounded up)."""
    seconds = math.ceil(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds}s"


def moment(when: float | str) -> str:
    """A moment (unix time, or ISO 8601 as the log records it) in UTC, and in local time when
    that differs: a person reads when to come back in their own terms."""
    from datetime import datetime

    from statemachine.scheduler import iso

    ts = datetime.fromisoformat(when).timestamp() if isinstance(when, str) else when
    local = datetime.fromtimestamp(ts).astimezone()
    return iso(ts) + (f" ({local:%Y-%m-%d %H:%M %Z} local time)" if local.utcoffset() else "")


def plural(count: int, noun: str) -> str:
    """`1 plugin`, `2 plugins` (nouns with a plain -s plural)."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def report_check(as_json: bool, report: dict[str, Any], ok_line: str, problems: list[str],
                 last_line: str | None = None) -> None:
    """A check's outcome: `report` as one JSON object, or for a person `ok_line` when nothing
    is wrong and one `problem:` line each (then `last_line`, if any) otherwise; then exit 1 if
    there is any problem."""
    if as_json:
        emit_json(report)
    else:
        if not problems:
            click.echo(ok_line)
        for problem in problems:
            click.echo(f"problem: {problem}")
        if problems and last_line:
            click.echo(last_line)
    if problems:
        from cli.options import EXIT_PROBLEMS

        raise click.exceptions.Exit(EXIT_PROBLEMS)


def emit_json(value: Any) -> None:
    """One JSON document, in ASCII (other characters escaped): valid in every locale's encoding."""
    click.echo(json.dumps(value))


def stderr_console() -> "Console":
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def interactive() -> bool:
    return sys.stderr.isatty()
