"""The transition table drives the Machine, the projection and replay checks."""

from __future__ import annotations

import pytest
from transitions import MachineError

from statemachine import catalog as c
from statemachine.lifecycle import BY_TAG, TRANSITIONS, Lifecycle, State, next_state
from statemachine.workspace import open_log
from events import ProjectionError


def test_every_plugin_event_type_belongs_to_exactly_one_transition():
    tags = [t.tag for t in TRANSITIONS]
    assert len(tags) == len(set(tags))
    plugin_types = {cls for cls in c.EVENT_TYPES if cls.__struct_config__.tag in BY_TAG}
    assert plugin_types == {t.event for t in TRANSITIONS}
    assert len({t.trigger for t in TRANSITIONS}) == len(TRANSITIONS)


def test_every_state_is_reachable_from_new():
    reached, frontier = {State.NEW}, [State.NEW]
    while frontier:
        state = frontier.pop()
        for t in TRANSITIONS:
            if state in t.sources and t.dest not in reached:
                reached.add(t.dest)
                frontier.append(t.dest)
    assert reached == set(State)


def test_next_state_follows_the_table_and_refuses_the_rest():
    assert next_state("new", "PluginDiscovered") == State.DISCOVERED
    assert next_state("planning", "RequestFailed") == State.RETRYING
    with pytest.raises(ProjectionError, match="illegal transition: PlanReceived"):
        next_state("analyzed", "PlanReceived")
    with pytest.raises(ProjectionError, match="not a plugin lifecycle event"):
        next_state("analyzed", "RunStarted")


def _discovered(pid="plugins/x/p"):
    return c.PluginDiscovered(plugin_id=pid, name="p", category="x", path=pid, listed=True,
                              skill_name="p")


def test_machine_records_legal_transitions_and_refuses_illegal_ones(tmp_path):
    with open_log(tmp_path, tmp_path / "log.db") as store:
        lifecycle = Lifecycle(store)
        cursor = lifecycle.cursor("plugins/x/p")
        lifecycle.record(cursor, _discovered())
        lifecycle.record(cursor, c.PluginAnalyzed(content_hash="h1", facts=c.PluginFacts()))
        with pytest.raises(MachineError):
            lifecycle.record(cursor, c.PlanReceived(
                run_id="r", request_id="q", usage=c.Usage(),
                plan=c.Plan(gaps=[], quality_before=1, quality_after=2, sections_to_add=[],
                            bundled_files=[], trigger_phrases=[], allowed_tools=[])))
        assert cursor.state == "analyzed"
        assert store.query("SELECT count(*) FROM events") == [(2,)]
        lifecycle.release(cursor)
        again = lifecycle.cursor("plugins/x/p")  # state and version come from the projection
        assert (again.state, again.version) == ("analyzed", 2)
        assert store.verify() == []


def test_a_failed_append_leaves_the_machine_state_unchanged(tmp_path):
    with open_log(tmp_path, tmp_path / "log.db") as store:
        lifecycle = Lifecycle(store)
        cursor = lifecycle.cursor("plugins/x/p")
        lifecycle.record(cursor, _discovered())
        stale = lifecycle.cursor("plugins/x/p")
        lifecycle.record(cursor, c.PluginInvalid(reason="bad"))
        from events import StreamConflict
        with pytest.raises(StreamConflict):
            lifecycle.record(stale, c.PluginAnalyzed(content_hash="h", facts=c.PluginFacts()))
        assert stale.state == "discovered"
        assert store.query("SELECT state FROM plugins") == [("invalid",)]


def test_plugin_details_show_the_latest_of_each_step_since_the_plugin_was_discovered(tmp_path):
    import msgspec
    from statemachine.lifecycle import plugin_stream
    from tests.bench.synthetic import plugin_pass

    pid = "plugins/tools/p"
    trip = plugin_pass(pid, "run-1", 1)
    columns = ("facts", "plan", "draft", "feedback", "validated", "intent")

    def details(store):
        found = store.query(f"SELECT {', '.join(columns)} FROM plugin_details WHERE plugin_id = ?", (pid,))
        return {k: v if v is None or k == "draft" else msgspec.json.decode(v) for k, v in zip(columns, found[0])}

    def as_json(value):
        return msgspec.json.decode(msgspec.json.encode(value))

    with open_log(tmp_path, tmp_path / "log.db") as store:
        stream = plugin_stream(pid)
        store.append(stream, trip[:9])  # ... SkillReceived, SkillGateFailed
        seen = details(store)
        assert seen["facts"] == as_json(trip[1].facts)
        assert seen["plan"] == as_json(trip[5].plan)
        assert seen["draft"] == trip[7].draft_sha256
        assert seen["feedback"] == trip[8].reasons
        assert seen["validated"] is None and seen["intent"] is None

        store.append(stream, trip[9:])  # ... through PluginDone
        seen = details(store)
        assert seen["draft"] == trip[10].draft_sha256
        assert seen["validated"] == as_json(trip[11].files)
        assert seen["intent"] == {"writes": as_json(trip[13].writes), "moves": []}

        # Discovered again (the plugin changed): nothing from the earlier cycle shows.
        again = plugin_pass(pid, "run-2", 2)
        store.append(stream, again[:2])
        seen = details(store)
        assert seen["facts"] == as_json(again[1].facts)
        assert [seen[k] for k in columns[1:]] == [None] * 5

        # Gate feedback belongs to the plan it was given under: a new plan clears it.
        store.append(stream, again[2:9])
        assert details(store)["feedback"] == again[8].reasons
        store.append(stream, [
            c.SkillRequested(run_id="run-2", request_id="s", model="m", attempt=1, est_input_tokens=1),
            c.RequestFailed(run_id="run-2", request_id="s", step="plan", kind="server", message="500"),
            c.PlanRequested(run_id="run-2", request_id="r", model="m", attempt=3, est_input_tokens=1),
            c.PlanReceived(run_id="run-2", request_id="r", plan=again[5].plan, usage=again[5].usage),
        ])
        assert details(store)["feedback"] is None
        assert store.verify() == []


