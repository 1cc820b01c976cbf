"""The Gemini gateway: the only module that imports google.genai.

It turns one structured-output request into either a decoded answer with its token usage,
or a classified `GatewayError`, so the runner can decide what happens next without knowing
the SDK: wait and retry (rate limits, transient faults, unusable answers), fail the plugin
(a request Gemini refuses for this plugin), or stop the run (the key or model is wrong).
The SDK's own retries are off; the runner retries, and records every attempt.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import urllib.parse
import warnings
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx2
import msgspec
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from events.redact import forms, redact
from events.remote import display_url
from statemachine.catalog import Usage
from statemachine.errors import OvernightError

T = TypeVar("T")

DEFAULT_MODEL = "gemini-2.5-flash"
API_VERSION = "v1beta"


class GatewayError(OvernightError):
    """A Gemini call that produced no usable answer. `kind` is recorded in RequestFailed."""

    kind = "error"

    def __init__(self, message: str, *, status_code: int | None = None, usage: Usage | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.usage = usage
        if kind is not None:
            self.kind = kind


class RateLimited(GatewayError):
    """HTTP 429. `scope` is minute, day, tokens or unknown (no QuotaFailure)."""

    def __init__(self, message: str, *, scope: str, retry_after: float | None, quota_id: str | None,
                 quota_value: int | None) -> None:
        kind = "rate_limited" if scope == "unknown" else f"rate_limited_{scope}"
        super().__init__(message, status_code=429, kind=kind)
        self.scope = scope
        self.retry_after = retry_after
        self.quota_id = quota_id
        self.quota_value = quota_value


class Transient(GatewayError):
    """A fault worth retrying after a backoff: 5xx, timeout, connection reset."""


class Unusable(GatewayError):
    """An answer arrived (and may have cost tokens) but cannot be used: blocked prompt,
    truncated or filtered answer, empty text, JSON that does not fit the schema."""


class Refused(GatewayError):
    """Gemini refuses this request for good (400/404 for this plugin's request)."""


class AccessDenied(GatewayError):
    """The key, project or model is wrong: no plugin can succeed, so the run stops."""


@dataclass(frozen=True)
class GeminiSettings:
    model: str = DEFAULT_MODEL
    base_url: str | None = None
    timeout_s: float = 120.0
    max_output_tokens: int = 16384
    temperature: float = 0.4

    def public(self) -> dict[str, Any]:
        """The settings as recorded in the log: no secret (credentials in a URL are removed)."""
        base_url = display_url(self.base_url) if self.base_url else None
        return {"model": self.model, "base_url": base_url, "api_version": API_VERSION,
                "timeout_s": self.timeout_s, "max_output_tokens": self.max_output_tokens,
                "temperature": self.temperature}


@dataclass(frozen=True)
class Backend:
    """Which API the key or credentials are for; `describe()` is safe to print and record."""

    vertex: bool
    api_key: str | None = None
    project: str | None = None
    location: str | None = None

    def describe(self) -> dict[str, Any]:
        if self.vertex:
            return {"backend": "vertex", "project": self.project, "location": self.location}
        return {"backend": "gemini-developer-api"}


def backend_from_env(env: dict[str, str] | os._Environ = os.environ) -> Backend:
    """GOOGLE_GENAI_USE_VERTEXAI selects Vertex AI; otherwise GOOGLE_API_KEY wins over GEMINI_API_KEY."""
    if env.get("GOOGLE_GENAI_USE_VERTEXAI", "").strip().lower() in ("1", "true", "yes"):
        project, location = env.get("GOOGLE_CLOUD_PROJECT"), env.get("GOOGLE_CLOUD_LOCATION")
        if not project or not location:
            raise AccessDenied("GOOGLE_GENAI_USE_VERTEXAI is set but GOOGLE_CLOUD_PROJECT and "
                               "GOOGLE_CLOUD_LOCATION are not both set")
        return Backend(vertex=True, project=project, location=location)
    name = "GOOGLE_API_KEY" if (env.get("GOOGLE_API_KEY") or "").strip() else "GEMINI_API_KEY"
    key = (env.get(name) or "").strip()  # a key file's line break, a pasted space
    if not key:
        raise AccessDenied("no Gemini API key: set GOOGLE_API_KEY or GEMINI_API_KEY "
                           "(or GOOGLE_GENAI_USE_VERTEXAI with GOOGLE_CLOUD_PROJECT and GOOGLE_CLOUD_LOCATION)")
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        # the HTTP client would refuse it with the key itself in its message
        raise AccessDenied(f"{name} holds a space, a line break or another character no API key has; set it to "
                           "the key alone")
    return Backend(vertex=False, api_key=key)


_CREDENTIAL_PARAMETER = re.compile(r"key|token|auth|secret|pass|sig", re.IGNORECASE)
_ANSWER_CHECK_FROM = 12  # characters: an API key has 39


def credentials(api_key: str | None, base_url: str | None) -> list[str]:
    """Every credential a request carries: the API key; the base URL's password, the Basic
    authorization header its user and password become, and the values of its query parameters
    named like a credential (`?key=`, `?token=`), each as written and as decoded."""
    found = [api_key or ""]
    if base_url:
        parts = urllib.parse.urlsplit(base_url)
        user, password = urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or "")
        found += [password, parts.netloc.rpartition("@")[0].partition(":")[2]]
        for pair in parts.query.split("&"):
            name, _, raw = pair.partition("=")
            if _CREDENTIAL_PARAMETER.search(name):
                found += [raw, urllib.parse.unquote(raw), urllib.parse.unquote_plus(raw)]
        if user or password:
            found.append(base64.b64encode(f"{user}:{password}".encode()).decode())
    return [secret for secret in found if secret]


