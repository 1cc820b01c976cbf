"""SKILL.md composition and the validation gates: what passes, and what each gate refuses."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from skills_ref.parser import parse_frontmatter
from skills_ref.validator import validate

from statemachine.catalog import DraftFile, SkillDraft
from statemachine.gates import GateConfig, check
from statemachine.skillmd import compose

NAME = "manifest-checker"
DESCRIPTION = (
    "Checks Claude Code plugin manifests against the schema and reports every mismatch. "
    "Use when asked to validate a plugin, lint plugin.json or find broken commands."
)
GUIDE = DraftFile(path="references/guide.md", content="# Guide\n\nThe full rule list.\n")

FILLER = (
    "The checker reads the plugin manifest, compares each declared command with the files on "
    "disk, and records every mismatch with the file and line where it occurs. "
)


def good_body(
    *, instructions: str = "", examples: int = 3, padding: int = 38, extra: str = ""
) -> str:
    """A body that passes every gate: seven sections, `examples` code blocks, ~10 KB."""
    blocks = [
        "```bash\npython scripts/check.py --manifest .claude-plugin/plugin.json\n```",
        '```json\n{"plugin": "demo", "errors": [], "warnings": ["no description"]}\n```',
        "```text\ncommands/deploy.md: missing 'description' in frontmatter\n```",
    ]
    code = blocks[:examples] + ["Run the checker again after each fix."] * (3 - examples)
    overview = "\n\n".join(FILLER * 2 for _ in range(padding // 2))
    steps = "\n".join(f"{i}. {FILLER}" for i in range(1, padding // 2 + 1))
    return f"""
## Overview

{overview}

## Prerequisites

- Python 3.11 or newer on the PATH.
- A plugin directory containing `.claude-plugin/plugin.json`.

## Instructions

{steps}

Run the checker from the plugin root:

{code[0]}

{instructions}

## Output

The report is a JSON document:

{code[1]}

## Error Handling

| Problem | Action |
|---|---|
| Manifest missing | Stop and report that the plugin has no manifest. |
| Invalid JSON | Report the parser message with its line and column. |

## Examples

{code[2]}

## Resources

