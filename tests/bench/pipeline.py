"""The whole pipeline on a copy of ../shared/corpus against the emulator, and overhead per plugin.

Runs `overnight run` in-process with concurrency 1 against the emulator (no latency), then
reports: how every plugin ended, whether every written SKILL.md passes the reference
validator (`agentskills validate`'s function), whether the emulator received exactly the
requests the log records, and the per-plugin time spent outside Gemini calls (everything
overnight itself does: reading, prompting, recording, validating, snapshotting, writing).
Goal: median <= 20 ms.

    uv run python -m tests.bench.pipeline [--corpus ../shared/corpus] [--limit N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from skills_ref.validator import validate

from statemachine import pipeline
from statemachine.gateway import Backend, Gateway
from statemachine.runner import RunOptions, Runner
from statemachine.scheduler import Limits
from statemachine.gateway import GeminiSettings
from statemachine.workspace import open_log
from tests.bench.scan import DEFAULT_CORPUS
from tests.emulator import Emulator

KEY = "bench-key"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    in_gemini = threading.local()
    per_plugin: dict[str, list[float]] = {}

    class TimedGateway(Gateway):
        def generate(self, system, prompt, schema):
            start = time.perf_counter()
            try:
                return super().generate(system, prompt, schema)
            finally:
                in_gemini.total += time.perf_counter() - start

    original = pipeline.advance

    def timed_advance(ctx, plugin_id):
        in_gemini.total = 0.0
        start = time.perf_counter()
        try:
            return original(ctx, plugin_id)
        finally:
            spent = time.perf_counter() - start - in_gemini.total
            per_plugin.setdefault(plugin_id, []).append(spent)

    import statemachine.runner as runner_module
    runner_module.advance = timed_advance
    with tempfile.TemporaryDirectory() as tmp, Emulator(api_key=KEY) as emu:
        root = Path(tmp) / "marketplace"
        shutil.copytree(args.corpus, root)
        options = RunOptions(gemini=GeminiSettings(base_url=emu.url, timeout_s=30),
                             limits=Limits(rpm=100_000, rpd=1_000_000, tpm=10**9, concurrency=1),
                             limit=args.limit)
        with open_log(root) as store:
            runner = Runner(store, root, backend=Backend(vertex=False, api_key=KEY),
                            gateway_factory=TimedGateway)
            start = time.perf_counter()
            result = runner.start(options)
            elapsed = time.perf_counter() - start
            ledger = store.query("SELECT count(*) FROM quota_ledger")[0][0]
            done = store.query("SELECT path, skill_name FROM plugins WHERE state = 'done'")
        sent = [r for r in emu.requests if r.method == "POST"]
        written = [root / path / "skills" / name for path, name in done]
        failures = [s for s in written if validate(s)]
    overhead = sorted(sum(v) * 1000 for v in per_plugin.values())
    p95 = overhead[int(len(overhead) * 0.95) - 1] if overhead else 0.0
    print(f"run: {result.outcome}; {result.selected} plugins selected; by state {result.counts}; "
          f"{len(result.invalid)} invalid (not processed): {[p for p, _ in result.invalid]}")
    print(f"wall time {elapsed:.1f} s; requests: emulator received {len(sent)}, log records {ledger} "
          f"({'equal' if len(sent) == ledger else 'DIFFERENT'})")
    print(f"SKILL.md written: {len(written)}; failing the reference validator: {len(failures)}")
    print(f"overhead per plugin outside Gemini calls: median {statistics.median(overhead):.1f} ms, "
          f"p95 {p95:.1f} ms, max {overhead[-1]:.1f} ms (goal: median <= 20 ms)")


if __name__ == "__main__":
    main()