@dataclass(frozen=True)
class Answer:
    value: Any
    usage: Usage


class _BothKeysNotice(logging.Filter):
    """google-genai warns on stderr, at every client, that both GOOGLE_API_KEY and
    GEMINI_API_KEY are set: overnight takes GOOGLE_API_KEY (documented), and a cron job's mail
    or a script reading stderr gets nothing from the notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Both GOOGLE_API_KEY and GEMINI_API_KEY are set")


logging.getLogger("google_genai._api_client").addFilter(_BothKeysNotice())
# The SDK warns of an answer's values it does not know (`X is not a valid FinishReason`), quoting
# them: a server's words on the run's stderr, where nothing unredacted goes. check_answer judges
# the answer itself.
warnings.filterwarnings("ignore", category=UserWarning, module=r"google\.genai\.")


class Gateway:
    """One google-genai client (kept alive: it closes when garbage-collected)."""

    def __init__(self, settings: GeminiSettings, backend: Backend) -> None:
        self.settings = settings
        carried = credentials(backend.api_key, settings.base_url)
        self._secrets = forms(carried)  # redacted from whatever the endpoint says
        # an answer quoting one is not used; a short one could be an ordinary word (a test key "test")
        self._answer_forms = forms(secret for secret in carried if len(secret) >= _ANSWER_CHECK_FROM)
        http = types.HttpOptions(
            api_version=API_VERSION,
            timeout=int(settings.timeout_s * 1000),  # milliseconds
            retry_options=types.HttpRetryOptions(attempts=1),  # no SDK retries: ours are recorded
            base_url=settings.base_url,
            # a redirect would take the key (its x-goog-api-key header) to whatever host it names
            client_args={"follow_redirects": False},
        )
        if backend.vertex:
            self.client = genai.Client(vertexai=True, project=backend.project, location=backend.location,
                                       http_options=http)
        else:
            self.client = genai.Client(vertexai=False, api_key=backend.api_key, http_options=http)

    def check_access(self) -> None:
        """Fail fast, before any plugin is touched, when the key or the model is wrong."""
        try:
            self.client.models.get(model=self.settings.model)
        except genai_errors.APIError as e:
            error = classify_api_error(e, self._secrets)
            if isinstance(error, (AccessDenied, Refused)):
                raise AccessDenied(f"Gemini refused the model check for {self.settings.model!r}: "
                                   f"{error}") from None
            raise error from None
        except Exception as e:  # noqa: BLE001 - transport errors: translated in one place
            raise classify_transport_error(e, self._secrets) from None

    def generate(self, system: str, prompt: str, schema: type[T]) -> Answer:
        """Ask for JSON fitting `schema` (a msgspec Struct) and decode it; GatewayError otherwise."""
        config = types.GenerateContentConfig(
            system_instruction=system,
            response_mime_type="application/json",
            response_json_schema=msgspec.json.schema(schema),
            max_output_tokens=self.settings.max_output_tokens,
            temperature=self.settings.temperature,
        )
        try:
            response = self.client.models.generate_content(model=self.settings.model, contents=prompt,
                                                           config=config)
        except genai_errors.APIError as e:
            raise classify_api_error(e, self._secrets) from None
        except Exception as e:  # noqa: BLE001 - transport and decoding errors of the SDK
            raise classify_transport_error(e, self._secrets) from None
        return check_answer(response, schema, self._answer_forms)


def _usage(response: Any) -> Usage:
    meta = getattr(response, "usage_metadata", None)
    if meta is None:
        return Usage()
    return Usage(input_tokens=meta.prompt_token_count or 0,
                 cached_tokens=meta.cached_content_token_count or 0,
                 output_tokens=meta.candidates_token_count or 0,
                 thoughts_tokens=meta.thoughts_token_count or 0)


def check_answer(response: Any, schema: type[T], secrets: tuple[str, ...] = ()) -> Answer:
    """A 200 answer is not yet a usable one: blocked prompts, truncated or filtered answers,
    empty text, text that quotes a credential of the request (`secrets`: their forms; it would be
    written into the marketplace), also JSON-escaped, and JSON that does not fit the schema all
    raise Unusable (with the usage)."""
    usage = _usage(response)
    feedback = getattr(response, "prompt_feedback", None)
    if feedback is not None and feedback.block_reason:
        raise Unusable(f"prompt blocked by Gemini ({_name(feedback.block_reason)})", usage=usage,
                       kind="blocked")
    candidates = response.candidates or []
    if not candidates:
        raise Unusable("answer has no candidates", usage=usage, kind="empty")
    finish = _name(candidates[0].finish_reason) if candidates[0].finish_reason else "STOP"
    if finish == "MAX_TOKENS":
        raise Unusable("answer truncated at the output token limit (MAX_TOKENS)", usage=usage,
                       kind="truncated")
    if finish in ("SAFETY", "RECITATION", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII"):
        raise Unusable(f"answer withheld by Gemini ({finish})", usage=usage, kind=finish.lower())
    content = candidates[0].content
    text = "".join(p.text or "" for p in (content.parts or []) if not getattr(p, "thought", False)) \
        if content is not None else ""
    if not text.strip():
        raise Unusable(f"answer is empty (finish reason {finish})", usage=usage, kind="empty")
    if secrets:
        try:  # as decoded too: `\u0041...` in the JSON is the credential all the same
            decoded = msgspec.json.encode(msgspec.json.decode(text)).decode("utf-8")
        except (msgspec.DecodeError, UnicodeEncodeError):
            decoded = ""
        if redact(text, secrets) != text or redact(decoded, secrets) != decoded:
            raise Unusable("answer quotes a credential the request carried (a proxy echoing requests?); not used",
                           usage=usage, kind="invalid_answer")
    try:
        value = msgspec.json.decode(text, type=schema)
    except msgspec.ValidationError as e:
        raise Unusable(f"answer does not fit the schema: {e}", usage=usage, kind="invalid_answer") from None
    except msgspec.DecodeError as e:
        raise Unusable(f"answer is not valid JSON: {e}", usage=usage, kind="invalid_answer") from None
    except UnicodeEncodeError:  # the response's JSON escaped half a surrogate pair: no UTF-8 holds it
        raise Unusable("answer holds an unpaired surrogate, which is no Unicode text", usage=usage,
                       kind="invalid_answer") from None
    return Answer(value=value, usage=usage)


def _name(value: Any) -> str:
    return getattr(value, "name", None) or str(value)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
_SCOPES = (("PerDay", "day"), ("PerMinute", "minute"))


def _quota_details(details: Any) -> tuple[str | None, int | None, float | None]:
    """(quotaId, quotaValue, retry delay in seconds) from a 429's google.rpc details."""
    quota_id = quota_value = retry = None
    error = details.get("error", details) if isinstance(details, dict) else {}
    for item in error.get("details", []) if isinstance(error, dict) else []:
        if not isinstance(item, dict):
            continue
        kind = str(item.get("@type", ""))
        if kind.endswith("google.rpc.QuotaFailure"):
            for violation in item.get("violations") or []:
                if isinstance(violation, dict) and violation.get("quotaId"):
                    quota_id = str(violation["quotaId"])
                    try:
                        quota_value = int(violation.get("quotaValue"))
                    except (TypeError, ValueError):
                        quota_value = None
                    break
        elif kind.endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(item.get("retryDelay", "")))
            if match:
                retry = float(match.group(1))
    return quota_id, quota_value, retry


