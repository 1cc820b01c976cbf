"""What the reading commands (`status`, `audit log`, `metrics`, `restore-plugin --list`) tell a
person: every plugin that needs one, text from the marketplace escaped, and a clear word when
there is nothing to show or the log is not a log at all."""

from __future__ import annotations

import json
import shutil

import apsw

from events.lock import WriterLock
from statemachine.scan import scan
from statemachine.workspace import open_log
from tests.marketplace_builder import plugin
from tests.test_run import FAST, KEY, emu, market, one, overnight, query, run  # noqa: F401


def test_audit_log_escapes_control_characters_from_the_marketplace(tmp_path, emu):
    root = tmp_path / "market"
    plugin(root, "plugins/x/evil\x1b[2J\nname", "evil", description="Clears screens.",
           files={"README.md": "# Evil\n\nClears screens.\n"})
    assert run(root, emu, "--dry-run").exit_code == 0
    text = overnight("audit", "log", root)
    assert text.exit_code == 0, text.output
    assert "\x1b" not in text.output
    assert len(text.output.splitlines()) == query(root, "SELECT count(*) FROM events")[0][0]
    assert "plugin:plugins/x/evil\\u001b[2J\\u000aname  PluginDiscovered" in text.output
    as_json = overnight("audit", "log", root, "--json")
    streams = {json.loads(line)["stream"] for line in as_json.stdout.splitlines()}
    assert "plugin:plugins/x/evil\x1b[2J\nname" in streams


def test_status_says_how_many_plugins_needing_attention_it_does_not_list(tmp_path, emu):
    root = tmp_path / "market"
    for i in range(32):
        plugin(root, f"plugins/x/broken-{i:02}", None)  # invalid: no name
    assert run(root, emu).exit_code == 0
    text = overnight("status", root)
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert len([line for line in lines if line.startswith("  invalid ")]) == 20
    assert lines[-1] == (f"  ... and 12 more not listed: `overnight status {root} --state STATE` lists every "
                         "plugin in a state")
    report = json.loads(overnight("status", root, "--json").stdout)
    assert len(report["items"]) == 20 and report["items_total"] == 32
    assert {"plugins", "by_state", "events", "last_run"} <= set(report)
    every = json.loads(overnight("status", root, "--state", "invalid", "--json").stdout)
    assert len(every["items"]) == every["items_total"] == 32
    assert "more not listed" not in overnight("status", root, "--state", "invalid").stdout


def test_a_write_cut_short_needs_attention_until_resume_finishes_it(one, emu, monkeypatch):
    from statemachine import pipeline
    from statemachine.lifecycle import State

    def crash(ctx, cursor, row):
        raise RuntimeError("simulated crash right after WriteIntended")
    monkeypatch.setitem(pipeline._STEPS, State.WRITING, crash)
    assert run(one, emu).exit_code == 4
    monkeypatch.undo()
    hint = f"its write was cut short: `overnight resume {one}` finishes it"
    text = overnight("status", one)
    assert text.stdout.splitlines()[-1] == f"  writing     plugins/tools/widget [skill]: {hint}", text.stdout
    (item,) = json.loads(overnight("status", one, "--json").stdout)["items"]
    assert (item["state"], item["hint"]) == ("writing", hint)
    # what cannot go on before the write is finished names the command that finishes it
    refused = overnight("restore-plugin", "widget", one)
    assert (refused.exit_code, refused.stderr) == (1, "error: plugins/tools/widget is in the middle of a write; "
                                                      f"run `overnight resume {one}` first\n")
    readme = one / "plugins" / "tools" / "widget" / "README.md"
    readme.write_text(readme.read_text() + "\nchanged meanwhile\n")
    assert (f"  warning  plugins/tools/widget: changed during a write by overnight; run `overnight resume {one}` "
            "to finish it first") in overnight("scan", one).output
    lock = WriterLock(one / ".overnight" / "overnight.db")  # as a running overnight holds it
    lock.acquire()
    try:
        assert json.loads(overnight("status", one, "--json").stdout)["items"] == []
    finally:
        lock.release()
    assert json.loads(overnight("status", one, "--json").stdout)["busy"] is False
    resumed = overnight("resume", one)
    assert resumed.exit_code == 0
    assert "changed during a write" not in resumed.output  # its summary told to resume what it had just done
    assert query(one, "SELECT state FROM plugins") == [("done",)]
    assert json.loads(overnight("status", one, "--json").stdout)["items"] == []


