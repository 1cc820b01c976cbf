"""The validation gates a composed SKILL.md must pass before it is written. No model involved.

Invariants: `check` returns [] only when every gate passes; otherwise one line per failing
gate (the spec gate forwards each line of the reference validator), ordered by gate number,
each starting with the gate's name, short enough to go back to the model as feedback. It
never raises, whatever the text holds, and it reads nothing from disk: what already exists in
the skill directory comes in as `existing`.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from skills_ref.errors import ParseError
from skills_ref.parser import parse_frontmatter
from skills_ref.validator import validate_metadata

from statemachine.catalog import DraftFile
from statemachine.skillmd import tidy

BUNDLE_DIRS = ("scripts", "references", "assets")

# How many offending items one reason lists before it says "and N more".
_SHOWN = 5
# strictyaml takes time quadratic in the number of YAML nodes (4,000 list items: 35 s), and a
# composed frontmatter is a handful of lines, so longer blocks are refused unread.
_MAX_FRONTMATTER_CHARS = 16_000
_MAX_FRONTMATTER_LINES = 100
# A bundled file's path within the skill directory, in UTF-8 bytes: each name leaves room for
# the temporary name a write (or a restore) makes beside it, `.<name>.overnight-tmp-<16 hex>`,
# 32 bytes more within a file system's 255; and the whole stays far below any path limit.
_MAX_PATH_BYTES = 200
# A bundled file's size: a reference or a script, not a data dump (a SKILL.md is 14,000 at most).
MAX_BUNDLED_BYTES = 100_000
# Names Windows keeps for devices, with any extension ("nul.txt"): such a file cannot be checked out there.
_WINDOWS_DEVICES = frozenset({"con", "prn", "aux", "nul", *(f"com{n}" for n in range(1, 10)),
                              *(f"lpt{n}" for n in range(1, 10))})
# A reason is one line: quoted values are cut (_show), and so is what a library says.
_MAX_REASON_CHARS = 1000
# The license a SKILL.md states (skillmd.compose) is a license's name or a license file's name on
# one line, bounded like the spec's other one-line fields (a description: 1,024 characters). A
# license's whole text would keep every generated SKILL.md from passing the gates.
MAX_LICENSE_CHARS = 1024
_NOT_ON_WINDOWS = frozenset('<>:"|?*')


@dataclass(frozen=True)
class GateConfig:
    min_bytes: int = 8000
    max_bytes: int = 14000
    sections: tuple[str, ...] = (
        "Overview", "Prerequisites", "Instructions", "Output", "Error Handling", "Examples",
        "Resources",
    )
    max_second_person: int = 2
    min_code_blocks: int = 2
    max_description: int = 1024


def license_problem(license: str | None) -> str | None:
    """Why no SKILL.md stating this license could ever pass the gates, or None."""
    stated = " ".join(license.split()) if license else ""
    if len(stated) <= MAX_LICENSE_CHARS:
        return None
    return (f"its license is {len(stated):,} characters long (from plugin.json, its marketplace entry or the "
            "SKILL.md it replaces): the SKILL.md states it in its frontmatter, which takes a license's name or "
            f"a license file's name, at most {MAX_LICENSE_CHARS:,} characters; correct it, and the next run takes "
            "the plugin up again")


def check(
    name: str,
    skill_md: str,
    files: list[DraftFile],
    existing: set[str],
    config: GateConfig = GateConfig(),
    directories: set[str] = frozenset(),
) -> list[str]:
    """Every reason the composed SKILL.md (plus the bundled files it would create) fails.

    name: the skill directory name. existing: the files (paths relative to the skill directory,
    posix) already on disk there; directories: the directories there. Gates, in order: encoding
    (+ the bundled files'), spec (+ description), size, sections, voice, fences, examples,
    links, absolute paths, containment.
    """
    doc = _Document(skill_md)
    reasons: list[str] = []
    reasons += _encoding(doc)
    reasons += _bundled_content(files)
    reasons += _spec(name, skill_md, config)
    reasons += _size(skill_md, config)
    reasons += _sections(doc, config)
    reasons += _voice(doc, config)
    reasons += _fences(doc)
    reasons += _examples(doc, config)
    links = [_Link(line, target) for line, target in doc.link_targets()]
    bundled = [f.path for f in files]
    reasons += _links(links, bundled, existing)
    reasons += _absolute_paths(doc, links)
    reasons += _containment(bundled, links, existing, directories)
    return [r if len(r) <= _MAX_REASON_CHARS else r[:_MAX_REASON_CHARS - 3] + "..." for r in reasons]


# ------------------------------------------------------------------ the document


_FENCE = re.compile(r"[ \t]*(`{3,}|~{3,})(.*)")
_HEADING = re.compile(r" {0,3}##[ \t]+(.*)")
_BACKTICKS = re.compile(r"`+")
_INLINE_TARGET = re.compile(r"\]\([ \t]*(<[^<>\n]*>|[^\s)]*)")
_REFERENCE_DEFINITION = re.compile(r" {0,3}\[[^\]\n]+\]:[ \t]*(<[^<>\n]*>|\S+)")


@dataclass
class _Block:
    line: int
    fence: str
    has_content: bool = False
    closed: bool = False


class _Document:
    """The lines of the text split into prose (outside fenced code) and fenced blocks.

    Fences follow CommonMark (three or more backticks or tildes; a block closes only with the
    same character at least as long, with nothing after it; a backtick opener's info string
    holds no backtick), except that any indentation is accepted, because generated bodies
    often indent fences inside list items.
    """

    def __init__(self, text: str):
        self.lines = [line.rstrip("\r") for line in text.split("\n")]
        prose: list[tuple[int, str]] = []
        self.blocks: list[_Block] = []
        block: _Block | None = None
        for number, line in enumerate(self.lines, start=1):
            fence = _FENCE.fullmatch(line)
            if block is not None:
                if fence and _closes(fence, block.fence):
                    block.closed = True
                    block = None
                elif line.strip():
                    block.has_content = True
            elif fence and not (fence.group(1)[0] == "`" and "`" in fence.group(2)):
                block = _Block(number, fence.group(1))
                self.blocks.append(block)
            else:
                prose.append((number, line))
        self.prose = prose
        self.prose_without_code = [(number, _drop_code_spans(line)) for number, line in prose]

    def headings(self) -> list[str]:
        """Level-2 ATX heading texts outside code, without an optional closing run of '#'."""
        titles = []
        for _, line in self.prose:
            if m := _HEADING.match(line):
                title = m.group(1).rstrip(" \t")
                unhashed = title.rstrip("#")
                if unhashed != title and (not unhashed or unhashed[-1] in " \t"):
                    title = unhashed.rstrip(" \t")
                titles.append(title)
        return titles

    def link_targets(self) -> list[tuple[int, str]]:
        """(line, target) of inline links and images and of reference definitions."""
        targets = []
        for number, line in self.prose_without_code:
            if "](" in line:
                targets += [(number, m.group(1)) for m in _INLINE_TARGET.finditer(line)]
            if definition := _REFERENCE_DEFINITION.match(line):
                targets.append((number, definition.group(1)))
        return [(number, target.removeprefix("<").removesuffix(">")) for number, target in targets]


def _closes(fence: re.Match, opener: str) -> bool:
    run = fence.group(1)
    return run[0] == opener[0] and len(run) >= len(opener) and not fence.group(2).strip()


def _drop_code_spans(line: str) -> str:
    """The line without `code spans`: a run of backticks pairs with the next run of equal length."""
    if "`" not in line:
        return line
    runs = [(m.start(), m.end()) for m in _BACKTICKS.finditer(line)]
    by_length: dict[int, list[int]] = {}
    for index, (start, end) in enumerate(runs):
        by_length.setdefault(end - start, []).append(index)
    kept, position, index = [], 0, 0
    while index < len(runs):
        start, end = runs[index]
        same = by_length[end - start]
        following = bisect_right(same, index)
        if following == len(same):
            index += 1
            continue
        closer = same[following]
        kept.append(line[position:start])
        position = runs[closer][1]
        index = closer + 1
    kept.append(line[position:])
    return " ".join(kept)


# ------------------------------------------------------------------ the gates


def _encoding(doc: _Document) -> list[str]:
    """Text that cannot be written as UTF-8, or holds control characters, is refused first."""
    bad = [
        (number, char)
        for number, line in enumerate(doc.lines, start=1)
        for char in _control_chars(line)
    ]
    if not bad:
        return []
    shown = ", ".join(f"U+{ord(char):04X} on line {number}" for number, char in bad[:_SHOWN])
    return [f"encoding: {len(bad)} control or unpaired surrogate characters ({shown}{_more(bad)})"]


def _control_chars(line: str) -> list[str]:
    if line.isprintable():
        return []
    return [c for c in line if c != "\t" and unicodedata.category(c) in ("Cc", "Cs")]


def _bundled_content(files: list[DraftFile]) -> list[str]:
    """Each bundled file, as it is written (skillmd.tidy), is text a person can read, as the
    SKILL.md is, and of a bounded size."""
    problems = []
    for f in files:
        text = tidy(f.content)
        size = len(text.encode("utf-8", "surrogatepass"))
        bad = [char for line in text.split("\n") for char in _control_chars(line)]
        if size > MAX_BUNDLED_BYTES:
            problems.append(f"bundled file {_show(f.path)} is {size:,} bytes, above the maximum of "
                            f"{MAX_BUNDLED_BYTES:,}")
        elif bad:
            problems.append(f"bundled file {_show(f.path)} holds {len(bad)} control or unpaired surrogate "
                            f"characters (first U+{ord(bad[0]):04X})")
    if not problems:
        return []
    return [f"encoding: {'; '.join(problems[:_SHOWN])}{_more(problems)}"]


def _spec(name: str, text: str, config: GateConfig) -> list[str]:
    """The reference validator on the frontmatter, with the directory-name check."""
    end = max(text.find("---", 3), 0) if text.startswith("---") else 0
    if end > _MAX_FRONTMATTER_CHARS or text.count("\n", 0, end) - 1 > _MAX_FRONTMATTER_LINES:
        return [
            f"spec: the frontmatter is longer than {_MAX_FRONTMATTER_LINES} lines or "
            f"{_MAX_FRONTMATTER_CHARS:,} characters"
        ]
    # skills_ref is third-party and built on strictyaml: whatever it raises on hostile text
    # (RecursionError on deeply nested YAML, for one) is a failed gate, not a crash of the run.
    try:
        metadata, _ = parse_frontmatter(text)
        problems = validate_metadata(metadata, Path(name))
    except ParseError as e:
        return [f"spec: {_one_line(str(e))}"]
    except Exception as e:  # noqa: BLE001
        return [f"spec: the frontmatter cannot be parsed ({type(e).__name__})"]
    reasons = [f"spec: {_one_line(problem)}" for problem in problems]
    for key, value in metadata.items():  # escaped in the YAML, so the text's own encoding gate passed them
        if isinstance(value, str) and (bad := _control_chars(value)):
            reasons.append(f"encoding: the {key} holds {len(bad)} control characters (first U+{ord(bad[0]):04X})")
    description = metadata.get("description")
    already_said = any("description" in problem.lower() for problem in problems)
    # The validator already refuses an empty description and one over its own 1,024 limit.
    too_long = isinstance(description, str) and len(description) > config.max_description
    if too_long and not already_said:
        reasons.append(
            f"description: {len(description):,} characters, above the maximum of "
            f"{config.max_description:,}"
        )
    return reasons


def _size(text: str, config: GateConfig) -> list[str]:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size < config.min_bytes:
        return [f"size: {size:,} bytes, below the minimum of {config.min_bytes:,}"]
    if size > config.max_bytes:
        return [f"size: {size:,} bytes, above the maximum of {config.max_bytes:,}"]
    return []


def _sections(doc: _Document, config: GateConfig) -> list[str]:
    present = {heading.casefold() for heading in doc.headings()}
    missing = [s for s in config.sections if s.casefold() not in present]
    if not missing:
        return []
    return ["sections: missing " + ", ".join(f"'## {section}'" for section in missing)]


_SECOND_PERSON = re.compile(r"\byou(?:rs?|rself|rselves)?\b", re.IGNORECASE)
# Link targets and URLs are addresses, not voice. Both patterns stop at characters they start
# with, so they stay linear on hostile lines.
_ADDRESSES = re.compile(r"\]\([^\s)]*|://\S*")


def _voice(doc: _Document, config: GateConfig) -> list[str]:
    """Second person outside code. "you're", "you'll", "you've" and "you'd" count once each."""
    hits = []
    for number, line in doc.prose_without_code:
        hits += [number] * len(_SECOND_PERSON.findall(_ADDRESSES.sub(" ", line)))
    if len(hits) <= config.max_second_person:
        return []
    lines = sorted(set(hits))
    where = ", ".join(str(n) for n in lines[:_SHOWN])
    return [
        f"voice: {len(hits)} second-person words (you, your, ...) outside code, at most "
        f"{config.max_second_person} allowed; first on line{'s' if len(lines) > 1 else ''} "
        f"{where}; use the imperative"
    ]


def _fences(doc: _Document) -> list[str]:
    unclosed = [block for block in doc.blocks if not block.closed]
    return [
        f"fences: the {block.fence if len(block.fence) <= 10 else block.fence[:3] + '...'} fence "
        f"opened on line {block.line} is never closed"
        for block in unclosed
    ]


def _examples(doc: _Document, config: GateConfig) -> list[str]:
    """Only blocks with content count: an empty fence is not an example."""
    count = sum(1 for block in doc.blocks if block.has_content)
    if count >= config.min_code_blocks:
        return []
    return [
        f"examples: {count} non-empty fenced code block{'' if count == 1 else 's'}, at least "
        f"{config.min_code_blocks} required"
    ]


# ------------------------------------------------------------ links and paths


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")
_DRIVE = re.compile(r"[A-Za-z]:[\\/]")
_LEADING_DOTS = re.compile(r"^(?:\./)+")


class _Link:
    """A link target, classified once: ignored (URL, anchor), absolute, or a relative path."""

    def __init__(self, line: int, target: str):
        self.line = line
        self.target = target
        lowered = target[:5].lower()
        ignored = (
            not target
            or target.startswith(("#", "?", "//"))
            or (_SCHEME.match(target) is not None and lowered != "file:")
        )
        self.absolute = not ignored and (
            target.startswith(("/", "\\", "~")) or bool(_DRIVE.match(target)) or lowered == "file:"
        )
        # The decoded path without query, fragment and leading './'; None unless relative.
        self.relative_path: str | None = None
        if not ignored and not self.absolute:
            path = unquote(re.split(r"[?#]", target, maxsplit=1)[0])
            self.relative_path = _LEADING_DOTS.sub("", path, count=1)


def _links(links: list[_Link], bundled: list[str], existing: set[str]) -> list[str]:
    """Every relative link resolves to a bundled file, a file already there, or a directory
    holding one. Wider than scripts/, references/ and assets/ on purpose: a link to a file
    that will not exist is broken wherever it points. Links failing containment are left to
    that gate."""
    files = set(existing) | set(bundled) | {"SKILL.md"}
    directories = {
        "/".join(parts[:i]) for parts in (f.split("/") for f in files) for i in range(1, len(parts))
    }
    available = files | directories
    broken = []
    for link in links:
        path = link.relative_path
        if path is None or _path_problem(path.removesuffix("/"), bundled=False):
            continue
        if path.removesuffix("/") not in available:
            broken.append(f"{_show(path)} (line {link.line})")
    if not broken:
        return []
    return [
        f"links: {len(broken)} link target{'' if len(broken) == 1 else 's'} not bundled and not "
        f"in the skill directory: {', '.join(broken[:_SHOWN])}{_more(broken)}"
    ]


# A path under a root that belongs to one machine or one user (home directories, temp and
# mount points), not inside a URL or a relative path, and not after a placeholder such as
# ${CLAUDE_PLUGIN_ROOT}/, $(pwd)/ or <skill-dir>/. System paths a skill may legitimately
# document (/etc/nginx/nginx.conf, /usr/local/bin) and web routes (/api/v1/users) pass.
_ROOTED = re.compile(r"(?<![\w.~:/}\)\]>$%*@\\-])/(?:home|Users|root|tmp|private|mnt|Volumes|media|"
                     r"workspace|workspaces|builds|var/folders)/[\w.@+-]+")
_HOME = re.compile(r"(?<![\w.~/-])~[\w.-]*/")
_WINDOWS = re.compile(r"(?<!\w)[A-Za-z]:\\|(?<![\w/])[A-Za-z]:/(?=[\w.])")
_FILE_URL = re.compile(r"\bfile:/", re.IGNORECASE)
_TOKEN = re.compile(r"[^\s`'\"()<>\[\]]+")


def _absolute_paths(doc: _Document, links: list[_Link]) -> list[str]:
    """Absolute filesystem paths anywhere, in code blocks too: they are one machine's paths."""
    found: dict[str, int] = {}
    for number, line in enumerate(doc.lines, start=1):
        if "/" not in line and "\\" not in line:
            continue
        for pattern in (_ROOTED, _HOME, _WINDOWS, _FILE_URL):
            for m in pattern.finditer(line):
                found.setdefault(_token_at(line, m.start()), number)
    for link in links:
        if link.absolute:
            found.setdefault(_show(link.target), link.line)
    if not found:
        return []
    items = [f"{token} (line {number})" for token, number in found.items()]
    return [
        f"absolute paths: {', '.join(items[:_SHOWN])}{_more(items)}; refer to files relative to "
        "the skill directory"
    ]


def _token_at(line: str, start: int) -> str:
    match = _TOKEN.match(line, start)
    return _show((match[0] if match else "").rstrip(".,;:!?"))


def _containment(bundled: list[str], links: list[_Link], existing: set[str], existing_dirs: set[str]) -> list[str]:
    """Bundled files only under scripts/, references/, assets/, each with a name every file
    system and git keep apart from the others; nothing leaves the skill dir."""
    problems = []
    seen: dict[str, str] = {}  # folded -> the bundled path that has it
    for path in bundled:
        if problem := _path_problem(path, bundled=True):
            problems.append(f"bundled file {_show(path)} {problem}")
        elif (folded := fold(path)) in seen:
            problems.append(f"bundled file {_show(path)} collides with {_show(seen[folded])}")
        else:
            seen[folded] = path
    on_disk = {fold(path): path for path in existing}
    files = {**on_disk, **seen}
    directories: dict[str, str] = {}  # folded directory -> a file below it
    for folded, path in files.items():
        for directory in _parents(folded):
            directories.setdefault(directory, path)
    present = {fold(path): path for path in existing_dirs}
    for folded, path in seen.items():
        if folded in present:
            problems.append(f"bundled file {_show(path)} is the existing directory {_show(present[folded])}")
        elif (same := on_disk.get(folded, path)) != path:
            problems.append(f"bundled file {_show(path)} differs only in letter case or Unicode form from the "
                            f"existing {_show(same)}")
        elif folded in directories:
            problems.append(f"bundled file {_show(path)} is also the directory of {_show(directories[folded])}")
        elif parent := next((files[d] for d in _parents(folded) if d in files), None):
            problems.append(f"bundled file {_show(path)} needs {_show(parent)}, a file, to be a directory")
    for link in links:
        path = link.relative_path
        if path is not None and (problem := _path_problem(path.removesuffix("/"), bundled=False)):
            problems.append(f"link {_show(link.target)} (line {link.line}) {problem}")
    if not problems:
        return []
    return [f"containment: {'; '.join(problems[:_SHOWN])}{_more(problems)}"]


def fold(path: str) -> str:
    """The key under which two names are one file on some file system (case, Unicode form)."""
    return unicodedata.normalize("NFC", path).casefold()


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _path_problem(path: str, *, bundled: bool) -> str | None:
    """Why a path relative to the skill directory is unsafe, or None."""
    if not path:
        return "is empty"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in path):
        return "holds control characters"
    if "\\" in path:
        return "holds a backslash"
    if path.startswith("/") or _DRIVE.match(path) or path.startswith("~"):
        return "is absolute"
    segments = path.split("/")
    if ".." in segments:
        return "leaves the skill directory ('..')"
    if any(segment in ("", ".") for segment in segments):
        return "has an empty or '.' segment"
    if not bundled:
        return None
    if len(path.encode("utf-8", "surrogatepass")) > _MAX_PATH_BYTES:
        return f"is longer than {_MAX_PATH_BYTES} bytes"
    if any(s.startswith(".") for s in segments):
        return "has a segment starting with '.' (hidden: left out of listings, and often ignored by git)"
    if any(s != s.strip() or s.endswith(".") for s in segments):
        return "has a segment that begins or ends with a space, or ends with '.'"
    if any(c in _NOT_ON_WINDOWS for c in path):
        return "holds a character Windows cannot name a file with (one of < > : \" | ? *)"
    if any(s.split(".", 1)[0].casefold() in _WINDOWS_DEVICES for s in segments):
        return "has a name Windows keeps for a device (CON, PRN, AUX, NUL, COM1-9, LPT1-9; with any extension)"
    if unicodedata.normalize("NFC", path) != path:
        return "is not in Unicode NFC form"
    if segments[-1].casefold() == "skill.md":
        return "is named SKILL.md, which only the composer writes"
    if segments[0] not in BUNDLE_DIRS or len(segments) < 2:
        return "is not under scripts/, references/ or assets/"
    return None


# ------------------------------------------------------------------ wording


def _show(value: str) -> str:
    """A value quoted for a one-line reason: escaped, and cut at 80 characters."""
    shown = repr(value[:80])
    return shown[:-1] + "..." + shown[-1] if len(value) > 80 else shown


def _more(items: list) -> str:
    return f", and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())
