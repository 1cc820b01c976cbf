"""Options shared by every command, and the one place where errors become messages."""

from __future__ import annotations

import importlib
import io
import math
import os
import shlex
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn

import click

from cli.render import shown
from events import EventStoreError, StoreLocked
from events.redact import url_shown
from statemachine.errors import NotAMarketplace, OvernightError, StoppedBySignal
from statemachine.lifecycle import RETRYABLE

# Exit codes (documented in README.md).
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_INTERNAL = 4
EXIT_SIGNAL = {"SIGHUP": 129, "SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as a shell reports it

_debug = False


class Terminated(BaseException):
    """SIGTERM or SIGHUP (its name is the argument), raised where the main thread is, like
    KeyboardInterrupt for SIGINT: cleanup code runs (a restore removes its staging directory)
    and the command exits 143 or 129. SIGHUP is left alone when ignored (nohup). `run` and
    `resume` install their own handlers, which stop the run cleanly and record it."""


def _terminate(signum: int, frame: object) -> NoReturn:
    raise Terminated(signal.Signals(signum).name)


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _debug
    _debug = _debug or value


debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
    help="Show the full traceback when something goes wrong.",
)

db_option = click.option(
    "--db", "db", type=click.Path(dir_okay=False, path_type=Path), envvar="OVERNIGHT_DB",
    default=None, show_envvar=True,
    help="Event log file. Default: <marketplace>/.overnight/overnight.db.",
)

retry_option = click.option(
    "--retry", "retry", multiple=True, type=click.Choice(sorted(s.value for s in RETRYABLE)),
    help="Only the plugins that ended in this state (failed or rejected), processed again; repeatable.")


def where(root: Path | None, db: Path | None) -> str:
    """` PATH [--db LOG]`, shell-quoted: what a hint puts after `overnight COMMAND`, so the
    command it names works from any directory (`MARKETPLACE` when the root is not known).
    Control characters in a path are shown escaped, as everywhere else."""
    return shown(" " + shlex.join([str(root) if root else "MARKETPLACE"]
                                  + (["--db", str(db.absolute())] if db is not None else [])))


def retry_states(force: bool, retry: tuple[str, ...]) -> tuple[str, ...]:
    """--retry's states, each once; wrong usage with --force, which takes every plugin."""
    if force and retry:
        raise click.UsageError("--force takes every plugin again, --retry only the failed or rejected ones; "
                               "use one or the other")
    return tuple(sorted(set(retry)))


# Not checked by click: `marketplace_root` says "PATH is not a directory" (exit 2) for a
# missing path and for a file alike.
marketplace_argument = click.argument("path", type=click.Path(path_type=Path), default=".", required=False)


