"""The CLI contract (scan, status, audit), through click as a user calls it, on real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import apsw
import click
import pytest
from click.testing import CliRunner

from cli.main import main
from cli.options import Terminated
from events.lock import WriterLock
from tests.marketplace_builder import manifest, plugin, write
from tests.privileges import needs_permissions, unprivileged

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "example-marketplace"


def run(*args: str, env: dict | None = None) -> click.testing.Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def as_json(result) -> dict:
    return json.loads(result.stdout)


@pytest.fixture
def market(tmp_path) -> Path:
    root = tmp_path / "market"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns(".overnight"))
    return root


def db_of(root: Path) -> Path:
    return root / ".overnight" / "overnight.db"


def event_count(root: Path) -> int:
    conn = apsw.Connection(str(db_of(root)))
    try:
        return conn.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        conn.close()


def test_scan_records_every_plugin_and_a_second_scan_appends_nothing(market):
    first = run("scan", market, "--json")
    assert first.exit_code == 0, first.output
    report = as_json(first)
    assert (report["plugins"], report["new"], report["invalid"]) == (4, 4, 0)
    assert report["events"] == 9 == event_count(market)  # the log's binding to the marketplace, 2 per plugin
    second = as_json(run("scan", market, "--json"))
    assert (second["unchanged"], second["events"]) == (4, 0)
    assert event_count(market) == 9
    git = subprocess.run(["git", "init", "-q", str(market)], capture_output=True)
    assert git.returncode == 0, git.stderr
    untracked = subprocess.run(["git", "-C", str(market), "status", "--porcelain", "--untracked-files=all"],
                               capture_output=True, text=True, check=True).stdout
    assert ".overnight" not in untracked and "plugins/" in untracked  # the log is kept out of git


def test_scan_sees_changed_vanished_and_repaired_plugins(market):
    run("scan", market)
    readme = market / "plugins" / "devops" / "deploy-checker" / "README.md"
    readme.write_text(readme.read_text() + "\nOne more line.\n")
    shutil.rmtree(market / "plugins" / "security" / "secret-scanner")
    listing = market / ".claude-plugin" / "marketplace.json"
    data = json.loads(listing.read_text())
    data["plugins"] = [p for p in data["plugins"] if p["name"] != "secret-scanner"]
    listing.write_text(json.dumps(data))
    report = as_json(run("scan", market, "--json"))
    assert (report["changed"], report["vanished"], report["unchanged"]) == (1, 1, 2)
    assert report["events"] == 3  # rediscovered + analyzed, vanished
    status = as_json(run("status", market, "--json"))
    assert status["by_state"] == {"analyzed": 3, "gone": 1}

    pj = market / "plugins" / "productivity" / "meeting-notes" / ".claude-plugin" / "plugin.json"
    good = pj.read_text()
    pj.write_text("{ not json")
    report = as_json(run("scan", market, "--json"))
    assert report["invalid"] == 1 and report["changed"] == 1
    assert "invalid JSON" in report["problems"][0]["reason"]
    assert as_json(run("scan", market, "--json"))["events"] == 0  # still invalid, same reason
    pj.write_text(good)
    report = as_json(run("scan", market, "--json"))
    assert (report["invalid"], report["changed"]) == (0, 1)
    assert as_json(run("status", market, "--json"))["by_state"] == {"analyzed": 3, "gone": 1}
    assert run("audit", "verify", market).exit_code == 0


def test_bad_plugins_are_recorded_with_reasons_and_the_scan_goes_on(tmp_path):
    root = tmp_path / "m"
    outside = tmp_path / "outside"
    write(outside / "secret.txt", "do not read")
    manifest(root, [
        {"name": "good", "source": "./plugins/a/good"},
        {"name": "escape", "source": "../outside"},
        {"name": "missing", "source": "./plugins/a/missing"},
        {"name": "remote", "source": "https://github.com/foo/bar.git"},
        {"name": "ssh", "source": "git@github.com:foo/bar.git"},
        {"name": "short", "source": "github:foo/bar"},
        {"name": "blank", "source": ""},
    ])
    plugin(root, "plugins/a/good", "good", files={"README.md": "# Good\n"})
    write(root / "plugins/a/broken/.claude-plugin/plugin.json", "{")
    write(root / "plugins/a/empty/.claude-plugin/plugin.json", "")
    write(root / "plugins/a/latin1/.claude-plugin/plugin.json", b'{"name": "caf\xe9"}')
    write(root / "plugins/a/bigint/.claude-plugin/plugin.json", '{"name": "bigint", "version": ' + "1" * 5000 + "}")
    plugin(root, "plugins/b/good", "good")  # duplicate name
    plugin(root, "plugins/b/slash", "a/../b")
    plugin(root, "plugins/b/looped", "looped")
    os.symlink("..", root / "plugins/b/looped/loop")
    os.symlink(outside / "secret.txt", root / "plugins/b/looped/leak.md")
    result = run("scan", root, "--json")
    assert result.exit_code == 0, result.output
    report = as_json(result)
    reasons = {p["plugin"]: p["reason"] for p in report["problems"]}
    assert set(reasons) == {"../outside", "plugins/a/missing", "plugins/a/broken", "plugins/a/empty",
                            "plugins/a/latin1", "plugins/a/bigint", "plugins/b/good", "plugins/b/slash",
                            "https://github.com/foo/bar.git", "git@github.com:foo/bar.git", "github:foo/bar", '""'}
    for url in ("https://github.com/foo/bar.git", "git@github.com:foo/bar.git", "github:foo/bar"):  # "does not exist"
        assert reasons[url].endswith(f"source '{url}' is a URL; only plugins inside the repository are processed")
    assert "outside the repository" in reasons["../outside"]
    assert reasons['""'] == ".claude-plugin/marketplace.json entry 'blank': source is empty"
    assert "does not exist" in reasons["plugins/a/missing"]
    assert "invalid JSON" in reasons["plugins/a/broken"]
    assert "empty" in reasons["plugins/a/empty"]
    assert "UTF-8" in reasons["plugins/a/latin1"]
    assert reasons["plugins/a/bigint"] == (".claude-plugin/plugin.json: invalid JSON: Exceeds the limit (4300 digits) "
                                           "for integer string conversion: value has 5000 digits")
    assert "duplicate plugin name 'good'" in reasons["plugins/b/good"]
    assert "cannot become a skill name" in reasons["plugins/b/slash"]
    status = as_json(run("status", root, "--json", "--state", "invalid"))
    assert status["by_state"] == {"analyzed": 2, "invalid": 12}
    assert {i["plugin_id"] for i in status["items"]} == set(reasons)
    looped = as_json(run("status", root, "--json", "--plugin", "plugins/b/looped"))["items"][0]
    assert looped["state"] == "analyzed"
    assert "do not read" not in db_of(root).read_bytes().decode("latin-1")
    # a plugin added later under a name taken is the duplicate, not the plugin that had it
    plugin(root, "plugins/a/copy", "looped")
    again = as_json(run("scan", root, "--json"))
    assert {p["plugin"]: p["reason"] for p in again["problems"]}["plugins/a/copy"] == (
        "duplicate plugin name 'looped' (also used by plugins/b/looped)")
    assert as_json(run("status", root, "--json", "--plugin", "plugins/b/looped"))["items"][0]["state"] == "analyzed"


def test_a_marketplace_json_that_python_cannot_read_is_a_warning_and_the_scan_goes_on(market):
    """A number of 5,000 digits stopped every command that scans, with an internal error."""
    (market / ".claude-plugin/marketplace.json").write_text('{"plugins": [], "version": ' + "9" * 5000 + "}")
    result = run("scan", market, "--json")
    assert result.exit_code == 0, result.output
    report = as_json(result)
    assert report["warnings"][0].startswith(".claude-plugin/marketplace.json: invalid JSON: Exceeds the limit "
                                            "(4300 digits)"), report["warnings"]
    assert as_json(run("status", market, "--json"))["by_state"] == {"analyzed": 4}


def test_a_symlink_to_a_plugin_under_plugins_is_a_warning(tmp_path):
    """A plugin reached through a symlink under plugins/ was left out without a word."""
    root = tmp_path / "market"
    plugin(root, "plugins/a/real", "real")
    plugin(root, "vendor/linked", "linked")
    os.symlink("../../vendor/linked", root / "plugins" / "a" / "linked")
    os.symlink("../../nowhere", root / "plugins" / "a" / "dangling")  # no plugin there: no word
    (root / "docs").mkdir()
    os.symlink("../../docs", root / "plugins" / "a" / "docs")  # a directory, no plugin: no word
    report = as_json(run("scan", root, "--json"))
    assert report["plugins"] == 1 and report["warnings"] == [
        "skipped plugins/a/linked: a symlink to a plugin (never followed); move the plugin there, or list its "
        "real directory in marketplace.json"]


def test_fields_of_the_wrong_type_are_warnings_naming_the_plugin_and_the_field(tmp_path):
    """A license given npm's way ({"type": "MIT"}) was left out of the SKILL.md without a word; so
    was any other field of the wrong type. What the analysis notes (a README that is not UTF-8)
    was kept in its event only."""
    root = tmp_path / "market"
    plugin(root, "plugins/a/npm", "npm", license={"type": "MIT"}, keywords="a, b", version=2,
           files={"README.md": b"caf\xe9\n"})
    plugin(root, "plugins/a/fine", "fine", license="MIT", keywords=["a"], version="1.0.0")
    manifest(root, [{"name": "npm", "source": "./plugins/a/npm", "description": ["not", "text"]}])
    report = as_json(run("scan", root, "--json"))
    assert report["warnings"] == [
        'plugins/a/npm: .claude-plugin/plugin.json: "version" is a number, not a string; not used',
        'plugins/a/npm: .claude-plugin/plugin.json: "license" is an object, not a string; not used',
        'plugins/a/npm: .claude-plugin/plugin.json: "keywords" is a string, not a list; not used',
        'plugins/a/npm: its entry in .claude-plugin/marketplace.json: "description" is a list, not a string; '
        "not used",
        "plugins/a/npm: README.md is not UTF-8"]
    assert as_json(run("scan", root, "--json"))["warnings"] == []  # told once, when the plugin is analyzed


def test_status_json_contract_and_filters(market):
    run("scan", market)
    everything = as_json(run("status", market, "--json"))
    assert everything["plugins"] == 4 and everything["by_state"] == {"analyzed": 4}
    one = as_json(run("status", market, "--json", "--plugin", "deploy-checker"))
    assert [i["plugin_id"] for i in one["items"]] == ["plugins/devops/deploy-checker"]
    by_state = as_json(run("status", market, "--json", "--state", "analyzed"))
    assert len(by_state["items"]) == 4
    human = run("status", market)
    assert human.exit_code == 0 and "4 plugins (analyzed 4)" in human.stdout
    unknown = run("status", market, "--plugin", "nope")
    assert unknown.exit_code == 1
    assert unknown.stderr.strip() == "error: no plugin named or with id 'nope' in this log"


def test_db_option_and_environment_variable_choose_the_log(market, tmp_path):
    chosen = tmp_path / "elsewhere" / "log.db"
    run("scan", market, "--db", chosen)
    assert chosen.exists() and not db_of(market).exists()
    assert as_json(run("status", market, "--json", "--db", chosen))["plugins"] == 4
    via_env = as_json(run("status", market, "--json", env={"OVERNIGHT_DB": str(chosen)}))
    assert via_env["plugins"] == 4


def test_a_log_kept_outside_serves_one_marketplace_and_follows_it_when_it_moves(market, tmp_path):
    """A leftover OVERNIGHT_DB, or a wrong --db, rescanned another marketplace's log: every
    plugin of the first marketplace vanished from it, their states lost."""
    log = tmp_path / "logs" / "market.db"
    assert run("scan", market, "--db", log).exit_code == 0
    other = tmp_path / "other"
    shutil.copytree(EXAMPLE, other, ignore=shutil.ignore_patterns(".overnight", "deploy-checker"))
    conn = apsw.Connection(str(log))
    before = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    remote = tmp_path / "remote.db"
    for args, env in ((["scan", other, "--db", log], None), (["estimate", other], {"OVERNIGHT_DB": str(log)}),
                      (["restore-plugin", "schema-linter", other, "--db", log], None),
                      (["backup", other, "--to", f"file:{remote}"], {"OVERNIGHT_DB": str(log)})):
        refused = run(*args, env=env)
        assert refused.exit_code == 1, refused.output
        assert refused.stderr == (
            f"error: {log} is the event log of the marketplace at {market.resolve()}, not of {other.resolve()}: "
            "give this marketplace's own log with --db (or unset OVERNIGHT_DB); to make this log serve "
            f"{other.resolve()} from now on, `overnight scan {other.resolve()} --db {log} --rebind`\n"), refused.stderr
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == before and not remote.exists()
    read = run("status", other, "--db", log)  # reading is allowed, and says whose log it is
    assert read.exit_code == 0 and read.stderr == (
        f"warning: {log} is the event log of the marketplace at {market.resolve()}, not of {other.resolve()}: "
        "what follows is that marketplace's\n"), read.stderr

    moved = tmp_path / "moved"
    market.rename(moved)
    followed = run("scan", moved, "--db", log)
    assert followed.exit_code == 0, followed.output
    assert f"  warning  the event log {log} served the marketplace at {market.resolve()}; it serves " \
           f"{moved.resolve()} from now on" in followed.stdout
    assert "0 vanished" in followed.stdout and "4 unchanged" in followed.stdout
    assert "warning" not in run("scan", moved, "--db", log).stdout

    rebound = run("scan", other, "--db", log, "--rebind")  # moved's plugins vanish from this log: asked for
    assert rebound.exit_code == 0, rebound.output
    assert f"it serves {other.resolve()} from now on" in rebound.stdout
    assert conn.execute("SELECT json_extract(data, '$.root') FROM events WHERE type = 'MarketplaceBound' "
                        "ORDER BY seq").fetchall() == [(str(p.resolve()),) for p in (market, moved, other)]
    conn.close()


def test_a_marketplace_around_another_cannot_take_its_log(market, tmp_path):
    """The inner marketplace's own log lies inside the outer one too: a scan of the outer one
    with it took it over without a word, and the inner one's plugins were marked gone."""
    assert run("scan", market).exit_code == 0
    outer = market.parent
    (outer / "plugins" / "x").mkdir(parents=True)
    shutil.copytree(EXAMPLE / "plugins" / "devops" / "deploy-checker", outer / "plugins" / "x" / "deploy-checker")
    refused = run("scan", outer, "--db", db_of(market))
    assert refused.exit_code == 1 and f"is the event log of the marketplace at {market.resolve()}" in refused.stderr
    assert event_count(market) == 9
    assert run("scan", market).stdout.startswith("4 plugins: 0 new, 0 changed, 4 unchanged")


