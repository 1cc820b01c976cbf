"""Collects the outcome of every torture test; writes docs/reliability.md when asked to
(`python -m tests.torture` sets OVERNIGHT_TORTURE_REPORT), so an ordinary smoke run inside
`pytest` never overwrites the figures of a full run."""

from __future__ import annotations

import os
import time

from tests.torture import FIGURES, SIZE

OUTCOMES: dict[str, str] = {}
DURATIONS: dict[str, float] = {}
_started = time.time()


def pytest_runtest_logreport(report):
    if "tests/torture/" not in report.nodeid.replace("\\", "/"):
        return
    DURATIONS[report.nodeid] = DURATIONS.get(report.nodeid, 0.0) + report.duration
    if report.when == "call" or report.outcome != "passed":
        if OUTCOMES.get(report.nodeid) in (None, "passed"):
            OUTCOMES[report.nodeid] = report.outcome


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("OVERNIGHT_TORTURE_REPORT")
    if not target or not OUTCOMES:
        return
    from tests.torture.report import render
    with open(target, "w", encoding="utf-8") as f:
        f.write(render(SIZE, FIGURES, OUTCOMES, DURATIONS, time.time() - _started,
                       os.environ.get("OVERNIGHT_TORTURE_COMMAND", "")))