- [Rule guide](references/guide.md) lists every rule with its rationale.
{extra}
"""


def draft(body: str, *, description: str = DESCRIPTION, files: list[DraftFile] | None = None,
          tools: list[str] | None = None) -> SkillDraft:
    return SkillDraft(
        description=description,
        allowed_tools=["Read", "Bash(python:*)"] if tools is None else tools,
        body=body,
        files=[GUIDE] if files is None else files,
    )


def run(body: str | None = None, *, name: str = NAME, files: list[DraftFile] | None = None,
        existing: frozenset[str] = frozenset(), config: GateConfig = GateConfig(),
        directories: frozenset[str] = frozenset(), **draft_args) -> list[str]:
    d = draft(good_body() if body is None else body, files=files, **draft_args)
    return check(name, compose(NAME, d, license="MIT"), d.files, set(existing), config, set(directories))


def gates(reasons: list[str]) -> list[str]:
    return [reason.split(":", 1)[0] for reason in reasons]


# ------------------------------------------------------------------ a good skill


def test_a_good_skill_passes_every_gate_and_the_reference_validator(tmp_path: Path):
    d = draft(good_body())
    text = compose(NAME, d, license="MIT")
    assert 8000 <= len(text.encode()) <= 14000
    assert check(NAME, text, d.files, set()) == []

    skill_dir = tmp_path / NAME
    skill_dir.mkdir()
    (skill_dir / "SKILL.md").write_text(text, encoding="utf-8")
    assert validate(skill_dir) == []


def test_a_full_size_file_passes_the_gates():
    """Its speed is measured by `tests.bench.gates`, not asserted here."""
    d = draft(good_body(padding=48))
    text = compose(NAME, d)
    assert len(text.encode()) > 12000
    assert check(NAME, text, d.files, set()) == []


# ------------------------------------------------------------------ compose


def test_compose_writes_the_fields_in_order_and_ends_with_one_newline():
    text = compose(NAME, draft("\n\n  ## Overview\n\nBody.\n\n\n"), license="MIT")
    assert text == (
        "---\n"
        "name: manifest-checker\n"
        f"description: {DESCRIPTION}\n"
        'allowed-tools: "Read Bash(python:*)"\n'
        "license: MIT\n"
        "---\n"
        "\n"
        "## Overview\n\nBody.\n"
    )


def test_compose_omits_empty_allowed_tools_and_a_missing_license():
    text = compose(NAME, draft("Body.", tools=[" ", ""]))
    metadata, body = parse_frontmatter(text)
    assert list(metadata) == ["name", "description"]
    assert body == "Body."


def test_compose_joins_tools_with_spaces_dropping_duplicates():
    text = compose(NAME, draft("Body.", tools=["Read", "Grep", "Read", " Bash(git:*) "]))
    assert parse_frontmatter(text)[0]["allowed-tools"] == "Read Grep Bash(git:*)"


def test_compose_splits_a_tools_entry_that_lists_several_at_its_commas():
    text = compose(NAME, draft("Body.", tools=["Write, Edit", "Read,Grep", "Bash(git add:*, git rm:*)", "Edit"]))
    assert parse_frontmatter(text)[0]["allowed-tools"] == "Write Edit Read Grep Bash(git add:*, git rm:*)"


@pytest.mark.parametrize(
    "description",
    [
        "Formats code: run it when asked",
        'Says "hello" and \'bye\'',
        "Counts # of items # not a comment",
        "First line\nsecond line\r\n\tthird",
        "- starts like a list item",
        "? starts like a key",
        "[starts] like a flow sequence",
        "{starts: like a mapping}",
        "*alias &anchor !tag %directive @at `tick` |pipe >fold",
        "Ünïcödé — “quotes” ✓ 日本語 😀",
        "Separates --- like a document marker ---- and -- too -",
        "---",
        "...",
        "back\\slash \\n not a newline",
        "yes",
        "null",
        "~",
        "0x1F",
        "12:30",
        "ends with a colon:",
        "zero\u200bwidth and nbsp\u00a0here",
        "line\u2028separator and next\u0085line",
        "bell\x07 and nul\x00 inside",
    ],
)
def test_compose_round_trips_any_description(description: str):
    text = compose(NAME, draft("Body.", description=description))
    metadata, body = parse_frontmatter(text)
    assert metadata["description"] == " ".join(description.split())
    assert metadata["name"] == NAME
    assert body == "Body."


def test_compose_round_trips_random_unicode():
    rng = random.Random(7)
    alphabet = "abc :#'\"\\-\n\t{}[]&*!|>%@`?,~" + "é😀\u2028\x00\x7f\ufeff"
    for _ in range(300):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        tool = value.replace(",", "")  # a comma separates tools: tested above
        text = compose(NAME, draft("Body.", description=value, tools=[tool]), license=value)
        metadata, _ = parse_frontmatter(text)
        expected = " ".join(value.split())
        assert metadata["description"] == expected
        assert metadata.get("allowed-tools", "") == " ".join(tool.split())
        assert metadata.get("license", "") == expected


def test_compose_drops_the_models_own_frontmatter():
    body = "---\nname: other\nauthor: someone\nversion: 2\n---\n\n## Overview\n\nBody.\n"
    text = compose(NAME, draft(body))
    metadata, rest = parse_frontmatter(text)
    assert metadata["name"] == NAME
    assert "author" not in metadata
    assert rest == "## Overview\n\nBody."
    assert "someone" not in text


def test_compose_drops_stacked_frontmatter_but_keeps_a_lone_thematic_break():
    stacked = compose(NAME, draft("---\na: 1\n---\n---\nb: 2\n...\nBody."))
    assert parse_frontmatter(stacked)[1] == "Body."
    lone = compose(NAME, draft("---\nBody after a rule."))
    assert lone.endswith("---\n\n---\nBody after a rule.\n")
    assert parse_frontmatter(lone)[0]["name"] == NAME


# ------------------------------------------------------------------ one gate at a time


def test_spec_gate_requires_the_directory_name():
    reasons = run(name="another-dir")
    assert gates(reasons) == ["spec"]
    assert "Directory name 'another-dir' must match skill name 'manifest-checker'" in reasons[0]


def test_spec_gate_refuses_extra_fields_and_missing_frontmatter():
    d = draft(good_body())
    text = compose(NAME, d).replace("name: ", "author: me\nname: ", 1)
    reasons = check(NAME, text, d.files, set())
    assert gates(reasons) == ["spec"]
    assert "Unexpected fields in frontmatter: author" in reasons[0]

    no_frontmatter = text.split("---\n", 2)[2] + "x" * 200
    assert gates(check(NAME, no_frontmatter, d.files, set())) == ["spec"]


def test_spec_gate_refuses_an_empty_description_once():
    reasons = run(description="   ")
    assert gates(reasons) == ["spec"]


def test_description_over_the_configured_maximum():
    reasons = run(config=GateConfig(max_description=100))
    assert reasons == [f"description: {len(DESCRIPTION)} characters, above the maximum of 100"]
    long = run(description="Checks manifests. " * 60)
    assert gates(long) == ["spec"]
    assert "exceeds 1024" in long[0]


def test_size_gate_both_ways():
    small = run(good_body(padding=4))
    assert gates(small) == ["size"]
    assert "below the minimum of 8,000" in small[0]
    large = run(good_body(padding=64))
    assert gates(large) == ["size"]
    assert "above the maximum of 14,000" in large[0]


def test_size_message_names_the_byte_count():
    reasons = run(config=GateConfig(min_bytes=20_000, max_bytes=30_000))
    size = len(compose(NAME, draft(good_body()), license="MIT").encode())
    assert reasons == [f"size: {size:,} bytes, below the minimum of 20,000"]


def test_sections_gate_names_the_missing_sections():
    body = good_body().replace("## Output", "## Results").replace("## Resources", "### Resources")
    reasons = run(body)
    assert reasons == ["sections: missing '## Output', '## Resources'"]


def test_sections_are_case_insensitive_may_close_with_hashes_and_do_not_count_in_code():
    body = good_body().replace("## Output", "## output ##")
    assert run(body) == []
    hidden = good_body().replace("## Output", "```markdown\n## Output\n```")
    assert gates(run(hidden)) == ["sections"]


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("Young readers and youth groups read the yourt file.", 0),
        ("Then you run it. Your output follows.", 2),
        ("Then you run it. Your output follows. You're done.", 3),
        ("You'll, you've and you'd: three contractions.", 3),
        ("Yourself and yourselves and yours.", 3),
        ("`you` `your` ``you`` are code, so is `you're`. [link](https://example.com/you)", 0),
    ],
)
def test_voice_gate_counts_second_person_outside_code(text: str, count: int):
    reasons = run(good_body(instructions=text))
    if count <= 2:
        assert reasons == []
    else:
        assert gates(reasons) == ["voice"]
        assert reasons[0].startswith(f"voice: {count} second-person words")
        assert "at most 2 allowed" in reasons[0]


def test_voice_gate_ignores_code_blocks_and_reports_line_numbers():
    in_code = "```text\nyou your yours you you you\n```\n~~~\nyou\n~~~"
    assert run(good_body(instructions=in_code)) == []

    body = good_body(instructions="You first.\n\nThen you.\n\nAnd your last.")
    text = compose(NAME, draft(body), license="MIT")
    first = text.split("\n").index("You first.") + 1
    reasons = check(NAME, text, [GUIDE], set())
    assert gates(reasons) == ["voice"]
    assert f"first on lines {first}, {first + 2}, {first + 4};" in reasons[0]


def test_fences_gate_reports_the_unclosed_fence():
    body = good_body(extra="\n```python\nprint('never closed')\n")
    text = compose(NAME, draft(body))
    line = text.split("\n").index("```python") + 1
    reasons = check(NAME, text, [GUIDE], set())
    assert reasons == [f"fences: the ``` fence opened on line {line} is never closed"]


@pytest.mark.parametrize(
    ("block", "closed"),
    [
        ("~~~\ncode\n~~~", True),
        ("````\n```\nnested\n```\n````", True),
        ("````\ncode\n```", False),
        ("```\ncode\n~~~", False),
        ("~~~~\ncode\n~~~~~", True),
        ("```\ncode\n``` trailing", False),
        ("  ```bash\n  indented in a list\n  ```", True),
    ],
)
def test_fences_close_only_with_the_same_character_and_at_least_the_same_length(block, closed):
    reasons = run(good_body(extra="\n" + block + "\n"))
    assert gates(reasons) == ([] if closed else ["fences"])


def test_examples_gate_counts_non_empty_fenced_blocks():
    reasons = run(good_body(examples=1))
    assert reasons == ["examples: 1 non-empty fenced code block, at least 2 required"]
    empty = good_body(examples=1, extra="\n```\n```\n")
    assert gates(run(empty)) == ["examples"]


def test_links_gate_reports_targets_that_will_not_exist():
    body = good_body(extra="- [API](references/api.md)\n- ![diagram](assets/flow.png)\n")
    reasons = run(body)
    assert gates(reasons) == ["links"]
    assert "2 link targets" in reasons[0]
    assert "'references/api.md'" in reasons[0] and "'assets/flow.png'" in reasons[0]


@pytest.mark.parametrize(
    "link",
    [
        "[g](references/guide.md#rules)",
        "[g](references/guide.md?plain=1)",
        "[g](./references/guide.md)",
        "[g](<references/guide.md>)",
        '[g](references/guide.md "The guide")',
        "[g][guide]\n\n[guide]: references/guide.md",
        "[g](references/)",
        "[web](https://example.com/a/b) [mail](mailto:a@example.com) [top](#overview)",
        "[existing](scripts/run.sh)",
        "[self](SKILL.md#examples)",
        "`[not a link](references/none.md)`",
    ],
)
def test_links_that_resolve_or_are_not_files(link: str):
    assert run(good_body(extra=link), existing=frozenset({"scripts/run.sh"})) == []


def test_reference_definitions_are_checked():
    reasons = run(good_body(extra="[guide]: references/missing.md\n"))
    assert gates(reasons) == ["links"]
    assert "'references/missing.md'" in reasons[0]


@pytest.mark.parametrize(
    "text",
    [
        "Logs go to /tmp/plugin/run.log.",
        "```bash\ncat /home/jeremy/notes.txt\n```",
        "Copy it into /Users/jeremy/projects.",
        "Edit /home/dev/.bashrc first.",
        "The cache lives in ~/.cache/overnight.",
        r"Windows keeps it in C:\Users\dev\plugin.",
        "Or C:/Program Files/plugin.",
        "[notes](/docs/notes.md)",
        "[root](/index)",
        "Open file:///tmp/report.html",
    ],
)
def test_absolute_paths_gate(text: str):
    reasons = run(good_body(extra="\n" + text + "\n"))
    assert gates(reasons) == ["absolute paths"]


@pytest.mark.parametrize(
    "text",
    [
        "See https://example.com/docs/page and http://localhost:8080/api/v1.",
        "Run `${CLAUDE_PLUGIN_ROOT}/scripts/a.sh`, $(pwd)/scripts/a.sh or <skill-dir>/scripts/x.",
        "Use scripts/run.sh and ./scripts/run.sh; read/write and/or TCP/IP and 2024/01/02.",
        "Use /tmp alone, a regex like s/foo/bar/ and 1/2/3.",
    ],
)
def test_not_absolute_paths(text: str):
    assert run(good_body(extra="\n" + text + "\n")) == []


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("../x", "leaves the skill directory"),
        ("/etc/passwd", "is absolute"),
        ("references/../../x", "leaves the skill directory"),
        ("scripts\\x", "holds a backslash"),
        ("SKILL.md", "is named SKILL.md"),
        ("references/skill.md", "is named SKILL.md"),
        ("notes/x.md", "is not under scripts/, references/ or assets/"),
        ("references", "is not under scripts/, references/ or assets/"),
        ("references//x.md", "empty or '.' segment"),
        ("references/./x.md", "empty or '.' segment"),
        ("references/x\x00.md", "control characters"),
        ("references/x\n.md", "control characters"),
        ("C:\\x", "holds a backslash"),
        ("C:/x", "is absolute"),
        ("~/x", "is absolute"),
        ("", "is empty"),
        ("references/" + "a" * 190, "longer than 200 bytes"),
        ("references/" + "é" * 95, "longer than 200 bytes"),  # 201 bytes in UTF-8
        ("references/aux.md", "Windows keeps for a device"),
        ("scripts/NUL", "Windows keeps for a device"),
        ("assets/lpt1/x.md", "Windows keeps for a device"),
        ("assets/.git/config", "segment starting with '.'"),
        ("scripts/.env", "segment starting with '.'"),
        ("references/notes.md ", "begins or ends with a space"),
        ("references/ notes.md", "begins or ends with a space"),
        ("references/notes.", "ends with '.'"),
        ("references/a:b.md", "Windows cannot name"),
        ("references/cafe\u0301.md", "not in Unicode NFC form"),
    ],
)
def test_containment_of_bundled_files(path: str, problem: str):
    reasons = run(files=[GUIDE, DraftFile(path=path, content="x")])
    assert gates(reasons) == ["containment"]
    assert problem in reasons[0]


def test_bundled_files_may_not_collide():
    files = [GUIDE, DraftFile(path="references/Guide.md", content="y")]
    reasons = run(files=files)
    assert gates(reasons) == ["containment"]
    assert "collides with 'references/guide.md'" in reasons[0]


def test_a_bundled_file_where_a_directory_is_fails_at_the_gate():
    """Gates counted the files on disk only: an empty directory at a bundled path passed, and
    the plugin failed at its write, after both requests (as would every retry)."""
    reasons = run(files=[GUIDE], directories=frozenset({"references", "references/Guide.md"}))
    assert reasons == ["containment: bundled file 'references/guide.md' is the existing directory "
                       "'references/Guide.md'"]
    assert run(files=[GUIDE], directories=frozenset({"references"})) == []


def test_names_that_only_look_like_windows_devices_are_fine():
    files = [GUIDE, *(DraftFile(path=f"references/{n}", content="x") for n in ("console.md", "com10.md", "nullify"))]
    assert run(files=files) == []


def test_bundled_files_are_readable_text_of_a_bounded_size():
    files = [GUIDE, DraftFile(path="references/big.md", content="x" * 100_001),  # and the newline it ends with
             DraftFile(path="scripts/run.sh", content="#!/bin/sh\necho \x1b[2J\x00\x1e\n")]
    assert run(files=files) == ["encoding: bundled file 'references/big.md' is 100,002 bytes, above the maximum of "
                                "100,000; bundled file 'scripts/run.sh' holds 3 control or unpaired surrogate "
                                "characters (first U+001B)"]  # U+001E too, a line break to str.splitlines
    assert run(files=[GUIDE, DraftFile(path="references/ok.md", content="x" * 99_997 + "\r\n\t")]) == []


@pytest.mark.parametrize("field", ["description", "allowed_tools"])
def test_control_characters_in_the_frontmatter_fail_as_in_the_body(field):
    """The composer escapes them in the YAML (\\x1b), so the text passed its encoding gate, and
    the frontmatter read back held a terminal's escape sequence."""
    value = "Clears the screen \x1b[2J and rings \x07."
    reasons = run(**({"description": value} if field == "description" else {"tools": [value]}))
    key = "description" if field == "description" else "allowed-tools"
    assert reasons == [f"encoding: the {key} holds 2 control characters (first U+001B)"]