def test_a_log_inside_its_marketplace_goes_with_a_copy_of_it(market, tmp_path):
    assert run("scan", market).exit_code == 0
    copy = tmp_path / "copy"
    shutil.copytree(market, copy)
    assert run("status", copy).stderr == ""  # no warning: the log only moved with its marketplace
    scanned = run("scan", copy)
    assert scanned.exit_code == 0, scanned.output
    assert "warning" not in scanned.stdout and "4 unchanged" in scanned.stdout


def test_audit_verify_names_a_changed_byte_and_a_deleted_event(market):
    run("scan", market)
    healthy = run("audit", "verify", market, "--json")
    assert healthy.exit_code == 0
    report = as_json(healthy)
    (head,) = apsw.Connection(str(db_of(market))).execute("SELECT hash FROM events WHERE seq = 9").fetchall()
    assert report == {"ok": True, "events": 9, "problems": [], "head": {"seq": 9, "hash": head[0]}}
    assert f"head: seq 9 {head[0]}" in run("audit", "verify", market).stdout

    conn = apsw.Connection(str(db_of(market)))
    conn.execute("DROP TRIGGER events_no_update; DROP TRIGGER events_no_delete")
    conn.execute("UPDATE events SET data = replace(data, 'schema-linter', 'schema-lintex') WHERE seq = 2")
    conn.close()
    changed = run("audit", "verify", market, "--json")
    assert changed.exit_code == 1
    assert "seq 2: hash mismatch (the stored event was altered)" in as_json(changed)["problems"]
    human = run("audit", "verify", market)
    assert human.exit_code == 1 and "problem: seq 2: hash mismatch" in human.stdout
    assert human.stdout.endswith(f"\n9 events; head: seq 9 {head[0]}\n")  # to compare with one kept elsewhere

    conn = apsw.Connection(str(db_of(market)))
    conn.execute("DELETE FROM events WHERE seq = 5")
    conn.close()
    deleted = as_json(run("audit", "verify", market, "--json"))
    assert "seq 5: missing from the log (deleted events)" in deleted["problems"]
    assert deleted["events"] == 8


