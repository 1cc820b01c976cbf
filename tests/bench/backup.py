"""Backup and restore of a copy of ../shared/corpus (about 5,000 files) through the test server.

First backup (everything), second backup after one file changed (one file and the directory
nodes on its path), full restore into an empty directory (tree, log, projections, verify):
seconds, bytes sent and received over HTTP (JSON, blobs in base64), rows written (Turso bills rows written), requests.

    uv run python -m tests.bench.backup [--corpus ../shared/corpus] [--latency 0]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from statemachine import backup as backup_service
from statemachine.scan import scan
from statemachine.workspace import open_log
from tests.libsql_server import LibsqlServer

DEFAULT_CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"


def figures(label: str, server: LibsqlServer, mark: tuple[int, ...], seconds: float) -> tuple[int, ...]:
    now = (server.bytes_received, server.bytes_answered, server.rows_written, len(server.requests))
    sent, received, rows, requests = (a - b for a, b in zip(now, mark))
    print(f"{label:<24} {seconds:6.2f} s  {sent:>11,} B sent  {received:>11,} B received  "
          f"{rows:>6,} rows written  {requests:>4,} requests")
    return now


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--latency", type=float, default=0.0, help="Seconds the server waits per request.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "marketplace"
        shutil.copytree(args.corpus, root, ignore=shutil.ignore_patterns(".overnight"))
        files = sum(1 for p in root.rglob("*") if p.is_file())
        with open_log(root) as store:
            scan(store, root)
        print(f"corpus copy: {files:,} files; server latency {args.latency * 1000:.0f} ms per request")
        with LibsqlServer(Path(tmp) / "remote.db", token="bench") as server:
            server.latency = args.latency
            mark: tuple[int, ...] = (0, 0, 0, 0)
            with open_log(root) as store:
                start = time.perf_counter()
                first = backup_service.backup(store, root, server.url, "bench")
                mark = figures("first backup", server, mark, time.perf_counter() - start)
                changed = next(p for p in sorted(root.rglob("*.md")))
                changed.write_text(changed.read_text() + "\none more line\n")
                start = time.perf_counter()
                backup_service.backup(store, root, server.url, "bench")
                mark = figures("second backup (1 file)", server, mark, time.perf_counter() - start)
            print(f"snapshot: {first.snapshot.files:,} files, {first.snapshot.bytes:,} bytes, "
                  f"{first.snapshot.plugins} plugins")
            start = time.perf_counter()
            report = backup_service.restore(server.url, "bench", Path(tmp) / "restored")
            figures("full restore", server, mark, time.perf_counter() - start)
            print(f"restore: {report.files:,} files, {report.events:,} events, "
                  f"{len(report.problems)} problems, recovery time {report.seconds:.2f} s")
            start = time.perf_counter()
            verified = backup_service.verify(server.url, "bench", 1.0)
            figures("verify --read-data 100", server, mark, time.perf_counter() - start)
            print(f"verify: {len(verified.problems)} problems")


if __name__ == "__main__":
    main()