class Number(click.FloatRange):
    """A finite number within a range. click's FloatRange lets `nan` through (no comparison
    refuses it) and `inf`: a budget of nan dollars would be no budget at all."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class HttpUrl(click.ParamType):
    """An http:// or https:// URL with a host (a Gemini endpoint), with no space or control
    character: anything else is wrong usage, not a connection that fails later."""

    name = "url"
    what = "an http:// or https:// URL with a host"  # in a config file's error

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from urllib.parse import urlsplit

        text = str(value)
        try:
            parts = urlsplit(text)
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            parts, port_ok = None, False
        blank = any(ch.isspace() or not ch.isprintable() for ch in text)
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or blank:
            self.fail(f"{self.shown(text)} is not {self.what}", param, ctx)
        return str(value)

    @staticmethod
    def shown(value: Any) -> str:
        """The value for a message (here, and a config file's): without what may be credentials."""
        return repr(url_shown(value) if isinstance(value, str) else value)


class TextFile(click.Path):
    """An existing file of UTF-8 text, read up front: a file that cannot be read is wrong usage,
    not an internal error once the run has begun."""

    def __init__(self) -> None:
        super().__init__(exists=True, dir_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = super().convert(value, param, ctx)
        try:
            Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{click.format_filename(path)!r} is not UTF-8 text (byte {e.start} cannot be read as such)",
                      param, ctx)
        except OSError as e:
            self.fail(f"cannot read {click.format_filename(path)!r}: {e.strerror}", param, ctx)
        return path


# What a run sends to Gemini, for run and for estimate (which builds the same prompts).
model_option = click.option("--model", default="gemini-2.5-flash", show_default=True, help="Gemini model.")
standards_option = click.option("--standards", type=TextFile(),
                                help="Authoring standards text sent with every prompt (default: the shipped one).")


def backup_url(url: str, flag: str = "") -> str:
    """A backup URL as given (`--backup-to`, `--to`, `--from`): an unknown scheme is wrong
    usage; a `file:` path is made absolute and normal, so a recorded URL names the same file
    from any directory, written one way."""
    from events.remote import RemoteError, absolute_url, check_url

    try:
        check_url(url)
    except RemoteError as e:
        raise click.UsageError(f"{flag} {e}" if flag else str(e)) from e
    return absolute_url(url)


def stated_limits(**limits: int | None) -> tuple[str, ...]:
    """The quota limits the user stated (a flag or the config file; None: not given): they
    override the ones learned from Gemini's 429 answers before now."""
    return tuple(sorted(name for name, value in limits.items() if value is not None))


def common(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--db and --debug for a command that works on a marketplace's log."""
    return debug_option(db_option(fn))


class OvernightGroup(click.Group):
    """A click group whose commands' errors become one clear line and an exit code.

    Nested groups raise through the root group's `invoke`, so this is the only place where
    errors are mapped (tests that use click's CliRunner see the same behaviour). Wrong usage
    (click's own checks, a bad config file, contradictory options, a PATH that is not a
    directory) exits 2; a failed operation 1.

    `lazy` maps a command's name to the "module:attribute" defining it, imported only when the
    command is used (click's "lazily loading subcommands"): `overnight status` need not import
    what backup or run use.
    """

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attribute = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        global _debug
        _debug = False
        if threading.current_thread() is not threading.main_thread():
            return super().main(*args, **kwargs)
        if isinstance(sys.stdout, io.TextIOWrapper):
            # in a locale whose encoding lacks a character of a plugin's name, print it escaped; it
            # was an internal error, and (after the lines before it) a half-written report
            sys.stdout.reconfigure(errors="backslashreplace")
        caught = [signal.SIGTERM] + ([signal.SIGHUP] if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN else [])
        previous = {signum: signal.signal(signum, _terminate) for signum in caught}
        try:
            return super().main(*args, **kwargs)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:  # the root's own options (`overnight --bogus`)
            return super().make_context(*args, **kwargs)
        except click.UsageError as e:
            _usage(e)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            _usage(e)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:
            # The reader went away (`overnight audit log | head`): not an error of ours.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(0) from None
        except (KeyboardInterrupt, Terminated) as e:  # click would say "Aborted!" and exit 1
            name = "SIGINT" if isinstance(e, KeyboardInterrupt) else e.args[0]
            _fail(e, EXIT_SIGNAL[name], f"interrupted by {name}")
        except StoppedBySignal as e:  # before the run began: no run to resume
            _fail(e, EXIT_SIGNAL[e.signal], f"{e}, before the run began (what its scan recorded is kept)")
        except StoreLocked as e:
            _fail(e, EXIT_LOCKED)
        except NotAMarketplace as e:
            _fail(e, EXIT_USAGE)
        except (OvernightError, EventStoreError) as e:
            _fail(e, EXIT_PROBLEMS)
        except Exception as e:
            signalled = _signal_behind(e)
            if signalled:
                _fail(e, EXIT_SIGNAL[signalled], f"interrupted by {signalled}")
            # a bug: say so, and keep the traceback one flag away
            if _debug:
                traceback.print_exc()
            click.echo(f"error: internal error {type(e).__name__}: {shown(str(e))}"
                       + ("" if _debug else " (rerun with --debug for the traceback)"), err=True)
            raise click.exceptions.Exit(EXIT_INTERNAL) from e


def _signal_behind(e: BaseException) -> str | None:
    """The signal an error was raised in the handling of, if any: Python turns a KeyboardInterrupt
    (or our Terminated) raised inside some of its machinery, such as a class's __set_name__ while
    a module is imported, into another error raised from it."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return "SIGINT"
        if isinstance(cause, Terminated):
            return cause.args[0]
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _usage(e: click.UsageError) -> NoReturn:
    if isinstance(e, click.exceptions.NoArgsIsHelpError):
        raise e  # a group given no command (`overnight audit`): its help, as click shows it
    _fail(e, EXIT_USAGE, e.format_message())


def _fail(e: Exception, code: int, message: str | None = None) -> NoReturn:
    if _debug:
        traceback.print_exc()
    click.echo(f"error: {shown(message or str(e))}", err=True)  # one line: a path may hold a newline or an escape
    raise click.exceptions.Exit(code) from e
