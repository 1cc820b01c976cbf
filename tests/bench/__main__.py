"""Run every benchmark in turn: `uv run python -m tests.bench`. They print figures, assert nothing."""

import runpy
import sys

for name in ("append", "replay", "status", "scan", "backup", "gates"):
    print(f"\n== tests.bench.{name}", flush=True)
    sys.argv = [name]
    runpy.run_module(f"tests.bench.{name}", run_name="__main__")