def test_audit_verify_reads_the_log_at_one_instant_while_a_run_appends(market):
    """A run appended an event and its blob between verify's read of the blobs and its read of
    the events naming them: a healthy log was reported as missing a blob (a false alarm for a
    monitor polling `audit verify` during a night's run)."""
    import msgspec

    from events.store import blob_hash
    from statemachine import audit
    from statemachine import catalog as c
    from statemachine.lifecycle import plugin_stream
    from statemachine.workspace import open_log
    from tests.bench.synthetic import plugin_pass

    assert run("scan", market).exit_code == 0
    draft = b"---\nname: late\n---\nA draft.\n"
    trip = plugin_pass("plugins/late/late", "run-1", 0)
    first_skill = next(i for i, e in enumerate(trip) if isinstance(e, c.SkillReceived))
    events = trip[:first_skill] + [msgspec.structs.replace(trip[first_skill], draft_sha256=blob_hash(draft))]
    writer = open_log(market)
    reader = open_log(market, writer=False)
    appended = []

    def run_appends(cursor, sql, bindings):  # the run's append lands between two of verify's reads
        if sql.startswith("SELECT seq, type, schema_version, data FROM events WHERE type IN") and not appended:
            appended.extend(writer.append(plugin_stream("plugins/late/late"), events, blobs=[draft]))
        return True

    reader.conn.exec_trace = run_appends
    try:
        result = audit.verify(reader)
    finally:
        reader.conn.exec_trace = None
        reader.close()
        writer.close()
    assert appended and result.problems == [], result.problems
    assert result.head["seq"] == result.events == appended[0].seq - 1  # the instant verify began
    assert run("audit", "verify", market).exit_code == 0