def test_a_log_from_before_the_plugin_details_view_opens_and_verifies(tmp_path):
    """Earlier versions kept plugin_details as a projection table; opening such a log for
    writing drops the table, makes the view, and the log still verifies."""
    from events import EventStore, Projection
    from statemachine.lifecycle import plugin_stream
    from statemachine.projections import PROJECTIONS
    from statemachine.workspace import REGISTRY
    from tests.bench.synthetic import plugin_pass

    old_details = Projection(name="plugin_details", columns=(("plugin_id", "TEXT"), ("facts", "TEXT")),
                             key_len=1, handles=frozenset({"PluginDiscovered"}),
                             key=lambda rec: (rec.event.plugin_id,),
                             fold=lambda row, rec: {"plugin_id": rec.event.plugin_id, "facts": None})
    db = tmp_path / "log.db"
    with EventStore.open(db, registry=REGISTRY, projections=PROJECTIONS + (old_details,)) as store:
        store.append(plugin_stream("plugins/a/p"), plugin_pass("plugins/a/p", "run-1", 1))
        assert store.query("SELECT type FROM sqlite_schema WHERE name = 'plugin_details'") == [("table",)]
    with open_log(tmp_path, db) as store:
        assert store.query("SELECT type FROM sqlite_schema WHERE name = 'plugin_details'") == [("view",)]
        assert store.query("SELECT count(*) FROM plugin_details WHERE plan IS NOT NULL") == [(1,)]
        assert store.verify() == []


def test_the_event_types_the_plugin_details_view_reads_have_no_older_schema():
    """The view reads stored payloads with json_extract, not through the upcasters: a new
    schema version of one of these types must come with a change to the view."""
    read_by_view = (c.PluginDiscovered, c.PluginAnalyzed, c.PlanReceived, c.SkillReceived,
                    c.SkillGateFailed, c.SkillValidated, c.WriteIntended)
    for cls in read_by_view:
        assert cls.schema_version == 1, f"{cls.__name__} changed: update the plugin_details view"
        assert not [k for k in c.UPCASTERS if k[0] == cls.__struct_config__.tag]


def test_a_run_finished_logged_before_by_other_runs_existed_reads_as_none_by_other_runs():
    old = b'{"type":"RunFinished","run_id":"r1","outcome":"complete","counts":{"done":2}}'
    event = c.REGISTRY.decode("RunFinished", 1, old)
    assert (event.counts, event.by_other_runs) == ({"done": 2}, {})


@pytest.mark.parametrize("status, outcome", [(400, "refused"), (404, "refused"), (500, "error"), (None, "error")])
def test_a_last_failure_an_older_overnight_recorded_without_its_kind_settles_the_ledger_by_its_status(
        tmp_path, status, outcome):
    """An older overnight's PluginFailed had a status code but no kind: a refused request (a
    400) counted in the ledger as an error, and `estimate` took it for a retry of Gemini's."""
    with open_log(tmp_path, tmp_path / "log.db") as store:
        lifecycle = Lifecycle(store)
        cursor = lifecycle.cursor("plugins/x/p")
        lifecycle.record(cursor, _discovered())
        lifecycle.record(cursor, c.PluginAnalyzed(content_hash="h1", facts=c.PluginFacts()))
        lifecycle.record(cursor, c.PlanRequested(run_id="r", request_id="q", model="m", attempt=1,
                                                 est_input_tokens=10))
        lifecycle.record(cursor, c.PluginFailed(run_id="r", step="plan", reason="refused", request_id="q",
                                                status_code=status))
        assert store.query("SELECT outcome FROM quota_ledger") == [(outcome,)]
        assert store.verify() == []
