"""Generated parts of docs/architecture.md: the lifecycle diagram and the event catalogue.

Run `uv run python -m statemachine.docs` to refresh them; tests/test_docs.py fails when the
file is stale. Text between `<!-- BEGIN GENERATED: x -->` and `<!-- END GENERATED: x -->`
belongs to this module; everything else in the file is written by hand.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import msgspec

from statemachine import catalog
from statemachine.lifecycle import BY_TAG, TRANSITIONS, State

ARCHITECTURE = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
# A transition from more sources than this is drawn as a note, not as one arrow per source.
WIDE = 4


def lifecycle_diagram() -> str:
    lines = ["```mermaid", "stateDiagram-v2"]
    notes = []
    for t in TRANSITIONS:
        if len(t.sources) > WIDE:
            excluded = sorted(set(State) - t.sources - {State.NEW})
            scope = "any state" + (f" except {', '.join(excluded)}" if excluded else "")
            notes.append(f"{t.trigger} ({t.tag}): {scope} → {t.dest}")
            continue
        for source in sorted(t.sources):
            start = "[*]" if source == State.NEW else source.value
            lines.append(f"    {start} --> {t.dest.value}: {t.trigger}")
    for state in ("skipped", "rejected", "done", "invalid", "failed", "gone"):
        lines.append(f"    {state} --> [*]")
    lines.append("```")
    lines.append("")
    lines.append("Transitions allowed from many states (not drawn):")
    lines.append("")
    lines += [f"- {n}" for n in notes]
    lines.append("")
    lines.append("| trigger | from | to | event | meaning |")
    lines.append("| --- | --- | --- | --- | --- |")
    for t in TRANSITIONS:
        sources = ("any but " + ", ".join(sorted(set(State) - t.sources - {State.NEW}))
                   if len(t.sources) > WIDE else ", ".join(sorted(t.sources)))
        lines.append(f"| `{t.trigger}` | {sources} | {t.dest} | `{t.tag}` | {t.doc} |")
    return "\n".join(lines)


def _type_name(tp: object) -> str:
    text = getattr(tp, "__name__", None) if not hasattr(tp, "__args__") else None
    text = text or str(tp)
    return re.sub(r"\b(typing|statemachine\.catalog)\.", "", text).replace("NoneType", "None")


# The stream of every event that is not a plugin's, as docs show it (tests check real logs).
STREAMS = {
    "RunStarted": "run:<id>", "LimitsChanged": "run:<id>", "BackupTargetChanged": "run:<id>",
    "RunPaused": "run:<id>", "RunResumed": "run:<id>", "RunInterrupted": "run:<id>",
    "BudgetExhausted": "run:<id>", "RunFinished": "run:<id>", "RequestLost": "run:<id>",
    "LimitLearned": "quota:<model>", "BackupCompleted": "backup", "MarketplaceBound": "marketplace",
}


def stream_of(tag: str) -> str:
    """The stream an event of type `tag` is appended to, with <placeholders>."""
    return "plugin:<id>" if tag in BY_TAG else STREAMS[tag]


def _meaning(cls: type) -> str:
    """The first paragraph of the type's docstring, on one line; the transition's own text when
    it has none."""
    paragraph = (cls.__doc__ or "").strip().split("\n\n")[0]
    tag = cls.__struct_config__.tag
    return " ".join(paragraph.split()) or (BY_TAG[tag].doc if tag in BY_TAG else "")


def event_catalogue() -> str:
    lines = ["| event | stream | schema | fields | meaning |", "| --- | --- | --- | --- | --- |"]
    for cls in catalog.EVENT_TYPES:
        tag = cls.__struct_config__.tag
        fields = ", ".join(
            f"{f.name}: {_type_name(f.type)}" for f in msgspec.structs.fields(cls)
        ).replace("|", "\\|")
        stream = stream_of(tag).replace("<", "&lt;").replace(">", "&gt;")
        meaning = _meaning(cls).replace("|", "\\|")
        lines.append(f"| `{tag}` | {stream} | v{cls.schema_version} | {fields} | {meaning} |")
    return "\n".join(lines)


GENERATORS = {"lifecycle": lifecycle_diagram, "events": event_catalogue}


def render(text: str) -> str:
    """`text` with every generated block replaced by its current content."""
    for name, generate in GENERATORS.items():
        pattern = re.compile(
            rf"(<!-- BEGIN GENERATED: {name} -->\n).*?(<!-- END GENERATED: {name} -->)", re.S
        )
        if not pattern.search(text):
            raise ValueError(f"docs/architecture.md has no generated block {name!r}")
        content = generate()
        text = pattern.sub(lambda m, content=content: m.group(1) + content + "\n" + m.group(2), text)
    return text


def main() -> int:
    current = ARCHITECTURE.read_text(encoding="utf-8")
    fresh = render(current)
    if fresh != current:
        ARCHITECTURE.write_text(fresh, encoding="utf-8")
        print(f"updated {ARCHITECTURE}")
    else:
        print(f"{ARCHITECTURE} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