def test_a_log_written_by_a_newer_version_is_refused_unchanged_by_readers_and_writers(market):
    from events.migrations import LATEST

    run("scan", market)
    conn = apsw.Connection(str(db_of(market)))
    conn.execute(f"PRAGMA user_version = {LATEST + 1}")
    conn.close()
    before = db_of(market).read_bytes()
    expected = (f"error: {db_of(market)} was written by a newer version of overnight (schema version "
                f"{LATEST + 1}, this version knows up to {LATEST}); upgrade overnight "
                "(`pip install -U overnight`) to open it\n")
    for command in (["status"], ["audit", "verify"], ["audit", "log"], ["scan"]):
        result = run(*command, market)
        assert (result.exit_code, result.stderr) == (1, expected), command
    assert db_of(market).read_bytes() == before
    assert event_count(market) == 9


def test_a_log_last_written_by_an_older_version_is_read_with_this_versions_views(market):
    """Readers cannot rewrite the stored views (a writing command does): they use this
    version's, never an older one that lacks a column the commands read."""
    from statemachine.projections import VIEWS

    run("scan", market)
    conn = apsw.Connection(str(db_of(market)))
    conn.execute("DROP VIEW run_summary; CREATE VIEW run_summary AS SELECT run_id, command, status FROM runs")
    conn.close()
    before = db_of(market).read_bytes()
    for command in (["status"], ["status", "--json"], ["metrics"], ["metrics", "--json"]):
        result = run(*command, market)
        assert (result.exit_code, result.stderr) == (0, ""), command
    assert "4 plugins (analyzed 4)" in run("status", market).stdout
    assert db_of(market).read_bytes() == before
    run("scan", market)
    conn = apsw.Connection(str(db_of(market)))
    stored = conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'run_summary'").fetchone()[0]
    conn.close()
    assert stored == f"CREATE VIEW run_summary AS {VIEWS['run_summary']}"


