"""The event store on real SQLite files: append, conflicts, chain, projections, replay, lock."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import ClassVar

import apsw
import msgspec
import pytest

from events import (
    Event,
    EventStore,
    Projection,
    ProjectionError,
    Registry,
    StoreLocked,
    StreamConflict,
    UndecodableEvent,
)
from events.chain import chain_hash


class Opened(Event, frozen=True, tag="Opened"):
    owner: str


class Deposited(Event, frozen=True, tag="Deposited"):
    amount: int


class Closed(Event, frozen=True, tag="Closed"):
    pass


def _fold_account(row, rec):
    ev = rec.event
    if isinstance(ev, Opened):
        if row is not None:
            raise ProjectionError("account opened twice")
        return {"account": rec.stream, "owner": ev.owner, "balance": 0, "open": 1}
    if row is None or not row["open"]:
        raise ProjectionError(f"{rec.type} on an account that is not open")
    if isinstance(ev, Deposited):
        return dict(row, balance=row["balance"] + ev.amount)
    return dict(row, open=0)


ACCOUNTS = Projection(
    name="accounts",
    columns=(("account", "TEXT"), ("owner", "TEXT"), ("balance", "INTEGER"), ("open", "INTEGER")),
    key_len=1,
    handles=frozenset({"Opened", "Deposited", "Closed"}),
    key=lambda rec: (rec.stream,),
    fold=_fold_account,
)
REGISTRY = Registry([Opened, Deposited, Closed])


def open_store(path, **kw):
    return EventStore.open(path, registry=REGISTRY, projections=[ACCOUNTS], **kw)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "log.db"


def test_append_projects_in_the_same_transaction_and_replay_matches(db):
    with open_store(db) as store:
        store.append("acct-1", [Opened(owner="ann"), Deposited(amount=5)])
        store.append("acct-1", Deposited(amount=7), expected_version=2)
        store.append("acct-2", Opened(owner="bob"), expected_version=0)
        assert store.query("SELECT account, balance FROM accounts ORDER BY account") == [
            ("acct-1", 12), ("acct-2", 0)]
        assert [r.seq for r in store.read()] == [1, 2, 3, 4]
        assert [r.version for r in store.read(stream="acct-1")] == [1, 2, 3]
        report = store.replay()
        assert report.ok and report.events == 4 and report.rows == {"accounts": 2}
        assert store.verify() == []


def test_payload_is_queryable_json_in_the_sqlite_shell_sense(db):
    with open_store(db) as store:
        store.append("acct-1", [Opened(owner="ann"), Deposited(amount=5)])
        assert store.query("SELECT json_extract(data, '$.amount') FROM events WHERE type = 'Deposited'") == [(5,)]


def test_conflicting_append_fails_and_changes_nothing(db):
    with open_store(db) as store:
        store.append("acct-1", Opened(owner="ann"))
        with pytest.raises(StreamConflict):
            store.append("acct-1", Deposited(amount=1), expected_version=0)
        assert store.last_seq == 1
        store.append("acct-1", Deposited(amount=1), expected_version=1)
        assert store.verify() == []


def test_projection_refusal_rolls_back_the_append(db):
    with open_store(db) as store:
        with pytest.raises(ProjectionError):
            store.append("acct-9", Deposited(amount=1))
        assert store.query("SELECT count(*) FROM events") == [(0,)]
        store.append("acct-9", Opened(owner="x"))  # head was restored: seq 1 again
        assert [r.seq for r in store.read()] == [1]
        assert store.verify() == []


def test_batch_is_all_or_nothing(db):
    with open_store(db) as store:
        with pytest.raises(RuntimeError):
            with store.batch():
                store.append("acct-1", Opened(owner="ann"))
                raise RuntimeError("boom")
        assert store.last_seq == 0
        assert store.query("SELECT count(*) FROM accounts") == [(0,)]


def test_events_table_refuses_update_and_delete(db):
    with open_store(db) as store:
        store.append("acct-1", Opened(owner="ann"))
    conn = apsw.Connection(str(db))
    with pytest.raises(apsw.ConstraintError):
        conn.execute("UPDATE events SET data = data WHERE seq = 1")
    with pytest.raises(apsw.ConstraintError):
        conn.execute("DELETE FROM events")


def _tamper(db, sql, *params):
    """What an attacker with the sqlite3 shell can do: drop the guard triggers, then edit."""
    conn = apsw.Connection(str(db))
    conn.execute("DROP TRIGGER IF EXISTS events_no_update; DROP TRIGGER IF EXISTS events_no_delete")
    conn.execute(sql, params)
    conn.close()


def _three_accounts(db):
    with open_store(db) as store:
        for i in range(3):
            store.append(f"acct-{i}", [Opened(owner=f"o{i}"), Deposited(amount=10 + i)])


def test_changed_byte_is_named_by_seq(db):
    _three_accounts(db)
    _tamper(db, "UPDATE events SET data = replace(data, '11', '91') WHERE seq = 4")
    with open_store(db, writer=False) as store:
        problems = store.verify()
    assert any(p.startswith("seq 4: hash mismatch") for p in problems), problems
    assert any("projection accounts differs" in p for p in problems)


def test_rehashed_forgery_breaks_the_chain_at_the_next_seq(db):
    _three_accounts(db)
    conn = apsw.Connection(str(db))
    seq, stream, version, type_, sv, at, data, prev = conn.execute(
        "SELECT seq, stream, version, type, schema_version, at, data, prev_hash FROM events WHERE seq = 2"
    ).fetchone()
    conn.close()
    forged = data.replace("10", "99")
    _tamper(db, "UPDATE events SET data = ?, hash = ? WHERE seq = 2", forged,
            chain_hash(prev, seq, stream, version, type_, sv, at, forged))
    with open_store(db, writer=False) as store:
        problems = store.verify()
    assert "seq 3: hash chain broken (prev_hash does not match seq 2)" in problems


def test_deleted_event_is_named(db):
    _three_accounts(db)
    _tamper(db, "DELETE FROM events WHERE seq = 3")
    with open_store(db, writer=False) as store:
        problems = store.verify()
    assert "seq 3: missing from the log (deleted events)" in problems


def test_edited_projection_is_reported_and_replay_apply_repairs_it(db):
    _three_accounts(db)
    conn = apsw.Connection(str(db))
    conn.execute("UPDATE accounts SET balance = 1000 WHERE account = 'acct-1'")
    conn.close()
    with open_store(db) as store:
        report = store.replay()
        assert not report.ok and report.differences == {"accounts": 1}
        assert "'acct-1'" in report.problems[0]
        store.replay(apply=True)
        assert store.query("SELECT balance FROM accounts WHERE account = 'acct-1'") == [(11,)]
        assert store.verify() == []


def test_illegal_transition_in_the_log_is_reported(db):
    """An event the projection refuses, slipped in with a valid hash, is still caught."""
    _three_accounts(db)
    conn = apsw.Connection(str(db))
    seq, prev = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    data = '{"type":"Deposited","amount":1}'
    at = "2026-01-01T00:00:00.000000Z"
    conn.execute(
        "INSERT INTO events VALUES (?, 'acct-7', 1, 'Deposited', 1, ?, ?, ?, ?)",
        (seq + 1, at, data, prev, chain_hash(prev, seq + 1, "acct-7", 1, "Deposited", 1, at, data)),
    )
    conn.close()
    with open_store(db, writer=False) as store:
        problems = store.verify()
    assert problems == [f"seq {seq + 1} (acct-7): Deposited on an account that is not open"]


def test_undecodable_payload_is_reported(db):
    _three_accounts(db)
    _tamper(db, "UPDATE events SET data = '{\"type\":\"Deposited\",\"amount\":\"lots\"}' WHERE seq = 2")
    with open_store(db, writer=False) as store:
        problems = store.verify()
    assert any(p.startswith("seq 2: undecodable payload") for p in problems), problems


def test_tampered_blob_is_reported(db):
    with open_store(db) as store:
        digest = store.put_blob(b"snapshot bytes")
        assert store.get_blob(digest) == b"snapshot bytes"
        assert store.has_blob(digest)
    conn = apsw.Connection(str(db))
    conn.execute("UPDATE blobs SET data = ? WHERE hash = ?", (b"snapshot bytez", digest))
    conn.close()
    with open_store(db, writer=False) as store:
        assert store.verify() == [f"blob {digest}: content does not match its hash"]


# --------------------------------------------------------------------- upcasting

class PriceSetV1(Event, frozen=True, tag="PriceSet"):
    cents: int


class PriceSet(Event, frozen=True, tag="PriceSet"):
    """v3: v2 renamed cents -> amount and added currency; v3 made amount a string."""

    schema_version: ClassVar[int] = 3
    amount: str
    currency: str


def test_upcasters_lift_old_payloads_step_by_step(db):
    with EventStore.open(db, registry=Registry([PriceSetV1])) as store:
        store.append("p", PriceSetV1(cents=250))
    upcasters = {
        ("PriceSet", 1): lambda d: {"amount": d["cents"], "currency": "EUR"},
        ("PriceSet", 2): lambda d: {**d, "amount": f"{d['amount'] / 100:.2f}"},
    }
    with EventStore.open(db, registry=Registry([PriceSet], upcasters)) as store:
        store.append("p", PriceSet(amount="3.10", currency="USD"))
        events = [r.event for r in store.read()]
        assert events == [PriceSet(amount="2.50", currency="EUR"), PriceSet(amount="3.10", currency="USD")]
        assert [r.schema_version for r in store.read()] == [1, 3]
        assert store.verify() == []


def test_missing_upcaster_and_newer_version_are_undecodable(db):
    with EventStore.open(db, registry=Registry([PriceSetV1])) as store:
        store.append("p", PriceSetV1(cents=1))
    with EventStore.open(db, registry=Registry([PriceSet]), writer=False) as store:
        with pytest.raises(UndecodableEvent, match="no upcaster for PriceSet v1"):
            list(store.read())
    registry = Registry([PriceSetV1])
    with pytest.raises(UndecodableEvent, match="newer than this program knows"):
        registry.decode("PriceSet", 3, msgspec.json.encode({"type": "PriceSet", "cents": 1}))
    # an event type a newer version added is named as one (older versions called it only "unknown")
    with pytest.raises(UndecodableEvent, match=r"^unknown event type 'PriceDropped' \(written by a newer version"):
        registry.decode("PriceDropped", 1, msgspec.json.encode({"type": "PriceDropped"}))


# ---------------------------------------------------------------- single writer

def test_second_writer_in_another_process_is_refused_clearly(db, tmp_path):
    with open_store(db) as store:
        store.append("acct-1", Opened(owner="ann"))
        script = textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {str(tmp_path)!r})
            from events import EventStore, Registry, StoreLocked
            try:
                EventStore.open({str(db)!r}, registry=Registry([]))
            except StoreLocked as e:
                print("LOCKED", e)
        """)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        assert out.stdout.startswith("LOCKED ")
        assert "in use by another overnight process" in out.stdout
        store.append("acct-1", Deposited(amount=1))  # the first writer is unharmed
    with open_store(db) as store:  # the lock is released on close
        assert store.verify() == []


