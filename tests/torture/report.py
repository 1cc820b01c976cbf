"""Renders docs/reliability.md from the figures the torture tests collected."""

from __future__ import annotations

import datetime as dt
import json
import platform
from typing import Any

PARTS = [
    ("kill_loop", "1. Kill loop",
     "SIGKILL at random instants (0.3-4 s after each start; 0.3-1.5 s in smoke) of `overnight run`/`resume` on a marketplace, "
     "against the emulator with latency 0.05-0.3 s and 5 % seeded random faults; `overnight resume` after each "
     "kill. After every kill: `audit verify` passes; `audit replay` equals the live projections; every file "
     "differing from the original is a recorded blob (no partial file); at most one PlanReceived/SkillReceived "
     "per plugin per discovery cycle; no 60 s window of `quota_ledger.sent_at` over `--rpm`. At the end: every "
     "plugin done exactly once, emulator requests <= 2 x plugins + kills x concurrency + recorded retries, "
     "requests <= ledger rows, no temp file left."),
    ("fault_matrix", "2. Fault matrix",
     "Every emulator fault kind (`tests.emulator.FAULTS`) at each phase (plan, skill), once, on a one-plugin "
     "marketplace; plus faults on every attempt (the plugin ends failed/rejected with its reason). Each case: "
     "expected end state and recorded failure kind, `audit verify` and `replay` pass, the key is in no file."),
    ("disk_faults", "3. Disk faults",
     "ENOSPC from a small tmpfs (`mount -t tmpfs -o size=8m`, filled up to a few KiB) holding either the log "
     "(`--db`) or the marketplace; EFBIG from `RLIMIT_FSIZE` set in the child (SIGXFSZ ignored) while "
     "appending events; EIO from fsync of the log, injected by an apsw VFS below SQLite "
     "(`tests/torture/failing_disk.py`: after N good syncs, every sync fails, or only the next one), since "
     "device-mapper (`dm-error`) is not available here (/dev/mapper absent). Expected: exit 1 with one "
     "`error:` line naming the cause, no traceback, `audit verify`/`replay` pass, no unrecorded file, no "
     "recorded answer asked for again, and resume finishes once the disk works."),
    ("hostile", "4. Hostile input",
     "One scan + run over generated hostile plugins: malformed, empty, huge (sparse 3 GiB and real 2 MB), "
     "non-UTF-8, UTF-16, too deeply nested and wrong-typed manifests; names with `..`, NUL, 200 characters, "
     "separators, non-ASCII, bidi override, empty; duplicate names and a manifest entry listed twice; manifest "
     "sources outside, absolute, missing, remote; symlink escapes, loops, dangling links, a directory and a "
     "FIFO as plugin.json; prompt injection in README and commands; a plan and a SKILL.md asking for "
     "`../../etc` files; Markdown bombs (50,000 nested quotes, 400,000 reference links, 60,000 fences); "
     "1,500 files. Each must end in its defined state with a one-line reason; the directory around the "
     "marketplace is hashed before and after."),
    ("secrets", "5. Secrets",
     "A recognisable fake API key and token (`TURSO_AUTH_TOKEN`, `LIBSQL_AUTH_TOKEN`) in the environment of "
     "runs killed by SIGKILL and SIGTERM with `--debug`, resumed, failing on a rejected key and an unreachable "
     "endpoint, and of a backup/verify/restore when `cli/backup.py` exists; the log directory, the JSON log, "
     "the backup and restored tree and every captured stdout/stderr are searched for both (and their tails)."),
    ("two_runs", "6. Two runs at once",
     "A second `overnight run` (and a `resume`) on the same marketplace while the first runs."),
]


def _fmt(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value, ensure_ascii=False) + "`"
    return str(value)


def render(size: str, figures: dict, outcomes: dict, durations: dict, seconds: float, command: str) -> str:
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    passed = sum(1 for o in outcomes.values() if o == "passed")
    failed = [n for n, o in outcomes.items() if o == "failed"]
    skipped = [n for n, o in outcomes.items() if o == "skipped"]
    lines = [
        "# Reliability: the torture suite",
        "",
        "Written by `tests/torture` (do not edit by hand). Re-run with:",
        "",
        "```sh",
        "uv run python -m tests.torture          # smoke size (also part of `uv run --extra test pytest`)",
        "uv run python -m tests.torture full     # full size (OVERNIGHT_TORTURE=full)",
        "```",
        "",
        f"- date: {now}",
        f"- size: **{size}**",
        f"- command: `{command or 'pytest tests/torture'}`",
        f"- machine: {platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- result: {passed} passed, {len(failed)} failed, {len(skipped)} skipped in {seconds:.0f} s",
        "",
    ]
    for key, title, what in PARTS:
        part_tests = {n: o for n, o in outcomes.items() if _part_of(n) == key}
        held = all(o == "passed" for o in part_tests.values()) and part_tests
        lines += [f"## {title}", "", what, "",
                  f"Tests: {sum(o == 'passed' for o in part_tests.values())}/{len(part_tests)} passed "
                  f"({sum(durations.get(n, 0) for n in part_tests):.0f} s). "
                  f"**{'Held.' if held else 'Did not hold: see below.'}**", ""]
        figs = figures.get(key, {})
        if figs:
            lines += ["| figure | value |", "| --- | --- |"]
            lines += [f"| {k} | {_fmt(v).replace('|', '/')} |" for k, v in figs.items()]
            lines.append("")
        bad = [n for n, o in part_tests.items() if o != "passed"]
        if bad:
            lines += ["Not held:", ""] + [f"- `{n}`: {outcomes[n]}" for n in bad] + [""]
    return "\n".join(lines)


def _part_of(nodeid: str) -> str:
    name = nodeid.split("::")[0]
    if "kill_loop" in name:
        return "kill_loop"
    if "fault_matrix" in name:
        return "fault_matrix"
    if "disk_faults" in name:
        return "disk_faults"
    if "hostile" in name:
        return "hostile"
    if "secrets_and_locks" in name:
        return "two_runs" if "second_run" in nodeid else "secrets"
    return "other"
