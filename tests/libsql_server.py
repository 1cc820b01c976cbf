"""A small libSQL-protocol server for tests: what libsql-client 0.3.1 uses, over HTTP and
over WebSocket.

HTTP (`url`): `POST /v1/execute` ({"stmt"} -> {"result"}) and `POST /v1/batch` ({"batch":
{"steps"}} -> {"result": {"step_results", "step_errors"}}, with step conditions
ok/error/not/and/or).
WebSocket (`ws_url`, subprotocol hrana2, served by aiohttp): hello (the token is the `jwt`),
then requests open_stream, close_stream, execute and batch with the same statement and
batch semantics.
Both run against a real SQLite file with the stdlib's sqlite3, one request at a time, and
both bind 127.0.0.1 only. With `tls` (a server-side `ssl.SSLContext`) both speak TLS, and the
URLs are https://, wss:// and `libsql_url` (libsql://, which libsql-client maps to wss://).

Fault switches (set the attributes while it runs): `fail_500` (answer the next N requests
with 500), `drop_mid_batch` (the next N batches run half their steps, roll back, and the
connection is closed without an answer), `drop_after_commit` (the next N batches commit and
then the connection is closed: the client cannot know it succeeded), `max_body` (413 for
larger bodies), `latency` (seconds before each answer), `token` (require `Authorization:
Bearer <token>`, or the hello's jwt). `requests` logs (path, bytes received, rows written,
status, bytes answered); WebSocket requests are logged as `ws:<type>`. Over WebSocket a
"dropped connection" closes the socket without an answer, and `fail_500`/`max_body` do not
apply.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import sqlite3
import ssl
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
    tls: ssl.SSLContext | None = field(default=None, repr=False)
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
        if self.tls is not None:
            self._httpd.socket = self.tls.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._ws = _WebSocketSide(self)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self._ws.port}"

    @property
    def libsql_url(self) -> str:
        assert self.tls is not None, "libsql:// means TLS (ws:// is the same without it)"
        return f"libsql://127.0.0.1:{self._ws.port}"

    def start(self) -> "LibsqlServer":
        self._thread.start()
        self._ws.start()
        return self

    def stop(self) -> None:
        self._ws.stop()
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
                answer, drop = {"result": self._batch(body["batch"]["steps"])}, False
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
        return {"step_results": results, "step_errors": errors}

    def _run(self, stmt: dict) -> dict:
        args = [_from_proto(v) for v in stmt.get("args") or []]
        named = {a["name"].lstrip(":@$"): _from_proto(a["value"]) for a in stmt.get("named_args") or []}
        cursor = self._conn.execute(stmt["sql"], named or args)
        rows = cursor.fetchall()
        cols = [{"name": d[0]} for d in cursor.description or ()]
        return {"cols": cols, "rows": [[_to_proto(v) for v in row] for row in rows],
                "affected_row_count": max(cursor.rowcount, 0),
                "last_insert_rowid": str(cursor.lastrowid) if cursor.lastrowid else None}


class _WebSocketSide:
    """The hrana2 WebSocket endpoint of a LibsqlServer, on its own event-loop thread."""

    def __init__(self, owner: LibsqlServer) -> None:
        self.owner = owner
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _serve(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/", self._session)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.owner.tls)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()

    async def _session(self, request: Any) -> Any:
        from aiohttp import WSMsgType, web

        owner = self.owner
        ws = web.WebSocketResponse(protocols=("hrana2",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                break
            message = json.loads(msg.data)
            if message["type"] == "hello":
                owner.headers_seen.append(message.get("jwt") or "")
                if owner.token is not None and message.get("jwt") != owner.token:
                    await ws.send_json({"type": "hello_error",
                                        "error": {"message": "Unauthorized: bad or missing token"}})
                    break
                await ws.send_json({"type": "hello_ok"})
                continue
            if owner.latency:
                await asyncio.sleep(owner.latency)
            req = message["request"]
            answer, drop = self._answer(req, len(msg.data))
            if drop:
                break  # closing the socket without an answer
            await ws.send_json({"request_id": message["request_id"], **answer})
        await ws.close()
        return ws

    def _answer(self, req: dict, received: int) -> tuple[dict, bool]:
        """(the message to send, drop the connection instead)."""
        owner = self.owner
        kind = req["type"]
        if kind in ("open_stream", "close_stream"):
            return {"type": "response_ok", "response": {"type": kind}}, False
        if kind not in ("execute", "batch"):
            return {"type": "response_error", "error": {"message": f"{kind} is not supported here"}}, False
        body = {"stmt": req["stmt"]} if kind == "execute" else {"batch": req["batch"]}
        status, answer, drop, written = owner.handle(f"/v1/{kind}", body)
        owner.requests.append(Request(f"ws:{kind}", received, written, 0 if drop else 200))
        if status != 200:
            return {"type": "response_error", "error": answer}, False
        return {"type": "response_ok", "response": {"type": kind, "result": answer["result"]}}, drop


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