def test_second_writer_in_the_same_process_is_refused(db):
    with open_store(db):
        with pytest.raises(StoreLocked):
            open_store(db)


def test_lock_is_released_when_the_holder_is_killed(db):
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from events import EventStore, Registry
            s = EventStore.open({str(db)!r}, registry=Registry([]))
            print("ready", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLocked, match=f"pid {proc.pid}"):
            open_store(db)
    finally:
        proc.kill()
        proc.wait()
    with open_store(db) as store:
        assert store.verify() == []


def test_reader_needs_an_existing_log(tmp_path):
    from events import EventStoreError
    with pytest.raises(EventStoreError, match="no event log at"):
        open_store(tmp_path / "absent.db", writer=False)


def test_changed_projection_version_is_rebuilt_from_the_log_on_open(db):
    _three_accounts(db)
    v2 = Projection(**{**{f: getattr(ACCOUNTS, f) for f in
                          ("name", "columns", "key_len", "handles", "key", "fold")},
                       "version": 2})
    with EventStore.open(db, registry=REGISTRY, projections=[v2]) as store:
        assert store.query("SELECT count(*) FROM accounts") == [(3,)]
        assert store.query("SELECT version FROM projection_versions WHERE name = 'accounts'") == [(2,)]
        assert store.verify() == []


