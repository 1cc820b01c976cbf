"""The hash chain over the log, and its verification.

hash(n) = sha256(json([prev_hash, seq, stream, version, type, schema_version, at]) + b"\\n" + data)
with prev_hash(1) = GENESIS. Verification needs no event types, so it can run in a second
process while the first folds projections (see EventStore.replay).
"""

from __future__ import annotations

import hashlib

import apsw
import msgspec

GENESIS = "0" * 64
EVENT_COLUMNS = "seq, stream, version, type, schema_version, at, data, prev_hash, hash"
_header_encoder = msgspec.json.Encoder()


def chain_hash(prev_hash: str, seq: int, stream: str, version: int, type_: str,
               schema_version: int, at: str, data: str) -> str:
    header = _header_encoder.encode([prev_hash, seq, stream, version, type_, schema_version, at])
    return hashlib.sha256(header + b"\n" + data.encode("utf-8")).hexdigest()


class ChainCheck:
    """Fed the stored rows in seq order; collects gaps, broken links and altered events."""

    __slots__ = ("problems", "expected_seq", "last_hash")

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.expected_seq = 1
        self.last_hash = GENESIS

    def feed(self, seq: int, stream: str, version: int, tag: str, sv: int, at: str, data: str,
             prev: str, digest: str) -> None:
        if seq != self.expected_seq:
            first = self.expected_seq
            missing = f"{first}" if seq - 1 == first else f"{first}-{seq - 1}"
            self.problems.append(f"seq {missing}: missing from the log (deleted events)")
        elif prev != self.last_hash:
            self.problems.append(f"seq {seq}: hash chain broken (prev_hash does not match seq {seq - 1})")
        if chain_hash(prev, seq, stream, version, tag, sv, at, data) != digest:
            self.problems.append(f"seq {seq}: hash mismatch (the stored event was altered)")
        self.expected_seq = seq + 1
        self.last_hash = digest


def check_file(path: str, upto: int) -> list[str]:
    """The chain problems of the log at `path` up to seq `upto` (run in a worker process)."""
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        check = ChainCheck()
        for row in conn.execute(f"SELECT {EVENT_COLUMNS} FROM events WHERE seq <= ? ORDER BY seq", (upto,)):
            check.feed(*row)
        return check.problems
    finally:
        conn.close()
