"""A local HTTP emulator of the Gemini Developer API, as google-genai 3.x calls it.

    with Emulator(api_key="test-key") as emu:
        client = genai.Client(api_key="test-key", vertexai=False,
                              http_options=types.HttpOptions(base_url=emu.url,
                                                             api_version="v1beta"))
        emu.script("rate_limit_minute", times=2)           # next two generateContent -> 429
        emu.script("server_error", phase="skill")          # next skill request -> 500

Endpoints (api_version v1 or v1beta):
- POST /{v}/models/{model}:generateContent  structured answers: a good SKILL.md draft when the
  response schema has a `body` property (phase "skill"), otherwise JSON generated to conform to
  the schema (phase "plan"); plain text when no schema is given.
- POST /{v}/models/{model}:countTokens      {"totalTokens": N}
- GET  /{v}/models/{model}                  the model resource (preflight check)

Faults (FAULTS) are consumed one per generateContent request; optional quotas (rpm, rpd, tpm;
per model; per-day counts reset at midnight America/Los_Angeles) answer 429 like the real API.
Run `python -m tests.emulator --port 8080` to rehearse by hand without a key.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import re
import socket
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

from tests.skill_content import GATES, bad_skill, good_skill, untidy_files

PACIFIC = ZoneInfo("America/Los_Angeles")
DEFAULT_MODELS = frozenset({"gemini-2.5-flash", "gemini-2.5-pro", "gemini-2.5-flash-lite"})
API_VERSIONS = ("v1", "v1beta")

QUOTA_MINUTE = "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
QUOTA_DAY = "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
QUOTA_TOKENS = "GenerateContentInputTokensPerModelPerMinute-FreeTier"
METRIC_REQUESTS = "generativelanguage.googleapis.com/generate_content_free_tier_requests"
METRIC_TOKENS = "generativelanguage.googleapis.com/generate_content_free_tier_input_token_count"

FAULTS = ("rate_limit_minute", "rate_limit_day", "rate_limit_tokens", "rate_limit_bare",
          "server_error", "unavailable", "bad_request", "timeout", "reset", "malformed_body", "invalid_json",
          "schema_mismatch", "blocked", "max_tokens", "safety", "recitation", "empty", "untidy_files",
          *(f"gate_{g}" for g in GATES))

_TYPE = "type.googleapis.com/google.rpc."


@dataclass
class RequestRecord:
    """One HTTP request the emulator received. The API key itself is never stored."""

    time: float
    method: str
    path: str
    model: str | None
    phase: str | None
    api_key_present: bool
    authorization: str | None = None  # the Authorization header's scheme (`Basic` for a URL's user:password)
    status: int | str | None = None   # HTTP status sent, "reset", or None while in progress
    fault: str | None = None          # the scripted fault or quota kind applied, if any
    prompt_tokens: int = 0
    text: str = ""


@dataclass
class _Scripted:
    kind: str
    times: int
    phase: str | None
    params: dict[str, Any] = field(default_factory=dict)


def _error(code: int, status: str, message: str, details: list | None = None) -> dict:
    err: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        err["details"] = details
    return {"error": err}


def _quota_429(model: str, quota_id: str, quota_value: Any, retry_delay: str | None) -> dict:
    metric = METRIC_TOKENS if quota_id == QUOTA_TOKENS else METRIC_REQUESTS
    details: list[dict[str, Any]] = [
        {"@type": _TYPE + "QuotaFailure",
         "violations": [{"quotaMetric": metric, "quotaId": quota_id,
                         "quotaDimensions": {"location": "global", "model": model},
                         "quotaValue": str(quota_value)}]},
        {"@type": _TYPE + "Help",
         "links": [{"description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
    ]
    message = ("You exceeded your current quota, please check your plan and billing details. "
               "For more information on this error, head to: "
               "https://ai.google.dev/gemini-api/docs/rate-limits.\n"
               f"* Quota exceeded for metric: {metric}, limit: {quota_value}, model: {model}")
    if retry_delay is not None:
        details.append({"@type": _TYPE + "RetryInfo", "retryDelay": retry_delay})
        message += f"\nPlease retry in {retry_delay}."
    return _error(429, "RESOURCE_EXHAUSTED", message, details)


# ------------------------------------------------------------------ schema-driven answers


def resolve_schema(schema: Any) -> dict:
    """The object schema behind a top-level `$ref` into `$defs` (or the schema itself)."""
    if not isinstance(schema, dict):
        return {}
    return _deref(schema, schema.get("$defs") or schema.get("definitions") or {})


def _deref(node: dict, defs: dict) -> dict:
    seen = 0
    while isinstance(node, dict) and "$ref" in node and seen < 32:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = defs.get(name, {})
        seen += 1
    return node if isinstance(node, dict) else {}


def phase_of(schema: Any) -> str | None:
    if not isinstance(schema, dict) or not schema:
        return None
    props = resolve_schema(schema).get("properties") or {}
    return "skill" if "body" in props else "plan"


_ARRAY_HINTS = {
    "allowed_tools": ["Read", "Grep", "Bash"],
    "sections_to_add": ["Prerequisites", "Error Handling", "Examples"],
    "trigger_phrases": ["Use when setting up the plugin", "Use when the plugin run fails",
                        "Use when reviewing the plugin configuration"],
}


def conform(schema: Any) -> Any:
    """Deterministic JSON value that conforms to `schema` (JSON Schema as msgspec emits it)."""
    if not isinstance(schema, dict):
        return None
    defs = schema.get("$defs") or schema.get("definitions") or {}
    return _gen(schema, defs, "value", 0, 0)


def _gen(node: dict, defs: dict, name: str, index: int, depth: int) -> Any:
    node = _deref(node, defs)
    if depth > 12:
        return None
    if "const" in node:
        return node["const"]
    if node.get("enum"):
        return node["enum"][index % len(node["enum"])]
    for key in ("anyOf", "oneOf"):
        if node.get(key):
            options = [_deref(o, defs) for o in node[key]]
            non_null = [o for o in options if o.get("type") != "null"] or options
            return _gen(non_null[0], defs, name, index, depth + 1)
    if node.get("allOf"):
        merged: dict[str, Any] = {}
        for part in node["allOf"]:
            merged.update(_deref(part, defs))
        return _gen(merged, defs, name, index, depth + 1)
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in node else "array" if "items" in node else "string"
    if kind == "object":
        props = node.get("properties") or {}
        return {key: _gen(sub, defs, key, index, depth + 1) for key, sub in props.items()}
    if kind == "array":
        lo = int(node.get("minItems", 1))
        hi = int(node.get("maxItems", max(lo, 3)))
        count = max(lo, min(hi, 2 if depth else 3)) if hi >= lo else lo
        hint = _ARRAY_HINTS.get(name)
        item = node.get("items") or {"type": "string"}
        if hint and _deref(item, defs).get("type") == "string":
            return hint[:max(count, min(len(hint), hi))]
        return [_gen(item, defs, name, i, depth + 1) for i in range(count)]
    if kind == "integer" or kind == "number":
        lo = node.get("minimum")
        if lo is None:
            lo = node["exclusiveMinimum"] + 1 if "exclusiveMinimum" in node else 0
        hi = node.get("maximum")
        if hi is None:
            hi = node["exclusiveMaximum"] - 1 if "exclusiveMaximum" in node else lo + 100
        frac = 0.35 if name.endswith("before") else 0.85 if name.endswith("after") else 0.5
        value = lo + (hi - lo) * frac
        mult = node.get("multipleOf")
        if mult:
            value = math.ceil(value / mult) * mult
        return int(round(value)) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    # string
    if name == "path":
        text = f"references/topic-{index + 1}.md"
    elif name in ("description", "purpose"):
        text = f"Adds the missing {name} number {index + 1} so the skill is complete and testable."
    else:
        text = f"{name.replace('_', ' ')} {index + 1}"
    lo, hi = int(node.get("minLength", 0)), node.get("maxLength")
    if len(text) < lo:
        text = text + "x" * (lo - len(text))
    if hi is not None:
        text = text[:int(hi)]
    return text


# ------------------------------------------------------------------------ the emulator


def _request_text(body: dict) -> str:
    parts: list[str] = []

    def walk(content: Any) -> None:
        if isinstance(content, dict):
            for part in content.get("parts") or []:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    parts.append(part["text"])
        elif isinstance(content, list):
            for c in content:
                walk(c)

    walk(body.get("systemInstruction") or body.get("system_instruction"))
    walk(body.get("contents") or [])
    return "\n".join(parts)


def _tokens(text: str) -> int:
    return (len(text) + 3) // 4


_NAME = r"([A-Za-z0-9][\w.-]{0,63})"
_HINT_PATTERNS = (   # most specific first: the skill prompt names the skill in quotes
    re.compile(r"Agent Skill [\"'`]" + _NAME + r"[\"'`]", re.I),
    re.compile(r"^\s*plugin[ _]name\s*[:=]\s*[\"'`]?" + _NAME, re.I | re.M),
    re.compile(r"^\s*(?:plugin|skill[ _]name)\s*[:=]\s*[\"'`]?" + _NAME, re.I | re.M),
    re.compile(r"\"name\"\s*:\s*\"" + _NAME + r"\""),
    re.compile(r"plugin\s+[\"'`]" + _NAME + r"[\"'`]", re.I),
)


def name_hint(text: str) -> str:
    for pattern in _HINT_PATTERNS:
        m = pattern.search(text)
        if m:
            return m.group(1)
    return "the plugin"


class Emulator:
    """Gemini Developer API emulator on 127.0.0.1. Use as a context manager or start()/stop()."""

    def __init__(self, api_key: str = "test-key", *, models: Iterable[str] | None = None,
                 port: int = 0, latency: tuple[float, float] | None = None, seed: int = 0,
                 rpm: int | None = None, rpd: int | None = None, tpm: int | None = None,
                 clock: Callable[[], float] = time.time,
                 on_request: Callable[[RequestRecord], None] | None = None) -> None:
        self.api_key = api_key
        self.echo_key = False  # a wrong key's error quotes the key sent (a careless proxy's way)
        self.models = set(models) if models is not None else set(DEFAULT_MODELS)
        self.latency = latency
        self.rpm, self.rpd, self.tpm = rpm, rpd, tpm
        self.clock = clock
        self.on_request = on_request
        self._port = port
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._queue: list[_Scripted] = []
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._counter = 0
        # quota state, per model
        self._minute: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._day: dict[str, tuple[dt.date, int]] = {}

    # -------------------------------------------------------------- lifecycle

    def start(self) -> "Emulator":
        if self._server is not None:
            return self
        self._stopping.clear()
        server = ThreadingHTTPServer(("127.0.0.1", self._port), _make_handler(self))
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"gemini-emulator-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2)

    def __enter__(self) -> "Emulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("emulator not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -------------------------------------------------------------- scripting

    def script(self, kind: str, times: int = 1, *, phase: str | None = None,
               **params: Any) -> None:
        """Queue `kind` for the next `times` generateContent requests (of `phase`, if given).

        Params: retry_delay ("7s"; None omits RetryInfo), quota_value, delay (timeout seconds),
        text (candidate text for invalid_json / schema_mismatch / max_tokens),
        block_reason (blocked), message (error kinds), quota_id (rate_limit_minute)."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {FAULTS}")
        if phase not in (None, "plan", "skill"):
            raise ValueError("phase must be None, 'plan' or 'skill'")
        if times < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._queue.append(_Scripted(kind, times, phase, params))

    def pending(self) -> list[tuple[str, int, str | None]]:
        """Scripted faults not yet consumed: (kind, remaining times, phase)."""
        with self._lock:
            return [(s.kind, s.times, s.phase) for s in self._queue]

    def clear(self) -> None:
        """Drop queued faults and the request log (quota state is kept)."""
        with self._lock:
            self._queue.clear()
            self._records.clear()

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def _take_fault(self, phase: str | None) -> _Scripted | None:
        with self._lock:
            for i, item in enumerate(self._queue):
                if item.phase is None or item.phase == phase:
                    item.times -= 1
                    if item.times <= 0:
                        del self._queue[i]
                    return item
        return None

    def _log(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def _finish(self, record: RequestRecord, status: int | str) -> None:
        with self._lock:
            record.status = status
        if self.on_request is not None:
            try:
                self.on_request(record)
            except Exception:  # noqa: BLE001 - a printing callback must not break the server
                pass

    def _next_id(self) -> str:
        with self._lock:
            self._counter += 1
            return f"emu-{self._counter:06d}-{self._rng.getrandbits(32):08x}"

    def _latency(self) -> float:
        if not self.latency:
            return 0.0
        with self._lock:
            return self._rng.uniform(*self.latency)

    # -------------------------------------------------------------- quotas

    def _admit(self, model: str, tokens: int) -> dict | None:
        """Count the request if every quota allows it; else the 429 body to send."""
        if self.rpm is None and self.rpd is None and self.tpm is None:
            return None
        with self._lock:
            now = self.clock()
            minute = self._minute.setdefault(model, deque())
            toks = self._tokens.setdefault(model, deque())
            while minute and minute[0] <= now - 60:
                minute.popleft()
            while toks and toks[0][0] <= now - 60:
                toks.popleft()
            local = dt.datetime.fromtimestamp(now, PACIFIC)
            today = local.date()
            day, count = self._day.get(model, (today, 0))
            if day != today:
                day, count = today, 0
            if self.rpd is not None and count >= self.rpd:
                midnight = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(0),
                                               tzinfo=PACIFIC).timestamp()
                wait = max(1, math.ceil(midnight - now))
                return _quota_429(model, QUOTA_DAY, self.rpd, f"{wait}s") | {"_kind": "quota_day"}
            if self.rpm is not None and len(minute) >= self.rpm:
                wait = max(1, math.ceil(minute[len(minute) - self.rpm] + 60 - now))
                return _quota_429(model, QUOTA_MINUTE, self.rpm, f"{wait}s") | {"_kind": "quota_minute"}
            if self.tpm is not None:
                used = sum(n for _, n in toks)
                if used + tokens > self.tpm:
                    wait, freed = 60, used
                    for t, n in toks:
                        freed -= n
                        if freed + tokens <= self.tpm:
                            wait = max(1, math.ceil(t + 60 - now))
                            break
                    return (_quota_429(model, QUOTA_TOKENS, self.tpm, f"{wait}s")
                            | {"_kind": "quota_tokens"})
            minute.append(now)
            toks.append((now, tokens))
            self._day[model] = (day, count + 1)
            return None

    def usage(self, model: str) -> dict[str, int]:
        """Admitted requests/tokens in the current minute window and Pacific day, per model."""
        with self._lock:
            now = self.clock()
            minute = [t for t in self._minute.get(model, ()) if t > now - 60]
            toks = sum(n for t, n in self._tokens.get(model, ()) if t > now - 60)
            today = dt.datetime.fromtimestamp(now, PACIFIC).date()
            day, count = self._day.get(model, (today, 0))
            return {"minute_requests": len(minute), "minute_tokens": toks,
                    "day_requests": count if day == today else 0}

    # -------------------------------------------------------------- answers

    def model_resource(self, model: str) -> dict:
        pro = "pro" in model
        return {"name": f"models/{model}", "version": "001",
                "displayName": " ".join(w.capitalize() for w in model.split("-")),
                "description": "Emulated Gemini model.",
                "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
                "supportedGenerationMethods": ["generateContent", "countTokens",
                                               "createCachedContent", "batchGenerateContent"],
                "temperature": 1.0, "topP": 0.95, "topK": 64, "maxTemperature": 2.0,
                "thinking": True if pro or "flash" in model else False}

    def answer_text(self, body: dict, phase: str | None, text: str,
                    fault: _Scripted | None) -> str:
        gen = body.get("generationConfig") or {}
        schema = gen.get("responseJsonSchema") or gen.get("responseSchema")
        if phase == "skill":
            hint = name_hint(text)
            if fault is not None and fault.kind.startswith("gate_"):
                draft = bad_skill(fault.kind[len("gate_"):], hint)
            elif fault is not None and fault.kind == "untidy_files":
                draft = untidy_files(hint)
            else:
                draft = good_skill(hint)
            return json.dumps(draft, ensure_ascii=False)
        if schema:
            return json.dumps(conform(schema), ensure_ascii=False)
        if gen.get("responseMimeType") == "application/json":
            return json.dumps({"ok": True})
        return "OK"

    def _usage(self, prompt: int, out: int) -> dict:
        return {"promptTokenCount": prompt, "candidatesTokenCount": out,
                "totalTokenCount": prompt + out, "thoughtsTokenCount": 0}

    def generate(self, model: str, body: dict, record: RequestRecord,
                 fault: _Scripted | None) -> tuple[int, Any]:
        """(status, JSON body or raw bytes) for an admitted generateContent request."""
        kind = fault.kind if fault else None
        p = fault.params if fault else {}
        if kind == "rate_limit_minute":
            return 429, _quota_429(model, p.get("quota_id", QUOTA_MINUTE), p.get("quota_value", 10),
                                   p.get("retry_delay", "7s"))
        if kind == "rate_limit_day":
            return 429, _quota_429(model, QUOTA_DAY, p.get("quota_value", 20),
                                   p.get("retry_delay", "43200s"))
        if kind == "rate_limit_tokens":
            return 429, _quota_429(model, QUOTA_TOKENS, p.get("quota_value", 250000),
                                   p.get("retry_delay", "30s"))
        if kind == "rate_limit_bare":
            return 429, _error(429, "RESOURCE_EXHAUSTED", p.get(
                "message", "Resource has been exhausted (e.g. check quota)."))
        if kind == "server_error":
            return 500, _error(500, "INTERNAL", p.get(
                "message", "An internal error has occurred. Please retry or report in "
                           "https://developers.generativeai.google/guide/troubleshooting"))
        if kind == "unavailable":
            return 503, _error(503, "UNAVAILABLE", p.get(
                "message", "The model is overloaded. Please try again later."))
        if kind == "bad_request":
            return 400, _error(400, "INVALID_ARGUMENT", p.get(
                "message", "Request contains an invalid argument."))
        if kind == "malformed_body":
            return 200, p.get("text", "<html><body>502 Bad Gateway</body></html>").encode()

        prompt = record.prompt_tokens
        envelope = {"modelVersion": model, "responseId": self._next_id()}
        if kind == "blocked":
            return 200, {"promptFeedback": {
                "blockReason": p.get("block_reason", "SAFETY"),
                "safetyRatings": [
                    {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"},
                    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
                    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
                    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH",
                     "blocked": True}]},
                "usageMetadata": {"promptTokenCount": prompt, "totalTokenCount": prompt},
                **envelope}
        if kind in ("safety", "recitation"):
            cand: dict[str, Any] = {"finishReason": kind.upper(), "index": 0}
            if kind == "safety":
                cand["safetyRatings"] = [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                                          "probability": "HIGH", "blocked": True}]
            else:
                cand["citationMetadata"] = {"citationSources": [
                    {"startIndex": 0, "endIndex": 120, "uri": "https://example.com/source"}]}
            return 200, {"candidates": [cand], "usageMetadata": self._usage(prompt, 0), **envelope}
        if kind == "empty":
            return 200, {"candidates": [{"content": {"role": "model"}, "finishReason": "STOP",
                                         "index": 0}],
                         "usageMetadata": self._usage(prompt, 0), **envelope}

        finish = "STOP"
        text = self.answer_text(body, record.phase, record.text, fault)
        if kind == "invalid_json":
            text = p.get("text", text[: max(1, len(text) * 3 // 5)])
        elif kind == "schema_mismatch":
            text = p.get("text", json.dumps({"unexpected": True}))
        elif kind == "max_tokens":
            finish = "MAX_TOKENS"
            limit = (body.get("generationConfig") or {}).get("maxOutputTokens")
            cut = min(len(text) // 2, limit * 4) if limit else len(text) // 2
            text = p.get("text", text[:max(1, cut)])
        out = _tokens(text)
        return 200, {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                     "finishReason": finish, "index": 0}],
                     "usageMetadata": self._usage(prompt, out), **envelope}


_PATH = re.compile(r"^/(?P<version>[^/]+)/models/(?P<model>[^/:]+)(?::(?P<method>\w+))?$")


def _make_handler(emu: Emulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "GeminiEmulator/1.0"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def setup(self) -> None:
            super().setup()
            with emu._lock:
                emu._conns.add(self.connection)

        def finish(self) -> None:
            try:
                super().finish()
            except OSError:
                pass
            with emu._lock:
                emu._conns.discard(self.connection)

        # ---------------------------------------------------------- plumbing

        def _send(self, record: RequestRecord, status: int, payload: Any) -> None:
            if isinstance(payload, (bytes, bytearray)):
                data, ctype = bytes(payload), "text/html; charset=UTF-8"
            else:
                data, ctype = json.dumps(payload).encode(), "application/json; charset=UTF-8"
            emu._finish(record, status)
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()
            except OSError:
                self.close_connection = True

        def _reset(self, record: RequestRecord) -> None:
            emu._finish(record, "reset")
            self.close_connection = True
            try:
                self.rfile.close()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.connection.close()
            except OSError:
                pass

        def _authorization(self) -> str | None:
            header = self.headers.get("Authorization")
            return header.split()[0] if header else None

        def _key(self) -> str | None:
            key = self.headers.get("x-goog-api-key")
            if key is None:
                key = (parse_qs(urlsplit(self.path).query).get("key") or [None])[0]
            return key

        def _check(self, record: RequestRecord, key: str | None, version: str | None,
                   model: str | None, method: str | None) -> bool:
            """Key, version and model checks; sends the error and returns False on failure."""
            if key is None or key == "":
                self._send(record, 403, _error(
                    403, "PERMISSION_DENIED",
                    "Method doesn't allow unregistered callers (callers without established "
                    "identity). Please use API Key or other form of API consumer identity to "
                    "call this API."))
                return False
            if key != emu.api_key:
                quoted = f" (got {key})" if emu.echo_key else ""  # as a careless proxy might
                self._send(record, 400, _error(
                    400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key." + quoted,
                    [{"@type": _TYPE + "ErrorInfo", "reason": "API_KEY_INVALID",
                      "domain": "googleapis.com",
                      "metadata": {"service": "generativelanguage.googleapis.com"}}]))
                return False
            if version not in API_VERSIONS or model is None:
                self._send(record, 404, _error(404, "NOT_FOUND",
                                               f"Requested entity was not found: {self.path}"))
                return False
            if model not in emu.models:
                what = f"or is not supported for {method}" if method else "or is not supported"
                self._send(record, 404, _error(
                    404, "NOT_FOUND", f"models/{model} is not found for API version {version}, "
                    f"{what}. Call ListModels to see the list of available models and their "
                    "supported methods."))
                return False
            return True

        def _route(self) -> tuple[str | None, str | None, str | None]:
            m = _PATH.match(urlsplit(self.path).path)
            if not m:
                return None, None, None
            return m.group("version"), m.group("model"), m.group("method")

        # ---------------------------------------------------------- verbs

        def do_GET(self) -> None:  # noqa: N802
            version, model, method = self._route()
            key = self._key()
            record = RequestRecord(time=emu.clock(), method="GET", path=urlsplit(self.path).path,
                                   model=model, phase=None, api_key_present=bool(key),
                                   authorization=self._authorization())
            emu._log(record)
            if emu._stopping.wait(emu._latency()):
                return self._reset(record)
            if not self._check(record, key, version, model, None):
                return
            if method is not None:
                return self._send(record, 404, _error(404, "NOT_FOUND", "Not found."))
            self._send(record, 200, emu.model_resource(model))

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            version, model, method = self._route()
            key = self._key()
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError:
                body = None
            gen = (body or {}).get("generationConfig") or {}
            schema = gen.get("responseJsonSchema") or gen.get("responseSchema")
            text = _request_text(body or {})
            record = RequestRecord(time=emu.clock(), method="POST", path=urlsplit(self.path).path,
                                   model=model, phase=phase_of(schema),
                                   api_key_present=bool(key), authorization=self._authorization(),
                                   prompt_tokens=_tokens(text),
                                   text=text)
            emu._log(record)
            if not self._check(record, key, version, model, method):
                return
            if body is None:
                return self._send(record, 400, _error(
                    400, "INVALID_ARGUMENT", "Invalid JSON payload received."))
            if method == "countTokens":
                return self._send(record, 200, {"totalTokens": record.prompt_tokens})
            if method != "generateContent":
                return self._send(record, 404, _error(404, "NOT_FOUND", f"Method {method} not found."))
            if not body.get("contents"):
                return self._send(record, 400, _error(
                    400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified"))
            # Quota is counted on arrival, as Gemini does; the latency is the model's work.
            refused = emu._admit(model, record.prompt_tokens)
            if refused is not None:
                record.fault = refused.pop("_kind")
                return self._send(record, 429, refused)
            if emu._stopping.wait(emu._latency()):
                return self._reset(record)
            fault = emu._take_fault(record.phase)
            if fault is not None:
                record.fault = fault.kind
            if fault is not None and fault.kind == "reset":
                return self._reset(record)
            if fault is not None and fault.kind == "timeout":
                if emu._stopping.wait(float(fault.params.get("delay", 30))):
                    return self._reset(record)
            status, payload = emu.generate(model, body, record, fault)
            self._send(record, status, payload)

    return Handler


# ------------------------------------------------------------------------ command line


def _print_record(record: RequestRecord) -> None:
    stamp = dt.datetime.fromtimestamp(record.time).strftime("%H:%M:%S")
    print(f"{stamp} {record.method} {record.path} model={record.model} phase={record.phase} "
          f"status={record.status} fault={record.fault} prompt_tokens={record.prompt_tokens}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.emulator",
                                 description="Local Gemini API emulator (127.0.0.1 only).")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--api-key", default="test-key")
    ap.add_argument("--latency", help="MIN,MAX seconds of uniform random latency")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fault", choices=FAULTS, action="append", default=[])
    ap.add_argument("--times", type=int, action="append", default=[])
    ap.add_argument("--phase", choices=("plan", "skill"))
    ap.add_argument("--rpm", type=int)
    ap.add_argument("--rpd", type=int)
    ap.add_argument("--tpm", type=int)
    args = ap.parse_args(argv)
    latency = None
    if args.latency:
        lo, _, hi = args.latency.partition(",")
        latency = (float(lo), float(hi or lo))
    emu = Emulator(api_key=args.api_key, port=args.port, latency=latency, seed=args.seed,
                   rpm=args.rpm, rpd=args.rpd, tpm=args.tpm, on_request=_print_record)
    for i, kind in enumerate(args.fault):
        times = args.times[i] if i < len(args.times) else (args.times[-1] if args.times else 1)
        emu.script(kind, times=times, phase=args.phase)
    with emu:
        print(f"Gemini emulator on {emu.url} (api key {args.api_key!r}); "
              f"set base_url={emu.url} api_version='v1beta'. Ctrl-C to stop.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