def test_audit_replay_equals_live_and_apply_repairs_an_edited_projection(market):
    run("scan", market)
    same = run("audit", "replay", market, "--json")
    assert same.exit_code == 0 and as_json(same)["ok"] and as_json(same)["rows"]["plugins"] == 4
    conn = apsw.Connection(str(db_of(market)))
    conn.execute("UPDATE plugins SET state = 'done' WHERE name = 'meeting-notes'")
    conn.close()
    differs = run("audit", "replay", market, "--json")
    assert differs.exit_code == 1 and as_json(differs)["differences"] == {"plugins": 1}
    assert run("audit", "verify", market).exit_code == 1
    applied = run("audit", "replay", market, "--apply")
    assert applied.exit_code == 0 and "replaced by the replay" in applied.stdout
    assert run("audit", "verify", market).exit_code == 0
    assert as_json(run("status", market, "--json"))["by_state"] == {"analyzed": 4}

    conn = apsw.Connection(str(db_of(market)))
    conn.execute("DROP TRIGGER events_no_update")
    conn.execute("UPDATE events SET hash = 'x' || substr(hash, 2) WHERE seq = 3")
    conn.close()
    broken = run("audit", "replay", market, "--apply")
    assert broken.exit_code == 1  # a replay repairs projections, never the log
    assert "the log's own problems above are not repaired by a replay" in broken.stdout


def test_audit_log_prints_one_json_object_per_event(market):
    run("scan", market)
    lines = run("audit", "log", market, "--json").stdout.splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["seq"] for e in entries] == list(range(1, 10))
    assert set(entries[0]) == {"seq", "at", "stream", "type", "data"}
    assert entries[0]["type"] == "MarketplaceBound" and entries[0]["data"]["root"] == str(market.resolve())
    assert entries[1]["type"] == "PluginDiscovered" and entries[1]["data"]["type"] == "PluginDiscovered"
    one = [json.loads(x) for x in run("audit", "log", market, "--json", "--plugin", "meeting-notes").stdout.splitlines()]
    assert {e["stream"] for e in one} == {"plugin:plugins/productivity/meeting-notes"}
    assert [e["type"] for e in one] == ["PluginDiscovered", "PluginAnalyzed"]
    human = run("audit", "log", market, "--after", "8").stdout.splitlines()
    assert len(human) == 1 and human[0].split()[0] == "9"


def test_audit_log_of_a_name_two_plugins_share_shows_both_histories(tmp_path):
    root = tmp_path / "m"
    plugin(root, "plugins/a/good", "good", files={"README.md": "# Good\n"})
    plugin(root, "plugins/b/good", "good")  # duplicate name: recorded as invalid
    plugin(root, "plugins/c/other", "other")
    assert run("scan", root).exit_code == 0
    listed = as_json(run("status", root, "--json", "--plugin", "good"))
    assert [i["plugin_id"] for i in listed["items"]] == ["plugins/a/good", "plugins/b/good"]
    both = run("audit", "log", root, "--json", "--plugin", "good")
    assert both.exit_code == 0, both.output
    entries = [json.loads(line) for line in both.stdout.splitlines()]
    assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)
    assert {e["stream"] for e in entries} == {"plugin:plugins/a/good", "plugin:plugins/b/good"}
    assert [e["type"] for e in entries if e["stream"] == "plugin:plugins/b/good"] == [
        "PluginDiscovered", "PluginInvalid"]
    human = run("audit", "log", root, "--plugin", "good")
    assert human.exit_code == 0
    assert [line.split()[0] for line in human.stdout.splitlines()] == [str(e["seq"]) for e in entries]
    by_id = [json.loads(x) for x in run("audit", "log", root, "--json", "--plugin", "plugins/b/good").stdout.splitlines()]
    assert {e["stream"] for e in by_id} == {"plugin:plugins/b/good"} and len(by_id) == 2
    unknown = run("audit", "log", root, "--plugin", "nope")
    assert (unknown.exit_code, unknown.stderr) == (1, "error: no plugin named or with id 'nope' in this log\n")


def test_audit_verify_of_a_log_with_no_events_says_so(tmp_path):
    from statemachine.workspace import open_log

    open_log(tmp_path).close()  # a log created, and nothing recorded yet
    human = run("audit", "verify", tmp_path)
    assert human.exit_code == 0
    assert human.stdout == ("ok: 0 events, hash chain intact, projections match the log; "
                            "head: no events yet\n")
    assert as_json(run("audit", "verify", tmp_path, "--json")) == {
        "ok": True, "events": 0, "problems": [], "head": {"seq": 0, "hash": ""}}


