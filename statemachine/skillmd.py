"""Composing SKILL.md from the model's fields.

Invariant: the frontmatter of every text `compose` returns is written here, from the given
name, the draft's description and allowed tools, and the license, never copied from the
model's body; and skills_ref.parser.parse_frontmatter reads each value back exactly as given
(after whitespace is collapsed to single spaces), whatever characters it holds.
"""

from __future__ import annotations

import re

from statemachine.catalog import SkillDraft

# Values matching this are written as YAML plain scalars, for readability; everything else is
# double-quoted. Deliberately narrow: a value that would be fine plain but does not match is
# merely quoted, never misread.
_PLAIN = re.compile(r"[A-Za-z0-9(][A-Za-z0-9 .,;()'/+_=?!*-]*")

# skills_ref finds the end of the frontmatter with content.split("---", 2): the first "---"
# anywhere after the opening one closes it, even inside a quoted value. So a value may never
# contain three hyphens in a row as written; in double quotes a hyphen can be spelled \x2d.
_HYPHEN_AFTER_HYPHEN = re.compile(r"(?<=-)-")

# A comma outside parentheses separates two tools ("Write, Edit"); one inside belongs to a
# tool's pattern ("Bash(git add:*, git rm:*)").
_TOOL_SEPARATOR = re.compile(r",(?![^(]*\))")

_ESCAPES = {"\\": "\\\\", '"': '\\"'}

_FRONTMATTER_OPEN = re.compile(r"---[ \t]*\r?\n")
_FRONTMATTER_CLOSE = re.compile(r"^(?:---|\.\.\.)[ \t]*$", re.MULTILINE)


def compose(name: str, draft: SkillDraft, *, license: str | None = None) -> str:
    """The full SKILL.md text: YAML frontmatter composed in code from the fields, then the body.

    Frontmatter fields, in order: name, description, allowed-tools (the tools joined by single
    spaces, as the Agent Skills spec has it, an entry listing several split at its commas;
    omitted when there are none), license (omitted when
    None or blank). Whitespace inside every value collapses to single spaces. Any frontmatter
    the model put at the top of the body is dropped. The body is stripped and the file ends
    with exactly one newline.
    """
    fields = [("name", _one_line(name)), ("description", _one_line(draft.description))]
    tools = _unique(_one_line(tool) for entry in draft.allowed_tools for tool in _TOOL_SEPARATOR.split(entry))
    if tools:
        fields.append(("allowed-tools", " ".join(tools)))
    if license is not None and _one_line(license):
        fields.append(("license", _one_line(license)))
    frontmatter = "\n".join(f"{key}: {_yaml_scalar(value)}" for key, value in fields)
    body = _strip_frontmatter(draft.body)
    text = f"---\n{frontmatter}\n---\n"
    return f"{text}\n{body}\n" if body else text


def tidy(content: str) -> str:
    """A bundled text file as written: no byte order mark, LF line endings (a CRLF script's
    shebang line names an interpreter 'bash\r'), ending with one newline unless it is empty."""
    text = content.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return text.rstrip("\n") + "\n" if text.strip("\n") else ""


def _one_line(value: str) -> str:
    return " ".join(value.split())


def _unique(values) -> list[str]:
    seen: dict[str, None] = {}
    for value in values:
        if value:
            seen.setdefault(value, None)
    return list(seen)


def _yaml_scalar(value: str) -> str:
    if _PLAIN.fullmatch(value) and "---" not in value:
        return value
    out = []
    for char in value:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char.isprintable() and char != "\ufeff":
            out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + _HYPHEN_AFTER_HYPHEN.sub(r"\\x2d", "".join(out)) + '"'


def _strip_frontmatter(body: str) -> str:
    """The body without leading frontmatter blocks (the model's, which must never be copied).

    A leading '---' line counts as frontmatter only when a later '---' or '...' line closes it;
    otherwise it is a thematic break and stays.
    """
    body = body.strip().lstrip("\ufeff").strip()
    while opened := _FRONTMATTER_OPEN.match(body):
        closed = _FRONTMATTER_CLOSE.search(body, opened.end())
        if closed is None:
            break
        body = body[closed.end():].strip()
    return body
