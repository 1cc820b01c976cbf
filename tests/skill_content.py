"""Deterministic SKILL.md content for tests: one good draft and one bad draft per gate.

`good_skill(hint)` returns the fields of a `SkillDraft` ({description, allowed_tools, body,
files}) that pass the project's default gates once composed as

    ---\\nname: x\\ndescription: ...\\nallowed-tools: ...\\n---\\n\\n + body

(whole file 8,000-14,000 bytes, the seven marketplace sections, imperative voice with no second
person, balanced fences with at least three code blocks, relative links that all resolve to
bundled files, no absolute paths, no parent-directory references).

`bad_skill(gate, hint)` returns a draft that fails exactly one gate and passes the others;
`GATES` lists the gate names. `compose(draft, name)` builds the SKILL.md text and `check(...)`
is a plain reference implementation of those constraints, used by the emulator's own tests.
"""

from __future__ import annotations

import re
from typing import Any

SECTIONS = ("Overview", "Prerequisites", "Instructions", "Output", "Error Handling",
            "Examples", "Resources")
MIN_BYTES, MAX_BYTES = 8_000, 14_000
GATES = ("size_small", "size_large", "sections", "voice", "fences", "examples", "links",
         "absolute", "escape", "hidden")

FENCE = "```"
SECOND_PERSON = re.compile(r"\byou(?:r|rs|'re|rself|rselves)?\b", re.IGNORECASE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
ABSOLUTE = re.compile(r"(/home/|/Users/|/etc/|/root/|[A-Za-z]:\\)")


def _words(hint: str) -> list[str]:
    words = [w for w in re.split(r"[^A-Za-z0-9]+", hint) if w]
    return [w for w in words if not SECOND_PERSON.fullmatch(w)][:8] or ["plugin"]


def _slug(hint: str) -> str:
    return "-".join(w.lower() for w in _words(hint))[:64].strip("-")


def _title(hint: str) -> str:
    return " ".join(w.capitalize() for w in _words(hint))[:64].strip()


# ----------------------------------------------------------------------- the sections


def _overview(t: str, s: str) -> str:
    return f"""## Overview

This skill equips Claude to operate the {t} plugin end to end: inspect the current state of a
project, decide which {t} command fits the task, run it with safe defaults, and report the
result in a short, verifiable summary. The skill favours small, reversible steps. Each step
reads before it writes, records what changed, and stops at the first sign of an unexpected
state instead of guessing.

The {t} plugin bundles commands, an agent and configuration templates. This skill ties them
together into one repeatable workflow so that routine requests such as "set up {t}", "check the
{t} configuration" or "fix the failing {t} run" are handled the same way every time. Longer
background material lives in [the {t} guide](references/guide.md) and the
[review checklist](references/checklist.md); this file keeps only what is needed to act.

Key properties of the workflow:

- **Deterministic**: the same inputs produce the same plan and the same files.
- **Observable**: every command that changes state is echoed with its arguments first.
- **Reversible**: configuration changes are written to a new file, compared, then swapped in.
- **Bounded**: no step runs longer than its configured timeout, and no step retries forever.

### When not to use this skill

Do not use this skill for tasks unrelated to {t}, for changes to the plugin's own source code,
or for bulk rewrites of project files that {t} merely reads. Hand those tasks back with a short
note explaining why they fall outside the workflow. Likewise, do not use it to install system
packages or to change credentials; ask for those to be done separately and resume afterwards.
"""


def _prerequisites(t: str, s: str) -> str:
    return f"""## Prerequisites

Confirm each item before starting. Stop and report the missing item when any check fails.

1. The working tree is a Git repository with no uncommitted changes to files that {t} manages.
   Run `git status --porcelain` and expect an empty result for those paths.
2. The {t} plugin is installed and enabled. List installed plugins and look for `{s}`.
3. A configuration file named `{s}.config.json` exists at the project root, or the task
   explicitly asks to create one from the bundled template in `assets/config.template.json`.
4. The tools named in `allowed-tools` are available: Read and Grep for inspection, Bash for
   running the helper script, Write and Edit only when the task asks for changes.
5. Network access is available when the task involves fetching remote data; otherwise every
   step below works offline.

Gather the following facts once, at the start, and reuse them in every later step:

- the project root, taken as the top level of the Git working tree;
- the test command, read from the build configuration or the contributing notes;
- the default branch name, to keep the diff comparison meaningful;
- the plugin version, read from the installed plugin manifest.

Record the versions of the runtime and of the plugin in the final summary. Version drift is
the most common cause of differences between two runs of the same task.
"""


def _instructions(t: str, s: str) -> str:
    return f"""## Instructions

Follow the steps in order. Each step names its input, its action and the evidence that it
succeeded. Skip a step only when its evidence is already present.

### Step 1: Inspect the project

Read the project layout and the existing configuration before proposing anything.

```bash
git status --porcelain
ls -la
test -f {s}.config.json && cat {s}.config.json
```

Note the language, the build tool, the test command and any existing {t} settings. Search for
earlier integrations with Grep, for example the pattern `{s}` across configuration files, to
avoid creating a second, conflicting setup.

### Step 2: Validate the configuration

Run the bundled validator. It checks required keys, value types and obvious mistakes such as
duplicate entries or empty lists, and exits non-zero on the first error.

```bash
bash scripts/validate.sh {s}.config.json
```

Treat any output on standard error as a failure, even when the exit code is zero. Compare the
reported keys with the table in [the {t} guide](references/guide.md) when a key is unfamiliar.

### Step 3: Plan the change

Write a short plan before editing: the files to touch, the expected diff in one sentence per
file, and the command that proves success. Keep the plan to at most five items. When the task
needs more, split it into separate runs and finish the first one completely.

### Step 4: Apply the change

Make the smallest edit that satisfies the plan. Prefer editing the existing configuration over
generating a new one. Write new content to a temporary file next to the target, compare the
two, then replace the target in one move so that an interrupted run never leaves a half-written
file behind.

```json
{{
  "name": "{s}",
  "enabled": true,
  "timeoutSeconds": 120,
  "include": ["src", "tests"],
  "exclude": ["build", "dist", "node_modules"],
  "report": {{"format": "markdown", "path": "reports/{s}-summary.md"}}
}}
```

### Step 5: Verify

Run the validator again, then the project's own test command. Both must pass. Review the diff
with `git diff --stat` and confirm that only the planned files changed.

### Step 6: Report

Produce the summary described in the Output section. Include failures and skipped steps; never
omit a failed check from the report.
"""


def _output(t: str, s: str) -> str:
    return f"""## Output

Every run ends with a Markdown summary written to `reports/{s}-summary.md` and echoed in the
conversation. The summary has a fixed shape so that runs can be compared over time:

```markdown
{t} run summary

- Status: success | partial | failed
- Plugin version: 1.4.2
- Files changed: 2 ({s}.config.json, README.md)
- Checks: validator passed, tests passed (48 of 48)
- Duration: 41 s

Notes:
- Added the report section to the configuration.
- Left the exclude list unchanged.
```

Keep the summary factual. State numbers rather than adjectives, list every changed file, and
link the full validator log when it exists. A run that changed nothing still produces a summary
with status `success` and the line `Files changed: 0`.
"""


def _error_handling(t: str, s: str) -> str:
    return f"""## Error Handling

Handle the common failures as follows. Stop after two failed attempts at the same step and
report the last error verbatim instead of trying further variations.

| Symptom | Likely cause | Action |
|---------|--------------|--------|
| `{s}.config.json` not found | Project not initialised | Create it from `assets/config.template.json`, then rerun Step 2 |
| Validator reports an unknown key | Configuration written for an older plugin version | Look the key up in [the guide](references/guide.md); rename or remove it |
| Validator exits with status 2 | Malformed JSON | Show the line and column from the message; fix the syntax only |
| Tests fail after the change | Change broke an existing assumption | Revert the change, report the failing test names, stop |
| Command times out | Slow network or oversized input | Narrow the include list, rerun once, then report |
| Validator passes but the run reports nothing | Include list points at empty directories | List the directories, correct the include list, rerun |
| Two configuration files found | An older setup left a second file behind | Report both paths; keep the one the plugin reads and ask before removing the other |
| Permission denied on write | File owned by another user or read-only checkout | Report the path; do not change permissions |

Never delete user files to recover from an error. Never weaken a check, disable a test or edit
the validator to make a run pass. When the cause is unclear, collect the exact command, its exit
status and the first twenty lines of its output, and include them in the report.
"""


def _examples(t: str, s: str) -> str:
    return f"""## Examples

### Example 1: First-time setup

Request: "Set up {t} for this repository."

1. Inspect the project (Step 1) and find no existing configuration.
2. Copy the template and fill in the detected source and test directories.
3. Validate, run the tests, and write the summary.

```bash
cp assets/config.template.json {s}.config.json
bash scripts/validate.sh {s}.config.json
git diff --stat
```

Result: one new file, validator passed, summary status `success`.

### Example 2: Repair a broken configuration

Request: "The {t} run fails with an unknown key error."

1. Run the validator and read the reported key, for example `timeout_sec`.
2. Look up the current name in the guide: `timeoutSeconds`.
3. Rename the key, validate again and run the tests.

```text
error: unknown key 'timeout_sec' at line 4 (expected one of: name, enabled,
timeoutSeconds, include, exclude, report)
```

Result: one changed line, validator passed, summary lists the renamed key.

### Example 4: Tighten the scope

Request: "Make {t} skip generated files."

1. Read the include and exclude lists and find `build` excluded but `generated` missing.
2. Add `generated` to the exclude list, keeping the list sorted.
3. Validate, run the tests, and note the added entry in the summary.

Result: one changed line; the next run processes fewer files and finishes sooner.

### Example 3: Review without changes

Request: "Check whether the {t} setup follows the team conventions."

Read the configuration, walk through [the review checklist](references/checklist.md) item by
item, and report each item as passed or failed with a one-line reason. Make no edits during a
review; propose changes in the summary instead.
"""


def _resources(t: str, s: str) -> str:
    return f"""## Resources

- [The {t} guide](references/guide.md): every configuration key, its type, default and purpose.
- [Review checklist](references/checklist.md): the conventions applied in Example 3.
- [Validation script](scripts/validate.sh): the checks run in Step 2 and Step 5.
- [Configuration template](assets/config.template.json): the starting point for a new setup.

Keep this file focused on the workflow. Add background material, long tables and rarely needed
details to the guide rather than to this file.
"""


_SECTION_FUNCS = (_overview, _prerequisites, _instructions, _output, _error_handling,
                  _examples, _resources)


def _files(t: str, s: str) -> list[dict[str, str]]:
    guide = f"""# {t} configuration guide

| Key | Type | Default | Purpose |
|-----|------|---------|---------|
| name | string | none | Identifier used in reports |
| enabled | boolean | true | Turns the plugin on or off |
| timeoutSeconds | integer | 120 | Upper bound for one run |
| include | list of strings | ["src"] | Directories to process |
| exclude | list of strings | [] | Directories to skip |
| report | object | none | Format and location of the summary |

Renamed keys: `timeout_sec` became `timeoutSeconds` in version 1.2.
"""
    checklist = f"""# {t} review checklist

1. The configuration file validates without warnings.
2. The include list names only source and test directories.
3. Generated output is excluded from processing.
4. The timeout is between 30 and 600 seconds.
5. The report path is inside the repository.
"""
    script = f"""#!/usr/bin/env bash
# Validate a {t} configuration file: required keys and basic types.
set -euo pipefail
config="${{1:-{s}.config.json}}"
python3 - "$config" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
for key in ("name", "enabled", "include"):
    if key not in data:
        sys.exit(f"error: missing key '{{key}}'")
print("ok")
PY
"""
    template = f"""{{
  "name": "{s}",
  "enabled": true,
  "timeoutSeconds": 120,
  "include": ["src", "tests"],
  "exclude": ["build", "dist"],
  "report": {{"format": "markdown", "path": "reports/{s}-summary.md"}}
}}
"""
    return [{"path": "references/guide.md", "content": guide},
            {"path": "references/checklist.md", "content": checklist},
            {"path": "scripts/validate.sh", "content": script},
            {"path": "assets/config.template.json", "content": template}]


def _sections(hint: str) -> list[str]:
    t, s = _title(hint), _slug(hint)
    return [f(t, s) for f in _SECTION_FUNCS]


def _body(hint: str, sections: list[str]) -> str:
    return f"# {_title(hint)}\n\n" + "\n".join(sections)


def good_skill(name_hint: str = "the plugin") -> dict[str, Any]:
    """A SkillDraft-shaped dict that passes every default gate (deterministic in name_hint)."""
    t = _title(name_hint)
    description = (f"Sets up, validates and repairs the {t} plugin configuration and reports the "
                   f"result. Use when asked to set up {t}, check or fix its configuration, or "
                   f"review a {t} setup against team conventions.")
    return {"description": description,
            "allowed_tools": ["Read", "Grep", "Glob", "Bash", "Edit", "Write"],
            "body": _body(name_hint, _sections(name_hint)),
            "files": _files(t, _slug(name_hint))}


def untidy_files(name_hint: str = "the plugin") -> dict[str, Any]:
    """A good draft whose bundled files come as an editor on another system might leave them:
    CRLF line endings, a byte order mark before the first, no newline at the end of the last."""
    draft = good_skill(name_hint)
    files = [dict(f, content=f["content"].replace("\n", "\r\n")) for f in draft["files"]]
    files[0]["content"] = "\ufeff" + files[0]["content"]
    files[-1]["content"] = files[-1]["content"].rstrip("\r\n")
    return dict(draft, files=files)


_FILLER = """### Note {n}

Keep every run small and auditable. Record the command, its exit status and the files it
touched. Prefer reading over writing, and prefer one clear step over several clever ones. When
two approaches are possible, choose the one that is easier to undo and explain the choice in
the summary. Re-run the validator after every edit, not only at the end of the run.
"""


def bad_skill(gate: str, name_hint: str = "the plugin") -> dict[str, Any]:
    """A draft that fails exactly `gate` (one of GATES) and passes the other gates."""
    draft = good_skill(name_hint)
    t = _title(name_hint)
    sections = _sections(name_hint)
    if gate == "size_small":
        # Keep all sections and three code blocks, drop most of the prose.
        short = []
        for sec in sections:
            head, _, rest = sec.partition("\n\n")
            blocks = re.findall(r"```[a-z]*\n.*?```\n", rest, re.S)
            short.append(head + "\n\nFollow the workflow for " + t + ".\n\n" + "".join(blocks[:1]))
        draft["body"] = _body(name_hint, short)
        draft["body"] = draft["body"].replace(
            "## Resources\n\nFollow", "## Resources\n\nSee [the guide](references/guide.md). Follow")
    elif gate == "size_large":
        base, n = sections[2], 0
        while len(compose(draft).encode("utf-8")) <= MAX_BYTES + 1_500:
            n += 1
            sections[2] = base + "\n" + "\n".join(_FILLER.format(n=i) for i in range(1, n + 1))
            draft["body"] = _body(name_hint, sections)
    elif gate == "sections":
        del sections[SECTIONS.index("Error Handling")]
        draft["body"] = _body(name_hint, sections)
    elif gate == "voice":
        sections[0] = sections[0].replace(
            "Key properties", "You should read this first. Your project stays safe when you follow "
            "the steps yourself, and you're told what changed.\n\nKey properties")
        draft["body"] = _body(name_hint, sections)
    elif gate == "fences":
        sections[-1] = sections[-1] + "\n```bash\nbash scripts/validate.sh\n"
        draft["body"] = _body(name_hint, sections)
    elif gate == "examples":
        plain = []
        for sec in sections:
            def unfence(m: re.Match[str]) -> str:
                lines = [ln.strip() for ln in m.group(1).strip("\n").splitlines()]
                return "Commands, in order: " + "; ".join(f"`{ln}`" for ln in lines if ln) + ".\n"
            plain.append(re.sub(r"```[a-z]*\n(.*?)```\n", unfence, sec, flags=re.S))
        draft["body"] = _body(name_hint, plain)
    elif gate == "links":
        sections[-1] = sections[-1].replace(
            "\nKeep this file", "- [Troubleshooting notes](references/missing.md): rare failures.\n"
            "\nKeep this file")
        draft["body"] = _body(name_hint, sections)
    elif gate == "absolute":
        sections[1] = sections[1] + (
            "\nA typical project keeps its inputs in `/home/user/project/file.txt`.\n")
        draft["body"] = _body(name_hint, sections)
    elif gate == "escape":
        sections[-1] = sections[-1].replace(
            "\nKeep this file", "- [Shared notes](../outside.md): notes shared across plugins.\n"
            "\nKeep this file")
        draft["body"] = _body(name_hint, sections)
        draft["files"] = draft["files"] + [{"path": "../outside.md", "content": "# Notes\n"}]
    elif gate == "hidden":
        draft["files"] = draft["files"] + [{"path": "scripts/.env", "content": "TOKEN=x\n"}]
    else:
        raise ValueError(f"unknown gate {gate!r}; expected one of {GATES}")
    return draft


# ------------------------------------------------------------ reference composition + checks


def compose(draft: dict[str, Any], name: str = "x") -> str:
    """The SKILL.md text as the project composes it (frontmatter built in code)."""
    return (f"---\nname: {name}\ndescription: {draft['description']}\n"
            f"allowed-tools: {' '.join(draft['allowed_tools'])}\n---\n\n" + draft["body"])


def check(draft: dict[str, Any], name: str = "x") -> list[str]:
    """Names of the gates `draft` fails (empty when it passes all), per the test brief."""
    text = compose(draft, name)
    body = draft["body"]
    failed: list[str] = []
    size = len(text.encode("utf-8"))
    if size < MIN_BYTES:
        failed.append("size_small")
    if size > MAX_BYTES:
        failed.append("size_large")
    headings = re.findall(r"^## (.+?)\s*$", _strip_fenced(body), re.M)
    if tuple(headings) != SECTIONS:
        failed.append("sections")
    if SECOND_PERSON.search(text):
        failed.append("voice")
    fences = re.findall(r"^\s*```", body, re.M)
    if len(fences) % 2:
        failed.append("fences")
    if len(fences) // 2 < 3:
        failed.append("examples")
    paths = {f["path"] for f in draft.get("files", [])}
    links = LINK.findall(body)
    for target in links:
        if target.startswith(("scripts/", "references/", "assets/")) and target not in paths:
            failed.append("links")
            break
    if any(re.match(r"^[a-z][a-z0-9+.-]*:", t) or t.startswith("/") for t in links):
        failed.append("links")
    everything = text + "".join(f["path"] + f["content"] for f in draft.get("files", []))
    if ABSOLUTE.search(everything) or any(p.startswith("/") for p in paths):
        failed.append("absolute")
    if ".." in body or any(".." in p.split("/") for p in paths):
        failed.append("escape")
    if any(seg.startswith(".") and seg != ".." for p in paths for seg in p.split("/")):
        failed.append("hidden")
    return failed


def _strip_fenced(body: str) -> str:
    return re.sub(r"^```.*?^```", "", body, flags=re.S | re.M)
