"""Durable appends: overnight's event store versus plain single-row SQLite inserts.

Both use WAL and synchronous=FULL and one transaction per row (one fsync each). The store's
append also encodes the event, extends the hash chain and updates every projection. Rounds
alternate between the two so that disk noise hits both alike.

    uv run python -m tests.bench.append [--rounds 6] [--per-round 500]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import apsw

from statemachine.lifecycle import Lifecycle, plugin_stream
from statemachine.workspace import open_log
from tests.bench.synthetic import plugin_pass


def plain_inserts(conn: apsw.Connection, n: int, payload: str) -> float:
    start = time.perf_counter()
    for _ in range(n):
        conn.execute("INSERT INTO t (data) VALUES (?)", (payload,))
    return time.perf_counter() - start


def store_appends(store, events: list) -> float:
    start = time.perf_counter()
    for stream, event in events:
        store.append(stream, event)
    return time.perf_counter() - start


def machine_records(lifecycle: Lifecycle, plugins: list[tuple[str, list]]) -> float:
    """As the runner does it: one cursor per plugin in flight, events fired through it."""
    start = time.perf_counter()
    for pid, events in plugins:
        cursor = lifecycle.cursor(pid)
        for event in events:
            lifecycle.record(cursor, event)
        lifecycle.release(cursor)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=500)
    args = parser.parse_args()
    n = args.per_round
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        tmp = Path(tmp)
        conn = apsw.Connection(str(tmp / "plain.db"))
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, data TEXT NOT NULL)")
        store = open_log(tmp, tmp / "store.db")
        machine_store_dir = tmp / "m"
        machine_store_dir.mkdir()
        mstore = open_log(machine_store_dir, machine_store_dir / "store.db")
        lifecycle = Lifecycle(mstore)
        payload = '{"type":"PlanRequested","run_id":"run-1","request_id":"x","model":"m","attempt":1}'
        totals = {"plain": 0.0, "store": 0.0, "machine": 0.0}
        counter = 0
        for _ in range(args.rounds):
            events, plugins = [], []
            while len(events) < n:
                pid = f"plugins/bench/p{counter:06d}"
                trip = plugin_pass(pid, "run-1", counter)
                events += [(plugin_stream(pid), event) for event in trip]
                plugins.append((pid, trip))
                counter += 1
            totals["plain"] += plain_inserts(conn, n, payload)
            totals["store"] += store_appends(store, events[:n])
            machine_events = len(events)
            totals["machine"] += machine_records(lifecycle, plugins) * n / machine_events
        store.close()
        mstore.close()
        conn.close()
    total = args.rounds * n
    plain = total / totals["plain"]
    rate = total / totals["store"]
    machine = total / totals["machine"]
    print(f"durable appends, {total} per variant, WAL + synchronous=FULL, one transaction each")
    print(f"  plain single-row INSERT:                 {plain:8.0f}/s  ({1e6 / plain:6.0f} us each)")
    print(f"  EventStore.append + 4 projections:       {rate:8.0f}/s  ({1e6 / rate:6.0f} us each)"
          f"  = {rate / plain:.0%} of plain (goal >= 80%)")
    print(f"  ... through the transitions Machine:     {machine:8.0f}/s  ({1e6 / machine:6.0f} us each)"
          f"  = {machine / plain:.0%} of plain")


if __name__ == "__main__":
    main()
