"""Keeping credentials out of everything overnight writes or says.

A server may quote a request's credentials back in an error (a proxy, a test server), and a
client library may quote them in its own messages, escaped its own way. `forms` lists every
form such a quote may take; `redact` replaces them all. Each message that can come from outside
is redacted before it is cut short or tidied, so no part of a credential survives either.
`url_shown` is a URL as a message may show it, whatever it holds.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Iterable

MARK = "[redacted]"
_SHORTEST = 4  # shorter values would redact ordinary words
# A secret this long (an API key: 39 characters) is also redacted piece by piece: a server may
# quote only its first characters (an HTTP reason phrase cut short), and any 12 of them in a row
# are too many to show.
_PIECES_FROM = 16
_PIECE = 12


def forms(secrets: Iterable[str | None]) -> tuple[str, ...]:
    """Each secret as it is; JSON-, repr- and JSON-then-repr-escaped; with its white space
    collapsed; URL-encoded (upper- and lower-case escapes); and, for a long one, each run of 12
    of its characters. Longest first, so that no form inside another is replaced first."""
    found: set[str] = set()
    for secret in secrets:
        if not secret or len(secret) < _SHORTEST:
            continue
        escaped = json.dumps(secret)[1:-1]
        quoted = urllib.parse.quote(secret, safe="")
        found.update((secret, escaped, json.dumps(secret, ensure_ascii=False)[1:-1], repr(secret)[1:-1],
                      repr(escaped)[1:-1], json.dumps(escaped)[1:-1], " ".join(secret.split()), quoted,
                      re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), quoted)))
        if len(secret) >= _PIECES_FROM:
            found.update(secret[i:i + _PIECE] for i in range(len(secret) - _PIECE + 1))
    return tuple(sorted((form for form in found if form), key=len, reverse=True))


def redact(text: str, secret_forms: tuple[str, ...]) -> str:
    for form in secret_forms:
        text = text.replace(form, MARK)
    return text


def url_shown(url: str) -> str:
    """`url` for a message: its scheme and host (and its path, when it holds no user info), never
    a user, password, query, parameter or fragment, however malformed the URL is."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:  # user info, perhaps with a '#' or '?' in its password: the host is after the last '@'
        rest = rest.rpartition("@")[2].split("/")[0]
    return scheme + sep + re.split(r"[?#;]", rest)[0]