def test_status_says_when_a_process_writes_the_log_before_any_run_is_under_way(one, emu):
    """A --force run of thousands of plugins first puts every finished one back to analyzed:
    status showed them all analyzed and the last run complete, nothing under way."""
    assert run(one, emu).exit_code == 0
    line = ("an overnight process is writing to this log with no run under way: a scan, a backup, a restore-plugin, "
            "or a run scanning before it starts (counts may move)")
    assert line not in overnight("status", one).stdout
    lock = WriterLock(one / ".overnight" / "overnight.db")  # as `overnight run --force` holds it while it scans
    lock.acquire()
    try:
        assert overnight("status", one).stdout.splitlines()[1] == line
        assert json.loads(overnight("status", one, "--json").stdout)["busy"] is True
    finally:
        lock.release()


def test_read_only_commands_refuse_a_file_that_is_no_event_log_and_leave_it_alone(one, emu, tmp_path):
    assert run(one, emu, "--dry-run").exit_code == 0
    other = tmp_path / "notes.db"
    conn = apsw.Connection(str(other))
    conn.execute("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('keep me')")
    conn.close()
    empty = tmp_path / "empty.db"
    empty.touch()
    before = other.read_bytes()
    for command in (["status"], ["metrics"], ["audit", "verify"], ["audit", "log"]):
        refused = overnight(*command, one, "--db", other)
        assert (refused.exit_code, refused.stderr) == (
            1, f"error: {other} is not an overnight event log (its tables are not overnight's)\n"), command
        refused = overnight(*command, one, "--db", empty)
        assert (refused.exit_code, refused.stderr) == (
            1, f"error: {empty} is not an overnight event log (it is empty; a copy of a log in use needs "
               f"its empty.db-wal file copied beside it)\n"), command
    assert other.read_bytes() == before and empty.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "one") == ["empty.db", "notes.db"]
    # a writing command refuses it too, rather than adding overnight's tables to it
    for command in (["scan"], ["run", "--base-url", emu.url]):
        refused = overnight(*command, one, "--db", other)
        assert (refused.exit_code, refused.stderr) == (
            1, f"error: {other} is not an overnight event log (its tables are not overnight's)\n"), command
    assert other.read_bytes() == before


def test_a_copy_of_a_log_in_use_without_its_wal_file_is_refused_with_the_wal_named(one, tmp_path):
    """The events of a log still open are in its -wal file until SQLite checkpoints them."""
    live = tmp_path / "live.db"
    store = open_log(one, live)
    try:
        scan(store, one)
        shutil.copy(live, tmp_path / "copy.db")
        refused = overnight("status", one, "--db", tmp_path / "copy.db")
        assert (refused.exit_code, refused.stderr) == (
            1, f"error: {tmp_path / 'copy.db'} is not an overnight event log (it is empty; a copy of a log "
               "in use needs its copy.db-wal file copied beside it)\n")
        shutil.copy(tmp_path / "live.db-wal", tmp_path / "copy.db-wal")
        read = overnight("status", one, "--db", tmp_path / "copy.db", "--json")
        assert read.exit_code == 0 and json.loads(read.stdout)["plugins"] == 1
    finally:
        store.close()


def test_a_log_not_readable_while_a_writer_is_at_work_says_to_try_again_in_a_moment(one, tmp_path):
    """A reader can open a log in the moment its writer is creating it (an empty file): then it
    says so."""
    creating = tmp_path / "new.db"
    creating.touch()
    later = "; an overnight process is writing it now: if it is creating or upgrading the log, try again in a moment"
    reason = (f"{creating} is not an overnight event log (it is empty; a copy of a log in use needs its new.db-wal "
              "file copied beside it)")
    assert overnight("status", one, "--db", creating).stderr == f"error: {reason}\n"
    lock = WriterLock(creating)  # as the overnight creating it holds it
    lock.acquire()
    try:
        assert overnight("status", one, "--db", creating).stderr == f"error: {reason}{later}\n"
    finally:
        lock.release()


