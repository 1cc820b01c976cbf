"""`--config FILE`: settings from a TOML file, as defaults for the command's own options.

The file is one flat table whose keys are option names (with `_` or `-`), for example

    model = "gemini-2.5-flash"
    rpm = 15
    rpd = 1000
    concurrency = 4
    max_cost = 5.0

Command-line flags win over the file; the file wins over the built-in defaults. A key that
no command knows is an error naming it, so a typo never silently does nothing. Values are
TOML-typed: a whole number for a count, a number for seconds or dollars, true or false for a
switch, a string otherwise (`rpm = "15"` or `rpm = 1.5` is refused, never read as 15 or 1).
Every command checks every value (also of keys it does not take), so one file is valid for all
or none. Every problem with the file is wrong usage (exit 2), told in one line naming the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Callable, Iterable

import click

# Keys a config file may set: run's, resume's, estimate's and metrics' options, but for those
# that name one invocation's work or output (--force, --dry-run, --plugin, --json, --json-log).
KNOWN = {
    "model", "base_url", "timeout", "standards", "min_bytes", "max_bytes", "min_examples",
    "gate_attempts", "max_attempts", "backoff", "category", "limit", "rpm", "rpd", "tpm",
    "concurrency", "no_wait", "backup_to", "max_requests", "max_tokens", "max_cost", "price_input", "price_output",
}


def load(path: Path, known: Iterable[str]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise click.UsageError(f"cannot read config file {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise click.UsageError(f"config file {path} is not valid TOML: {e}") from None
    settings = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise click.UsageError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(known))}")
    return settings


def _expected(kind: click.ParamType) -> tuple[tuple[type, ...], str]:
    """The TOML value types an option of click type `kind` takes, and what its value must be,
    in words (with the range of a number)."""
    if isinstance(kind, click.types.BoolParamType):
        return (bool,), "true or false"
    if isinstance(kind, click.types.IntParamType):
        accepted, what = (int,), "a whole number"
    elif isinstance(kind, click.types.FloatParamType):
        accepted, what = (int, float), "a number"
    else:
        return (str,), getattr(kind, "what", "a string")
    limits = []
    if getattr(kind, "min", None) is not None:
        limits.append(f"{'>' if kind.min_open else '>='} {kind.min}")
    if getattr(kind, "max", None) is not None:
        limits.append(f"{'<' if kind.max_open else '<='} {kind.max}")
    return accepted, f"{what} {' and '.join(limits)}" if limits else what


def _settable(ctx: click.Context) -> dict[str, click.Parameter]:
    """The options a config file may set (KNOWN), taken from every command of the program
    (commands sharing an option share its type)."""
    root = ctx.find_root()
    group = root.command
    commands = ([group.get_command(root, name) for name in group.list_commands(root)]
                if isinstance(group, click.Group) else [])
    found: dict[str, click.Parameter] = {}
    for command in [*commands, ctx.command]:
        found.update((p.name, p) for p in command.params if p.name in KNOWN)
    return found


def _apply(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """Check every setting of the file, also those this command does not take (one file
    serves run, resume, estimate and metrics: a wrong value is wrong for all of them), then
    make this command's settings its defaults."""
    if value is not None:
        options = _settable(ctx)
        settings = load(value, options)
        for name, setting in settings.items():
            # checked here so that the message names the file and the key, not a flag never given
            option = options[name]
            accepted, expected = _expected(option.type)
            shown = getattr(option.type, "shown", repr)(setting)  # a URL's, without its credentials
            wrong = f"config file {value}: {name} must be {expected}, not {shown}"
            if type(setting) not in accepted:  # `type`: TOML's true is a bool, not a whole number
                raise click.UsageError(wrong)
            settings[name] = setting = _from(value.parent, option, setting)
            try:
                option.type_cast_value(ctx, setting)
            except click.BadParameter as e:  # a number out of its range; a path that is no file, in click's words
                raise click.UsageError(f"config file {value}: {name}: {e.message}"
                                       if isinstance(option.type, click.Path) else wrong) from None
        mine = {p.name for p in ctx.command.params}
        ctx.default_map = {**(ctx.default_map or {}), **{k: v for k, v in settings.items() if k in mine}}
    return value


def _from(directory: Path, option: click.Parameter, setting: Any) -> Any:
    """A relative path in the file (a file option's, a `file:` backup URL's) is taken from the
    file's own directory, as it is wherever the command runs (OVERNIGHT_CONFIG names a shared file)."""
    if isinstance(option.type, click.Path) and not Path(setting).is_absolute():
        return str(directory / setting)
    if option.name == "backup_to" and setting.startswith("file:") and not setting.startswith(("file:/", "file://")):
        return "file:" + str(directory / setting[len("file:"):])
    return setting


def config_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), envvar="OVERNIGHT_CONFIG",
        show_envvar=True, is_eager=True, expose_value=False, callback=_apply,
        help="TOML file of settings (option names as keys); flags win over it.",
    )(fn)


def source(name: str) -> str:
    """Where an option's value came from, for the log: 'flag', 'config file' or 'default'."""
    found = click.get_current_context().get_parameter_source(name)
    if found is click.core.ParameterSource.COMMANDLINE:
        return "flag"
    if found is click.core.ParameterSource.DEFAULT_MAP:
        return "config file"
    return "default"
