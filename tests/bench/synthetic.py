"""A synthetic log of realistic shape: many plugins, each going round the whole lifecycle."""

from __future__ import annotations

import hashlib
from itertools import islice
from pathlib import Path
from typing import Iterator

from events import Event
from statemachine import catalog as c
from statemachine.lifecycle import plugin_stream
from statemachine.projections import PROJECTIONS
from statemachine.workspace import open_log

USAGE = c.Usage(input_tokens=4200, cached_tokens=0, output_tokens=2100, thoughts_tokens=300)
PLAN = c.Plan(
    gaps=[c.Gap(priority="high", description="no examples"), c.Gap(priority="low", description="terse")],
    quality_before=41, quality_after=88, sections_to_add=["Examples", "Error Handling"],
    bundled_files=[c.BundledFile(path="references/api.md", purpose="endpoint details")],
    trigger_phrases=["deploy the service", "check the deployment"], allowed_tools=["Read", "Bash"],
)
FACTS = c.PluginFacts(version="1.0.0", description="A plugin that does useful things for people.",
                      keywords=["a", "b"], readme_bytes=2400, commands=["one", "two"],
                      agents=["helper"], files=9, bytes=24000)


def plugin_pass(pid: str, run_id: str, n: int) -> list[Event]:
    """One full trip through the lifecycle: 16 events, with a retry and a gate failure."""
    rq = f"{run_id}:{pid}:{n}"
    return [
        c.PluginDiscovered(plugin_id=pid, name=pid.rsplit("/", 1)[-1], category="bench", path=pid,
                           listed=True, skill_name=pid.rsplit("/", 1)[-1]),
        c.PluginAnalyzed(content_hash=f"{n:064x}", facts=FACTS),
        c.PlanRequested(run_id=run_id, request_id=rq + ":p1", model="gemini-2.5-flash", attempt=1,
                        est_input_tokens=4000),
        c.RequestFailed(run_id=run_id, request_id=rq + ":p1", step="plan", kind="rate_limited_minute",
                        message="429", status_code=429, not_before="2026-01-01T00:00:30.000000Z"),
        c.PlanRequested(run_id=run_id, request_id=rq + ":p2", model="gemini-2.5-flash", attempt=2,
                        est_input_tokens=4000),
        c.PlanReceived(run_id=run_id, request_id=rq + ":p2", plan=PLAN, usage=USAGE),
        c.SkillRequested(run_id=run_id, request_id=rq + ":s1", model="gemini-2.5-flash", attempt=1,
                         est_input_tokens=6000),
        c.SkillReceived(run_id=run_id, request_id=rq + ":s1", draft_sha256="a" * 64, usage=USAGE),
        c.SkillGateFailed(run_id=run_id, attempt=1, reasons=["missing section Examples"]),
        c.SkillRequested(run_id=run_id, request_id=rq + ":s2", model="gemini-2.5-flash", attempt=2,
                         est_input_tokens=6000, feedback=["missing section Examples"]),
        c.SkillReceived(run_id=run_id, request_id=rq + ":s2", draft_sha256="b" * 64, usage=USAGE),
        c.SkillValidated(run_id=run_id, skill_name="p", files=[c.FileWrite(path="skills/p/SKILL.md",
                                                                            sha256="c" * 64)]),
        c.PluginSnapshotted(run_id=run_id, tree_sha256="d" * 64),
        c.WriteIntended(run_id=run_id, writes=[c.FileWrite(path="skills/p/SKILL.md", sha256="c" * 64)]),
        c.WriteCompleted(run_id=run_id),
        c.PluginDone(run_id=run_id, content_hash=f"{n + 1:064x}"),
    ]


def stream_of_events(plugins: int, events: int) -> Iterator[tuple[str, Event]]:
    """(stream, event) pairs until `events` are produced: passes over all plugins, in order."""
    produced, n = 0, 0
    while True:
        run_id = f"run-{n}"
        yield f"run:{run_id}", c.RunStarted(run_id=run_id, command="run", config={"model": "flash"},
                                            plugins=plugins)
        produced += 1
        for i in range(plugins):
            pid = f"plugins/bench/p{i:05d}"
            for event in plugin_pass(pid, run_id, n):
                if produced >= events:
                    return
                yield plugin_stream(pid), event
                produced += 1
        n += 1


def build_log(path: Path, plugins: int, events: int, batch: int = 20000) -> None:
    """Write the synthetic log with every projection, quickly (synchronous=OFF, big batches)."""
    chunks = stream_of_events(plugins, events)
    with open_log(path.parent, path, synchronous="OFF") as store:
        while chunk := list(islice(chunks, batch)):
            with store.batch():
                for stream, event in chunk:
                    store.append(stream, event)


def cached_log(plugins: int, events: int) -> Path:
    """The synthetic log, built once and kept under tests/bench/.cache/."""
    # The projections' definitions are part of the name: a log cached by an older version
    # of the code is rebuilt rather than read with stale tables.
    shape = hashlib.sha256(repr([(p.name, p.version, p.columns) for p in PROJECTIONS]).encode()).hexdigest()[:8]
    path = Path(__file__).resolve().parent / ".cache" / f"log-{plugins}p-{events}e-{shape}.db"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".building")
        for leftover in path.parent.glob(tmp.name + "*"):
            leftover.unlink()
        build_log(tmp, plugins, events)
        for suffix in ("-wal", "-shm", ".lock"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)
        tmp.rename(path)
    return path