def test_a_config_value_of_the_wrong_type_names_the_key_the_file_and_what_it_must_be(market, tmp_path):
    config = tmp_path / "config.toml"
    cases = {
        'rpm = "x"\n': "rpm must be a whole number >= 1, not 'x'",
        "rpm = 1.5\n": "rpm must be a whole number >= 1, not 1.5",  # not cut to 1
        "rpm = true\n": "rpm must be a whole number >= 1, not True",  # not read as 1
        'rpm = "15"\n': "rpm must be a whole number >= 1, not '15'",
        "concurrency = 65\n": "concurrency must be a whole number >= 1 and <= 64, not 65",
        "max_cost = -1\n": "max_cost must be a number >= 0, not -1",
        'no_wait = "maybe"\n': "no_wait must be true or false, not 'maybe'",
        "standards = 3\n": "standards must be a string, not 3",
    }
    for text, message in cases.items():
        config.write_text(text)
        # one file serves every command: each refuses a wrong value, also of a key it does not take
        for command in ("run", "resume", "estimate", "metrics"):
            result = run(command, market, "--config", config)
            assert (result.exit_code, result.stderr) == (2, f"error: config file {config}: {message}\n"), \
                (command, text)
    assert not (market / ".overnight").exists()


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    """Every command's path, through click's own lookup (the root group loads its commands when used)."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None and command.name == name, (prefix, name)
        yield prefix + (name,)
        if isinstance(command, click.Group):
            yield from _commands(command, prefix + (name,))


def test_every_command_has_help():
    paths = list(_commands(main))
    assert {("scan",), ("status",), ("audit", "verify"), ("audit", "replay"), ("audit", "log")} <= set(paths)
    for path in paths:
        result = run(*path, "--help")
        assert result.exit_code == 0, path
        assert "Usage: " in result.stdout and len(result.stdout.splitlines()) > 3, path


def test_status_offers_only_the_states_a_plugin_can_be_in():
    refused = run("status", "--state", "new")
    assert refused.exit_code == 2 and "'new' is not one of 'discovered'" in refused.stderr


def test_backup_help_shows_the_options_of_the_backup_itself():
    shown = run("backup", "--help").stdout
    assert shown.startswith("Usage: main backup [PATH] [OPTIONS] | COMMAND [ARGS]...\n")  # main: CliRunner's name
    for option in ("--to URL", "--json", "--db FILE", "--debug"):
        assert f"\n  {option}" in shown, option
    assert "\n  list " in shown and "\n  verify " in shown and "\n  now" not in shown


def test_errors_are_one_line_with_a_nonzero_exit(tmp_path):
    missing = run("status", tmp_path / "nope")
    assert missing.exit_code == 2  # wrong usage
    assert missing.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'} is not a directory"]
    (tmp_path / "plugins").mkdir()  # a marketplace never scanned
    no_log = run("audit", "verify", tmp_path)
    assert no_log.exit_code == 1 and no_log.stderr.startswith("error: no event log at")
    assert len(no_log.stderr.strip().splitlines()) == 1
    # a first run is making it at this moment: `overnight scan` (which it would refuse) is no hint then
    (tmp_path / ".overnight").mkdir()
    maker = WriterLock(tmp_path / ".overnight" / "overnight.db")
    maker.acquire()
    try:
        told = (f"error: no event log at {tmp_path / '.overnight' / 'overnight.db'} yet: an overnight process is "
                "creating it now; try again in a moment\n")
        for command in (("status", tmp_path, "--json"), ("audit", "verify", tmp_path)):
            soon = run(*command)
            assert (soon.exit_code, soon.stderr) == (1, told), command
    finally:
        maker.release()
    usage = run("status", tmp_path, "--state", "sleeping")
    assert usage.exit_code == 2


def test_wrong_usage_exits_2_with_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for path in (tmp_path / "nope", afile, afile / "sub"):
        for command in (["scan"], ["status"], ["run"], ["estimate"], ["metrics"], ["audit", "verify"],
                        ["restore-plugin", "x"]):
            result = run(*command, path)
            assert (result.exit_code, result.stderr) == (2, f"error: {path} is not a directory\n"), command
    usages = {
        ("status", tmp_path, "--state", "sleeping"): "error: Invalid value for '--state': 'sleeping' is not one of ",
        ("scan", tmp_path, "--bogus"): "error: No such option '--bogus'.",
        ("frobnicate",): "error: No such command 'frobnicate'.",
        ("--bogus", "scan"): "error: No such option '--bogus'.",
        ("run", tmp_path, "--rpm", "0"): "error: Invalid value for '--rpm': 0 is not in the range x>=1.",
    }
    for args, start in usages.items():
        result = run(*args)
        assert result.exit_code == 2, args
        assert result.stderr.startswith(start) and len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / ".overnight").exists()
    group = run("audit")  # a group without its command still shows its help
    assert group.exit_code == 2 and "Commands:" in group.output


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "plugins").mkdir()  # a marketplace never scanned: no event log
    plain = run("audit", "verify", tmp_path)
    assert "Traceback" not in plain.stderr
    debug = run("--debug", "audit", "verify", tmp_path)
    assert debug.exit_code == 1 and "Traceback (most recent call last)" in debug.stderr
    late = run("audit", "verify", tmp_path, "--debug")
    assert "Traceback (most recent call last)" in late.stderr
    between = run("audit", "--debug", "verify", tmp_path)  # on the group: refused as no such option before
    assert between.exit_code == 1 and "Traceback (most recent call last)" in between.stderr
    missing = f"file:{tmp_path / 'no-backup.db'}"
    for args in (["backup", "--debug", "list", "--from", missing], ["backup", "list", "--from", missing, "--debug"]):
        listed = run(*args)  # on the backup group: it was taken for a PATH to back up before
        assert listed.exit_code == 1 and "no backup there" in listed.stderr, args
        assert "Traceback (most recent call last)" in listed.stderr, args


@pytest.mark.parametrize("signalled, name, code", [(KeyboardInterrupt(), "SIGINT", 130),
                                                   (Terminated("SIGTERM"), "SIGTERM", 143)])
def test_a_signal_python_wraps_in_another_error_is_still_an_interruption(market, monkeypatch, signalled, name, code):
    """Ctrl-C while a command imports its modules (google-genai's pydantic classes, at the start
    of a run) reaches the command as a RuntimeError raised from the KeyboardInterrupt (Python
    wraps what a class's __set_name__ raises): an interruption, not an internal error."""
    import statemachine.status

    def interrupted(*args, **kwargs):
        try:
            raise signalled
        except BaseException as e:
            raise RuntimeError("Error calling __set_name__ on 'PydanticDescriptorProxy' instance") from e

    run("scan", market)
    monkeypatch.setattr(statemachine.status, "status", interrupted)
    result = run("status", market)
    assert (result.exit_code, result.stderr) == (code, f"error: interrupted by {name}\n")


def test_a_second_writer_is_refused_and_the_first_is_unharmed(market):
    """Another process holds the log (as a running scan would); our scan must refuse cleanly."""
    run("scan", market)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from statemachine.workspace import open_log\n"
         "from pathlib import Path\n"
         f"s = open_log(Path({str(market)!r}))\n"
         "print('ready', flush=True)\n"
         "sys.stdin.readline()\n"
         "s.close()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "ready"
        refused = subprocess.run([sys.executable, "-m", "cli", "scan", str(market)],
                                 capture_output=True, text=True, cwd=REPO)
        assert refused.returncode == 3
        assert refused.stderr.strip() == (
            f"error: {db_of(market)} is in use by another overnight process (pid {holder.pid}); "
            "wait for it to finish or stop it first")
        reading = run("status", market, "--json")  # readers are not blocked
        assert as_json(reading)["plugins"] == 4
    finally:
        holder.communicate("done\n")
    assert run("audit", "verify", market).exit_code == 0


def test_a_state_directory_overnight_cannot_use_is_one_clear_error(market, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    state = market / ".overnight"
    state.write_text("not a directory")
    result = run("scan", market)
    assert result.exit_code == 1
    assert result.output == (f"error: {state} is not a directory; pass --db FILE (or set OVERNIGHT_DB) to keep "
                             "the log elsewhere\n")
    state.unlink()
    state.symlink_to(outside)
    result = run("scan", market)
    assert result.exit_code == 1 and f"error: {state} is a symlink; overnight never follows one out of the " \
        "marketplace" in result.output
    state.unlink()
    state.mkdir()
    (state / "overnight.db").symlink_to(outside / "evil.db")
    assert run("scan", market).exit_code == 1
    (state / "overnight.db").unlink()
    for suffix in ("-wal", "-shm"):  # SQLite's files beside the log: it failed unclearly, and left an empty log
        (state / f"overnight.db{suffix}").symlink_to(outside / f"evil{suffix}")
        result = run("scan", market)
        assert result.exit_code == 1 and result.output.startswith(
            f"error: {state / f'overnight.db{suffix}'} is a symlink; overnight never follows one"), result.output
        assert not (state / "overnight.db").exists()
        (state / f"overnight.db{suffix}").unlink()
    assert list(outside.iterdir()) == []  # nothing was created through any symlink
    assert run("scan", market, "--db", tmp_path / "elsewhere.db").exit_code == 0


def test_a_listed_plugins_directory_renamed_keeps_its_name_at_the_first_scan(market):
    """The manifest entry whose directory is gone held the name: the first scan refused the
    renamed directory as a duplicate, the next one (nothing changed) took it."""
    assert run("scan", market).exit_code == 0
    old = market / "plugins" / "devops" / "deploy-checker"
    old.rename(old.with_name("deploy-check"))
    first = as_json(run("scan", market, "--json"))
    assert {p["plugin"] for p in first["problems"]} == {"plugins/devops/deploy-checker"}  # the entry: no directory
    assert as_json(run("status", market, "--json", "--plugin", "plugins/devops/deploy-check"))["items"][0][
        "state"] == "analyzed"
    assert as_json(run("scan", market, "--json"))["events"] == 0


def test_a_db_that_is_no_regular_file_is_named_as_such(market, tmp_path):
    """A FIFO given as --db was reported as a failing disk."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    for command in ("status", "scan"):
        result = subprocess.run([sys.executable, "-m", "cli", command, str(market), "--db", str(fifo)], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stderr) == (
            1, f"error: {fifo} is not a regular file; --db (or OVERNIGHT_DB) names the log file\n"), command


def test_a_lock_file_that_is_a_symlink_or_a_fifo_is_refused_untouched(market, tmp_path):
    """A cloned marketplace can ship `.overnight/overnight.db.lock` as anything: a symlink's
    target was truncated, and a FIFO hung every command."""
    assert run("scan", market).exit_code == 0
    lock = market / ".overnight" / "overnight.db.lock"
    victim = write(tmp_path / "outside" / "rc", "export IMPORTANT=1\n")
    lock.unlink()
    lock.symlink_to(victim)
    for command in (("scan",), ("status",)):
        result = run(*command, market)
        assert result.exit_code == 1, result.output
        assert result.output == f"error: {lock} is a symlink; overnight never follows one: remove it\n"
    assert victim.read_text() == "export IMPORTANT=1\n"
    lock.unlink()
    os.mkfifo(lock)
    for command in ("scan", "status"):
        result = subprocess.run([sys.executable, "-m", "cli", command, str(market)], cwd=REPO, capture_output=True,
                                text=True, timeout=60)  # a blocking open of the FIFO never returned
        assert result.returncode == 1, result.stderr
        assert result.stderr == f"error: {lock} is not a regular file: remove it (overnight makes its lock file)\n"
    lock.unlink()
    lock.mkdir()
    result = run("scan", market)
    assert result.output == f"error: {lock} is not a regular file: remove it (overnight makes its lock file)\n"
    lock.rmdir()
    assert run("status", market).exit_code == 0 and run("scan", market).exit_code == 0


@needs_permissions
def test_a_read_only_marketplace_says_where_the_log_can_go(market, tmp_path):
    market.chmod(0o555)
    try:
        result = subprocess.run([*unprivileged(), sys.executable, "-m", "cli", "scan", str(market)], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
    finally:
        market.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"error: cannot open the event log {market}/.overnight/overnight.db: Permission "
                             "denied; pass --db FILE (or set OVERNIGHT_DB) to keep the log elsewhere\n")


@needs_permissions
def test_a_listed_plugin_whose_directory_cannot_be_read_says_so(market, tmp_path):
    """Its plugin.json was reported missing; the directory is there, unreadable."""
    listing = json.loads((market / ".claude-plugin" / "marketplace.json").read_text())
    source = listing["plugins"][0]["source"]
    locked = (market / source).resolve()
    locked.chmod(0o000)
    try:
        result = subprocess.run([*unprivileged(), sys.executable, "-m", "cli", "scan", str(market), "--db",
                                 str(tmp_path / "log.db")], cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 0, result.stderr
    plugin_id = locked.relative_to(market.resolve()).as_posix()
    assert (f"  invalid  {plugin_id}: cannot read .claude-plugin/plugin.json: Permission denied"
            in result.stdout.splitlines()), result.stdout


@needs_permissions
def test_a_log_in_a_directory_this_user_cannot_write_can_still_be_read(market):
    """A reader of a WAL log needs a -shm file beside it, which SQLite cannot make there."""
    assert run("scan", market).exit_code == 0
    state = market / ".overnight"
    state.chmod(0o555)
    try:
        ended = {command: subprocess.run([*unprivileged(), sys.executable, "-m", "cli", *command.split(), str(market)],
                                         cwd=REPO, capture_output=True, text=True, timeout=60)
                 for command in ("status", "metrics", "audit verify", "audit replay", "audit log", "scan")}
    finally:
        state.chmod(0o755)
    for command, result in ended.items():
        if command != "scan":
            assert (command, result.returncode, result.stderr) == (command, 0, "")
    assert "4 plugins (analyzed 4)" in ended["status"].stdout
    assert ended["scan"].returncode == 1 and ended["scan"].stderr == (
        f"error: {state / 'overnight.db'}: cannot write it: its directory or disk is read-only here (the commands "
        "that only read it, such as status, metrics and audit verify, can)\n")
    assert sorted(p.name for p in state.iterdir()) == [".gitignore", "overnight.db", "overnight.db.lock"]


def test_control_characters_in_directory_names_reach_the_terminal_escaped(tmp_path):
    root = tmp_path / "market"
    plugin(root, "plugins/x/evil\x1b[2J\nname", "evil", description="Clears screens.")
    plugin(root, "plugins/x/[bold]markup[link=x]", "markup", description="Looks like rich markup.")
    plugin(root, "plugins/x/bad\x07bell", None)  # invalid: no name
    plugin(root, "plugins/x/launch:rocket:", None)  # an :emoji: code stays text
    scan = run("scan", root)
    assert scan.exit_code == 0, scan.output
    assert "\x1b" not in scan.output and "\x07" not in scan.output
    assert "  invalid  plugins/x/bad\\u0007bell: .claude-plugin/plugin.json has no 'name'" in scan.output
    assert "  invalid  plugins/x/launch:rocket:: .claude-plugin/plugin.json has no 'name'" in scan.output
    listed = run("status", root, "--state", "analyzed")
    assert listed.exit_code == 0 and "\x1b" not in listed.output
    assert "  analyzed    plugins/x/evil\\u001b[2J\\u000aname" in listed.output
    assert "  analyzed    plugins/x/[bold]markup[link=x]" in listed.output


def test_a_directory_that_is_no_marketplace_is_refused_and_left_alone(tmp_path):
    plain = tmp_path / "home"
    plain.mkdir()
    (plain / "notes.md").write_text("a forgotten PATH must not turn this into a marketplace\n")
    for command in ("scan", "run", "estimate", "status"):
        result = run(command, plain)
        assert result.exit_code != 0 and result.output == (
            f"error: {plain} does not look like a marketplace (no plugins/ directory and no "
            ".claude-plugin/marketplace.json); give the marketplace's path\n"), (command, result.output)
    assert sorted(p.name for p in plain.iterdir()) == ["notes.md"]


def test_a_locale_whose_encoding_lacks_a_plugins_characters_still_gets_whole_reports(tmp_path):
    """Under an ISO-8859-1 locale, `status --json` was an internal error (exit 4) with nothing on
    stdout, and `audit log --json` stopped half way."""
    root = tmp_path / "market"
    plugin(root, "plugins/x/arrow\u2192name", "arrow\u2192x", description="Arrows \u2192 everywhere.")
    plugin(root, "plugins/x/plain", "plain", description="Nothing odd.")
    assert run("scan", root).exit_code == 0
    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli", *args, str(root)], cwd=REPO, env=env,
                              capture_output=True, timeout=120)

    status = cli("status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert [i["plugin_id"] for i in report["items"]] == ["plugins/x/arrow\u2192name"]
    log = cli("audit", "log", "--json")
    assert log.returncode == 0, log.stderr
    assert [json.loads(line)["seq"] for line in log.stdout.splitlines()] == list(range(1, report["events"] + 1))
    text = cli("status")
    assert text.returncode == 0, text.stderr
    assert b"  invalid     plugins/x/arrow\\u2192name: " in text.stdout
