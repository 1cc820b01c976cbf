"""Plugin names become Agent Skills names.

Invariant: every string `skill_name` returns is a valid Agent Skills `name` (lowercase ASCII
letters, digits and single hyphens, 1 to 64 characters, no leading or trailing hyphen), so it
is also safe as a single path component: the skill's directory name.
"""

from __future__ import annotations

import re

MAX_SKILL_NAME_LENGTH = 64

# Only these characters may appear in a plugin name we are willing to convert. Anything else
# (slashes, NUL, control characters, non-ASCII) is refused rather than silently dropped, so two
# different plugin names can never quietly map to one skill directory through stripping.
_ALLOWED = re.compile(r"[A-Za-z0-9 ._-]*")
_SEPARATORS = re.compile(r"[ ._-]+")


class InvalidName(ValueError):
    """A plugin name that cannot become a skill name; the message is one line."""


def skill_name(plugin_name: str) -> str:
    """Normalize a plugin name into an Agent Skills name (== the skill directory name).

    Lowercase; spaces, '_' and '.' become '-'; runs of '-' collapse; leading and trailing '-'
    are stripped. Raises InvalidName when the name is blank, holds any character other than
    ASCII letters, digits, space, '-', '_' or '.', or normalizes to nothing or to more than
    64 characters.
    """
    if not isinstance(plugin_name, str) or not plugin_name.strip():
        raise InvalidName("the name is empty")
    if not _ALLOWED.fullmatch(plugin_name):
        bad = next(c for c in plugin_name if not _ALLOWED.fullmatch(c))
        raise InvalidName(
            f"it contains {_describe(bad)}; only ASCII letters, digits, space, '-', '_' and '.'"
            " are allowed"
        )
    result = _SEPARATORS.sub("-", plugin_name.lower()).strip("-")
    if not result:
        raise InvalidName("it has no letters or digits")
    if len(result) > MAX_SKILL_NAME_LENGTH:
        raise InvalidName(
            f"it becomes {len(result)} characters long; the limit is {MAX_SKILL_NAME_LENGTH}"
        )
    return result


def _describe(char: str) -> str:
    if char.isprintable() and char.isascii():
        return f"the character {char!r}"
    return f"the character U+{ord(char):04X}"