def test_a_reason_stays_one_short_line_however_long_what_it_quotes():
    fence = "`" * 60_000
    reasons = run(good_body(extra=f"\n{fence}\nnever closed\n"), config=GateConfig(max_bytes=100_000))
    assert len(reasons) == 1 and reasons[0].startswith("fences: the ```... fence opened on line "), reasons
    assert all(len(r) <= 1000 for r in run(files=[GUIDE, *(DraftFile(path=f"x{i}/" + "y" * 150, content="z")
                                                             for i in range(5))]))


@pytest.mark.parametrize(("files", "existing", "problem"), [
    (["references/guide.md/more.md"], [],
     "'references/guide.md' is also the directory of 'references/guide.md/more.md'"),
    (["scripts/run"], ["scripts/run/x.sh"], "'scripts/run' is also the directory of 'scripts/run/x.sh'"),
    (["assets/img/logo.svg"], ["assets/img"], "'assets/img/logo.svg' needs 'assets/img', a file, to be a directory"),
    ([], ["references/Guide.md"], "'references/guide.md' differs only in letter case or Unicode form from the "
                                  "existing 'references/Guide.md'"),
])
def test_bundled_files_keep_apart_from_each_other_and_from_files_on_disk(files, existing, problem):
    reasons = run(files=[GUIDE, *(DraftFile(path=p, content="x") for p in files)], existing=frozenset(existing))
    assert gates(reasons) == ["containment"]
    assert problem in reasons[0]


