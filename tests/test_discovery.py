"""Discovery, tree hashing and analysis over marketplaces built in tmp_path, bad content too."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from skills_ref.validator import validate_metadata

from statemachine import analysis
from statemachine.analysis import analyze, hash_tree
from statemachine.discovery import Candidate, discover
from statemachine.names import InvalidName, skill_name
from tests.marketplace_builder import manifest, plugin, skill_md, write

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "example-marketplace"
PJ = ".claude-plugin/plugin.json"


def by_id(root: Path) -> dict[str, Candidate]:
    return {c.plugin_id: c for c in discover(root).candidates}


def only(root: Path) -> Candidate:
    candidates = discover(root).candidates
    assert len(candidates) == 1, candidates
    return candidates[0]


# ------------------------------------------------------------------ names


@pytest.mark.parametrize("given, expected", [
    ("sugar", "sugar"),
    ("My_Plugin.v2", "my-plugin-v2"),
    ("  Deploy   Checker ", "deploy-checker"),
    ("a--b__c..d", "a-b-c-d"),
    ("-edge-", "edge"),
])
def test_skill_name_normalizes_into_a_name_the_validator_accepts(given, expected):
    name = skill_name(given)
    assert name == expected
    assert validate_metadata({"name": name, "description": "x"}, Path("/x") / name) == []


@pytest.mark.parametrize("given", [
    "", "   ", "---", "a/b", "..", "../etc", "a\\b", "a\x00b", "tab\there", "café", "x" * 65,
])
def test_skill_name_refuses_what_cannot_be_a_skill_directory(given):
    with pytest.raises(InvalidName) as info:
        skill_name(given)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ listing


def test_manifest_entries_and_unlisted_directories_are_both_found(tmp_path):
    plugin(tmp_path, "plugins/devops/listed", "listed")
    plugin(tmp_path, "plugins/ai/unlisted", "unlisted")
    plugin(tmp_path, "plugins/deep/er/nested", "nested")
    plugin(tmp_path, "plugins/flat", "flat")
    manifest(tmp_path, [{"name": "listed", "source": "./plugins/devops/listed/"}])
    found = discover(tmp_path)
    assert found.warnings == []
    assert [c.plugin_id for c in found.candidates] == [
        "plugins/ai/unlisted", "plugins/deep/er/nested", "plugins/devops/listed", "plugins/flat"]
    cands = {c.plugin_id: c for c in found.candidates}
    assert cands["plugins/devops/listed"].listed is True
    assert cands["plugins/ai/unlisted"].listed is False
    assert cands["plugins/ai/unlisted"].category == "ai"
    assert cands["plugins/flat"].category == "uncategorized"
    assert all(c.problem is None and c.path == c.plugin_id for c in found.candidates)


def test_the_manifest_wins_for_name_and_category(tmp_path):
    plugin(tmp_path, "plugins/misc/tool", "Old Name")
    manifest(tmp_path, [{"name": "New Name", "source": "plugins/misc/tool",
                         "category": "productivity"}])
    c = only(tmp_path)
    assert (c.name, c.category, c.skill_name, c.listed) == (
        "New Name", "productivity", "new-name", True)


def test_the_manifest_name_excuses_a_plugin_json_without_one(tmp_path):
    plugin(tmp_path, "plugins/misc/tool", None, version="1.0.0")
    manifest(tmp_path, [{"name": "tool", "source": "./plugins/misc/tool"}])
    assert only(tmp_path).problem is None


def test_a_source_listed_twice_is_one_candidate_and_a_warning(tmp_path):
    plugin(tmp_path, "plugins/a/x", "x")
    manifest(tmp_path, [{"name": "x", "source": "./plugins/a/x"},
                        {"name": "x", "source": "plugins/a/x/"}])
    found = discover(tmp_path)
    assert len(found.candidates) == 1 and found.candidates[0].problem is None
    assert len(found.warnings) == 1 and "listed twice" in found.warnings[0]


@pytest.mark.parametrize("content, expected", [
    ("{\n  \"plugins\": [\n    {,}\n  ]\n}", "invalid JSON at line 3 column 6"),
    ("[1, 2]", "is not a JSON object"),
    ('{"plugins": {"a": 1}}', "'plugins' is not a list"),
    ("", "is empty"),
    (b"\xff\xfe{}", "is not UTF-8"),
])
def test_a_broken_manifest_falls_back_to_directories(tmp_path, content, expected):
    plugin(tmp_path, "plugins/a/x", "x")
    write(tmp_path / ".claude-plugin" / "marketplace.json", content)
    found = discover(tmp_path)
    assert [c.plugin_id for c in found.candidates] == ["plugins/a/x"]
    assert found.candidates[0].problem is None
    assert len(found.warnings) == 1 and expected in found.warnings[0]
    assert found.warnings[0].startswith(".claude-plugin/marketplace.json")


# ------------------------------------------------------------------ manifest sources


@pytest.mark.parametrize("source, expected", [
    ("../outside", "source '../outside' points outside the repository"),
    ("plugins/../../outside", "points outside the repository"),
    ("/etc", "source '/etc' is an absolute path; a source is relative to the marketplace root"),
    ("./plugins/x/y", "source './plugins/x/y' does not exist"),
    ("./plugins/a/.git", "source './plugins/a/.git' is inside .git, which is never a plugin"),
    ("node_modules/pkg", "source 'node_modules/pkg' is inside node_modules, which is never a plugin"),
    ("plugins/a/\u0000x", "source 'plugins/a/\\u0000x' holds a NUL character, which no path can"),
    ({"source": "github", "repo": "owner/x"}, "remote github source"),
    ({"source": "url", "url": "https://example.com/x.git"}, "remote url source"),
])
def test_manifest_sources_that_are_not_local_plugin_dirs_are_problems(tmp_path, source, expected):
    (tmp_path / "market").mkdir()
    (tmp_path / "outside" / ".claude-plugin").mkdir(parents=True)
    write(tmp_path / "outside" / PJ, '{"name": "outside"}')
    root = tmp_path / "market"
    manifest(root, [{"name": "x", "source": source}])
    c = only(root)
    assert c.listed and c.name == "x"
    assert c.problem is not None and expected in c.problem
    assert c.problem.startswith(".claude-plugin/marketplace.json entry 'x': source ")
    assert "\n" not in c.problem and "\x00" not in c.problem


def test_a_source_escaping_through_a_symlink_is_refused(tmp_path):
    outside = plugin(tmp_path, "outside", "outside")
    root = tmp_path / "market"
    (root / "plugins" / "a").mkdir(parents=True)
    os.symlink(outside, root / "plugins" / "a" / "escape")
    manifest(root, [{"name": "escape", "source": "./plugins/a/escape"}])
    assert only(root).problem == (".claude-plugin/marketplace.json entry 'escape': source './plugins/a/escape' "
                                  "points outside the repository")


def test_a_source_directory_without_plugin_json_says_so(tmp_path):
    write(tmp_path / "plugins/devops/sugar/plugin.json", '{"name": "sugar"}')
    write(tmp_path / "plugins/devops/bare/README.md", "# bare\n")
    manifest(tmp_path, [{"name": "sugar", "source": "./plugins/devops/sugar"},
                        {"name": "bare", "source": "./plugins/devops/bare"}])
    cands = by_id(tmp_path)
    assert cands["plugins/devops/bare"].problem == "missing .claude-plugin/plugin.json"
    assert cands["plugins/devops/sugar"].problem == (
        "missing .claude-plugin/plugin.json (found plugin.json at the plugin root; "
        "Claude Code reads .claude-plugin/plugin.json)")


# ------------------------------------------------------------------ plugin.json


@pytest.mark.parametrize("content, expected", [
    (b"", ".claude-plugin/plugin.json is empty"),
    (b"  \n\t\n", ".claude-plugin/plugin.json is empty"),
    (b'{"name": "x",\n  "version": }',
     ".claude-plugin/plugin.json: invalid JSON at line 2 column 14"),
    (b'{"name": "caf\xe9"}', ".claude-plugin/plugin.json is not UTF-8 (invalid byte at offset 13)"),
    (b'["x"]', ".claude-plugin/plugin.json is not a JSON object"),
    (b'{"version": "1.0.0"}', ".claude-plugin/plugin.json has no 'name'"),
    (b'{"name": 42}', ".claude-plugin/plugin.json: 'name' is not a string"),
    (b"[" * 100_000 + b"]" * 100_000,
     ".claude-plugin/plugin.json: invalid JSON: nested too deeply"),
    (b'{"name": "x", "version": NaN}', ".claude-plugin/plugin.json: invalid JSON: NaN is not JSON"),
    (b'{"name": "x", "size": -Infinity}', ".claude-plugin/plugin.json: invalid JSON: -Infinity is not JSON"),
])
def test_bad_plugin_json_is_a_one_line_problem(tmp_path, content, expected):
    write(tmp_path / "plugins/a/x" / PJ, content)
    problem = only(tmp_path).problem
    assert problem is not None and problem.startswith(expected), problem
    assert "\n" not in problem


def test_a_huge_plugin_json_is_refused_by_size_without_reading_it(tmp_path):
    path = write(tmp_path / "plugins/a/x" / PJ, b"")
    with open(path, "wb") as f:
        f.truncate(3 * 1024 * 1024 * 1024)  # sparse: reading it would take seconds and memory
    assert only(tmp_path).problem == (
        ".claude-plugin/plugin.json is too large (3221225472 bytes; the limit is 1048576)")


def test_a_directory_named_plugin_json_is_a_problem(tmp_path):
    (tmp_path / "plugins/a/x" / PJ).mkdir(parents=True)
    assert only(tmp_path).problem == ".claude-plugin/plugin.json is a directory, not a file"


def test_a_fifo_named_plugin_json_is_never_opened(tmp_path):
    (tmp_path / "plugins/a/x/.claude-plugin").mkdir(parents=True)
    os.mkfifo(tmp_path / "plugins/a/x" / PJ)
    assert only(tmp_path).problem == ".claude-plugin/plugin.json is not a regular file (a FIFO)"


def test_plugin_json_symlinks_are_only_followed_inside_the_marketplace(tmp_path):
    write(tmp_path / "secret.json", '{"name": "secret"}')
    root = tmp_path / "market"
    write(root / "shared.json", '{"name": "shared"}')
    for name in ("outside", "inside", "dangling", "loop"):
        (root / "plugins/a" / name / ".claude-plugin").mkdir(parents=True)
    os.symlink(tmp_path / "secret.json", root / "plugins/a/outside" / PJ)
    os.symlink("../../../../shared.json", root / "plugins/a/inside" / PJ)
    os.symlink("nowhere.json", root / "plugins/a/dangling" / PJ)
    os.symlink("plugin.json", root / "plugins/a/loop" / PJ)
    cands = by_id(root)
    assert cands["plugins/a/outside"].problem.startswith(
        ".claude-plugin/plugin.json is a symlink pointing outside the marketplace")
    assert cands["plugins/a/inside"].problem is None
    assert cands["plugins/a/inside"].name == "shared"
    assert cands["plugins/a/dangling"].problem == (
        ".claude-plugin/plugin.json is a dangling symlink (-> nowhere.json)")
    assert cands["plugins/a/loop"].problem == ".claude-plugin/plugin.json is a symlink loop"


def test_a_claude_plugin_dir_symlinked_outside_is_not_read(tmp_path):
    outside = plugin(tmp_path, "outside", "outside")
    root = tmp_path / "market"
    (root / "plugins/a/x").mkdir(parents=True)
    os.symlink(outside / ".claude-plugin", root / "plugins/a/x/.claude-plugin")
    assert only(root).problem == ".claude-plugin/plugin.json resolves outside the marketplace"


def test_directory_symlink_loops_do_not_hang_discovery_or_hashing(tmp_path):
    directory = plugin(tmp_path, "plugins/a/x", "x", files={"README.md": "# x\n"})
    os.symlink("..", directory / "up")
    os.symlink("loop", directory / "loop")
    os.symlink(tmp_path, tmp_path / "plugins" / "root-again")
    c = only(tmp_path)
    assert c.problem is None
    tree = hash_tree(tmp_path, directory)
    assert tree.files == 2 and tree.problem is None
    assert any("loop -> loop" in w for w in tree.warnings)


# ------------------------------------------------------------------ names of plugins


@pytest.mark.parametrize("name, expected", [
    ("a/b", "plugin name 'a/b' cannot become a skill name: it contains the character '/'"),
    ("bad\u0000name", "plugin name 'bad\\u0000name' cannot become a skill name"),
    ("x" * 200, "cannot become a skill name: it becomes 200 characters long; the limit is 64"),
    ("naïve", "plugin name 'naïve' cannot become a skill name: it contains the character U+00EF"),
    ("", "plugin name '' cannot become a skill name: the name is empty"),
])
def test_names_that_cannot_become_skill_names_are_problems(tmp_path, name, expected):
    plugin(tmp_path, "plugins/a/x", name)
    c = only(tmp_path)
    assert c.skill_name is None
    assert c.problem is not None and expected in c.problem, c.problem
    assert "\x00" not in c.problem


def test_the_first_plugin_by_id_keeps_a_duplicate_name(tmp_path):
    plugin(tmp_path, "plugins/a/x", "Formatter")
    plugin(tmp_path, "plugins/b/x", "formatter")
    plugin(tmp_path, "plugins/c/x", "Formatter")
    cands = by_id(tmp_path)
    assert cands["plugins/a/x"].problem is None
    assert cands["plugins/a/x"].skill_name == "formatter"
    assert cands["plugins/b/x"].problem == (
        "its name 'formatter' makes the skill name 'formatter', which plugins/a/x (named 'Formatter') has")
    assert cands["plugins/c/x"].problem == "duplicate plugin name 'Formatter' (also used by plugins/a/x)"
    assert cands["plugins/b/x"].skill_name is None and cands["plugins/c/x"].skill_name is None


# ------------------------------------------------------------------ tree hash


def test_the_content_hash_is_stable_and_sees_one_changed_byte(tmp_path):
    directory = plugin(tmp_path, "plugins/a/x", "x",
                       files={"README.md": "# x\n", "commands/run.md": "run it\n"})
    first, second = hash_tree(tmp_path, directory), hash_tree(tmp_path, directory)
    assert first == second
    assert (first.files, first.bytes) == (3, len((directory / PJ).read_bytes()) + 4 + 7)
    (directory / "commands/run.md").write_text("run iT\n")
    assert hash_tree(tmp_path, directory).content_hash != first.content_hash


def test_symlinks_and_fifos_in_a_plugin_are_hashed_not_followed(tmp_path):
    write(tmp_path / "secret.txt", "top secret\n")
    root = tmp_path / "market"
    directory = plugin(root, "plugins/a/x", "x", files={"README.md": "# x\n"})
    (directory / "commands").mkdir()
    os.symlink(tmp_path / "secret.txt", directory / "commands" / "leak.md")
    os.mkfifo(directory / "pipe")
    tree = hash_tree(root, directory)
    assert tree.files == 2
    leak = f"commands/leak.md -> {tmp_path / 'secret.txt'}"
    assert f"symlink {leak} not followed (outside the marketplace)" in tree.warnings
    assert "skipped a FIFO pipe" in tree.warnings
    before = tree.content_hash
    (tmp_path / "secret.txt").write_text("changed\n")
    assert hash_tree(root, directory).content_hash == before
    facts = analyze(root, only(root), tree)
    assert facts.commands == []


def test_a_plugin_over_the_size_limit_is_too_large_without_reading(tmp_path):
    directory = plugin(tmp_path, "plugins/a/x", "x")
    with open(directory / "blob.bin", "wb") as f:
        f.truncate(analysis.MAX_BYTES + 1)
    tree = hash_tree(tmp_path, directory)
    assert tree.problem == "the plugin holds more than 200 MiB"


def test_a_plugin_with_too_many_entries_is_too_large(tmp_path, monkeypatch):
    monkeypatch.setattr(analysis, "MAX_ENTRIES", 10)
    directory = plugin(tmp_path, "plugins/a/x", "x",
                       files={f"commands/c{i}.md": "c\n" for i in range(20)})
    assert hash_tree(tmp_path, directory).problem == (
        "the plugin has more than 10 files and directories")


# ------------------------------------------------------------------ analysis


def test_analysis_reports_the_structure_of_a_plugin(tmp_path):
    directory = plugin(tmp_path, "plugins/devops/deployer", "deployer", version="2.1.0",
                       keywords=["deploy", 3], mcpServers={}, files={
                           "README.md": "# Deployer\n",
                           "commands/ship.md": "ship\n",
                           "commands/abort.md": "abort\n",
                           "commands/notes.txt": "not a command\n",
                           "agents/reviewer.md": "review\n",
                           "hooks/hooks.json": "{}",
                           "skills/deployer/scripts/check.sh": "true\n",
                           "skills/deployer/scripts/lib/util.sh": "true\n",
                           "skills/deployer/SKILL.md": skill_md("deployer"),
                       })
    manifest(tmp_path, [{"name": "deployer", "source": "./plugins/devops/deployer",
                         "description": "Ships things", "version": "9.9.9"}])
    tree = hash_tree(tmp_path, directory)
    facts = analyze(tmp_path, only(tmp_path), tree)
    assert facts.version == "2.1.0"  # plugin.json first
    assert facts.description == "Ships things"  # manifest as fallback
    assert facts.keywords == ["deploy"]
    assert facts.readme_bytes == len("# Deployer\n")
    assert facts.commands == ["abort", "ship"]
    assert facts.agents == ["reviewer"]
    assert facts.hooks and facts.mcp
    assert facts.scripts == 2
    assert [(s.dir, s.valid, s.errors) for s in facts.skills] == [("deployer", True, [])]
    assert (facts.files, facts.bytes) == (tree.files, tree.bytes)
    assert facts.warnings == ['.claude-plugin/plugin.json: "keywords" holds values that are not strings; '
                              "those are not used"]


def test_a_legacy_skill_adapter_fails_with_the_validator_message(tmp_path):
    content = skill_md("formatter", author="Someone", version="1.0.0")
    directory = plugin(tmp_path, "plugins/a/formatter", "formatter",
                       files={"skills/skill-adapter/SKILL.md": content})
    facts = analyze(tmp_path, only(tmp_path), hash_tree(tmp_path, directory))
    (skill,) = facts.skills
    assert (skill.dir, skill.bytes, skill.valid) == ("skill-adapter", len(content), False)
    assert "Directory name 'skill-adapter' must match skill name 'formatter'" in skill.errors
    assert any(e.startswith("Unexpected fields in frontmatter: author, version")
               for e in skill.errors)


@pytest.mark.parametrize("content, expected", [
    (b"---\nname: x\ndescription: \xff\n---\n", "SKILL.md is not UTF-8"),
    (b"# no frontmatter\n", "SKILL.md must start with YAML frontmatter (---)"),
    (b"---\nname: x\n", "SKILL.md frontmatter not properly closed with ---"),
    (b"---\nname: x\x00\n---\n", "SKILL.md frontmatter cannot be parsed"),
])
def test_unusable_skill_files_are_errors_not_crashes(tmp_path, content, expected):
    directory = plugin(tmp_path, "plugins/a/x", "x", files={"skills/x/SKILL.md": content})
    (skill,) = analyze(tmp_path, only(tmp_path), hash_tree(tmp_path, directory)).skills
    assert not skill.valid and skill.errors[0].startswith(expected), skill.errors


def test_a_skill_file_linked_outside_is_not_read(tmp_path):
    write(tmp_path / "SKILL.md", skill_md("x"))
    root = tmp_path / "market"
    directory = plugin(root, "plugins/a/x", "x")
    (directory / "skills/x").mkdir(parents=True)
    os.symlink(tmp_path / "SKILL.md", directory / "skills/x/SKILL.md")
    (skill,) = analyze(root, only(root), hash_tree(root, directory)).skills
    assert not skill.valid
    assert skill.errors[0].startswith("SKILL.md is a symlink pointing outside the marketplace")


def test_markdown_that_is_not_utf8_is_a_warning(tmp_path):
    directory = plugin(tmp_path, "plugins/a/x", "x", files={
        "README.md": b"caf\xe9\n", "commands/bad.md": b"\xff\xfe", "agents/ok.md": "ok\n"})
    facts = analyze(tmp_path, only(tmp_path), hash_tree(tmp_path, directory))
    assert facts.warnings == ["README.md is not UTF-8", "commands/bad.md is not UTF-8"]
    assert facts.commands == ["bad"] and facts.agents == ["ok"]


# ------------------------------------------------------------------ the shipped example


def test_the_example_marketplace():
    found = discover(EXAMPLE)
    assert found.warnings == []
    assert [(c.plugin_id, c.category, c.skill_name, c.listed, c.problem)
            for c in found.candidates] == [
        ("plugins/database/schema-linter", "database", "schema-linter", True, None),
        ("plugins/devops/deploy-checker", "devops", "deploy-checker", True, None),
        ("plugins/productivity/meeting-notes", "productivity", "meeting-notes", True, None),
        ("plugins/security/secret-scanner", "security", "secret-scanner", True, None),
    ]
    facts = {c.plugin_id.rsplit("/", 1)[1]:
             analyze(EXAMPLE, c, hash_tree(EXAMPLE, EXAMPLE / c.path)) for c in found.candidates}
    assert all(f.warnings == [] and f.readme_bytes for f in facts.values())
    assert [(s.dir, s.valid) for s in facts["schema-linter"].skills] == [("schema-linter", True)]
    (legacy,) = facts["deploy-checker"].skills
    assert legacy.dir == "skill-adapter" and not legacy.valid
    assert facts["deploy-checker"].commands == ["check-deploy", "rollback-plan"]
    assert facts["meeting-notes"].skills == [] and facts["meeting-notes"].agents == []
    assert facts["secret-scanner"].hooks and not facts["secret-scanner"].mcp
    assert json.loads((EXAMPLE / ".claude-plugin/marketplace.json").read_text())["plugins"]
