"""`overnight status` on a large log (10,000 plugins, 1,000,000 events): goal <= 0.5 s.

Timed twice: the whole command as a person runs it (a fresh process: interpreter start,
imports, open, query, print), and the status service alone inside one process. The command
runs as installed: with its modules' bytecode cached (pip compiles it at install; Python writes
it at the first import), even where PYTHONDONTWRITEBYTECODE is set, which would make every
start compile every module again (about 0.15 s more here).

    uv run python -m tests.bench.status [--plugins 10000] [--events 1000000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from statemachine.status import status
from statemachine.workspace import open_log
from tests.bench.synthetic import cached_log


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plugins", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    path = cached_log(args.plugins, args.events)
    print(f"log: {path.name}, {path.stat().st_size / 1e6:.0f} MB")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "cli", "--help"], env=env, capture_output=True, check=True)  # bytecode
    for label, extra in (("status --json", ["--json"]), ("status (table)", []),
                         ("status --state done --json", ["--state", "done", "--json"])):
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "cli", "status", str(path.parent), "--db", str(path),
                                  *extra], env=env, capture_output=True, text=True, check=True)
            times.append(time.perf_counter() - start)
        print(f"overnight {label:<28} median {statistics.median(times):5.2f} s, "
              f"max {max(times):5.2f} s  ({len(out.stdout):,} bytes of output)  goal <= 0.5 s")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    print(f"(an empty python process alone: {time.perf_counter() - start:.2f} s)")
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        with open_log(path.parent, path, writer=False) as store:
            report = status(store)
        times.append(time.perf_counter() - start)
    print(f"status service in-process (open + queries): median {statistics.median(times) * 1000:.0f} ms"
          f"  -> {report.plugins} plugins, {report.by_state}")


if __name__ == "__main__":
    main()
