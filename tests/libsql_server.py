"""A small libSQL-protocol HTTP server for tests: the v1 endpoints libsql-client 0.3.1 uses.

`POST /v1/execute` ({"stmt"} -> {"result"}) and `POST /v1/batch` ({"batch": {"steps"}} ->
{"result": {"step_results", "step_errors"}}, with step conditions ok/error/not/and/or),
executed against a real SQLite file with the stdlib's sqlite3, one request at a time.

Fault switches (set the attributes while it runs): `fail_500` (answer the next N requests
with 500), `drop_mid_batch` (the next N batches run half their steps, roll back, and the
connection is closed without an answer), `drop_after_commit` (the next N batches commit and
then the connection is closed: the client cannot know it succeeded), `max_body` (413 for
larger bodies), `latency` (seconds before each answer), `token` (require `Authorization:
Bearer <token>`). `requests` logs (path, bytes received, rows written, status, bytes answered).
"""

from __future__ import annotations

import base64
import json
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Request:
    path: str
    bytes_received: int
    rows_written: int
    status: int
    bytes_answered: int = 0


@dataclass
class LibsqlServer:
    db_path: Path
    token: str | None = field(default=None, repr=False)
    fail_500: int = 0
    drop_mid_batch: int = 0
    drop_after_commit: int = 0
    max_body: int | None = None
    latency: float = 0.0
    requests: list[Request] = field(default_factory=list)
    headers_seen: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(self.db_path), isolation_level=None, check_same_thread=False)
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> "LibsqlServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._conn.close()

    def __enter__(self) -> "LibsqlServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def bytes_received(self) -> int:
        return sum(r.bytes_received for r in self.requests)

    @property
    def bytes_answered(self) -> int:
        return sum(r.bytes_answered for r in self.requests)

    @property
    def rows_written(self) -> int:
        return sum(r.rows_written for r in self.requests)

    def sql(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Direct access to the server's database (to inspect it or tamper with it)."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # ------------------------------------------------------------------ protocol

    def handle(self, path: str, body: dict) -> tuple[int, dict, bool, int]:
        """(status, answer, drop the connection instead of answering, rows written)."""
        with self._lock:
            before = self._conn.total_changes
            if path == "/v1/execute":
                try:
                    answer = {"result": self._run(body["stmt"])}
                    status = 200
                except sqlite3.Error as e:
                    answer, status = {"message": str(e), "code": _code(e)}, 400
                drop = False
            elif path == "/v1/batch":
                answer, drop = self._batch(body["batch"]["steps"]), False
                status = 200
                if self.drop_mid_batch:
                    self.drop_mid_batch -= 1
                    drop = True
                elif self.drop_after_commit:
                    self.drop_after_commit -= 1
                    drop = True
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
            else:
                return 404, {"message": f"no endpoint {path}"}, False, 0
            return status, answer, drop, self._conn.total_changes - before

    def _batch(self, steps: list[dict]) -> dict:
        results: list[Any] = []
        errors: list[Any] = []
        halfway = len(steps) // 2 if self.drop_mid_batch else None
        for index, step in enumerate(steps):
            if halfway is not None and index == halfway:
                break  # the connection "drops" here; handle() rolls back
            if step.get("condition") is not None and not _holds(step["condition"], results, errors):
                results.append(None)
                errors.append(None)
                continue
            try:
                results.append(self._run(step["stmt"]))
                errors.append(None)
            except sqlite3.Error as e:
                results.append(None)
                errors.append({"message": str(e), "code": _code(e)})
        return {"result": {"step_results": results, "step_errors": errors}}

    def _run(self, stmt: dict) -> dict:
        args = [_from_proto(v) for v in stmt.get("args") or []]
        named = {a["name"].lstrip(":@$"): _from_proto(a["value"]) for a in stmt.get("named_args") or []}
        cursor = self._conn.execute(stmt["sql"], named or args)
        rows = cursor.fetchall()
        cols = [{"name": d[0]} for d in cursor.description or ()]
        return {"cols": cols, "rows": [[_to_proto(v) for v in row] for row in rows],
                "affected_row_count": max(cursor.rowcount, 0),
                "last_insert_rowid": str(cursor.lastrowid) if cursor.lastrowid else None}


class _Handler(BaseHTTPRequestHandler):
    owner: LibsqlServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        server = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        server.headers_seen.append(self.headers.get("Authorization") or "")
        if server.latency:
            time.sleep(server.latency)
        if server.token is not None and self.headers.get("Authorization") != f"Bearer {server.token}":
            return self._answer(401, {"message": "Unauthorized: bad or missing token"}, len(raw))
        if server.max_body is not None and length > server.max_body:
            return self._answer(413, f"body of {length} bytes is too large", len(raw))
        if server.fail_500:
            server.fail_500 -= 1
            return self._answer(500, "internal error (injected)", len(raw))
        status, answer, drop, written = server.handle(self.path, json.loads(raw))
        if drop:
            server.requests.append(Request(self.path, len(raw), written, 0))
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._answer(status, answer, len(raw), written)

    def _answer(self, status: int, answer: Any, received: int, written: int = 0) -> None:
        if isinstance(answer, str):
            body, kind = answer.encode(), "text/plain"
        else:
            body, kind = json.dumps(answer).encode(), "application/json"
        self.owner.requests.append(Request(self.path, received, written, status, len(body)))
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _holds(cond: dict, results: list, errors: list) -> bool:
    kind = cond["type"]
    if kind == "ok":
        return cond["step"] < len(results) and results[cond["step"]] is not None
    if kind == "error":
        return cond["step"] < len(errors) and errors[cond["step"]] is not None
    if kind == "not":
        return not _holds(cond["cond"], results, errors)
    if kind == "and":
        return all(_holds(c, results, errors) for c in cond["conds"])
    if kind == "or":
        return any(_holds(c, results, errors) for c in cond["conds"])
    raise ValueError(f"unknown batch condition {kind!r}")


def _code(e: sqlite3.Error) -> str:
    return getattr(e, "sqlite_errorname", None) or "SQLITE_ERROR"


def _from_proto(value: dict) -> Any:
    kind = value["type"]
    if kind == "null":
        return None
    if kind == "integer":
        return int(value["value"])
    if kind == "float":
        return float(value["value"])
    if kind == "text":
        return value["value"]
    if kind == "blob":
        return base64.b64decode(value["base64"])
    raise ValueError(f"unknown value type {kind!r}")


def _to_proto(value: Any) -> dict:
    if value is None:
        return {"type": "null"}
    if isinstance(value, bool | int):
        return {"type": "integer", "value": str(int(value))}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    if isinstance(value, str):
        return {"type": "text", "value": value}
    return {"type": "blob", "base64": base64.b64encode(bytes(value)).decode()}