def classify_api_error(e: genai_errors.APIError, secrets: tuple[str, ...] = ()) -> GatewayError:
    """`secrets`: the forms of `credentials`, redacted from what the error says before it is cut or tidied."""
    code = e.code or 0
    status = redact(str(e.status or ""), secrets)
    message = f"HTTP {code} {status}: {' '.join(redact(str(e.message or ''), secrets).split())}"[:500]
    if code == 429:
        quota_id, quota_value, retry = _quota_details(e.details)
        quota_id = redact(quota_id, secrets) if quota_id else None
        scope = "unknown"
        if quota_id:
            if "Token" in quota_id:
                scope = "tokens_day" if "PerDay" in quota_id else "tokens"
            else:
                scope = next((s for marker, s in _SCOPES if marker in quota_id), "unknown")
        return RateLimited(message, scope=scope, retry_after=retry, quota_id=quota_id,
                           quota_value=quota_value)
    if code >= 500:
        return Transient(message, status_code=code, kind="server")
    text = f"{e.message} {e.details}".upper()
    if code in (401, 403) or "API_KEY_INVALID" in text or "API KEY NOT VALID" in text:
        return AccessDenied(message, status_code=code)
    if code == 404 and "MODEL" in text:
        return AccessDenied(message, status_code=code)
    return Refused(message, status_code=code, kind="refused")


def _host(e: Exception) -> str:
    """The server a transport error concerns (scheme, host and port only), as far as known."""
    try:
        url = e.request.url  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError when no request is attached
        return "the Gemini endpoint"
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"


def classify_transport_error(e: Exception, secrets: tuple[str, ...] = ()) -> GatewayError:
    said = redact(str(e), secrets)
    if isinstance(e, httpx2.TimeoutException):
        return Transient(f"no answer within the timeout ({type(e).__name__})", kind="timeout")
    if isinstance(e, (httpx2.TransportError, ConnectionError)):
        return Transient(f"connection to {_host(e)} failed ({type(e).__name__}: {said})"[:300], kind="connection")
    if isinstance(e, ValueError):  # the SDK could not parse the HTTP body
        return Unusable(f"malformed answer ({type(e).__name__}: {said})"[:300], kind="invalid_answer")
    return Transient(f"{type(e).__name__}: {said}"[:300], kind="connection")
