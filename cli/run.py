"""overnight run | resume"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections import deque
from pathlib import Path
from typing import IO, Any, Callable

import click

from cli.config import config_option, source
from cli.metrics import prices, quota_options
from cli.options import (
    EXIT_PROBLEMS,
    EXIT_SIGNAL,
    HttpUrl,
    Number,
    backup_url,
    common,
    marketplace_argument,
    model_option,
    retry_option,
    retry_states,
    standards_option,
    stated_limits,
    where,
)
from cli.render import duration, emit_json, interactive, moment, not_listed, plural, shown, stderr_console



def limit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        *quota_options,
        click.option("--no-wait/--wait", "no_wait", default=None,
                     help="When the daily quota is used up, exit 0 saying when to resume instead of sleeping "
                          "(--wait: sleep until the quota comes back; the default, and what resume --wait "
                          "asks of a run started with --no-wait)."),
        click.option("--json-log", type=click.File("a", encoding="utf-8", lazy=True),
                     help="Append one JSON line per recorded event to this file ('-': stdout, which then holds "
                          "nothing else but the --json summary; the text summary goes to stderr)."),
        click.option("--json", "as_json", is_flag=True, help="Print the final summary as one JSON object."),
        click.option("--max-requests", type=click.IntRange(min=0), help="Stop the run after this many requests."),
        click.option("--max-tokens", type=click.IntRange(min=0), help="Stop the run after this many tokens."),
        click.option("--max-cost", type=Number(min=0), help="Stop the run after this many US dollars."),
    ]):
        fn = option(fn)
    return fn


def _override(base, **values):
    """`base` (a frozen dataclass of limits or budgets) with the options that were given."""
    from dataclasses import replace

    return replace(base, **{k: v for k, v in values.items() if v is not None})


@click.command()
@marketplace_argument
@model_option
@click.option("--base-url", type=HttpUrl(), envvar="GOOGLE_GEMINI_BASE_URL", show_envvar=True,
              help="Gemini endpoint (a proxy, or the emulator: python -m tests.emulator).")
@click.option("--timeout", type=Number(min=1), default=120.0, show_default=True,
              help="Seconds to wait for one Gemini answer.")
@standards_option
@click.option("--min-bytes", type=click.IntRange(min=0), default=8000, show_default=True,
              help="Smallest acceptable SKILL.md.")
@click.option("--max-bytes", type=click.IntRange(min=1), default=14000, show_default=True,
              help="Largest acceptable SKILL.md.")
@click.option("--min-examples", type=click.IntRange(min=0), default=2, show_default=True,
              help="Fenced code examples a SKILL.md needs.")
@click.option("--gate-attempts", type=click.IntRange(min=1), default=3, show_default=True,
              help="Generations allowed before a plugin is rejected.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=5, show_default=True,
              help="Tries per step on faults (5xx, timeouts, unusable answers); 429s are paced, not counted.")
@click.option("--backoff", type=Number(min=0), default=2.0, show_default=True,
              help="First wait in seconds after a fault; doubles per failure (with jitter).")
@click.option("--plugin", "plugins", multiple=True, help="Only this plugin (name or id); repeatable.")
@click.option("--category", help="Only plugins of this category.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many plugins.")
@click.option("--force", is_flag=True, help="Process plugins again even if done, skipped, rejected or failed.")
@retry_option
@click.option("--dry-run", is_flag=True, help="Analysis and plan only; nothing is written.")
@click.option("--backup-to", help="libSQL/Turso URL to back up to when the run finishes or pauses "
                                  "(token from TURSO_AUTH_TOKEN).")
@limit_options
@prices
@config_option
@common
def run(path: Path, db: Path | None, model: str, base_url: str | None, timeout: float,
        standards: Path | None, min_bytes: int, max_bytes: int, min_examples: int, gate_attempts: int,
        max_attempts: int, backoff: float, plugins: tuple[str, ...], category: str | None, limit: int | None,
        force: bool, retry: tuple[str, ...], dry_run: bool, backup_to: str | None, rpm: int | None,
        rpd: int | None, tpm: int | None, concurrency: int | None, no_wait: bool | None,
        json_log: IO[str] | None, as_json: bool,
        max_requests: int | None, max_tokens: int | None, max_cost: float | None, price_input: float,
        price_output: float) -> None:
    """Enhance every plugin of the marketplace at PATH with Gemini (plan, SKILL.md, gates, write).

    The key comes from GOOGLE_API_KEY or GEMINI_API_KEY (or Vertex AI: GOOGLE_GENAI_USE_VERTEXAI,
    GOOGLE_CLOUD_PROJECT, GOOGLE_CLOUD_LOCATION). Exit 0 when every selected plugin ended done,
    skipped or rejected; 1 otherwise; 130/143/129 when stopped by SIGINT/SIGTERM/SIGHUP.
    """
    from statemachine.budget import Budgets
    from statemachine.metrics import Prices
    from statemachine.gates import GateConfig
    from statemachine.gateway import GeminiSettings
    from statemachine.runner import RunOptions
    from statemachine.scheduler import Limits

    if backup_to is not None:
        backup_to = backup_url(backup_to, "--backup-to")  # recorded: resume backs up to the same place
    retry = retry_states(force, retry)
    if dry_run and (force or retry):
        flag = "--force" if force else " ".join(f"--retry {state}" for state in retry)
        raise click.UsageError(f"--dry-run with {flag} would put finished plugins back to planned, and a later "
                               "run would generate them again; use one or the other (`overnight estimate"
                               f"{where(Path(path).resolve(), db)} {flag}` tells what it would cost)")
    if min_bytes > max_bytes:
        raise click.UsageError(f"{_flag('min_bytes', min_bytes)} is more than {_flag('max_bytes', max_bytes)}: "
                               "no SKILL.md could pass the size gate")
    options = RunOptions(
        gemini=GeminiSettings(model=model, base_url=base_url, timeout_s=timeout),
        limits=_override(Limits(), rpm=rpm, rpd=rpd, tpm=tpm, concurrency=concurrency),
        gates=GateConfig(min_bytes=min_bytes, max_bytes=max_bytes, min_code_blocks=min_examples),
        gate_attempts=gate_attempts, max_attempts=max_attempts, backoff_s=backoff, plugins=plugins, category=category,
        limit=limit, force=force, retry=retry, dry_run=dry_run, standards=standards, wait=not no_wait,
        budgets=_override(Budgets(), max_requests=max_requests, max_tokens=max_tokens,
                          max_cost=max_cost), prices=Prices(price_input, price_output), backup_to=backup_to,
        explicit_limits=stated_limits(rpm=rpm, rpd=rpd, tpm=tpm),
    )
    _execute(path, db, json_log, as_json, lambda runner: runner.start(options))


@click.command()
@marketplace_argument
@click.option("--backup-to", help="Back up to this libSQL/Turso URL from now on, instead of the one the run "
                                  "recorded (token from TURSO_AUTH_TOKEN).")
@click.option("--no-backup", is_flag=True, help="No backup from now on.")
@click.option("--base-url", type=HttpUrl(), envvar="GOOGLE_GEMINI_BASE_URL", show_envvar=True,
              help="The run's Gemini endpoint with the credentials it was given (a proxy's user, password or "
                   "?key=), which the log never records; another endpoint is refused.")
@limit_options
@config_option
@common
def resume(path: Path, db: Path | None, backup_to: str | None, no_backup: bool, base_url: str | None,
           rpm: int | None, rpd: int | None, tpm: int | None, concurrency: int | None, no_wait: bool | None,
           json_log: IO[str] | None, as_json: bool, max_requests: int | None, max_tokens: int | None,
           max_cost: float | None) -> None:
    """Continue the last unfinished run at PATH with its recorded configuration.

    Limits and budgets given here (--rpm, --rpd, --tpm, --concurrency, --max-requests,
    --max-tokens, --max-cost), and --backup-to or --no-backup, apply from now on, and the
    change is recorded in the log.
    """
    from dataclasses import replace

    from events.remote import display_url
    from statemachine.errors import OvernightError

    if backup_to is not None and no_backup:
        raise click.UsageError("--backup-to and --no-backup contradict each other")
    if backup_to is not None:
        backup_to = backup_url(backup_to, "--backup-to")

    given = {k: v for k, v in (("rpm", rpm), ("rpd", rpd), ("tpm", tpm), ("concurrency", concurrency),
                               ("max_requests", max_requests), ("max_tokens", max_tokens),
                               ("max_cost", max_cost)) if v is not None}

    def overrides(options):
        if base_url is not None and base_url != options.gemini.base_url:
            if display_url(base_url) != options.gemini.base_url:
                raise OvernightError(f"--base-url names another endpoint ({display_url(base_url)}) than the run's "
                                     f"({options.gemini.base_url or 'Google'}): a run goes on where it began, with "
                                     "only the credentials the log does not keep given again; start another run "
                                     "for another endpoint")
            options = replace(options, gemini=replace(options.gemini, base_url=base_url))
        changed = replace(options,
                          limits=_override(options.limits, rpm=rpm, rpd=rpd, tpm=tpm, concurrency=concurrency),
                          budgets=_override(options.budgets, max_requests=max_requests, max_tokens=max_tokens,
                                            max_cost=max_cost))
        if no_wait is not None:
            changed = replace(changed, wait=not no_wait)
        if backup_to is not None or no_backup:
            changed = replace(changed, backup_to=backup_to)
        stated = set(options.explicit_limits) | set(stated_limits(rpm=rpm, rpd=rpd, tpm=tpm))
        return replace(changed, explicit_limits=tuple(sorted(stated)))

    reason = "resume with " + ", ".join(_flag(k, v) for k, v in given.items()) if given else ""
    _something_to_resume(path, db)
    _execute(path, db, json_log, as_json, lambda runner: runner.resume(overrides, reason), create=False)


def _something_to_resume(path: Path, db: Path | None) -> None:
    """A resume with no run to continue says so at once: before the Gemini client is loaded (two
    seconds) and before a missing API key is complained of."""
    from statemachine.status import run_to_resume
    from statemachine.workspace import marketplace_root, open_log

    with open_log(marketplace_root(path), db, writer=False) as store:
        run_to_resume(store)


def _flag(name: str, value: object) -> str:
    """`--max-requests 50` for a parameter's value, saying so when it came from the config file."""
    origin = " (from the config file)" if source(name) == "config file" else ""
    return f"--{name.replace('_', '-')} {value}{origin}"


