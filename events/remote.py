"""The narrow transport to a libSQL database: execute, atomic batch, close.

What must always hold:
- Every error that leaves this module is a `RemoteError` (an `EventStoreError`), and no
  message, repr or chained cause of it contains the auth token.
- Transient failures (a dropped connection or WebSocket, HTTP 5xx, a busy database) are
  retried a few times with exponential backoff; a TLS failure (an untrusted certificate) is
  not. Callers make every statement idempotent (`INSERT OR IGNORE`, reads), so retrying a
  batch the server may already have committed is safe.
- A batch is atomic, except that a batch the server refuses as too large (HTTP 413) is split
  in two and the halves are sent in order; callers order their statements so that every
  prefix of a batch is itself consistent (chunks before the index row that names them).

libsql-client is the only client today (its repository is archived); a second client can be
added behind `Remote` without touching replication or backup code.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from typing import Any, Protocol, Sequence

from events.errors import EventStoreError
from events.redact import forms, redact, url_shown

Params = Sequence[Any]
Statement = tuple[str, Params]
SCHEMES = ("file", "http", "https", "ws", "wss", "libsql")


class RemoteError(EventStoreError):
    """The remote database refused a request or could not be reached."""


class RemoteTooLarge(RemoteError):
    """The server refused a request body as too large (HTTP 413) even for one statement."""


class Remote(Protocol):
    def execute(self, sql: str, params: Params = ()) -> list[tuple]: ...

    def batch(self, statements: Sequence[Statement]) -> list[list[tuple]]: ...

    def close(self) -> None: ...


def display_url(url: str) -> str:
    """`url` without credentials, for logs, events and messages: no user info, and of the
    query only `tls` (libsql-client's one other parameter is `authToken`), which a recorded
    URL needs to reach the same server again."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    kept = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k == "tls"]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, urllib.parse.urlencode(kept), ""))


def absolute_url(url: str) -> str:
    """A `file:` URL with its path made absolute (from the current directory) and normal (no
    `..`), so that a URL recorded for later (`run --backup-to`, resumed elsewhere) names the
    same file, written one way; other URLs unchanged."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "file" or parts.netloc or not parts.path:
        return url
    # the path as written: libsql-client opens the URL's path as it stands, unquoted
    return urllib.parse.urlunsplit(("file", "", os.path.abspath(parts.path), parts.query, ""))


def file_path(url: str) -> str | None:
    """The local file a `file:` URL names (as libsql-client opens it), or None for another URL."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.unquote(parts.path) if parts.scheme == "file" else None


_STATUS = re.compile(r"HTTP status (\d{3})")


class _Failure(Exception):
    """A scrubbed failure with its classification; never leaves this module."""

    def __init__(self, message: str, transient: bool, too_large: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.too_large = too_large


class LibsqlRemote:
    """`Remote` over libsql-client's sync client (its own event-loop thread)."""

    def __init__(self, url: str, token: str | None, *, retries: int = 4, backoff: float = 0.25) -> None:
        self.url = display_url(url)
        self._secrets = forms([token])
        self.retries = retries
        self.backoff = backoff
        self.statements_sent = 0
        import libsql_client

        try:
            self._client = libsql_client.create_client_sync(url, auth_token=token)
        except Exception as e:
            raise RemoteError(f"{self.url}: cannot open: {self._scrub(str(e))}") from None

    def execute(self, sql: str, params: Params = ()) -> list[tuple]:
        result = self._retrying(lambda: self._client.execute(sql, list(params)))
        self.statements_sent += 1
        return [tuple(row[:]) for row in result]

    def batch(self, statements: Sequence[Statement]) -> list[list[tuple]]:
        """Run `statements` in one transaction; the rows of each, in order."""
        if not statements:
            return []
        import libsql_client

        stmts = [libsql_client.Statement(sql, list(params)) for sql, params in statements]
        try:
            results = self._retrying(lambda: self._client.batch(stmts))
        except RemoteTooLarge:
            if len(statements) == 1:
                raise
            half = len(statements) // 2
            return self.batch(statements[:half]) + self.batch(statements[half:])
        self.statements_sent += len(statements)
        return [[tuple(row[:]) for row in result] for result in results]

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:
            pass  # closing a client whose connection already failed: nothing left to release

    def _retrying(self, call: Any) -> Any:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return call()
            except Exception as e:  # classified below; anything unknown is not retried
                failure = self._classify(e)
            if failure.too_large:
                raise RemoteTooLarge(f"{self.url}: {failure}") from None
            if not failure.transient or attempt == self.retries:
                suffix = f" (after {attempt + 1} attempts)" if attempt else ""
                raise RemoteError(f"{self.url}: {failure}{suffix}") from None
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _classify(self, e: Exception) -> _Failure:
        import aiohttp
        import libsql_client

        message = self._scrub(f"{type(e).__name__}: {e}")
        if isinstance(e, libsql_client.LibsqlError):
            message = self._scrub(str(e))
            status = _STATUS.search(str(e))
            if status:
                code = int(status.group(1))
                return _Failure(message, transient=code >= 500 or code == 429, too_large=code == 413)
            # HRANA_WEBSOCKET_ERROR: the WebSocket closed or broke; the client reconnects.
            return _Failure(message, transient=e.code in ("SQLITE_BUSY", "SQLITE_LOCKED", "HRANA_WEBSOCKET_ERROR"),
                            too_large="too large" in message.lower())
        if isinstance(e, aiohttp.ClientSSLError):  # an untrusted certificate does not heal by retrying
            return _Failure(f"{message} (a server whose certificate comes from a private CA needs "
                            "SSL_CERT_FILE set to that CA's PEM file)", transient=False)
        if isinstance(e, (aiohttp.ClientError, TimeoutError, ConnectionError)):
            return _Failure(message, transient=True)
        return _Failure(message, transient=False)

    def _scrub(self, text: str) -> str:
        return redact(text, self._secrets)


def check_url(url: str) -> None:
    """RemoteError unless `url` has a scheme a backup can use (checked before a run starts)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # a host in brackets that is no IPv6 address (what it holds may be credentials)
        raise RemoteError("the backup URL cannot be read as a URL (a host in [brackets] is an IPv6 address)") from None
    if parts.scheme not in SCHEMES:
        raise RemoteError(f"{url_shown(url) or 'the backup URL'}: unsupported scheme "
                          f"{parts.scheme!r} (use one of {', '.join(SCHEMES)})")
    if parts.scheme == "file":
        if not parts.path:
            raise RemoteError("file: names no file (file:PATH)")
        return
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = 0
    if port == 0:
        raise RemoteError(f"{url_shown(url)}: its port is not a number from 1 to 65535")
    if not parts.hostname:  # (what it holds instead may be credentials: not repeated)
        raise RemoteError(f"the {parts.scheme}: backup URL names no host ({parts.scheme}://HOST)")
    if "@" in parts.netloc or "authtoken" in url.lower():  # a query's, a `;` parameter's, a fragment's
        # libsql-client refuses user info with its own words about headers
        raise RemoteError(f"{url_shown(url)}: credentials in the URL are not used; give the token in "
                          "TURSO_AUTH_TOKEN")


def open_remote(url: str, token: str | None = None, *, must_exist: bool = False, **options: Any) -> Remote:
    """A `Remote` for `url` (file:, http(s)://, ws(s)://, libsql://); `token` is never stored.

    `must_exist`: for reading a backup, a `file:` URL naming no file is an error (SQLite would
    create an empty database there).
    """
    check_url(url)
    path = file_path(url)
    if must_exist and path is not None and not os.path.isfile(path):
        raise RemoteError(f"{display_url(url)}: no backup there (the file does not exist)")
    return LibsqlRemote(url, token, **options)
