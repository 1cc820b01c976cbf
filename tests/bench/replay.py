"""Replay of a large log: rebuild every projection from scratch and compare with the live ones.

The log (10,000 plugins, 1,000,000 events of realistic shape, built once and cached under
tests/bench/.cache/) is replayed with `overnight audit replay`'s code path, which also checks
the hash chain, the sequence, and every transition against the table. Decoding alone is
timed too, for comparison.

    uv run python -m tests.bench.replay [--plugins 10000] [--events 1000000]
"""

from __future__ import annotations

import argparse
import time

from statemachine.catalog import REGISTRY
from statemachine.workspace import open_log
from tests.bench.synthetic import cached_log


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plugins", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    start = time.perf_counter()
    path = cached_log(args.plugins, args.events)
    built = time.perf_counter() - start
    print(f"log: {path.name}, {path.stat().st_size / 1e6:.0f} MB (ready in {built:.1f} s)")
    with open_log(path.parent, path, writer=False) as store:
        start = time.perf_counter()
        n = 0
        for tag, sv, data in store.conn.execute("SELECT type, schema_version, data FROM events"):
            REGISTRY.decode(tag, sv, data)
            n += 1
        decode = time.perf_counter() - start
        print(f"read + decode only:        {decode:6.2f} s  ({n / decode:,.0f} events/s)")
        start = time.perf_counter()
        report = store.replay()
        elapsed = time.perf_counter() - start
    rows = ", ".join(f"{k} {v:,}" for k, v in report.rows.items())
    print(f"replay + chain + compare:  {elapsed:6.2f} s  ({report.events / elapsed:,.0f} events/s)"
          f"  goal <= 10 s; equal to live: {report.ok}")
    print(f"  rebuilt rows: {rows}")
    if report.problems:
        print("  problems:", report.problems[:5])


if __name__ == "__main__":
    main()