def test_large_logs_check_the_chain_in_a_second_process_with_the_same_findings(db):
    _three_accounts(db)
    _tamper(db, "UPDATE events SET data = replace(data, '11', '91') WHERE seq = 4")
    _tamper(db, "DELETE FROM events WHERE seq = 2")
    with open_store(db, writer=False) as store:
        inline = store.replay(parallel_threshold=10**9).problems
        parallel = store.replay(parallel_threshold=0).problems
    assert parallel == inline
    assert "seq 2: missing from the log (deleted events)" in parallel
    assert "seq 4: hash mismatch (the stored event was altered)" in parallel


def test_a_reader_rebuilds_projections_of_another_version_in_memory_and_a_writer_in_the_log(db):
    """Right after an upgrade, the first command is often `status`: readers refused a log whose
    tables the previous version built, until a writing command had run."""
    _three_accounts(db)  # deposits of 10, 11 and 12

    def doubling(row, rec):  # version 2 of the projection counts every deposit twice
        new = _fold_account(row, rec)
        return dict(new, balance=row["balance"] + 2 * rec.event.amount) if isinstance(rec.event, Deposited) else new

    doubled = Projection(**{**{f: getattr(ACCOUNTS, f) for f in ("name", "columns", "key_len", "handles", "key")},
                            "fold": doubling, "version": 2})
    views = {"rich": "SELECT account FROM accounts WHERE balance > 21"}
    with EventStore.open(db, registry=REGISTRY, projections=[ACCOUNTS], views=views):
        pass  # the stored view, as version 1 made it
    with EventStore.open(db, registry=REGISTRY, projections=[doubled], views=views, writer=False) as store:
        assert store.rebuilt_in_memory == ["accounts"]
        assert store.query("SELECT account, balance FROM accounts ORDER BY account") == [
            ("acct-0", 20), ("acct-1", 22), ("acct-2", 24)]
        assert store.query("SELECT account FROM rich ORDER BY account") == [("acct-1",), ("acct-2",)]
        assert store.verify() == []
        assert store.query("SELECT version FROM main.projection_versions") == [(1,)]  # the log is untouched
    with EventStore.open(db, registry=REGISTRY, projections=[doubled], views=views):
        pass
    with EventStore.open(db, registry=REGISTRY, projections=[doubled], writer=False) as store:
        assert store.rebuilt_in_memory == [] and store.verify() == []
        assert store.query("SELECT balance FROM main.accounts ORDER BY account") == [(20,), (22,), (24,)]