def test_a_bundled_file_may_replace_the_same_file_on_disk():
    assert run(existing=frozenset({"references/guide.md", "scripts/old.sh"})) == []


@pytest.mark.parametrize(
    "link", ["[up](../README.md)", "[deep](references/../../secret)", "[bs](references\\guide.md)",
             "[enc](references/%2E%2E/%2E%2E/x)"],
)
def test_containment_of_link_targets(link: str):
    reasons = run(good_body(extra=link))
    assert gates(reasons) == ["containment"]


def test_reasons_come_in_gate_order():
    body = good_body(padding=2, examples=0, instructions="You and you and you. See /home/dev/x.")
    body = body.replace("## Output", "## Outcome") + "\n[x](references/none.md)\n```\nopen"
    reasons = run(body, name="wrong-dir", files=[GUIDE, DraftFile(path="../x", content="")])
    assert gates(reasons) == [
        "spec", "size", "sections", "voice", "fences", "examples", "links", "absolute paths",
        "containment",
    ]


# ------------------------------------------------------------------ hostile input


def test_hostile_input_never_raises():
    rng = random.Random(11)
    samples = [
        "",
        "\x00" * 100,
        "---",
        "---\n---",
        "---\n: : :\n---\n",
        "---\nname: [a, b]\n---\n",
        "---\nname: &a x\nb: *a\n---\n",
        "---\n" + "a: " * 10_000 + "\n---\n",
        "---\n" + "- x\n" * 4000 + "---\n",
        "---\n" + "- " * 5000 + "x\n---\n",
        "x" * 1_000_000,
        "`" * 100_000 + "x" + "``" * 100_000,
        "](" * 300_000,
        "## " + " " * 300_000 + "#",
        "/a" * 300_000,
        "~/" * 300_000,
        "a+a" * 300_000,
        "[x](" + "./" * 300_000 + ")",
        "```\n" * 50_000,
        "\ud800 lone surrogate \udfff",
        "".join(chr(rng.randint(0, 0x10FFFF)) for _ in range(200_000)),
    ]
    hostile_files = [
        DraftFile(path="\x00/..\\\ud800", content="\x00"),
        DraftFile(path="a" * 5000, content=""),
    ]
    for text in samples:
        start = time.perf_counter()
        for candidate in (text, compose(NAME, draft(text, description=text[:2000]))):
            reasons = check(NAME, candidate, hostile_files, {"\x00", ""})
            assert reasons and all(isinstance(r, str) and "\n" not in r for r in reasons)
        assert time.perf_counter() - start < 5, text[:20]


@pytest.mark.parametrize("text", [
    "Edit /etc/nginx/nginx.conf and reload.",
    "```bash\nls /usr/local/bin\n```",
    "Call GET /api/v1/users to list users.",
])
def test_system_paths_and_web_routes_are_not_machine_paths(text: str):
    assert not any(r.startswith("absolute paths") for r in run(good_body(instructions=text)))
