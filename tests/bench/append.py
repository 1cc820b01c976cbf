"""Durable appends: overnight's event store versus plain single-row SQLite inserts.

Every variant uses WAL and synchronous=FULL (the store's pragmas) and one transaction per
row, so one fsync each. Two plain baselines, both into a table with no index:
- "small rows": an 85-byte JSON payload, the cheapest insert there is;
- "same rows": the very envelope rows the store writes (seq, stream, version, type,
  schema_version, at, data, prev_hash, hash), so the difference is the store's own work:
  encoding, the hash chain, the (stream, version) index and the projections.
The store's append also updates every projection in the same transaction. A last variant
replays the store's own SQL (recorded with apsw's exec_trace) with no Python work at all: the
floor of this schema, whatever the Python side costs.

The disk of a virtual machine is noisy, so the variants take turns in many short rounds (the
order rotating each round); rates are totals over all rounds.

    uv run python -m tests.bench.append [--rounds 30] [--per-round 200]
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

SMALL = '{"type":"PlanRequested","run_id":"run-1","request_id":"x","model":"m","attempt":1}'
ENVELOPE = "seq, stream, version, type, schema_version, at, data, prev_hash, hash"


def plain_connection(path: Path, columns: str) -> apsw.Connection:
    conn = apsw.Connection(str(path))
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"CREATE TABLE t (id INTEGER PRIMARY KEY, {columns})")
    return conn


def recorded(tmp: Path, plugins: list[tuple[str, list]]) -> tuple[list[tuple], list[list[tuple]]]:
    """The envelope rows the store writes for these events, and the SQL of each append
    (one transaction per event), recorded once without fsync."""
    statements: list[tuple] = []

    def trace(cursor: apsw.Cursor, sql: str, bindings: object) -> bool:
        statements.append((sql, bindings or ()))
        return True

    with open_log(tmp, tmp / "rows.db", synchronous="OFF") as scratch:
        scratch.conn.exec_trace = trace
        for pid, events in plugins:
            for event in events:
                scratch.append(plugin_stream(pid), event)
        scratch.conn.exec_trace = None
        rows = scratch.query(f"SELECT {ENVELOPE} FROM events ORDER BY seq")
    transactions, current = [], []
    for sql, bindings in statements:
        current.append((sql, bindings))
        if sql == "COMMIT":
            transactions.append(current)
            current = []
    return rows, transactions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=200)
    args = parser.parse_args()
    n, rounds = args.per_round, args.rounds
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        tmp = Path(tmp)
        plugins, counter, total_events = [], 0, 0
        while total_events < n * rounds + 16 * rounds:  # the Machine records whole plugins
            pid = f"plugins/bench/p{counter:06d}"
            plugins.append((pid, plugin_pass(pid, "run-1", counter)))
            total_events += len(plugins[-1][1])
            counter += 1
        events = [(plugin_stream(pid), event) for pid, trip in plugins for event in trip]
        rows, transactions = recorded(tmp, plugins)
        open_log(tmp, tmp / "sql.db").close()  # the store's schema, empty
        sql_only = apsw.Connection(str(tmp / "sql.db"))
        sql_only.execute("PRAGMA journal_mode=WAL").fetchall()
        sql_only.execute("PRAGMA synchronous=FULL")
        sql_cursor = sql_only.cursor()

        small = plain_connection(tmp / "small.db", "data TEXT NOT NULL")
        same = plain_connection(tmp / "same.db", ", ".join(f"{c} NOT NULL" for c in ENVELOPE.split(", ")))
        same_sql = f"INSERT INTO t ({ENVELOPE}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        store = open_log(tmp, tmp / "store.db")
        (tmp / "m").mkdir()
        lifecycle = Lifecycle(open_log(tmp / "m", tmp / "m" / "store.db"))
        pending_machine = iter(plugins)

        def run_small(lo: int, hi: int) -> int:
            for _ in range(lo, hi):
                small.execute("INSERT INTO t (data) VALUES (?)", (SMALL,))
            return hi - lo

        def run_same(lo: int, hi: int) -> int:
            for row in rows[lo:hi]:
                same.execute(same_sql, row)
            return hi - lo

        def run_store(lo: int, hi: int) -> int:
            for stream, event in events[lo:hi]:
                store.append(stream, event)
            return hi - lo

        def run_sql_only(lo: int, hi: int) -> int:
            for transaction in transactions[lo:hi]:
                for sql, bindings in transaction:
                    sql_cursor.execute(sql, bindings)
            return hi - lo

        def run_machine(lo: int, hi: int) -> int:
            """As the runner does it: a cursor per plugin, events fired through the Machine.
            Whole plugins at a time, so it returns how many events it recorded."""
            done = 0
            while done < hi - lo:
                pid, trip = next(pending_machine)
                cursor = lifecycle.cursor(pid)
                for event in trip:
                    lifecycle.record(cursor, event)
                lifecycle.release(cursor)
                done += len(trip)
            return done

        variants = {"small": run_small, "same": run_same, "store": run_store, "machine": run_machine,
                    "sql": run_sql_only}
        seconds = dict.fromkeys(variants, 0.0)
        counts = dict.fromkeys(variants, 0)
        names = list(variants)
        for r in range(rounds):
            lo, hi = r * n, (r + 1) * n
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                count = variants[name](lo, hi)
                elapsed = time.perf_counter() - start
                seconds[name] += elapsed
                counts[name] += count
        store.close()
        lifecycle.store.close()
        for conn in (small, same, sql_only):
            conn.close()

    rate = {v: counts[v] / seconds[v] for v in variants}

    print(f"durable appends, WAL + synchronous=FULL, one transaction each; {rounds} rounds of {n}")
    print(f"  plain INSERT, small rows:           {rate['small']:7.0f}/s ({1e6 / rate['small']:4.0f} us)")
    print(f"  plain INSERT, same rows:            {rate['same']:7.0f}/s ({1e6 / rate['same']:4.0f} us)")
    for v, label in (("store", "EventStore.append + projections:"), ("machine", "... through the transitions Machine:"),
                     ("sql", "the store's SQL alone, no Python:")):
        print(f"  {label:36s}{rate[v]:7.0f}/s ({1e6 / rate[v]:4.0f} us) = "
              f"{rate[v] / rate['small']:.0%} of small rows, {rate[v] / rate['same']:.0%} of same rows")
    print("  goal: EventStore.append >= 80% of plain")


if __name__ == "__main__":
    main()