def test_a_reader_during_a_rebuild_sees_the_old_tables_whole_never_empty_ones(db):
    _three_accounts(db)
    seen = []

    def fold(row, rec):  # the rebuild is under way: what does another process's reader see?
        if not seen:
            reader = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
            seen.append(reader.execute("SELECT (SELECT count(*) FROM accounts), "
                                       "(SELECT version FROM projection_versions WHERE name = 'accounts')").fetchone())
            reader.close()
        return _fold_account(row, rec)

    v2 = Projection(**{**{f: getattr(ACCOUNTS, f) for f in ("name", "columns", "key_len", "handles", "key")},
                       "fold": fold, "version": 2})
    with EventStore.open(db, registry=REGISTRY, projections=[v2]) as store:
        assert store.query("SELECT count(*) FROM accounts") == [(3,)]
    assert seen == [(3, 1)]


def test_a_projection_no_longer_defined_is_dropped_and_views_follow_their_definition(db):
    _three_accounts(db)
    summary = {"balances": "SELECT account, balance FROM accounts"}
    with EventStore.open(db, registry=REGISTRY, projections=[ACCOUNTS], views=summary) as store:
        assert store.query("SELECT count(*) FROM balances") == [(3,)]
    richer = {"balances": "SELECT account, balance, owner FROM accounts"}
    with EventStore.open(db, registry=REGISTRY, projections=[ACCOUNTS], views=richer) as store:
        assert store.query("SELECT owner FROM balances ORDER BY account") == [("o0",), ("o1",), ("o2",)]
    # A later version of the program no longer defines `accounts`: its table goes away.
    with EventStore.open(db, registry=REGISTRY, projections=[]) as store:
        assert store.query("SELECT name FROM sqlite_schema WHERE name = 'accounts'") == []
        assert store.query("SELECT name FROM projection_versions") == []
        assert store.verify() == []


