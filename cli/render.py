"""Output helpers: JSON for scripts, rich tables for people."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, sort_keys=False))


def console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def table(*columns: str) -> Table:
    t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column in columns:
        t.add_column(column)
    return t


def interactive() -> bool:
    return sys.stderr.isatty()
