"""Keeping credentials out of everything overnight writes or says.

A server may quote a request's credentials back in an error (a proxy, a test server), and a
client library may quote them in its own messages, escaped its own way. `forms` lists every
form such a quote may take; `redact` replaces them all. Each message that can come from outside
is redacted before it is cut short or tidied, so no part of a credential survives either.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Iterable

MARK = "[redacted]"
_SHORTEST = 4  # shorter values (a URL's user name "a", say) would redact ordinary words


def forms(secrets: Iterable[str | None]) -> tuple[str, ...]:
    """Each secret as it is, JSON- or repr-escaped, with its white space collapsed, and
    URL-encoded; longest first, so that no form inside another is replaced first."""
    found = {form for secret in secrets if secret and len(secret) >= _SHORTEST
             for form in (secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
                          repr(secret)[1:-1], " ".join(secret.split()), urllib.parse.quote(secret, safe=""))}
    return tuple(sorted((form for form in found if form), key=len, reverse=True))


def redact(text: str, secret_forms: tuple[str, ...]) -> str:
    for form in secret_forms:
        text = text.replace(form, MARK)
    return text