def test_timestamps_are_iso_8601_utc_with_microseconds():
    from datetime import datetime, timedelta, timezone
    import random
    from events.store import format_at
    rng = random.Random(7)
    for _ in range(2000):
        moment = datetime(1, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=rng.randrange(315_537_897_599_999_999))
        local = moment.astimezone(timezone(timedelta(minutes=rng.randrange(-720, 720))))
        expected = moment.isoformat(timespec="microseconds").replace("+00:00", "Z")
        assert format_at(moment) == expected
        if moment.year > 1 and moment.year < 9999:
            assert format_at(local) == expected


def test_a_projection_whose_columns_changed_is_rebuilt_even_at_the_same_version(db):
    from events import EventStoreError
    _three_accounts(db)
    wider = Projection(**{**{f: getattr(ACCOUNTS, f) for f in ("name", "key_len", "handles", "key", "version")},
                          "columns": ACCOUNTS.columns + (("note", "TEXT"),),
                          "fold": lambda row, rec: dict(_fold_account(row, rec), note=rec.type)})
    with EventStore.open(db, registry=REGISTRY, projections=[wider], writer=False) as store:
        assert store.query("SELECT note FROM accounts WHERE account = 'acct-0'") == [("Deposited",)]
    with EventStore.open(db, registry=REGISTRY, projections=[wider]) as store:
        assert store.query("SELECT note FROM accounts WHERE account = 'acct-0'") == [("Deposited",)]
        assert store.verify() == []



def test_a_new_log_is_never_left_migrated_without_its_projection_tables(tmp_path, monkeypatch):
    """Killed just after its schema's transaction (the crash test hit it), a new log was
    migrated with no projection tables: every reader refused it as built by another version.
    The derived tables of a new log now come in its schema's transaction."""
    db = tmp_path / "log.db"

    def killed(self, views):
        raise KeyboardInterrupt  # as a kill stops the process right after the schema's commit

    with monkeypatch.context() as m:
        m.setattr(EventStore, "_ensure_projections", killed)
        with pytest.raises(KeyboardInterrupt):
            open_store(db)
    with open_store(db, writer=False) as reader:  # readable as it is, and sound
        assert reader.verify() == []


def test_a_new_log_whose_schema_transaction_is_cut_short_is_left_empty(tmp_path, monkeypatch):
    import events.store

    def killed_midway(conn, projections, views):
        conn.execute(projections[0].create_sql())
        raise KeyboardInterrupt

    db = tmp_path / "log.db"
    with monkeypatch.context() as m:
        m.setattr(events.store, "_create_derived", killed_midway)
        with pytest.raises(KeyboardInterrupt):
            open_store(db)
    conn = apsw.Connection(str(db))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0] == 0
    conn.close()
    open_store(db).close()  # made whole by the next writer
    with open_store(db, writer=False) as reader:
        assert reader.verify() == []