def test_after_an_upgrade_the_read_only_commands_read_the_log_before_any_writer_rebuilt_it(one, tmp_path):
    """The tables a previous version built (another projection version) made status, metrics,
    audit verify and audit log refuse the log until a writing command had run: the first thing
    done after an upgrade, and a cron job's `audit verify` exited 1 as if the log were damaged."""
    with open_log(one) as store:
        scan(store, one)
    log = one / ".overnight" / "overnight.db"
    conn = apsw.Connection(str(log))
    # as an older version's table: another version, and rows this version's fold would not make
    conn.execute("UPDATE projection_versions SET version = version - 1 WHERE name = 'plugins'")
    conn.execute("UPDATE plugins SET state = 'failed', reason = 'from another version'")
    conn.close()
    status = overnight("status", one, "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["by_state"] == {"analyzed": 1}
    for args in (("metrics",), ("audit", "verify"), ("audit", "log"), ("audit", "replay")):
        assert overnight(*args, one).exit_code == 0, args
    assert query(one, "SELECT state FROM plugins") == [("failed",)]  # read, never written
    assert overnight("scan", one).exit_code == 0  # a writer rebuilds the stored table
    assert query(one, "SELECT state FROM plugins") == [("analyzed",)]


def test_a_missing_log_given_with_db_is_not_answered_with_pass_db(one, tmp_path):
    missing = tmp_path / "nowhere" / "x.db"
    given = overnight("status", one, "--db", missing)
    assert (given.exit_code, given.stderr) == (
        1, f"error: no event log at {missing} (run `overnight scan` first with the same --db)\n")
    default = overnight("status", one)
    assert default.exit_code == 1 and default.stderr.endswith("(run `overnight scan` first, or pass --db)\n")
    assert not missing.parent.exists()


def test_commands_that_repair_or_copy_a_log_never_create_one(one, tmp_path):
    """Only scan and run start a log: resume, replay --apply, restore-plugin and backup need one."""
    for command in (["resume"], ["audit", "replay", "--apply"], ["restore-plugin", "widget"],
                    ["backup", "--to", f"file:{tmp_path / 'offsite.db'}"]):
        refused = overnight(*command, one)
        assert (refused.exit_code, refused.stderr) == (
            1, f"error: no event log at {one}/.overnight/overnight.db (run `overnight scan` first, or pass "
               "--db)\n"), command
        typo = tmp_path / "typo.db"
        refused = overnight(*command, one, "--db", typo)
        assert refused.exit_code == 1 and f"no event log at {typo} " in refused.stderr, command
    assert not (one / ".overnight").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["one"]


def test_restore_plugin_list_says_when_a_plugin_has_no_snapshot(one, emu):
    assert run(one, emu, "--dry-run").exit_code == 0
    listed = overnight("restore-plugin", "widget", one, "--list")
    assert (listed.exit_code, listed.stdout) == (0, "widget has no snapshot: overnight never changed it\n")
    as_json = overnight("restore-plugin", "widget", one, "--list", "--json")
    assert json.loads(as_json.stdout) == {"plugin_id": "plugins/tools/widget", "snapshots": []}


def test_metrics_of_a_log_without_plugins_says_so(tmp_path, emu):
    root = tmp_path / "market"
    (root / "plugins").mkdir(parents=True)
    assert run(root, emu).exit_code == 0
    result = overnight("metrics", root)
    assert result.exit_code == 0, result.output
    assert "plugins 0: none in the log" in result.stdout.splitlines()


def test_the_reading_commands_read_a_copied_log_given_by_db_from_any_directory(tmp_path, one, emu, monkeypatch):
    """A log copied off a machine (or restored) is read with --db alone: PATH, the current
    directory by default, need not be a marketplace. Writing commands still insist on one."""
    import shutil

    assert run(one, emu).exit_code == 0
    copy = tmp_path / "elsewhere" / "copy.db"
    copy.parent.mkdir()
    shutil.copy(one / ".overnight" / "overnight.db", copy)
    monkeypatch.chdir(copy.parent)
    status = overnight("status", "--db", copy, "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["by_state"] == {"done": 1}
    for command in (["metrics"], ["audit", "verify"], ["audit", "log"]):
        assert overnight(*command, "--db", copy).exit_code == 0, command
    scan = overnight("scan", "--db", copy)
    assert scan.exit_code == 2 and "does not look like a marketplace" in scan.stderr


def test_two_plugins_reported_at_once_the_last_line_gives_no_eta(capsys):
    """Plugins that finish together reach the progress view in one report, whose ETA was
    computed before the last of them counted: `2/2  done  ... ETA 1s` with nothing left."""
    from cli.run import _Display
    from statemachine.pipeline import Finished
    from statemachine.runner import Progress

    done = [Finished(f"plugins/tools/p{n}", "done", None, 4, 100, 200, 0) for n in (1, 2)]
    with _Display(enabled=False) as display:
        display.update(Progress(total=2, finished=0, phases={}, requests=0, input_tokens=0, output_tokens=0,
                                rate_limited=0, eta=30.0))
        display.update(Progress(total=2, finished=1, phases={}, requests=4, input_tokens=100, output_tokens=200,
                                rate_limited=0, eta=1.0, just_finished=done))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("  ETA 30s")
    assert lines[1] == "1/2  done      plugins/tools/p1  (4 requests  100 in / 200 out tokens  0 rate-limited  ETA 1s)"
    assert lines[2] == "2/2  done      plugins/tools/p2  (4 requests  100 in / 200 out tokens  0 rate-limited)"


def test_a_log_of_schema_1_is_read_as_it_is_and_migrated_by_the_next_writer(one):
    """The log of a version before `event_types`: readers read it, a writer migrates it (and an
    overnight of schema 1 then refuses it, as written by a newer version)."""
    with open_log(one) as store:
        scan(store, one)
    log = one / ".overnight" / "overnight.db"
    conn = apsw.Connection(str(log))
    conn.execute("DROP TRIGGER events_record_type; DROP TABLE event_types; PRAGMA user_version = 1")
    conn.close()
    assert json.loads(overnight("status", one, "--json").stdout)["plugins"] == 1
    assert overnight("audit", "verify", one).exit_code == 0
    assert query(one, "PRAGMA user_version") == [(1,)]  # a reader does not migrate
    assert overnight("scan", one).exit_code == 0
    assert query(one, "PRAGMA user_version") == [(2,)]
    assert query(one, "SELECT type FROM event_types ORDER BY type") == query(
        one, "SELECT DISTINCT type FROM events ORDER BY type")


def test_a_log_holding_event_types_this_version_does_not_know_is_refused_not_read_or_written(one):
    """A newer overnight's events (a downgrade): an older one read its tables wrong, skipped
    what it did not know when it rebuilt them, and wrote into the log."""
    with open_log(one) as store:
        scan(store, one)
    conn = apsw.Connection(str(one / ".overnight" / "overnight.db"))
    conn.execute("INSERT INTO event_types (type) VALUES ('PluginTeleported')")  # as its trigger records it
    conn.close()
    events = query(one, "SELECT count(*) FROM events")
    for args in (("status",), ("audit", "verify"), ("scan",), ("run", "--base-url", "http://127.0.0.1:9")):
        refused = overnight(*args, one, key=KEY)
        assert (refused.exit_code, refused.stderr) == (1, (
            f"error: {one / '.overnight' / 'overnight.db'} was written by a newer version of overnight: it holds "
            "events of types this version does not know (PluginTeleported); upgrade overnight (`pip install -U "
            "overnight`) to open it\n")), args
    assert query(one, "SELECT count(*) FROM events") == events