def _execute(path: Path, db: Path | None, json_log: IO[str] | None, as_json: bool, call, *,
             create: bool = True) -> None:
    """`create`: False for resume, which needs a log holding a run (a failed resume makes none)."""
    from statemachine.gateway import backend_from_env
    from statemachine.runner import Runner
    from statemachine.workspace import marketplace_lock, marketplace_root, open_log

    root = marketplace_root(path)
    if json_log is not None:
        _open_json_log(root, json_log)
    backend = backend_from_env()
    _steady_memory()
    display = _Display(enabled=interactive() and not as_json)
    with marketplace_lock(root):
        store = open_log(root, db, create=create)
        runner = Runner(store, root, backend=backend, json_log=json_log, on_progress=display.update,
                        on_scan=display.scanning)
        # SIGHUP (the terminal closed) stops the run cleanly too, unless it is ignored (nohup)
        hangup = signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN
        stops = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hangup else ())
        previous = {sig: signal.signal(sig, lambda s, _f: runner.interrupt(signal.Signals(s).name)) for sig in stops}
        try:
            with display:
                result = call(runner)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            store.close()
    # `--json-log -`: stdout carries the JSON lines alone (with --json, its summary too: one more line)
    to_stderr = not as_json and getattr(json_log, "name", None) == "-"
    with contextlib.redirect_stdout(sys.stderr) if to_stderr else contextlib.nullcontext():
        _render(result, as_json, where(root, db))
    if result.outcome == "interrupted" or runner.signal:  # also a signal that stopped the closing backup
        raise click.exceptions.Exit(EXIT_SIGNAL.get(runner.signal or "", 130))
    if not result.ok or result.backup_failed:
        raise click.exceptions.Exit(EXIT_PROBLEMS)


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _steady_memory() -> None:
    """Keep a long run's memory from creeping up. Each time glibc frees a large block it has
    mmapped (a plugin's snapshot, a prompt, an answer), it raises its mmap threshold to that
    block's size; from then on blocks up to that size come from the heaps of the worker threads
    instead, and fragment them. At --concurrency 64 a run grew by about 24 KiB per plugin it
    processed, with Python's own memory flat; with the threshold fixed at its default of 128 KiB,
    by 4-8 KiB, for some 15% more CPU time (page faults), nothing beside a Gemini call's seconds
    (`python -m tests.bench.memory`). Elsewhere than glibc (musl, macOS) there is nothing to do."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def _open_json_log(root: Path, json_log: click.utils.LazyFile) -> None:
    """--json-log's file grows with every event: inside a plugin's directory it would change the
    plugin the run works on, and every later scan would find it changed again. Refused before
    the file is made; then opened, so that a path that cannot be written stops the run before
    it starts."""
    from statemachine.analysis import holder
    from statemachine.workspace import STATE_DIR, make_state_dir

    if json_log.name != "-" and (plugin := holder(root, json_log.name)) is not None:
        raise click.BadParameter(f"{shown(json_log.name)} is inside plugin {plugin}, whose files it would change "
                                 "as the run goes; write it outside the plugin (outside the marketplace, or in "
                                 ".overnight/)", param_hint="'--json-log'")
    state = root / STATE_DIR
    if (json_log.name != "-" and not os.path.lexists(state)
            and Path(json_log.name).absolute().parent.resolve() == state.resolve()):
        make_state_dir(state)  # where the README suggests it, before the marketplace's first scan made it
    try:
        json_log.open()
    except click.FileError as e:
        raise click.BadParameter(e.format_message(), param_hint="'--json-log'") from e


def _render(result, as_json: bool, place: str) -> None:
    """`place`: what a hint puts after `overnight COMMAND` (the marketplace, and --db)."""
    from statemachine.status import ATTENTION_LIMIT

    resume = f"overnight resume{place}"
    if as_json:
        emit_json({"run_id": result.run_id, "outcome": result.outcome, "selected": result.selected,
                   "by_state": result.counts, "by_other_runs": result.by_other_runs,
                   "budget": result.budget, "paused_until": result.paused_until,
                   "message": result.message,
                   "problems": [{"plugin": p, "state": s, "reason": r} for p, s, r in result.problems],
                   "invalid": [{"plugin": p, "reason": r, "new": p in result.new_invalid} for p, r in result.invalid],
                   "backups": result.backups, "backup_failed": result.backup_failed, "warnings": result.warnings,
                   "left_alone": result.left_alone})
        if result.message and result.outcome != "budget_exhausted":
            click.echo(f"error: {shown(result.message)}", err=True)
        for line in result.backup_errors:
            click.echo(f"error: {shown(line)}", err=True)
        return
    counts = ", ".join(f"{s} {n}" for s, n in sorted(result.counts.items(), key=lambda kv: -kv[1]))
    others = ", ".join(f"{s} {n}" for s, n in sorted(result.by_other_runs.items(), key=lambda kv: -kv[1]))
    if result.run_id is None:  # no run was recorded
        finished = ", ".join(f"{s} {n}" for s, n in sorted(result.left_alone.items(), key=lambda kv: -kv[1]))
        click.echo(f"nothing to do: {plural(sum(result.left_alone.values()), 'plugin')} finished before ({finished}); "
                   "--force processes them again, --retry failed or --retry rejected those that ended so"
                   if result.left_alone else "nothing to do: no plugin to process")
    else:
        click.echo(f"run {result.run_id}: {result.outcome}; {plural(result.selected, 'plugin')} selected "
                   f"({counts or 'none'})" + (f"; finished by other runs: {others}" if others else ""))
    if result.outcome == "budget_exhausted":
        click.echo(f"{result.message}: `{shown(resume)} --max-{result.budget} N` goes on with a larger budget")
    if result.paused_until:
        click.echo(f"daily quota used up: resume after {moment(result.paused_until)} "
                   f"with `{shown(resume)}` (or `{shown(resume)} --wait` now, to sleep until then)")
    if result.message and result.outcome != "budget_exhausted":
        click.echo(f"error: {shown(result.message)}", err=True)
    for plugin_id, state, reason in result.problems[:ATTENTION_LIMIT]:
        click.echo(f"  {state:<11} {shown(plugin_id)}{': ' + shown(reason) if reason else ''}")
    if len(result.problems) > ATTENTION_LIMIT:  # one cause failing thousands would bury the rest
        not_listed(len(result.problems) - ATTENTION_LIMIT, place)
    new = [(plugin_id, reason) for plugin_id, reason in result.invalid if plugin_id in result.new_invalid]
    for plugin_id, reason in new[:ATTENTION_LIMIT]:
        click.echo(f"  {'invalid':<11} {shown(plugin_id)}: {shown(reason)} (not processed)")
    if len(new) > ATTENTION_LIMIT:
        not_listed(len(new) - ATTENTION_LIMIT, place)
    known = sum(1 for plugin_id, _ in result.invalid if plugin_id not in result.new_invalid)
    if known:
        them = "it" if known == 1 else "them"
        click.echo(f"  {'invalid':<11} {plural(known, 'plugin')} as before (not processed): "
                   f"`{shown(f'overnight status{place} --state invalid')}` lists {them}")
    for warning in result.warnings:
        click.echo(f"  {'warning':<11} {shown(warning)}")
    for line in result.backups:
        click.echo(f"error: {shown(line)}" if line in result.backup_errors else line, err=line in result.backup_errors)
    if result.outcome == "interrupted":
        click.echo(f"`{shown(resume)}` continues this run")


class _Display:
    """A live progress view on a terminal. Otherwise (cron, nohup) a line when its scan begins,
    one when the run begins, one line per plugin it finishes, naming it and its outcome, and a
    line when a quota pause begins (saying until when) and when it ends."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._live = None
        self._started = False
        self._shown = 0  # the number of the last finished plugin shown
        self._recent: deque[str] = deque(maxlen=5)
        self._paused_until: float | None = None
        self._stopping_told = False

    def __enter__(self) -> "_Display":
        if self.enabled:
            from rich.live import Live

            self._live = Live(console=stderr_console(), refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def scanning(self, done: int, total: int, plugin_id: str, what: str) -> None:
        """The run's scan (`what`: "scanning", or "analyzing again" for --force and --retry), before
        its first request: plugin by plugin on a terminal, otherwise one line."""
        if self._live is not None:
            from rich.text import Text

            # shown at once, then as the view refreshes: a quick scan is seen too, a long one costs nothing
            self._live.update(Text(f"{what} {done}/{plural(total, 'plugin')}  {shown(plugin_id)}"),
                              refresh=done == 0)
        elif done == 0:
            _note(f"{what} {plural(total, 'plugin')}")

    def update(self, progress) -> None:
        eta = f"  ETA {duration(progress.eta)}" if progress.eta is not None and not progress.stopping else ""
        finished = []
        for k, done in enumerate(progress.just_finished):
            # the batch counts a plugin just after it reports it: the count may lag one behind
            # (and never past the total: a plugin changed under the run may finish twice in it)
            self._shown = min(progress.total,
                              max(self._shown + 1, progress.finished - len(progress.just_finished) + k + 1))
            finished.append((f"{self._shown}/{progress.total}  {done.state:<9} {shown(done.plugin_id)}"
                             + (f": {shown(done.reason)}" if done.reason else ""), done, self._shown))
        if self._live is not None:
            from rich.text import Text

            self._recent.extend(line for line, _, _ in finished)
            line = f"{progress.finished}/{plural(progress.total, 'plugin')}  {_counters(progress)}{eta}"
            if progress.paused_until:
                line += f"  paused until {moment(progress.paused_until)}"
            if progress.stopping:
                line += "\n" + _stopping(progress)
            self._live.update(Text("\n".join([line] + _plugin_lines(progress) + list(self._recent))))
            return
        if not self._started:
            self._started = True
            _note(f"{progress.finished}/{plural(progress.total, 'plugin')}  {_counters(progress)}{eta}")
        if progress.paused_until != self._paused_until:
            self._paused_until = progress.paused_until
            _note(f"paused for the quota until {moment(progress.paused_until)}" if progress.paused_until
                  else "quota pause over: going on")
        for line, done, number in finished:  # with the run's counters when that plugin finished
            _note(f"{line}  ({_counters(done)}{eta if number < progress.total else ''})")
        if progress.stopping and not self._stopping_told:
            self._stopping_told = True
            _note(_stopping(progress))


def _stopping(progress) -> str:
    """What a first SIGINT or SIGTERM does while the run waits for the answers under way."""
    asking = sum(step in ("plan", "skill") and pid not in progress.waiting for pid, step in progress.phases.items())
    again = "Ctrl-C" if progress.stopping == "SIGINT" else "signal"
    if not asking:
        return f"stopping ({progress.stopping}): finishing the steps under way; a second {again} stops at once"
    return (f"stopping ({progress.stopping}): waiting for the {plural(asking, 'answer')} under way, to record "
            f"{'them' if asking != 1 else 'it'}; a second {again} stops at once (`resume` asks again)")


def _counters(counts) -> str:
    """The run's requests, tokens and 429s (of a Progress, or of a plugin's Finished)."""
    return (f"{plural(counts.requests, 'request')}  {counts.input_tokens:,} in / {counts.output_tokens:,} out tokens  "
            f"{counts.rate_limited} rate-limited")


_DOING = {"plan": "asking for a plan", "skill": "asking for a SKILL.md", "gates": "checking the SKILL.md",
          "snapshot": "taking a snapshot", "write": "writing", "finish": "finishing"}


def _plugin_lines(progress) -> list[str]:
    """The plugins in flight and what each one does, or which quota window it waits for; then
    the plugins queued to retry."""
    lines = []
    for pid, step in sorted(progress.phases.items()):
        doing = _DOING.get(step, step)
        wait = progress.waiting.get(pid)
        if wait is not None:
            seconds, why = wait
            doing += f", waits {duration(seconds)} ({why})"
        lines.append(f"  {shown(pid)}  {doing}")
    if progress.retrying:
        lines.append(f"  {plural(progress.retrying, 'plugin')} waiting to retry, the first in "
                     f"{duration(progress.next_retry or 0)}")
    return lines


def _note(line: str) -> None:
    """A progress line. A reader that went away (`overnight run ... 2>&1 | head`) does not stop
    the run: the lines go nowhere from then on."""
    try:
        print(line, file=sys.stderr, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


